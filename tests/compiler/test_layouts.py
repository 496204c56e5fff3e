"""Norms applied on reshaped views whose channel axis stays whole fold into the neighbouring
Linear: `bn(x.flatten(0, 1)).reshape_as(x)` (BatchNorm1d over batch*tokens), `view_as`,
`view(*shape)`, `reshape(b, n, c)` with sizes from `x.shape`, `unflatten`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops
from reparam.modules import ChannelAffine

from .helpers import assert_same, modules_of, randomize_bn


def bn1d(c):
    return randomize_bn(nn.BatchNorm1d(c))


class LinearNorm(nn.Module):
    """Linear on tokens [B, N, C] then BatchNorm1d over the flattened batch and tokens."""

    def __init__(self, ci, co, spelling):
        super().__init__()
        self.linear = nn.Linear(ci, co, bias=False)
        self.bn = bn1d(co)
        self.spelling = spelling

    def forward(self, x):
        x = self.linear(x)
        if self.spelling == "reshape_as":
            return self.bn(x.flatten(0, 1)).reshape_as(x)
        if self.spelling == "view_as":
            return self.bn(x.flatten(0, 1)).view_as(x)
        if self.spelling == "view_shape":
            shape = x.shape
            return self.bn(x.flatten(0, 1)).view(shape)  # `view(*shape)` cannot be traced by torch.fx
        if self.spelling == "reshape_bnc":
            b, n, c = x.shape
            return self.bn(x.reshape(b * n, c)).reshape(b, n, c)
        if self.spelling == "unflatten":
            b, n = x.shape[0], x.shape[1]
            return self.bn(x.flatten(0, 1)).unflatten(0, (b, n))
        raise ValueError(self.spelling)


SPELLINGS = ["reshape_as", "view_as", "view_shape", "reshape_bnc", "unflatten"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_batchnorm_over_batch_and_tokens_folds_into_the_linear(spelling):
    torch.manual_seed(0)
    model = nn.Sequential(LinearNorm(8, 12, spelling), nn.GELU(), LinearNorm(12, 6, spelling)).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert len(modules_of(fused, (nn.Linear,))) == 2
    assert not modules_of(fused, (nn.BatchNorm1d, ChannelAffine))
    assert not fused.report.refusals
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(3, 7, 8, dtype=torch.float64))  # other batch and token counts


def test_norm_on_a_view_that_splits_channels_is_not_folded():
    """`x.reshape(b, n * 2, c // 2)`: the channel axis does not stay whole, nothing folds."""

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)
            self.bn = bn1d(4)

        def forward(self, x):
            b, n, c = x.shape
            y = self.linear(x).reshape(b * n * 2, c // 2)
            return self.bn(y)

    torch.manual_seed(1)
    model = Split().double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert len(modules_of(fused, (nn.BatchNorm1d,))) + len(
        [m for m in fused.modules() if type(m).__name__ == "ChannelAffine"]) == 1
    assert_same(model, fused, x)


def test_unflatten_module_and_spatial_view():
    """Conv + BN, then `flatten(2)` and `nn.Unflatten`: the BN still folds into the conv."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(6)),
                          nn.Flatten(2), nn.Unflatten(2, (4, 5)), nn.ReLU()).double().eval()
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert len(modules_of(fused, (nn.Conv2d,))) == 1 and not modules_of(fused, (nn.BatchNorm2d,))
    assert_same(model, fused, x)


