"""A composition refused for its cost alone is taken by a sum it joins for free.

A 1x1 conv before a 3x3 average pool costs more multiply-accumulates as one 3x3 conv than as its
two parts, so on its own it stays apart. Summed with a dense 3x3 branch of the same geometry
(Diverse Branch Block), the composed 3x3 adds nothing to the 3x3 it merges into: the whole block
is one conv. Without a dense 3x3 in the sum, the refusal stands and the report says why.
"""

import torch
import torch.nn.functional as F
from torch import nn

import reparam

from .helpers import assert_same, call_targets, conv_bn, modules_of, n_bns, n_convs, rbn


def avg_branch(c: int) -> nn.Sequential:
    # No bias before the pool: a bias would be averaged over fewer taps at the border.
    return nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.AvgPool2d(3, 1, 1), rbn(c))


class DBBLike(nn.Module):
    """Diverse Branch Block as third-party code writes it: `+=` over a list of branches."""

    def __init__(self, c: int):
        super().__init__()
        self.dense = conv_bn(c, c, 3, padding=1)
        self.branches = nn.ModuleList([conv_bn(c, c, 1), avg_branch(c)])

    def forward(self, x):
        out = self.dense(x)
        for branch in self.branches:
            out += branch(x)
        return F.relu(out)


class NoDenseKxK(nn.Module):
    """The same 1x1 -> average-pool branch, summed with an identity and a 1x1 branch only."""

    def __init__(self, c: int):
        super().__init__()
        self.one = conv_bn(c, c, 1)
        self.avg = avg_branch(c)

    def forward(self, x):
        out = x + self.one(x)
        out += self.avg(x)
        return F.relu(out)


def fused64(model, shape=(2, 8, 9, 9), seed=0):
    torch.manual_seed(seed)
    model = model.double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    return model, reparam.fuse(model, x), x


def pools(fused) -> int:
    return len(modules_of(fused, (nn.AvgPool2d,))) + sum(
        "avg_pool" in str(t) for t in call_targets(fused))


def test_dbb_written_with_inplace_adds_fuses_to_one_conv():
    torch.manual_seed(1)
    model, fused, x = fused64(DBBLike(8))
    assert_same(model, fused, x, rel=1e-12)
    assert n_convs(fused) == 1 and n_bns(fused) == 0 and pools(fused) == 0
    conv = modules_of(fused, (nn.Conv2d,))[0]
    assert conv.kernel_size == (3, 3) and conv.groups == 1 and conv.padding == (1, 1)
    assert not fused.report.refusals
    (region,) = fused.report.regions  # names the 1x1 conv behind the pool among what it replaces
    assert {"dense.0", "branches.0.0", "branches.1.0", "branches.1.1", "branches.1.2"} <= set(region.members)


def test_dbb_like_with_grouped_dense_branch_keeps_the_refusal():
    """A depthwise-free but grouped dense 3x3 (groups=2) would become dense if the composed
    (channel-mixing) branch joined it: not free, so the refusal stands."""
    torch.manual_seed(2)
    model = DBBLike(8)
    model.dense = conv_bn(8, 8, 3, padding=1, groups=2)
    model.branches[0] = conv_bn(8, 8, 1, groups=2)
    model, fused, x = fused64(model)
    assert_same(model, fused, x, rel=1e-12)
    assert any("not cheaper" in r.reason and "branches.1.0" in r.where.split(", ")
               for r in fused.report.refusals)
    assert n_convs(fused) > 1


def test_without_a_dense_kxk_the_composition_stays_refused_by_cost():
    torch.manual_seed(3)
    model, fused, x = fused64(NoDenseKxK(8))
    assert_same(model, fused, x, rel=1e-12)
    refused = [r for r in fused.report.refusals if {"avg.0", "avg.1"} <= set(r.where.split(", "))]
    assert refused and "not cheaper" in refused[0].reason and "MACs" in refused[0].reason
    # The 1x1 conv stays; the pool (folded with its BatchNorm) stays a separate depthwise op.
    assert n_convs(fused) >= 2 and n_bns(fused) == 0
    dense_3x3 = [m for m in modules_of(fused, (nn.Conv2d,)) if m.kernel_size == (3, 3) and m.groups == 1]
    assert not dense_3x3
