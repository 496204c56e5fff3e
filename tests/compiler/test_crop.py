"""Spatial crops are part of the algebra (passes/crop.py): a convolution that reads no padding of a
cropped tensor is the same convolution with its padding reduced by the crop. ACNet's crop layer
(branches with less padding than half their kernel) fuses into one kxk convolution."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam import affine
from reparam.measure import unaccounted_linear_ops
from reparam.passes.crop import crop_border

from .helpers import assert_same, modules_of, n_bns, n_convs, rbn


class CropLayer(nn.Module):
    """ACNet's crop layer, as published: `crop_set = (-rows, -cols)`."""

    def __init__(self, crop_set):
        super().__init__()
        self.rows_to_crop = -crop_set[0]
        self.cols_to_crop = -crop_set[1]

    def forward(self, input):
        if self.rows_to_crop == 0 and self.cols_to_crop == 0:
            return input
        elif self.rows_to_crop > 0 and self.cols_to_crop == 0:
            return input[:, :, self.rows_to_crop:-self.rows_to_crop, :]
        elif self.rows_to_crop == 0 and self.cols_to_crop > 0:
            return input[:, :, :, self.cols_to_crop:-self.cols_to_crop]
        else:
            return input[:, :, self.rows_to_crop:-self.rows_to_crop, self.cols_to_crop:-self.cols_to_crop]


class ACBlockCrop(nn.Module):
    """ACNet's asymmetric block with padding 0: the 3x1 and 1x3 branches read cropped inputs."""

    def __init__(self, c, k=3, stride=1):
        super().__init__()
        self.square_conv = nn.Conv2d(c, c, k, stride, 0, bias=False)
        self.square_bn = rbn(c)
        self.ver_conv_crop_layer = CropLayer((0, -(k // 2)))
        self.hor_conv_crop_layer = CropLayer((-(k // 2), 0))
        self.ver_conv = nn.Conv2d(c, c, (k, 1), stride, 0, bias=False)
        self.hor_conv = nn.Conv2d(c, c, (1, k), stride, 0, bias=False)
        self.ver_bn, self.hor_bn = rbn(c), rbn(c)

    def forward(self, input):
        return (self.square_bn(self.square_conv(input))
                + self.ver_bn(self.ver_conv(self.ver_conv_crop_layer(input)))
                + self.hor_bn(self.hor_conv(self.hor_conv_crop_layer(input))))


def _slices(fused) -> list:
    """Crops left in the graph: slices as written, or the slice before a conv with negative padding."""
    return [n for n in fused.graph.nodes if n.op == "call_function" and (
        n.target is crop_border or (n.target is operator.getitem and isinstance(n.args[1], tuple)))]


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1)])
def test_acnet_crop_layer_block_becomes_one_kxk_conv(k, stride):
    torch.manual_seed(k + stride)
    model = ACBlockCrop(4, k, stride).double().eval()
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    convs = modules_of(fused, (nn.Conv2d,))
    assert len(convs) == 1 and convs[0].kernel_size == (k, k) and convs[0].padding == (0, 0)
    assert convs[0].stride == (stride, stride)
    assert n_bns(fused) == 0 and not _slices(fused)
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(1, 4, 8, 13, dtype=torch.float64))  # any input size
    assert unaccounted_linear_ops(fused) == []


class CropSpelling(nn.Module):
    """One crop of both spatial axes by `a`, spelled as third-party code spells it, then a valid conv."""

    def __init__(self, c, how, a=1, k=3, stride=1, dilation=1):
        super().__init__()
        self.how, self.a = how, a
        self.conv = nn.Conv2d(c, c, k, stride, 0, dilation, bias=False)
        self.bn = rbn(c)

    def forward(self, x):
        a = self.a
        if self.how == "slice":
            y = x[:, :, a:-a, a:-a]
        elif self.how == "shape":
            H, W = x.shape[-2:]
            y = x[..., a:H - a, a:W - a]
        elif self.how == "size":
            y = x[:, :, a:x.size(2) - a, a:x.size()[3] - a]
        elif self.how == "narrow":
            y = x.narrow(2, a, x.size(2) - 2 * a)[..., a:-a]
        else:
            y = F.pad(x, [-a, -a, -a, -a])
        return F.relu(self.bn(self.conv(y)))


@pytest.mark.parametrize("how", ["slice", "shape", "size", "narrow", "pad"])
def test_crop_spellings_fold_into_the_conv_after_them(how):
    torch.manual_seed(3)
    model = CropSpelling(3, how).double().eval()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    # Negative padding is lowered as one slice before the fused convolution.
    assert len(_slices(fused)) == 1 and not [n for n in fused.graph.nodes if n.target in (F.pad, "narrow")]
    assert len(fused.report.regions) == 1 and "padding=-1" in fused.report.regions[0].op
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(1, 3, 12, 7, dtype=torch.float64))
    assert unaccounted_linear_ops(fused) == []


class CropThenPaddedConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), rbn(c)

    def forward(self, x):
        return self.bn(self.conv(x[:, :, 1:-1, 1:-1]))


def test_padded_conv_after_a_crop_is_refused_with_its_reason():
    """conv(crop(x), padding=1) reads zeros where x has values: no padding of x expresses it."""
    torch.manual_seed(4)
    model = CropThenPaddedConv(3).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0 and len(_slices(fused)) == 1
    assert any("pads the cropped tensor" in r.reason for r in fused.report.refusals)
    assert_same(model, fused, x)
    assert unaccounted_linear_ops(fused) == []


