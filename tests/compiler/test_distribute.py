"""Per-channel maps across concatenations and channel splits, and sums written with `stack`
(passes/distribute.py), in blocks written as their authors write them.

Each test checks the structure (which operations are gone, how many convs remain, what must stay)
and the numbers in float64; structures that must stay are named in the report."""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops

from .helpers import assert_close_float32, assert_same, call_targets, fuse64, n_bns, n_convs, rbn


def refusals_naming(fused, name: str) -> list[str]:
    return [r.reason for r in fused.report.refusals if name in [w.strip() for w in r.where.split(",")]]


# -- YOLOv5's BottleneckCSP (the same operations as the authors' code) ---------------------------

class Conv(nn.Module):
    """Conv2d without bias, BatchNorm, SiLU."""

    def __init__(self, c1, c2, k=1, s=1, g=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = rbn(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class BottleneckCSP(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = nn.Conv2d(c1, c_, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(c_, c_, 1, 1, bias=False)
        self.cv4 = Conv(2 * c_, c2, 1, 1)
        self.bn = rbn(2 * c_)
        self.act = nn.SiLU()
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


@pytest.mark.parametrize("n", [1, 2])
def test_bottleneck_csp_batchnorm_after_the_cat_folds_into_both_convs(n):
    torch.manual_seed(n)
    fused = fuse64(BottleneckCSP(8, 8, n=n), torch.randn(2, 8, 9, 7, dtype=torch.float64))
    assert n_bns(fused) == 0
    assert n_convs(fused) == 4 + 2 * n  # cv1, cv2, cv3, cv4 and two per bottleneck: none merges
    assert torch.cat in call_targets(fused)
    assert not fused.report.refusals
    regions = [set(r.members) for r in fused.report.regions]
    assert any("cv3" in r for r in regions) and any("cv2" in r for r in regions)


def test_bottleneck_csp_in_float32():
    torch.manual_seed(5)
    model = BottleneckCSP(16, 16, n=1).eval()
    x = torch.randn(2, 16, 12, 12)
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 0 and n_convs(fused) == 6
    assert unaccounted_linear_ops(fused) == []
    y = torch.randn(1, 16, 7, 11)
    with torch.no_grad():
        ref, out = model(y), fused(y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class CatThenMap(nn.Module):
    """Two convs on different inputs, concatenated, then one per-channel map in some spelling."""

    def __init__(self, spelling: str, c=(3, 5)):
        super().__init__()
        self.spelling = spelling
        self.a = nn.Conv2d(4, c[0], 3, padding=1)
        self.b = nn.Conv2d(4, c[1], 1, bias=False)
        total = sum(c)
        self.bn = rbn(total)
        self.gamma = nn.Parameter(torch.rand(total) + 0.5)
        self.beta = nn.Parameter(torch.randn(total))

    def forward(self, x, y):
        z = torch.cat([self.a(x), self.b(y)], dim=1)
        if self.spelling == "module":
            return torch.relu(self.bn(z))
        if self.spelling == "functional":
            return torch.relu(F.batch_norm(z, self.bn.running_mean, self.bn.running_var, self.bn.weight,
                                           self.bn.bias, False, 0.1, self.bn.eps))
        if self.spelling == "affine":  # a channel affine as timm and ConvNeXt code write it
            return torch.relu(z * self.gamma[None, :, None, None] + self.beta.view(1, -1, 1, 1))
        if self.spelling == "layer_scale_after_bn":
            return torch.relu(self.gamma.view(1, -1, 1, 1) * self.bn(z))
        raise ValueError(self.spelling)


@pytest.mark.parametrize("spelling", ["module", "functional", "affine", "layer_scale_after_bn"])
def test_per_channel_map_after_cat_folds_into_each_input(spelling):
    torch.manual_seed(1)
    x, y = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = fuse64(CatThenMap(spelling), x, y)
    assert n_bns(fused) == 0 and n_convs(fused) == 2
    assert F.batch_norm not in call_targets(fused)
    assert not [n for n in fused.graph.nodes if n.op == "call_module" and "ChannelAffine" in
                type(fused.get_submodule(n.target)).__name__]
    assert torch.cat in call_targets(fused)
    assert not {operator.mul, operator.add} & set(call_targets(fused))  # the layer scale and shift too
    assert not fused.report.refusals


class LinearCat(nn.Module):
    """Features of two Linear layers concatenated, then BatchNorm1d (a two-tower head)."""

    def __init__(self):
        super().__init__()
        self.fa, self.fb = nn.Linear(6, 4), nn.Linear(3, 5, bias=False)
        self.bn = rbn(9, nd=1)

    def forward(self, a, b):
        return torch.tanh(self.bn(torch.cat([self.fa(a), self.fb(b)], -1)))


def test_batchnorm1d_after_cat_of_linears_folds_into_both():
    torch.manual_seed(2)
    fused = fuse64(LinearCat(), torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
    assert n_bns(fused) == 0
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 2
    assert not fused.report.refusals


class MapsBeforeCat(nn.Module):
    """The dual: a map on each input of the cat (conv+BN branches) already folds into each conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.Conv2d(4, 5, 1, bias=False)
        self.bn_a, self.bn_b = rbn(3), rbn(5)

    def forward(self, x, y):
        return torch.cat((self.bn_a(self.a(x)), self.bn_b(self.b(y))), 1).relu()


def test_maps_before_cat_fold_into_each_conv():
    torch.manual_seed(3)
    x, y = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = fuse64(MapsBeforeCat(), x, y)
    assert n_bns(fused) == 0 and n_convs(fused) == 2 and not fused.report.refusals


# -- what must stay after a cat ---------------------------------------------------------------

class CatKept(nn.Module):
    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 1)
        self.bn = rbn(8)
        self.a4, self.b4 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn_h = rbn(4)
        self.act = nn.ReLU()

    def forward(self, x, y):
        if self.case == "spatial_cat":  # concatenated along the height: the BN acts on channels
            return self.bn_h(torch.cat([self.a4(x), self.b4(y)], 2))
        if self.case == "source_itself":  # DenseNet-like: the input beside a conv of it
            r = self.act(x)
            return self.bn(torch.cat([r, self.a4(r)], 1))
        a = self.a(x)
        if self.case == "relu_input":
            return self.bn(torch.cat([a, self.act(self.b(y))], 1))
        z = torch.cat([a, self.b(y)], 1)
        if self.case == "cat_returned":
            return self.bn(z), z
        if self.case == "input_read_elsewhere":
            return self.bn(z) + a.sum()
        raise ValueError(self.case)


@pytest.mark.parametrize("case, says", [
    ("relu_input", "ReLU"),
    ("source_itself", "ReLU"),
    ("cat_returned", "also read by output"),
    ("input_read_elsewhere", "also read by"),
    ("spatial_cat", "along axis 1"),
])
def test_map_after_cat_stays_when_an_input_cannot_absorb_it(case, says):
    torch.manual_seed(4)
    x, y = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    model = CatKept(case).double().eval()
    fused = reparam.fuse(model, (x, y))
    assert n_bns(fused) == 1
    bn = "bn_h" if case == "spatial_cat" else "bn"
    reasons = refusals_naming(fused, bn)
    assert reasons and any(says in r for r in reasons), fused.report.refusals
    assert unaccounted_linear_ops(fused) == []
    with torch.no_grad():
        for ref, out in zip(*(torch.utils._pytree.tree_leaves(v) for v in (model(x, y), fused(x, y)))):
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# -- maps on the pieces of a split --------------------------------------------------------------

class Gated(nn.Module):
    """A gated conv block: one conv makes both halves; each half gets its own BatchNorm."""

    def __init__(self, spelling: str, c=6):
        super().__init__()
        self.spelling = spelling
        self.c = c
        self.conv = nn.Conv2d(4, 2 * c, 3, padding=1)
        self.bn1, self.bn2 = rbn(c), rbn(c)

    def forward(self, x):
        y, c = self.conv(x), self.c
        if self.spelling == "chunk_method":
            a, b = y.chunk(2, dim=1)
        elif self.spelling == "torch_chunk":
            a, b = torch.chunk(y, 2, 1)
        elif self.spelling == "split_sizes":
            a, b = torch.split(y, [c, c], dim=1)
        elif self.spelling == "split_method":
            a, b = y.split(c, 1)
        elif self.spelling == "slices":
            a, b = y[:, :c], y[:, c:]
        else:
            raise ValueError(self.spelling)
        return self.bn1(a) * torch.sigmoid(self.bn2(b))


@pytest.mark.parametrize("spelling", ["chunk_method", "torch_chunk", "split_sizes", "split_method", "slices"])
def test_maps_on_chunks_combine_into_the_conv(spelling):
    torch.manual_seed(6)
    fused = fuse64(Gated(spelling), torch.randn(2, 4, 7, 5, dtype=torch.float64))
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    targets = call_targets(fused)
    assert {"chunk", "split", torch.chunk, torch.split, operator.getitem} & set(targets)
    assert not fused.report.refusals


class ThreeWaySplit(nn.Module):
    """Split with sizes; a map on the first and last pieces, none on the middle one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 9, 3, padding=1, bias=False)
        self.bn_a, self.bn_c = rbn(2), rbn(3)
        self.scale = nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)

    def forward(self, x):
        a, b, c = torch.split(self.conv(x), [2, 4, 3], dim=1)
        return torch.cat([torch.relu(self.bn_a(a)), torch.tanh(b), torch.relu(self.bn_c(c) * self.scale)], 1)


def test_split_with_sizes_maps_on_some_pieces():
    torch.manual_seed(7)
    fused = fuse64(ThreeWaySplit(), torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    assert torch.split in call_targets(fused)
    assert operator.mul not in call_targets(fused)  # the scale after bn_c moved too
    assert not fused.report.refusals


class PieceReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1, self.bn2 = rbn(4), rbn(4)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, 1)
        return self.bn1(a) * torch.sigmoid(self.bn2(b)) + torch.relu(a)


def test_piece_read_twice_keeps_its_map():
    torch.manual_seed(8)
    fused = fuse64(PieceReadTwice(), torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert n_bns(fused) == 1 and n_convs(fused) == 1  # bn2 folds, bn1 stays on its piece
    assert [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)][0].num_features == 4
    reasons = refusals_naming(fused, "bn1")
    assert len(reasons) == 1 and "also read by relu" in reasons[0]
    assert not refusals_naming(fused, "bn2")


class SplitValueReadWhole(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.bn1, self.bn2 = rbn(4), rbn(4)

    def forward(self, x):
        y = self.conv(x)
        a, b = y.chunk(2, 1)
        return torch.cat([self.bn1(a), self.bn2(b)], 1).relu() + y


def test_split_value_read_whole_keeps_the_maps():
    torch.manual_seed(9)
    fused = fuse64(SplitValueReadWhole(), torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert n_bns(fused) == 2
    assert any("read whole" in r for r in refusals_naming(fused, "bn1"))


# -- sums written with stack ----------------------------------------------------------------------

class StackedRepVGG(nn.Module):
    """RepVGG / MobileOne branches (3x3 conv+BN, 1x1 conv+BN, BN identity) summed with stack."""

    def __init__(self, spelling: str, c=6):
        super().__init__()
        self.spelling = spelling
        self.branches = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), rbn(c)),
            nn.Sequential(nn.Conv2d(c, c, 1, bias=False), rbn(c)),
            rbn(c),
        ])

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        s = self.spelling
        if s == "sum_method":
            y = torch.stack(outs, dim=0).sum(dim=0)
        elif s == "mean_method":
            y = torch.stack(outs, dim=0).mean(dim=0)
        elif s == "torch_sum_positional":
            y = torch.sum(torch.stack(outs), 0)
        elif s == "torch_mean_keyword":
            y = torch.mean(torch.stack(outs, 0), dim=0, keepdim=False)
        elif s == "last_axis":
            y = torch.stack(outs, dim=-1).sum(-1)
        elif s == "axis_one_tuple":
            y = torch.stack(outs, 1).sum(dim=(1,))
        elif s == "keepdim":
            y = torch.stack(outs, 0).sum(0, keepdim=True)[0]
        elif s == "other_axis":
            y = torch.stack(outs, 0).sum(1)
        else:
            raise ValueError(s)
        return torch.relu(y)


@pytest.mark.parametrize("spelling", ["sum_method", "mean_method", "torch_sum_positional", "torch_mean_keyword",
                                      "last_axis", "axis_one_tuple"])
def test_stacked_branches_fuse_to_one_conv(spelling):
    torch.manual_seed(10)
    fused = fuse64(StackedRepVGG(spelling), torch.randn(2, 6, 7, 7, dtype=torch.float64))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert torch.stack not in call_targets(fused)
    assert not {"sum", "mean", torch.sum, torch.mean} & set(call_targets(fused))
    assert not fused.report.refusals


@pytest.mark.parametrize("spelling, says", [("keepdim", "keepdim=True"), ("other_axis", "not the stacked axis")])
def test_stack_not_summed_over_its_axis_stays(spelling, says):
    torch.manual_seed(11)
    fused = fuse64(StackedRepVGG(spelling), torch.randn(2, 6, 7, 7, dtype=torch.float64))
    assert torch.stack in call_targets(fused)
    assert n_convs(fused) == 2  # each conv+BN branch fuses on its own
    stack = [r for r in fused.report.refusals if "stack" in r.where]
    assert stack and says in stack[0].reason


class StackReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        s = torch.stack([self.a(x), self.b(x)])
        return s.sum(0) + s.amax(0)


def test_stack_read_elsewhere_stays():
    torch.manual_seed(12)
    fused = fuse64(StackReadTwice(), torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert torch.stack in call_targets(fused) and n_convs(fused) == 2
    assert any("also read by" in r.reason for r in fused.report.refusals if "stack" in r.where)


def test_stacked_branches_in_float32():
    torch.manual_seed(13)
    model = StackedRepVGG("mean_method", c=8).eval()
    x = torch.randn(2, 8, 10, 10)
    fused = assert_close_float32(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0


# -- metadata reads are not readers ---------------------------------------------------------------

class CheckedShapes(nn.Module):
    """Shape asserts and shape reads on the values the rewrites move maps across."""

    def __init__(self, c=4):
        super().__init__()
        self.c = c
        self.conv = nn.Conv2d(3, 2 * c, 3, padding=1)
        self.a, self.b = nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1, self.bn2, self.bn = rbn(c), rbn(c), rbn(2 * c)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.shape[1] == 2 * self.c, "channels")
        g, h = y.chunk(2, dim=1)
        g, h = torch.relu(self.bn1(g)), torch.relu(self.bn2(h))
        p, q = self.a(g), self.b(h)
        B, C, H, W = p.shape
        z = torch.cat([p, q], dim=1)
        torch._assert(z.dim() == 4, "rank")
        return torch.relu(self.bn(z)).reshape(B, 2 * C, H * W)


def test_shape_reads_do_not_stop_the_rewrites():
    torch.manual_seed(14)
    fused = fuse64(CheckedShapes(), torch.randn(2, 3, 6, 5, dtype=torch.float64))
    assert n_bns(fused) == 0 and n_convs(fused) == 3
    assert not fused.report.refusals


# -- properties: any channel sizes, any split of them ---------------------------------------------


class SplitThenCat(nn.Module):
    """conv -> split into `sizes` -> a BN on the pieces marked in `mapped` -> a nonlinearity each ->
    one conv per piece -> cat -> one BN over all channels."""

    def __init__(self, sizes, mapped, kernels):
        super().__init__()
        self.sizes = list(sizes)
        total = sum(sizes)
        self.conv = nn.Conv2d(3, total, kernels[0], padding=kernels[0] // 2, bias=False)
        self.piece_bns = nn.ModuleList([rbn(c) if m else nn.Identity() for c, m in zip(sizes, mapped)])
        self.convs = nn.ModuleList([nn.Conv2d(c, c + 1, k, padding=k // 2, bias=bool(i % 2))
                                    for i, (c, k) in enumerate(zip(sizes, kernels[1:]))])
        self.bn = rbn(total + len(sizes))

    def forward(self, x):
        pieces = torch.split(self.conv(x), self.sizes, dim=1)
        outs = [conv(torch.tanh(bn(pieces[i]))) for i, (bn, conv) in enumerate(zip(self.piece_bns, self.convs))]
        return self.bn(torch.cat(outs, dim=1))


@given(st.lists(st.integers(1, 4), min_size=2, max_size=3).flatmap(lambda sizes: st.tuples(
    st.just(sizes), st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)),
    st.lists(st.sampled_from([1, 3]), min_size=len(sizes) + 1, max_size=len(sizes) + 1))))
def test_split_and_cat_maps_fold_for_any_sizes(case):
    sizes, mapped, kernels = case
    note(f"sizes={sizes} mapped={mapped} kernels={kernels}")
    torch.manual_seed(len(sizes))
    fused = fuse64(SplitThenCat(sizes, mapped, kernels), torch.randn(1, 3, 5, 4, dtype=torch.float64))
    assert n_bns(fused) == 0 and n_convs(fused) == 1 + len(sizes)
    assert not fused.report.refusals


class OverlappingSlices(nn.Module):
    """Channel slices of one conv: 0:4 with a BatchNorm, 2:6 without (they overlap), 6:8 with one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.bn, self.bn_tail = rbn(4), rbn(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y[:, :4]).relu() + y[:, 2:6].tanh() + self.bn_tail(y[:, 6:]).mean((1, 2, 3), keepdim=True)


def test_overlapping_slice_keeps_the_map_it_would_change():
    torch.manual_seed(15)
    fused = fuse64(OverlappingSlices(), torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert n_bns(fused) == 1 and n_convs(fused) == 1  # bn stays, bn_tail folds into the conv
    reasons = refusals_naming(fused, "bn")
    assert len(reasons) == 1 and "channels 2:6" in reasons[0]
    assert not refusals_naming(fused, "bn_tail")


class InceptionHead(nn.Module):
    """Two 1x1 convs of one input concatenated, then a BatchNorm: one conv with the map in it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(6, 3, 1, bias=False), nn.Conv2d(6, 5, 1)
        self.bn = rbn(8)

    def forward(self, x):
        return torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))


def test_cat_of_one_source_still_becomes_one_conv():
    torch.manual_seed(16)
    fused = fuse64(InceptionHead(), torch.randn(2, 6, 5, 5, dtype=torch.float64))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert torch.cat not in call_targets(fused)
    assert not fused.report.refusals


# -- identities between the concatenation and its map; tensor_split and unbind ------------------

class CatThroughIdentities(nn.Module):
    """`bn(dropout(cat(...)))`, `bn(cat(...).contiguous())`, an nn.Identity in between."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.drop, self.ident = nn.Dropout(0.2), nn.Identity()
        self.bn = rbn(6)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        if self.how == "dropout":
            y = self.drop(y)
        elif self.how == "functional_dropout":
            y = F.dropout(y, 0.1, self.training)
        elif self.how == "contiguous":
            y = y.contiguous()
        else:
            y = self.ident(self.drop(y))
        return torch.relu(self.bn(y))


@pytest.mark.parametrize("how", ["dropout", "functional_dropout", "contiguous", "identity_and_dropout"])
def test_map_after_identities_after_a_cat_folds_into_each_input(how):
    torch.manual_seed(21)
    fused = fuse64(CatThroughIdentities(how), torch.randn(2, 3, 6, 5, dtype=torch.float64))
    assert n_bns(fused) == 0 and n_convs(fused) == 2  # the 3x3 and the 1x1 stay apart (cheaper)
    assert torch.cat in call_targets(fused)
    assert not [r for r in fused.report.refusals if "bn" in r.where.split(", ")]


class CatIdentityReadTwice(CatThroughIdentities):
    def forward(self, x):
        y = self.drop(torch.cat([self.a(x), self.b(x)], 1))
        return torch.relu(self.bn(y)) + y


def test_map_after_an_identity_read_twice_stays_with_a_reason():
    torch.manual_seed(22)
    fused = fuse64(CatIdentityReadTwice("dropout"), torch.randn(1, 3, 5, 5, dtype=torch.float64))
    assert n_bns(fused) == 1
    assert any("also read by" in r for r in refusals_naming(fused, "bn"))


class TensorSplitGate(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 7, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = rbn(4), rbn(3)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "sections":
            a, b = torch.tensor_split(y, 2, dim=1)  # 4 and 3 channels
        else:
            a, b = y.tensor_split([4], 1)
        return torch.relu(self.bn_a(a)).sum(1, keepdim=True) * torch.sigmoid(self.bn_b(b))


@pytest.mark.parametrize("how", ["sections", "indices"])
def test_maps_on_tensor_split_pieces_combine_into_the_conv(how):
    torch.manual_seed(23)
    fused = fuse64(TensorSplitGate(how), torch.randn(2, 3, 5, 6, dtype=torch.float64))
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    assert not fused.report.refusals


class UnbindScales(nn.Module):
    """`r, g, b = conv(x).unbind(1)` with a scale on some pieces: scalars move before the unbind as
    a map along the channels; a scale along the rows of a piece cannot."""

    def __init__(self, per_row: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)
        self.w = nn.Parameter(torch.rand(6, 1) + 0.5) if per_row else None

    def forward(self, x):
        r, g, b = self.conv(x).unbind(1)
        if self.w is not None:
            r = r * self.w
        return torch.tanh(r * 0.125) + torch.tanh(g) + torch.tanh(-b)


def test_scalar_maps_on_unbind_pieces_move_before_the_unbind():
    torch.manual_seed(24)
    fused = fuse64(UnbindScales(False), torch.randn(2, 4, 6, 5, dtype=torch.float64))
    targets = call_targets(fused)
    assert operator.mul not in targets and operator.neg not in targets and "unbind" in targets
    assert n_convs(fused) == 1 and not fused.report.refusals


def test_maps_along_another_axis_of_unbind_pieces_stay_with_a_reason():
    torch.manual_seed(25)
    fused = fuse64(UnbindScales(True), torch.randn(2, 4, 6, 5, dtype=torch.float64))
    assert any("unbind removes axis" in r.reason for r in fused.report.refusals), fused.report.refusals
