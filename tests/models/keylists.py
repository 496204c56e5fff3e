"""Published state_dict key lists of the model families (imported as a plain module: pytest puts
this folder on sys.path because tests/models has no __init__.py).

The lists live in the project's test data (tests/data/<family>/); a missing list is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import reparam.models as models

_TESTS = Path(__file__).resolve().parent.parent


def key_list(family: str, model: str, naming: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(key, shape), ...] of `<model>.<naming>-keys.json`, in the listed order."""
    path = _TESTS / "data" / family / f"{model}.{naming}-keys.json"
    assert path.is_file(), f"missing test data: {path}"
    data = json.loads(path.read_text())
    assert data["model"] == model
    return [(k, tuple(s)) for k, s in data["keys"]]


def meta_state_shapes(name: str, **overrides) -> dict[str, tuple[int, ...]]:
    """The registered model's state_dict shapes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = models.create(name, **overrides)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def marked_state_dict(keys: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Tensor i filled with i + 1 (int64 for num_batches_tracked): a test can tell where each went."""
    return {k: torch.full(s, i + 1, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
            for i, (k, s) in enumerate(keys)}


def randomize_batchnorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random running statistics and affine parameters in every BatchNorm (a fresh BN hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model
