"""No silent misses: every pair of adjacent linear operations left in a fused graph is explained
by the report (a refusal naming one of them), across the structure families."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops

from .helpers import assert_same, conv_bn, n_bns, n_convs, randomize_bn, rbn


class RepVGG(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.kxk, self.one, self.skip = conv_bn(c, c, 3), conv_bn(c, c, 1), rbn(c)

    def forward(self, x):
        return F.relu(self.kxk(x) + self.one(x) + self.skip(x))


class MobileOne(nn.Module):
    def __init__(self, c, k=3):
        super().__init__()
        self.scale = conv_bn(c, c, 1, groups=c)
        self.convs = nn.ModuleList([conv_bn(c, c, k, groups=c) for _ in range(3)])
        self.skip = rbn(c)

    def forward(self, x):
        out = self.scale(x) + self.skip(x)
        for conv in self.convs:
            out += conv(x)
        return F.relu(out)


class RepMixer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.mixer = rbn(c), conv_bn(c, c, 3, groups=c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1))

    def forward(self, x):
        return x + self.gamma * (self.mixer(x) - self.norm(x))


class BNBeforePadded(nn.Module):
    """Refused: a BN shift before a zero-padded conv."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = rbn(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


class DwThenDense(nn.Module):
    """Refused by cost: depthwise 7x7 + BN then a dense expanding 1x1."""

    def __init__(self, c):
        super().__init__()
        self.dw, self.pw = conv_bn(c, c, 7, groups=c), nn.Conv2d(c, 4 * c, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class AsymmetricPair(nn.Module):
    """Refused by cost: dense 1x7 + 7x1 kept as two convolutions."""

    def __init__(self, c):
        super().__init__()
        self.h, self.v = conv_bn(c, c, (1, 7)), conv_bn(c, c, (7, 1))

    def forward(self, x):
        return self.h(x) + self.v(x)


class TokenNorm(nn.Module):
    """Linear + BatchNorm1d over batch*tokens, then a Linear: everything folds."""

    def __init__(self, c):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(c, c), randomize_bn(nn.BatchNorm1d(c)), nn.Linear(c, c)

    def forward(self, x):
        y = self.a(x)
        return F.gelu(self.b(self.bn(y.flatten(0, 1)).reshape_as(y)))


class Pooled(nn.Module):
    """DBB-style: 3x3 + avg-pool branches, layer scale."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv_bn(c, c, 3)
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), rbn(c))
        self.ls = nn.Parameter(torch.rand(c, 1, 1))

    def forward(self, x):
        return F.relu(self.ls * (self.conv(x) + self.pool(x)))


FAMILIES = [
    (RepVGG, (1, 8, 8, 8)), (MobileOne, (1, 8, 8, 8)), (RepMixer, (1, 8, 8, 8)),
    (BNBeforePadded, (1, 8, 8, 8)), (DwThenDense, (1, 8, 24, 24)), (AsymmetricPair, (1, 8, 16, 16)),
    (TokenNorm, (2, 5, 8)), (Pooled, (1, 8, 8, 8)),
]


@pytest.mark.parametrize("family,shape", FAMILIES, ids=[f.__name__ for f, _ in FAMILIES])
def test_every_linear_op_left_is_accounted_for(family, shape):
    torch.manual_seed(0)
    model = family(shape[-1] if family is TokenNorm else shape[1]).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)


def test_the_helper_finds_a_silent_miss():
    """With the report's refusals removed, the kept pairs show up."""
    torch.manual_seed(1)
    model = BNBeforePadded(4).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    fused.report.refusals.clear()
    assert unaccounted_linear_ops(fused) == ["bn -> conv"]


# --------------------------------------------------------------------------------------------
# Blocks written the way third-party models write them
# --------------------------------------------------------------------------------------------

def grid_reverse(windows, grid_size, img_size, channels=None):
    """A grid partition undone, as MaxViT-style models write it: the channel count read from the
    windows' shape (or given), then view / permute / contiguous / view."""
    h, w = img_size
    c = windows.shape[-1] if channels is None else channels
    x = windows.view(-1, h // grid_size[0], w // grid_size[1], grid_size[0], grid_size[1], c)
    return x.permute(0, 3, 1, 4, 2, 5).contiguous().view(-1, h, w, c)


class GridAttentionTail(nn.Module):
    """Attention projection -> grid reverse -> layer scale -> residual, channels last. The layer
    scale folds into the projection across the reverse (its `contiguous()` copy replayed after the
    fused Linear); a read of the windows' shape is served by the replayed first view."""

    def __init__(self, c, shape_read):
        super().__init__()
        self.c, self.shape_read = c, shape_read
        self.proj = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        b, h, w, c = x.shape
        windows = torch.tanh(x.reshape(-1, 4, c))  # stands for the attention
        y = self.proj(windows).view(-1, 2, 2, c)
        y = grid_reverse(y, (2, 2), (h, w), None if self.shape_read else self.c)
        return x + y * self.gamma


class FourierPosition(nn.Module):
    """EdgeNeXt-style positional encoding: computed from `arange` and the input's shape only, so
    its arithmetic (`2 * (d // 2) / dim`) is no operation on data; then a 1x1 projection."""

    def __init__(self, c, hidden=8):
        super().__init__()
        self.hidden = hidden
        self.proj = nn.Conv2d(2 * hidden, c, 1)
        self.dw = conv_bn(c, c, 3, groups=c)

    def forward(self, x):
        b, _, h, w = x.shape
        ys = torch.arange(1, h + 1, dtype=x.dtype).view(1, h, 1).expand(b, h, w) / (h + 1e-6)
        xs = torch.arange(1, w + 1, dtype=x.dtype).view(1, 1, w).expand(b, h, w) / (w + 1e-6)
        d = torch.arange(self.hidden, dtype=x.dtype)
        d = 10000 ** (2 * torch.div(d, 2, rounding_mode="floor") / self.hidden)
        pos = torch.cat(((ys[..., None] / d).sin(), (xs[..., None] / d).cos()), dim=3).permute(0, 3, 1, 2)
        y = self.dw(x)
        return F.gelu(y + self.proj(pos))


class CatThenNorm(nn.Module):
    """YOLO's BottleneckCSP: `bn(cat(cv3(...), cv2(x)))`; with `other` the second input is a
    nonlinearity, so the norm stays after the concatenation (and the report says why)."""

    def __init__(self, c, other=False):
        super().__init__()
        self.other = other
        self.cv2, self.cv3 = nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, 1, bias=False)
        self.bn = rbn(2 * c)

    def forward(self, x):
        a = self.cv3(F.silu(x))
        b = torch.tanh(x) if self.other else self.cv2(x)
        return F.silu(self.bn(torch.cat((a, b), 1)))


class GatedSplit(nn.Module):
    """A gated block: `a, b = conv(x).chunk(2, 1)`, a norm on each piece; with `overlap` the norm
    reads channels that another slice reads without it, so it stays on its piece."""

    def __init__(self, c, overlap=False):
        super().__init__()
        self.c, self.overlap = c, overlap
        self.conv, self.bn1, self.bn2 = nn.Conv2d(c, 2 * c, 3, padding=1), rbn(c + 2 if overlap else c), rbn(c)

    def forward(self, x):
        y = self.conv(x)
        if self.overlap:
            a, b = y[:, : self.c + 2], y[:, self.c:]
        else:
            a, b = y.chunk(2, 1)
        return self.bn1(a)[:, : self.c] * torch.sigmoid(self.bn2(b) if not self.overlap else b)


THIRD_PARTY = [
    ("grid_tail_shape_read", lambda: GridAttentionTail(8, True), (1, 4, 4, 8), None),
    ("grid_tail_contiguous", lambda: GridAttentionTail(8, False), (1, 4, 4, 8), None),
    ("fourier_position", lambda: FourierPosition(8), (1, 8, 6, 6), None),
    ("cat_then_norm", lambda: CatThenNorm(4), (1, 4, 6, 6), None),
    ("cat_then_norm_refused", lambda: CatThenNorm(4, other=True), (1, 4, 6, 6), "concatenation"),
    ("gated_split", lambda: GatedSplit(4), (1, 4, 6, 6), None),
    ("gated_split_refused", lambda: GatedSplit(4, overlap=True), (1, 4, 6, 6), "kept on its piece"),
]


@pytest.mark.parametrize("build,shape,refusal", [t[1:] for t in THIRD_PARTY], ids=[t[0] for t in THIRD_PARTY])
def test_third_party_spellings_are_accounted_for(build, shape, refusal):
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert unaccounted_linear_ops(fused) == []
    reasons = [r.reason for r in fused.report.refusals]
    if refusal is None:
        assert reasons == []
    else:
        assert any(refusal in r for r in reasons), reasons
        fused.report.refusals.clear()  # without its refusal, the pair left is a silent miss
        assert unaccounted_linear_ops(fused) != []
    assert_same(model, fused, x)


def test_layer_scale_folds_into_the_projection_across_a_grid_reverse():
    torch.manual_seed(0)
    model = GridAttentionTail(8, False).double().eval()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    targets = [n.target for n in fused.graph.nodes]
    assert operator.mul not in targets and "contiguous" in targets  # the copy stays, replayed
    assert [type(m) for m in fused.modules() if isinstance(m, nn.Linear)] == [nn.Linear]
    assert_same(model, fused, x)


def test_fused_away_structures_leave_nothing_to_account_for():
    """The maps across a concatenation and a split fold into the convs; the position code stays."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    for model, convs in ((CatThenNorm(4).double().eval(), 2), (GatedSplit(4).double().eval(), 1)):
        fused = reparam.fuse(model, x)
        assert n_bns(fused) == 0 and n_convs(fused) == convs and unaccounted_linear_ops(fused) == []
        assert_same(model, fused, x)
    model, x = FourierPosition(8).double().eval(), x.new_zeros(1, 8, 6, 6).normal_()
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 0 and n_convs(fused) == 2  # dw conv+BN fused; the projection of the code kept
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)


def test_the_helper_finds_a_sum_left_unexplained():
    """Two branches over one value kept as two convolutions: without its refusal, a silent miss."""
    torch.manual_seed(2)
    model = AsymmetricPair(8).double().eval()
    x = torch.randn(1, 8, 16, 16, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert unaccounted_linear_ops(fused) == []
    fused.report.refusals.clear()
    missing = unaccounted_linear_ops(fused)
    assert len(missing) == 1 and " + " in missing[0], missing


class _Refused(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre, self.bn, self.conv = conv_bn(c, c, 1), rbn(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(self.bn(torch.tanh(self.pre(x)))))


class UntraceableTop(nn.Module):
    """Python control flow on a tensor value in the model's own forward: its children are fused
    one by one, and their graphs are accounted for under their paths."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = _Refused(c), nn.Sequential(conv_bn(c, c, 3), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.b(self.a(x))
        return self.a(x)


def test_an_untraceable_model_is_accounted_for_inside_its_children():
    torch.manual_seed(3)
    model = UntraceableTop(4).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64).abs()
    fused = reparam.fuse(model, x)
    assert not isinstance(fused, torch.fx.GraphModule)
    assert unaccounted_linear_ops(fused) == []
    fused.report.refusals.clear()
    assert unaccounted_linear_ops(fused) == ["a.bn -> a.conv"]
    assert_same(model, fused, x)


class StridedThenBranches(nn.Module):
    """GhostNetV3-style: a strided depthwise conv whose output feeds two 1x1 branches that merge
    into one conv, its shape also read further on: it stays apart, and the report says why."""

    def __init__(self, c):
        super().__init__()
        self.dw = conv_bn(c, c, 3, stride=2, groups=c)
        self.a, self.b = conv_bn(c, c // 2, 1), conv_bn(c, c // 2, 1)

    def forward(self, x):
        y = self.dw(x)
        out = F.relu(self.a(y) + self.b(y))
        return out.reshape(y.shape[0], -1)


def test_a_value_read_by_merged_branches_and_by_a_shape_read_is_explained():
    torch.manual_seed(0)
    model = StridedThenBranches(8).double().eval()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 2 and n_bns(fused) == 0  # dw + BN, and the two branches as one 1x1
    assert unaccounted_linear_ops(fused) == []
    assert any("reads its shape" in r.reason for r in fused.report.refusals)
    fused.report.refusals.clear()
    assert len(unaccounted_linear_ops(fused)) == 1
    assert_same(model, fused, x)
