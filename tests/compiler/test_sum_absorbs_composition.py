"""A composition refused for its cost alone is taken by a sum it joins at no extra cost.

A 1x1 conv before a kxk average pool costs more multiply-accumulates as one dense kxk conv than as
its two parts, so on its own it stays apart. Summed with a dense kxk branch of the same geometry
(Diverse Branch Block), the composed kxk adds nothing to the kxk it merges into: the whole block
becomes one conv. The sum judges this on geometry alone and computes the composed weights only for
a branch it takes; where no sum takes it (FastViT's ConvFFN: depthwise 7x7 -> BN -> dense 1x1),
nothing is composed and the refusal stands in the report.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import affine

from .helpers import assert_same, call_targets, conv_bn, modules_of, n_bns, n_convs, rbn


def named_conv_bn(ci, co, k, stride=1, groups=1) -> nn.Sequential:
    """The DBB authors' `conv_bn`: a Sequential with children named `conv` and `bn`."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(ci, co, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", rbn(co))
    return seq


class AuthorsDBB(nn.Module):
    """Diverse Branch Block laid out as its authors' repository lays it out (Sequential branches
    built with `add_module`, `out += branch(x)`), in the exactly fusible form: no BatchNorm between
    the 1x1 conv and the padded kxk conv / average pool."""

    def __init__(self, ci, co, k=3, stride=1, groups=1):
        super().__init__()
        self.dbb_origin = named_conv_bn(ci, co, k, stride, groups)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_module("conv", nn.Conv2d(ci, co, 1, groups=groups, bias=False))
        self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, k // 2))  # counts padding: 1/k^2 taps
        self.dbb_avg.add_module("avgbn", rbn(co))
        self.dbb_1x1 = named_conv_bn(ci, co, 1, stride, groups)
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("idconv1", nn.Conv2d(ci, ci, 1, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(ci, co, k, stride, k // 2, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", rbn(co))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


def fused64(model, shape, seed=0):
    model = model.double().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, reparam.fuse(model, x), x


def pools(fused) -> int:
    return len(modules_of(fused, (nn.AvgPool2d,))) + sum("avg_pool" in str(t) for t in call_targets(fused))


def refusals_naming(fused, *members):
    return [r for r in fused.report.refusals if set(members) <= set(r.where.split(", "))]


@pytest.mark.parametrize("ci,co,k,stride,groups", [(8, 8, 3, 1, 1), (8, 12, 3, 2, 2), (8, 8, 5, 2, 4)])
def test_authors_dbb_fuses_to_one_conv(ci, co, k, stride, groups):
    torch.manual_seed(ci * co + k + stride + groups)
    model, fused, x = fused64(AuthorsDBB(ci, co, k, stride, groups), (2, ci, 11, 9))
    assert_same(model, fused, x, rel=1e-12)
    assert n_convs(fused) == 1 and n_bns(fused) == 0 and pools(fused) == 0
    (conv,) = modules_of(fused, (nn.Conv2d,))
    assert conv.kernel_size == (k, k) and conv.groups == groups and conv.stride == (stride, stride)
    assert conv.padding == (k // 2, k // 2)
    assert not fused.report.refusals, fused.report.refusals
    (region,) = fused.report.regions  # the 1x1 conv behind the pool is among what the conv replaces
    assert {"dbb_origin.conv", "dbb_avg.conv", "dbb_avg.avg", "dbb_avg.avgbn",
            "dbb_1x1_kxk.idconv1"} <= set(region.members)


def test_authors_dbb_float32_end_to_end():
    torch.manual_seed(5)
    model = AuthorsDBB(16, 16, 3, 2, 2).eval()
    x = torch.randn(1, 16, 14, 14)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def avg_branch(c: int, groups: int = 1) -> nn.Sequential:
    # No bias before the pool: a bias would be averaged over fewer taps at the border.
    return nn.Sequential(nn.Conv2d(c, c, 1, groups=groups, bias=False), nn.AvgPool2d(3, 1, 1), rbn(c))


class PoolBesideOneByOne(nn.Module):
    """The 1x1 -> average-pool branch summed with an identity and a 1x1 branch: no kxk to join."""

    def __init__(self, c: int):
        super().__init__()
        self.one = conv_bn(c, c, 1)
        self.avg = avg_branch(c)

    def forward(self, x):
        out = x + self.one(x)
        out += self.avg(x)
        return F.relu(out)


def test_without_a_kxk_to_join_the_composition_stays_refused_and_reported():
    torch.manual_seed(3)
    model, fused, x = fused64(PoolBesideOneByOne(8), (2, 8, 9, 9))
    assert_same(model, fused, x, rel=1e-12)
    refused = refusals_naming(fused, "avg.0", "avg.1")
    assert refused and "not cheaper" in refused[0].reason and "MACs" in refused[0].reason
    # The 1x1 conv stays; the pool (folded with its BatchNorm) stays a depthwise op of its own.
    assert n_bns(fused) == 0
    assert not [m for m in modules_of(fused, (nn.Conv2d,)) if m.kernel_size == (3, 3) and m.groups == 1]


class GroupedKxKWithDensePool(nn.Module):
    """A grouped 3x3 beside a dense 1x1 -> pool: joining would make the grouped 3x3 dense."""

    def __init__(self, c: int):
        super().__init__()
        self.dense = conv_bn(c, c, 3, groups=2)
        self.one = conv_bn(c, c, 1, groups=2)
        self.avg = avg_branch(c)

    def forward(self, x):
        return F.relu(self.dense(x) + self.one(x) + self.avg(x))


def test_a_join_that_would_change_the_groups_is_not_free_and_stays_refused():
    torch.manual_seed(2)
    model, fused, x = fused64(GroupedKxKWithDensePool(8), (2, 8, 9, 9))
    assert_same(model, fused, x, rel=1e-12)
    refused = refusals_naming(fused, "avg.0", "avg.1")
    assert refused and "not cheaper" in refused[0].reason
    assert n_convs(fused) >= 2
    convs = modules_of(fused, (nn.Conv2d,))
    assert any(m.kernel_size == (3, 3) and m.groups == 2 for m in convs)  # the grouped 3x3 stays grouped
    assert not [m for m in convs if m.kernel_size == (3, 3) and m.groups == 1]


class ConvFFN(nn.Module):
    """FastViT's ConvFFN: depthwise 7x7 conv + BN -> dense 1x1 -> GELU -> dense 1x1, in a residual."""

    def __init__(self, c: int, ratio: int = 4):
        super().__init__()
        self.conv = conv_bn(c, c, 7, groups=c)
        self.fc1 = nn.Conv2d(c, c * ratio, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(c * ratio, c, 1)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.conv(x))))


def test_convffn_stays_two_convs_and_never_computes_the_dense_7x7(monkeypatch):
    composed = []
    compose = affine.compose

    def recording(after, before):
        result = compose(after, before)
        composed.append(result)
        return result

    monkeypatch.setattr(affine, "compose", recording)
    torch.manual_seed(4)
    model, fused, x = fused64(ConvFFN(8), (2, 8, 10, 10))
    assert_same(model, fused, x, rel=1e-12)
    convs = modules_of(fused, (nn.Conv2d,))
    dw = [m for m in convs if m.kernel_size == (7, 7)]
    assert len(dw) == 1 and dw[0].groups == 8  # the 7x7 stays depthwise, its BN folded in
    assert [m.kernel_size for m in convs].count((1, 1)) == 2 and n_bns(fused) == 0
    assert refusals_naming(fused, "conv.0", "conv.1", "fc1")
    # Refused compositions are judged on geometry stubs: no dense 7x7 was ever computed.
    assert not [op for op in composed if op.kernel_size == (7, 7) and op.groups == 1]


class ConvFFNBesideDense7x7(nn.Module):
    """The rule is general: depthwise 7x7 -> BN -> dense 1x1 beside a dense 7x7 joins it for free."""

    def __init__(self, c: int):
        super().__init__()
        self.large = conv_bn(c, c, 7)
        self.dw = conv_bn(c, c, 7, groups=c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.large(x) + self.pw(self.dw(x))


def test_a_depthwise_then_pointwise_chain_joins_a_dense_kernel_of_its_geometry():
    torch.manual_seed(6)
    model, fused, x = fused64(ConvFFNBesideDense7x7(8), (2, 8, 10, 10))
    assert_same(model, fused, x, rel=1e-12)
    (conv,) = modules_of(fused, (nn.Conv2d,))
    assert conv.kernel_size == (7, 7) and conv.groups == 1
    assert not fused.report.refusals, fused.report.refusals


def test_a_pool_branch_whose_source_is_read_elsewhere_stays_apart():
    """The 1x1 conv's output is also returned: it cannot disappear into the sum."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = conv_bn(8, 8, 3)
            self.pre = nn.Conv2d(8, 8, 1, bias=False)
            self.pool = nn.AvgPool2d(3, 1, 1)

        def forward(self, x):
            y = self.pre(x)
            return self.dense(x) + self.pool(y), y

    torch.manual_seed(7)
    model = Shared().double().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    with torch.no_grad():
        for a, b in zip(fused(x), model(x)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert n_convs(fused) == 2  # the 1x1 and the 3x3 with the pool folded in


class PoolBranchWithLayerScale(nn.Module):
    """Per-channel maps after the pool (a BatchNorm, then a layer scale) keep the recipe alive."""

    def __init__(self, c: int):
        super().__init__()
        self.dense = conv_bn(c, c, 3)
        self.avg = avg_branch(c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return F.relu(self.dense(x) - self.gamma * self.avg(x))


def test_per_channel_maps_after_the_refused_step_still_join_the_sum():
    torch.manual_seed(8)
    model, fused, x = fused64(PoolBranchWithLayerScale(8), (2, 8, 9, 9))
    assert_same(model, fused, x, rel=1e-12)
    (conv,) = modules_of(fused, (nn.Conv2d,))
    assert conv.kernel_size == (3, 3) and conv.groups == 1
    assert n_bns(fused) == 0 and pools(fused) == 0
    assert not fused.report.refusals, fused.report.refusals
