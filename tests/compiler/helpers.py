"""Building blocks for compiler tests: randomized BatchNorms and structural counts."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from reparam.passes.cleanup import RESTORED_IN_PLACE

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


SUM_TARGETS = (operator.add, torch.add, "add", "add_")


def n_sums(gm) -> int:
    """Tensor sums left, out of place or in place (`fuse` writes a sum into a fresh addend)."""
    return sum(t in SUM_TARGETS for t in call_targets(gm))


_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_, F.relu_}


def in_place_nodes(gm, restored: bool = False) -> list[str]:
    """Nodes that update a value in place (any spelling). Updates `fuse` put back in place after
    fusion, writing into a fresh value nothing else reads, count only with `restored=True`."""
    out = []
    for node in gm.graph.nodes:
        if node.meta.get(RESTORED_IN_PLACE) and not restored:
            continue
        if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("__"):
            out.append(node.name)
        elif node.op == "call_function" and (node.target in _IN_PLACE_FUNCTIONS or node.kwargs.get("inplace")):
            out.append(node.name)
        elif node.op == "call_module" and getattr(gm.get_submodule(node.target), "inplace", False):
            out.append(node.name)
    return out


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


def fuse64(model: nn.Module, *inputs) -> torch.fx.GraphModule:
    """`reparam.fuse` in float64, checked: nothing linear unexplained, and the same outputs as the
    model to 1e-12 on the example inputs and on fresh ones."""
    import reparam
    from reparam.measure import unaccounted_linear_ops

    model = model.double().eval()
    fused = reparam.fuse(model, inputs if len(inputs) > 1 else inputs[0])
    assert unaccounted_linear_ops(fused) == []
    for x in (inputs, tuple(torch.randn_like(t) for t in inputs)):
        assert_same(model, fused, *x, rel=1e-12)
    return fused
