"""Minimal reproducers of compiler bugs that the property tests (test_properties.py) found.

1. Order-dependent cost rule for multi-branch sums (ACNet written 3x1 + 1x3 + 3x3, avg-pool +
   1x1 + 3x3): the cost of a sum is now judged when the sum is complete, not per partial sum.
2. Spurious refusal of reflect/replicate/circular sums whose branches differ only in the dilation
   of a 1-tap axis, where dilation has no effect.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _called(gm, types) -> int:
    return sum(isinstance(gm.get_submodule(n.target), types) for n in gm.graph.nodes if n.op == "call_module")


def _random_bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


class OrderedSum(nn.Module):
    """`branches[0](x) + branches[1](x) + branches[2](x)`, in the order given."""

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return out


def _acnet(c: int, order: str) -> OrderedSum:
    """ACNet: 3x3, 3x1 and 1x3 conv+BN branches (letters s, v, h), summed in `order`."""
    make = {
        "s": lambda i: nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), _random_bn(c, i)),
        "v": lambda i: nn.Sequential(nn.Conv2d(c, c, (3, 1), padding=(1, 0), bias=False), _random_bn(c, i)),
        "h": lambda i: nn.Sequential(nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False), _random_bn(c, i)),
    }
    return OrderedSum([make[k](i) for i, k in enumerate(order)])


def _pool_1x1_3x3(c: int, order: str) -> OrderedSum:
    """avg-pool 3x3 (p), 1x1 conv+BN (o) and 3x3 conv+BN (s), summed in `order`."""
    make = {
        "p": lambda i: nn.AvgPool2d(3, 1, 1, count_include_pad=True),
        "o": lambda i: nn.Sequential(nn.Conv2d(c, c, 1, bias=False), _random_bn(c, i)),
        "s": lambda i: nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), _random_bn(c, i)),
    }
    return OrderedSum([make[k](i) for i, k in enumerate(order)])


def _check(model: nn.Module, x: torch.Tensor):
    model = model.double().eval()
    x = x.double()
    fused = reparam.fuse(model, x)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert float((ref - out).abs().max()) <= 1e-9 * float(ref.abs().max()) + 1e-12  # numbers are right
    return fused


@pytest.mark.parametrize("make, good, bad", [(_acnet, "svh", "vhs"), (_pool_1x1_3x3, "spo", "pos")],
                         ids=["acnet_3x1+1x3+3x3", "avgpool+1x1+3x3"])
def test_control_branch_order_that_fuses(make, good, bad):
    """Control: with the biggest kernel first the block collapses into one conv."""
    fused = _check(make(4, good), torch.randn(2, 4, 8, 8))
    assert _called(fused, CONVS) == 1 and _called(fused, BNS) == 0 and not fused.report.refusals


@pytest.mark.parametrize("make, good, bad", [(_acnet, "svh", "vhs"), (_pool_1x1_3x3, "spo", "pos")],
                         ids=["acnet_3x1+1x3+3x3", "avgpool+1x1+3x3"])
def test_branch_order_does_not_change_fusion(make, good, bad):
    """Bug 1: linear_forms._visit_sum combined a multi-branch sum pairwise, left to right, and applied
    the cost rule to every partial sum. 3x1 + 1x3 alone would be a 3x3 (9 MACs per channel pair vs
    3 + 3), avgpool3x3 + dense 1x1 alone a dense 3x3 (9*C*C vs 9*C + C*C): the first partial sum was
    refused and the whole block left unfused, although the complete sum (one 3x3) is cheaper than
    its parts."""
    fused = _check(make(4, bad), torch.randn(2, 4, 8, 8))
    assert _called(fused, CONVS) == 1, f"{_called(fused, CONVS)} convs left; refusals: {fused.report.refusals}"
    assert _called(fused, BNS) == 0


class ThreeReflectBranches(nn.Module):
    """Three identical 1x3 convs with a scalar dilation=2, padding_mode='reflect', + BN, summed."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, (1, 3), padding=(0, 2), dilation=2, bias=False, padding_mode="reflect") for _ in range(3))
        self.bns = nn.ModuleList(_random_bn(c, i) for i in range(3))

    def forward(self, x):
        out = self.bns[0](self.convs[0](x))
        for conv, bn in zip(self.convs[1:], self.bns[1:]):
            out = out + bn(conv(x))
        return out


def test_reflect_sum_ignores_dilation_of_1_tap_axes():
    """Bug 2: affine.add() writes the dilation of 1-tap axes as 1, so the partial sum of the first two
    branches had dilation (1, 2) while the third branch still had (2, 2); sum_refusal() compared raw
    (kernel, padding, dilation) tuples under padding_mode != 'zeros' and refused with "padding_mode=
    'reflect' branches of different geometry cannot share one padding"."""
    fused = _check(ThreeReflectBranches(), torch.randn(2, 4, 6, 6))
    assert not fused.report.refusals, fused.report.refusals
    assert _called(fused, CONVS) == 1 and _called(fused, BNS) == 0


def test_sum_refusal_ignores_dilation_of_1_tap_axes():
    """Bug 2 in the algebra alone: two reflect convs that differ only in the dilation of an axis with
    kernel size 1 (where dilation has no effect) were refused as 'different geometry'."""
    from reparam import affine

    w1, w2 = torch.randn(2, 2, 1, 3, dtype=torch.float64), torch.randn(2, 2, 1, 3, dtype=torch.float64)
    a = affine.from_conv(w1, None, 1, (0, 1), (2, 1), 1, "reflect")
    b = affine.from_conv(w2, None, 1, (0, 1), (1, 1), 1, "reflect")
    assert affine.sum_refusal([a, b]) is None
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert torch.allclose(affine.add([a, b]).apply(x), a.apply(x) + b.apply(x), rtol=1e-12, atol=1e-12)