class ConvNorm1d(nn.Module):
    """A conv, then a BatchNorm1d over its flattened positions with the sizes read from the conv's
    output (`B, C, H, W = y.shape`), then back: the norm folds into the conv. The conv changes the
    channel count, so a size read from its input would be wrong."""

    def __init__(self, spelling, ci=3, co=6):
        super().__init__()
        self.conv = nn.Conv2d(ci, co, 3, padding=1, bias=False)
        self.bn = bn1d(co)
        self.spelling = spelling

    def forward(self, x):
        y = self.conv(x)
        if self.spelling == "flatten_reshape":
            B, C, H, W = y.shape
            return self.bn(y.flatten(2)).reshape(B, C, H, W)
        if self.spelling == "view_minus_one":
            B, C, H, W = y.shape
            return self.bn(y.view(B, C, -1)).view(B, C, H, W)
        if self.spelling == "reshape_shape":
            return self.bn(y.flatten(2)).reshape(y.shape)
        if self.spelling == "size_calls":
            return self.bn(y.flatten(2)).view(y.size(0), y.size(1), y.size(2), y.size(3))
        if self.spelling == "tokens":  # to tokens [B, HW, C], the norm over batch * tokens
            B, C, H, W = y.shape
            t = y.flatten(2).transpose(1, 2)
            return self.bn(t.reshape(B * H * W, C)).reshape(B, H * W, C)
        raise ValueError(self.spelling)


def _folds_exactly(model, x, other, convs=(nn.Conv2d, 1)):
    """`model` fuses with no norm left, `convs` = (type, count) remaining, nothing refused, and the
    same float64 numbers on `x` and on `other` (another batch and spatial size)."""
    model = model.double().eval()
    fused = reparam.fuse(model, x)
    kind, count = convs
    assert len(modules_of(fused, (kind,))) == count
    assert not modules_of(fused, (nn.modules.batchnorm._BatchNorm,))
    assert not modules_of(fused, (ChannelAffine,))
    assert not fused.report.refusals
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)
    assert_same(model, fused, other)
    return fused


@pytest.mark.parametrize("spelling", ["flatten_reshape", "view_minus_one", "reshape_shape", "size_calls", "tokens"])
def test_batchnorm1d_over_a_conv_output_read_for_its_shape_folds_into_the_conv(spelling):
    torch.manual_seed(3)
    _folds_exactly(ConvNorm1d(spelling), torch.randn(2, 3, 5, 4, dtype=torch.float64),
                   torch.randn(3, 3, 6, 7, dtype=torch.float64))


