"""Fixtures of the model-zoo tests; helpers live in fastvit_testlib.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _two_threads():
    """Keep tests comparable to CI's two cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="module")
def _release_cached_models():
    """Models cached by fastvit_testlib.cached_model live for one test module (~0.8 GB for all)."""
    yield
    from fastvit_testlib import clear_model_cache

    clear_model_cache()
