"""Building blocks for compiler tests: randomized BatchNorms and structural counts."""

from __future__ import annotations

import torch
from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_FOR = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_FOR = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def randomize_bn(bn: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random running statistics and affine parameters: a fresh BN (mean 0, var 1) hides bugs."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(c, generator=generator) * 2 - 1)
        bn.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
        if bn.affine:
            bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.bias.copy_(torch.rand(c, generator=generator) * 2 - 1)
    return bn


def rbn(c: int, nd: int = 2) -> nn.Module:
    return randomize_bn(BN_FOR[nd](c))


def conv_bn(ci: int, co: int, k, stride=1, padding=None, groups=1, dilation=1, nd: int = 2) -> nn.Sequential:
    """Conv (no bias) + randomized BatchNorm, the training form of a reparameterizable branch."""
    if padding is None:
        ks = (k,) * nd if isinstance(k, int) else k
        padding = tuple(dilation * (kk - 1) // 2 for kk in ks)
    conv = CONV_FOR[nd](ci, co, k, stride, padding, dilation=dilation, groups=groups, bias=False)
    return nn.Sequential(conv, rbn(co, nd))


def modules_of(gm: nn.Module, types) -> list[nn.Module]:
    """Modules of `types` that the fused graph actually calls."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, types):
                out.append(m)
    return out


def n_convs(gm) -> int:
    return len(modules_of(gm, CONV_TYPES))


def n_bns(gm) -> int:
    return len(modules_of(gm, BN_TYPES))


def call_targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def assert_close_float32(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Fuse `model` in float32 end to end and compare outputs with float32 tolerances; returns it."""
    import reparam

    fused = reparam.fuse(model.eval(), x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    return fused


def assert_same(model: nn.Module, fused: nn.Module, *inputs, rel: float = 1e-9) -> float:
    """Outputs equal in float64 to a relative `rel`; returns the max abs difference."""
    model = model.eval()
    with torch.no_grad():
        ref = model(*inputs)
        out = fused(*inputs)
    diff = float((ref - out).abs().max())
    scale = float(ref.abs().max())
    assert diff <= rel * scale + 1e-12, f"max diff {diff} vs scale {scale}"
    return diff