class ReadTwice(nn.Module):
    """Sizes read from the Linear's output before the norm, and from the norm's output after it;
    the first also feeds arithmetic beside the chain (an attention-style `c ** -0.5`)."""

    def __init__(self, ci=8, co=12):
        super().__init__()
        self.linear = nn.Linear(ci, co)
        self.bn = bn1d(co)

    def forward(self, x):
        y = self.linear(x)
        b, n, c = y.shape
        z = self.bn(y.reshape(b * n, c))
        m, c2 = z.shape
        return torch.tanh(z.reshape(b, m // b, c2)) * c ** -0.5


class ConvReadTwice(nn.Module):
    def __init__(self, ci=3, co=6):
        super().__init__()
        self.conv = nn.Conv2d(ci, co, 3, padding=1)
        self.bn = bn1d(co)

    def forward(self, x):
        y = self.conv(x)
        B, C, H, W = y.shape
        z = self.bn(y.view(B, C, H * W))
        _, c2, _ = z.shape
        return z.view(B, c2, H, W)


def test_shape_read_before_and_after_the_norm_linear():
    torch.manual_seed(4)
    _folds_exactly(ReadTwice(), torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(3, 7, 8, dtype=torch.float64),
                   convs=(nn.Linear, 1))


def test_shape_read_before_and_after_the_norm_conv():
    torch.manual_seed(5)
    _folds_exactly(ConvReadTwice(), torch.randn(2, 3, 5, 4, dtype=torch.float64),
                   torch.randn(1, 3, 7, 3, dtype=torch.float64))


@pytest.mark.parametrize("split", ["channel pairs", "half positions"])
def test_sizes_that_split_the_channels(split):
    """`bn(y.reshape(B, C // 2, 2 * H * W))`: each of the norm's channels covers two whole
    channels of the conv (its channels are the leading factor), so it folds with its constants
    repeated. `bn(y.reshape(B, 2 * C, H * W // 2))`: each covers half of a channel's positions,
    which no per-channel map of the conv can do: the norm stays, and the report says why."""

    class SplitChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = bn1d(3 if split == "channel pairs" else 12)

        def forward(self, x):
            y = self.conv(x)
            B, C, H, W = y.shape
            if split == "channel pairs":
                return self.bn(y.reshape(B, C // 2, 2 * H * W)).reshape(B, C, H, W)
            return self.bn(y.reshape(B, 2 * C, H * W // 2)).reshape(B, C, H, W)

    torch.manual_seed(6)
    model = SplitChannels().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert len(modules_of(fused, (nn.Conv2d,))) == 1
    kept = len(modules_of(fused, (nn.BatchNorm1d, ChannelAffine)))
    if split == "channel pairs":
        assert kept == 0 and not fused.report.refusals
    else:
        assert kept == 1
        assert any("splits or merges the channel axis" in r.reason for r in fused.report.refusals), \
            fused.report.refusals
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(3, 3, 6, 2, dtype=torch.float64))


def test_linear_after_a_chain_that_reads_the_first_linears_shape_stays_apart():
    """`b, n, c = y.shape; lin2(bn(y.reshape(b * n, c)).reshape(b, n, c))`: the norm folds into the
    first Linear, but the second cannot join it (the reshapes need the first one's output shape),
    and the report says why."""

    class TwoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.bn, self.linear2 = nn.Linear(8, 12), bn1d(12), nn.Linear(12, 6)

        def forward(self, x):
            y = self.linear1(x)
            b, n, c = y.shape
            return self.linear2(self.bn(y.reshape(b * n, c)).reshape(b, n, c))

    torch.manual_seed(7)
    model = TwoLinears().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert len(modules_of(fused, (nn.Linear,))) == 2
    assert not modules_of(fused, (nn.BatchNorm1d, ChannelAffine))
    assert [r.reason for r in fused.report.refusals] == [
        "the layout change between the two operators reads the shape of the first one's output, which would no "
        "longer be computed"]
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(3, 7, 8, dtype=torch.float64))


def _timm():
    from reparam.optional import MissingExtra, install_command, require

    try:
        return require("timm", "the timm block tests")
    except MissingExtra:
        pytest.skip(f"timm is not installed: {install_command('timm')}")


# Attention blocks that read their input's shape (`B, C, H, W = x.shape`) around conv + BatchNorm
# projections and reshape by those sizes. (EfficientFormerV2's, alike, costs seconds in float64.)
TIMM_BLOCKS = [
    ("levit_conv_128s", lambda m: m.stages[0].blocks[0], (1, 128, 14, 14)),
]


@pytest.mark.parametrize("name,part,shape", TIMM_BLOCKS, ids=[b[0] for b in TIMM_BLOCKS])
def test_timm_attention_blocks_reading_shapes_fold_their_norms(name, part, shape):
    timm = _timm()
    torch.manual_seed(0)
    block = part(timm.create_model(name, pretrained=False))
    for bn in block.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            randomize_bn(bn)
    block = block.double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    fused = reparam.fuse(block, x)
    assert not modules_of(fused, (nn.modules.batchnorm._BatchNorm, ChannelAffine))
    # Every conv + BatchNorm became one conv; nothing else merges (attention sits between them).
    assert len(modules_of(fused, (nn.Conv2d,))) == sum(isinstance(m, nn.Conv2d) for m in block.modules())
    # The attention biases (added to the scores) are the only refusal.
    assert [r.reason for r in fused.report.refusals] == ["the constant varies along several axes: not a per-channel map"]
    assert unaccounted_linear_ops(fused) == []
    assert_same(block, fused, x)
    assert_same(block, fused, torch.randn(2, *shape[1:], dtype=torch.float64))  # another batch size
