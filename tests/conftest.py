"""Shared test configuration.

Hypothesis profiles, selected with pytest's `--hypothesis-profile NAME` (pyproject's addopts picks
`ci`; nothing here changes hypothesis settings at import):
  ci        fast enough for every CI run
  thorough  5,000 examples per property, for release checks

Reference data (published key lists, seeded reference weights and logits) lives in tests/data
and is read with tests/models/reference_data.py; every test runs from a fresh clone.
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



def pytest_configure(config):
    # Under pytest-xdist (`-n auto`) every core already runs a worker: one intra-op thread each
    # keeps them from oversubscribing the machine.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DATA = REPO_ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """tests/data: one folder per model family (see its README)."""
    return REFERENCE_DATA


@pytest.fixture(scope="session")
def fastvit_fixtures() -> Path:
    """tests/data/fastvit: the FastViT key lists and seeded references."""
    return REFERENCE_DATA / "fastvit"
