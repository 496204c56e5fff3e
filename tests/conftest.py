"""Shared test configuration.

Hypothesis profiles, selected with pytest's `--hypothesis-profile NAME` (pyproject's addopts picks
`ci`; nothing here changes hypothesis settings at import):
  ci        fast enough for every CI run
  thorough  5,000 examples per property, for release checks

Reference fixtures live in `../shared/fixtures` beside the checkout (override with
REPARAM_FIXTURES). Tests that need them skip with a reason when they are missing, except under CI
(the CI variable set), where missing fixtures are an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def fixtures_root() -> Path:
    env = os.environ.get("REPARAM_FIXTURES")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fastvit_fixtures() -> Path:
    """Folder of the FastViT reference fixtures; skips (or fails under CI) when absent."""
    path = fixtures_root() / "fastvit"
    if not (path / "fastvit_t8.ref.safetensors").is_file():
        message = (
            f"FastViT reference fixtures not found at {path}; "
            "set REPARAM_FIXTURES to the folder that holds fastvit/"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
