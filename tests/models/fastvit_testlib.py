"""Helpers shared by the model-zoo tests (imported as a plain module: pytest puts this folder on
sys.path because tests/models has no __init__.py)."""

from __future__ import annotations

import torch
from torch import nn

import reparam.models as models
from reparam.models.fastvit.blocks import LayerScale2d

ALL_VARIANTS = [
    "fastvit_t8", "fastvit_t12", "fastvit_s12", "fastvit_sa12", "fastvit_sa24", "fastvit_sa36",
    "fastvit_ma36", "fastvit_mci0", "fastvit_mci1", "fastvit_mci2",
]
APPLE_VARIANTS = ALL_VARIANTS[:7]  # the original release has no MobileCLIP towers
SMALL_VARIANTS = {"fastvit_t8", "fastvit_t12", "fastvit_s12", "fastvit_sa12", "fastvit_mci0"}

# Parameter counts of the fused reference models (DESIGN.md section 5), in millions.
REFERENCE_FUSED_PARAMS_M = {
    "fastvit_t8": 4.00, "fastvit_t12": 7.51, "fastvit_s12": 9.43, "fastvit_sa12": 11.55,
    "fastvit_sa24": 21.50, "fastvit_sa36": 31.46, "fastvit_ma36": 43.98,
}


def marked_state_dict(keys: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """A state_dict with the given keys and shapes where tensor i is filled with the value i + 1
    (int64 for BatchNorm's num_batches_tracked), so a test can tell where every value went.
    Filling is a memset: cheap even for the largest variants."""
    out = {}
    for i, (key, shape) in enumerate(keys):
        dtype = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        out[key] = torch.full(shape, i + 1, dtype=dtype)
    return out


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters and every layer scale
    a value in [0.5, 1.5): with fresh BatchNorms (identity) and tiny layer scales (1e-5) a wrong
    fusion would hide behind near-zero branches."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            elif isinstance(m, LayerScale2d):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) + 0.5)
    return model


_MODELS: dict[str, nn.Module] = {}


def cached_model(variant: str, *, take: bool = False) -> nn.Module:
    """One model per variant shared by the tests of one module (building the big ones takes about
    a second); conftest.py empties the cache after each test module. A test that changes the
    model's weights passes take=True: it gets the cached model (or a new one) and the cache
    forgets it."""
    model = _MODELS.pop(variant, None) if take else _MODELS.get(variant)
    if model is None:
        torch.manual_seed(0)
        model = models.create(variant)
        if not take:
            _MODELS[variant] = model
    return model


def clear_model_cache() -> None:
    _MODELS.clear()


def train_briefly(model: nn.Module, steps: int = 3, size: int = 64, batch: int = 4,
                  num_classes: int = 10, seed: int = 0) -> list[float]:
    """A few Adam steps on a fixed random batch in train mode; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def expected_fused_convs(model: nn.Module) -> int:
    """Convolutions a complete fusion leaves: one per MobileOne block with conv branches (RepMixer's
    mixer and norm collapse into one), one per large-kernel conv, three per ConvFFN (depthwise 7x7,
    fc1, fc2), one per RepCPE, two per squeeze-excitation."""
    from reparam.models.fastvit import blocks

    n = 0
    for m in model.modules():
        if isinstance(m, blocks.MobileOneBlock) and len(m.conv_kxk):
            n += 1
        elif isinstance(m, (blocks.ReparamLargeKernelConv, blocks.RepCPE)):
            n += 1
        elif isinstance(m, blocks.ConvMlp):
            n += 3
        elif isinstance(m, blocks.SqueezeExcite):
            n += 2
    return n