class UnevenCrops(nn.Module):
    def __init__(self, c, how):
        super().__init__()
        self.how = how
        self.conv, self.bn = nn.Conv2d(c, c, 3, bias=False), rbn(c)

    def forward(self, x):
        if self.how == "uneven":
            y = x[:, :, 1:-2, :]
        elif self.how == "fixed":
            y = x[:, :, 1:7, :]
        else:
            y = F.pad(x, [0, 0, -1, -2])
        return self.bn(self.conv(y))


@pytest.mark.parametrize("how,words", [("uneven", "pads both ends alike"), ("fixed", "fixed index"),
                                       ("pad", "differently")])
def test_crops_no_padding_expresses_stay_with_a_reason(how, words):
    torch.manual_seed(5)
    model = UnevenCrops(3, how).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0  # the BatchNorm still folds into the conv
    crops = [n for n in fused.graph.nodes if n.target in (operator.getitem, F.pad)]
    assert len(crops) == 1 and crops[0].args[0].op == "placeholder"  # the crop stays as written
    assert any(words in r.reason for r in fused.report.refusals), fused.report.refusals
    assert_same(model, fused, x)
    assert unaccounted_linear_ops(fused) == []


class CropBeforeNonlinearity(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return torch.relu(torch.relu(self.conv(x))[:, :, 1:-1, 1:3])


def test_slices_away_from_linear_operations_are_left_alone_silently():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    model = CropBeforeNonlinearity().double().eval()
    fused = reparam.fuse(model, x)
    assert fused.report.refusals == [] and len(_slices(fused)) == 1
    assert_same(model, fused, x)


def test_crop_of_a_conv_output_moves_into_its_padding():
    """crop(conv(x, padding=p, stride=s)) is conv(x, padding=p - a*s): the slice disappears."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=3, bias=False), rbn(4), CropLayer((-1, -1)))
    model = model.double().eval()
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    convs = modules_of(fused, (nn.Conv2d,))
    assert len(convs) == 1 and convs[0].padding == (1, 1) and not _slices(fused)
    assert_same(model, fused, x)


# -- the algebra, for any crop, kernel, stride, dilation and padding -----------------------------

@given(crop=st.tuples(st.integers(0, 2), st.integers(0, 2)), k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.tuples(st.integers(-1, 2), st.integers(-1, 2)), size=st.tuples(st.integers(0, 6), st.integers(0, 6)),
       seed=st.integers(0, 2**16))
def test_property_conv_after_a_crop_is_the_conv_with_less_padding(crop, k, stride, dilation, padding, size, seed):
    g = torch.Generator().manual_seed(seed)
    # Input large enough for the crop and the kernel, plus a random margin.
    shape = [2 * a + max(1, d * (kk - 1) + 1 - 2 * p) + extra for a, d, kk, p, extra in zip(crop, dilation, k, padding, size)]
    x = torch.randn(1, 2, *shape, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, *k, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    conv = affine.from_conv(w, b, stride, padding, dilation)
    cut = affine.crop(2, crop, 2)
    reference = conv.apply(cut.apply(x))
    reason = affine.compose_refusal(conv, cut)
    reads_padding = any(p > 0 and a > 0 for p, a in zip(padding, crop))
    assert (reason is not None) == reads_padding
    if reason is None:
        out = affine.compose(conv, cut).apply(x)
        assert out.shape == reference.shape
        torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    # A crop after the convolution always moves into it.
    after = affine.crop(3, crop, 2)
    y = conv.apply(x)
    if all(n > 2 * a for n, a in zip(y.shape[2:], crop)):
        assert affine.compose_refusal(after, conv) is None
        torch.testing.assert_close(affine.compose(after, conv).apply(x), after.apply(y), rtol=1e-12, atol=1e-12)


class CropBNPoolLinear(nn.Module):
    """A BatchNorm between a crop and global pooling still folds into the classifier."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(c, c, 3), rbn(c), nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(self.bn(x[:, :, 1:-1, 1:-1]).mean((2, 3)))


def test_map_after_a_crop_still_moves_through_pooling_into_the_linear():
    torch.manual_seed(7)
    model = CropBNPoolLinear(3).double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 0 and len(_slices(fused)) == 1
    assert [r.members for r in fused.report.regions] == [("bn", "mean", "fc")]
    assert any("crop stays" in r.reason for r in fused.report.refusals)
    assert_same(model, fused, x)
    assert unaccounted_linear_ops(fused) == []


class CropConvBN(nn.Module):
    def __init__(self, crop, k, stride, dilation, padding):
        super().__init__()
        self.crop = crop
        self.conv = nn.Conv2d(2, 3, k, stride, padding, dilation, bias=False)
        self.bn = rbn(3)

    def forward(self, x):
        a, b = self.crop
        H, W = x.shape[2:]
        return self.bn(self.conv(x[:, :, a:H - a, b:W - b]))


@given(crop=st.tuples(st.integers(0, 2), st.integers(0, 2)), k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 1), st.integers(0, 1)), seed=st.integers(0, 2**16))
def test_property_fused_crop_conv_bn_is_exact_or_refused(crop, k, stride, dilation, padding, seed):
    torch.manual_seed(seed)
    model = CropConvBN(crop, k, stride, dilation, padding).double().eval()
    x = torch.randn(1, 2, 9, 10, dtype=torch.float64)
    fused = reparam.fuse(model, x, verify=False)
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    reads_padding = any(p > 0 and a > 0 for p, a in zip(padding, crop))
    as_written = [n for n in fused.graph.nodes if n.target is operator.getitem and isinstance(n.args[1], tuple)]
    assert bool(as_written) == reads_padding  # a whole slice (no crop) is an identity
    assert any("pads the cropped tensor" in r.reason for r in fused.report.refusals) == reads_padding
    assert_same(model, fused, torch.randn(1, 2, 12, 13, dtype=torch.float64))  # another size than traced
    assert unaccounted_linear_ops(fused) == []
