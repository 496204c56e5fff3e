"""Sums of many branches are grouped by geometry into the cheapest set of fused convolutions,
whatever the order they are written in (and whatever the spelling: loops over a ModuleList, `+=`)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam import affine

from .helpers import assert_same, conv_bn, modules_of, n_bns, n_convs


class Branches(nn.Module):
    """`out = b0(x); for b in rest: out += b(x)` over a ModuleList, in the order given."""

    def __init__(self, branches, inplace: bool = True):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.inplace = inplace

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            if self.inplace:
                out += b(x)
            else:
                out = out + b(x)
        return out


def kernels_left(fused) -> list[tuple[int, ...]]:
    return sorted(tuple(m.kernel_size) for m in modules_of(fused, (nn.Conv2d,)))


def dw(c, k):
    return conv_bn(c, c, k, groups=c).double()


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_three_depthwise_1x7_and_one_7x1_become_one_of_each(order):
    torch.manual_seed(0)
    c = 16
    branches = [dw(c, (1, 7)), dw(c, (1, 7)), dw(c, (7, 1)), dw(c, (1, 7))]
    model = Branches([branches[i] for i in order]).double().eval()
    x = torch.randn(1, c, 32, 32, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert kernels_left(fused) == [(1, 7), (7, 1)]
    assert n_bns(fused) == 0
    assert_same(model, fused, x)
    # The refusal says what was kept apart and the figures it compared.
    assert any("(1, 7)" not in r.reason and "us" in r.reason and "7x7" in r.reason for r in fused.report.refusals)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 1, 0, 2), (2, 3, 1, 0)])
def test_dense_1x7_and_7x1_branches_stay_two_convolutions(order):
    torch.manual_seed(1)
    c = 8
    branches = [conv_bn(c, c, (1, 7)), conv_bn(c, c, (7, 1)), conv_bn(c, c, (1, 7)), conv_bn(c, c, 1)]
    model = Branches([branches[i] for i in order], inplace=False).double().eval()
    x = torch.randn(1, c, 16, 16, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert kernels_left(fused) == [(1, 7), (7, 1)]  # the 1x1 joins either; no dense 7x7
    assert n_bns(fused) == 0
    assert_same(model, fused, x)
    refusal = [r for r in fused.report.refusals if "not cheaper as one" in r.reason]
    assert len(refusal) == 1 and "MACs" in refusal[0].reason


@pytest.mark.parametrize("order", list(itertools.permutations(range(4)))[::5])
def test_equal_geometry_always_merges_in_any_order(order):
    """ACNet-style 3x3 + 1x3 + 3x1 + BN skip: one 3x3 whatever the order of the sum."""
    torch.manual_seed(2)
    c = 8
    branches = [conv_bn(c, c, 3), conv_bn(c, c, (1, 3)), conv_bn(c, c, (3, 1)), nn.BatchNorm2d(c)]
    from .helpers import randomize_bn
    randomize_bn(branches[3])
    model = Branches([branches[i] for i in order]).double().eval()
    x = torch.randn(2, c, 9, 9, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert kernels_left(fused) == [(3, 3)]
    assert n_bns(fused) == 0 and not fused.report.refusals
    assert_same(model, fused, x)


def test_branches_over_two_sources_group_per_source():
    """`conv(y) + conv(x) + conv(y)`: the two branches over y merge although x's sits between them."""
    torch.manual_seed(3)

    class TwoSources(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv_bn(4, 4, 3), conv_bn(4, 4, 3), conv_bn(4, 4, 1)

        def forward(self, x):
            y = torch.relu(x)
            return self.a(y) + self.b(x) + self.c(y)

    model = TwoSources().double().eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 2 and n_bns(fused) == 0
    assert_same(model, fused, x)


def test_partition_sum_is_independent_of_order():
    ops = [affine.from_conv(torch.randn(8, 1, 1, 7), padding=(0, 3), groups=8) for _ in range(3)]
    ops.append(affine.from_conv(torch.randn(8, 1, 7, 1), padding=(3, 0), groups=8))
    ops.append(affine.per_channel(torch.rand(8), torch.rand(8), 2))
    model = affine.CostModel()

    def cost(op):
        return model.conv(op, 8 * 32 * 32, 32 * 32)

    results = set()
    for perm in itertools.permutations(range(5)):
        blocks, total = affine.partition_sum([ops[i] for i in perm], cost, model.elementwise(8 * 32 * 32))
        results.add((frozenset(frozenset(ops[perm[i]].kernel_size for i in b) for b in blocks), round(total, 6)))
    assert len(results) == 1
    (grouping, _), = results
    assert len(grouping) == 2


# -- property: a reordered sum fuses to the same structure and the same numbers ------------------

@st.composite
def reordered_sums(draw):
    c = draw(st.sampled_from([2, 4, 8]))
    depthwise = draw(st.booleans())
    n = draw(st.integers(2, 6))
    kernels = [draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (1, 5), (5, 1), (5, 5)])) for _ in range(n)]
    bn_skip = draw(st.booleans())
    perm = draw(st.permutations(range(n + bn_skip)))
    size = draw(st.integers(3, 12))
    spelling = draw(st.sampled_from(["inplace", "plus", "torch.add"]))
    return c, depthwise, kernels, bn_skip, perm, size, spelling, draw(st.integers(0, 2**31 - 1))


class Spelled(nn.Module):
    def __init__(self, branches, spelling):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.spelling = spelling

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            if self.spelling == "inplace":
                out += b(x)
            elif self.spelling == "plus":
                out = out + b(x)
            else:
                out = torch.add(out, b(x))
        return out


@given(reordered_sums())
def test_reordered_sums_fuse_alike(case):
    c, depthwise, kernels, bn_skip, perm, size, spelling, seed = case
    torch.manual_seed(seed)
    from .helpers import randomize_bn
    branches = [conv_bn(c, c, k, groups=c if depthwise else 1) for k in kernels]
    if bn_skip:
        branches.append(randomize_bn(nn.BatchNorm2d(c)))
    x = torch.randn(1, c, size, size, dtype=torch.float64)
    written = Spelled(branches, spelling).double().eval()
    reordered = Spelled([branches[i] for i in perm], spelling).double().eval()
    a, b = reparam.fuse(written, x), reparam.fuse(reordered, x)
    assert kernels_left(a) == kernels_left(b)
    assert n_bns(a) == n_bns(b) == 0
    assert n_convs(a) <= len(set(kernels))  # equal geometries always merged
    assert_same(written, a, x)
    assert_same(reordered, b, x)
