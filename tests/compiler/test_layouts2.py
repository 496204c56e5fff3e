"""Linear structures across layout changes and upsampling, as third-party models write them: a
Linear on the channel axis between permutes after a kxk conv (ConvNeXt-style channels-last MLPs),
BatchNorm after PixelShuffle and nearest upsampling, per-channel maps along another axis than a
Linear's (ResMLP), and a BatchNorm over a reshaped 1x1 conv's channels (RepMLPNet's fc3)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops
from reparam.modules import ChannelAffine
from reparam.report import Report
from reparam.trace import propagate_shapes, trace

from .helpers import assert_same, conv_bn, fuse64, modules_of, n_bns, n_convs, rbn


def refusals_naming(fused, name: str) -> list[str]:
    return [r.reason for r in fused.report.refusals if name in [w.strip() for w in r.where.split(",")]]


# -- 1. a Linear on the channel axis between permutes, after a kxk conv ------------------------------
class ChannelsLastMLP(nn.Module):
    """kxk conv + BN, then `permute(0, 2, 3, 1)`, a Linear (or `@ W`) on channels, permute back."""

    def __init__(self, c=8, co=4, spelling="linear", read_shape=False, bn_after=False):
        super().__init__()
        self.conv = conv_bn(c, c, 3)
        self.fc = nn.Linear(c, co)
        self.w = nn.Parameter(torch.randn(c, co) / c ** 0.5)
        self.spelling, self.read_shape = spelling, read_shape
        self.bn = rbn(co) if bn_after else None

    def forward(self, x):
        y = self.conv(x)
        z = y.permute(0, 2, 3, 1)
        z = self.fc(z) if self.spelling == "linear" else z @ self.w
        z = z.permute(0, 3, 1, 2)
        if self.read_shape:
            z = z.reshape(y.shape[0], -1, y.shape[2], y.shape[3])
        return self.bn(z) if self.bn is not None else z


@pytest.mark.parametrize("spelling", ["linear", "matmul"])
@pytest.mark.parametrize("read_shape", [False, True])
def test_narrowing_linear_after_a_permute_composes_into_the_conv(spelling, read_shape):
    m = ChannelsLastMLP(8, 4, spelling, read_shape)
    fused = fuse64(m, torch.randn(2, 8, 9, 9, dtype=torch.float64))
    assert n_convs(fused) == 1 and n_bns(fused) == 0 and modules_of(fused, nn.Linear) == []
    (conv,) = modules_of(fused, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 4, (3, 3))
    assert fused.report.refusals == []
    assert unaccounted_linear_ops(fused) == []


class TransposedRoundTrip(ChannelsLastMLP):
    """The same round trip written with `transpose(1, 3)` both ways and `@ W`."""

    def forward(self, x):
        return (self.conv(x).transpose(1, 3) @ self.w).transpose(1, 3)


@pytest.mark.parametrize("make", [lambda: ChannelsLastMLP(8, 4, "linear"), lambda: TransposedRoundTrip(8, 4)])
def test_permutes_around_a_composed_linear_are_dropped(make):
    """Once the Linear is in the conv, `permute(0, 2, 3, 1)` then `permute(0, 3, 1, 2)` is the
    conv's own output: both go (an exporter would otherwise copy the tensor twice)."""
    m = make()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    fused = fuse64(m, x)
    assert n_convs(fused) == 1 and modules_of(fused, nn.Linear) == []
    steps = [n for n in fused.graph.nodes if n.op in ("call_method", "call_function")
             and getattr(n.target, "__name__", n.target) in ("permute", "transpose")]
    assert steps == [], fused.code
    assert fused(x).is_contiguous()
    assert_same(m, fused, torch.randn(1, 8, 5, 7, dtype=torch.float64))


def test_permutes_that_do_not_undo_each_other_stay():
    """`permute(0, 2, 3, 1)` twice is no round trip: the fused model keeps both steps."""

    class TwoTurns(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_bn(4, 4, 3)

        def forward(self, x):
            return torch.relu(self.conv(x).permute(0, 2, 3, 1).permute(0, 2, 3, 1))

    model = TwoTurns()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    fused = fuse64(model, x)
    assert sum(n.target == "permute" for n in fused.graph.nodes) == 2
    assert_same(model, fused, x)


def test_per_channel_map_after_the_permute_back_joins_too():
    m = ChannelsLastMLP(8, 8, bn_after=True)
    fused = fuse64(m, torch.randn(2, 8, 7, 7, dtype=torch.float64))
    assert n_convs(fused) == 1 and n_bns(fused) == 0 and modules_of(fused, nn.Linear) == []


@pytest.mark.parametrize("spelling", ["linear", "matmul"])
@pytest.mark.parametrize("read_shape", [False, True])
def test_widening_linear_after_a_permute_is_refused_for_its_cost(spelling, read_shape):
    m = ChannelsLastMLP(8, 32, spelling, read_shape)
    fused = fuse64(m, torch.randn(2, 8, 9, 9, dtype=torch.float64))
    assert n_convs(fused) == 1 and n_bns(fused) == 0  # BN folded into the conv; the Linear stays
    (conv,) = modules_of(fused, nn.Conv2d)
    assert conv.out_channels == 8
    linear_name = "fc" if spelling == "linear" else "matmul(w)"
    (reason,) = [r.reason for r in fused.report.refusals if linear_name in r.where]
    assert reason.startswith("not cheaper") and "Conv2d 3x3 8->32" in reason
    assert unaccounted_linear_ops(fused) == []


@pytest.mark.parametrize("read_shape", [False, True])
def test_accounting_sees_the_pair_across_the_permute(read_shape):
    """Left unfused (the traced graph itself), conv -> permute -> Linear is a pair the report must
    explain, also when the conv's output is read for its shape."""
    m = ChannelsLastMLP(8, 32, read_shape=read_shape).double().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    gm, _ = trace(m, (x,))
    propagate_shapes(gm, (x,))
    assert "conv.1 -> fc" in unaccounted_linear_ops(gm, Report(model="m"))


class ChannelsLastNorm(nn.Module):
    """ConvNeXt: depthwise conv, permute, LayerNorm, Linear: the LayerNorm is not linear."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return self.fc(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


def test_layer_norm_after_the_permute_stays():
    fused = fuse64(ChannelsLastNorm(), torch.randn(2, 8, 9, 9, dtype=torch.float64))
    assert n_convs(fused) == 1 and len(modules_of(fused, nn.LayerNorm)) == 1
    assert len(modules_of(fused, nn.Linear)) == 1


# -- 2. maps after upsamplings that copy pixels; expand_as of a constant -----------------------------
class Upsampled(nn.Module):
    """conv -> upsampling -> pointwise map, as super-resolution and decoder heads write it."""

    def __init__(self, how, c=8):
        super().__init__()
        self.how = how
        r2 = 4
        if how == "shuffle":  # ESPCN / EDSR upsampler: conv to c*r^2 channels, PixelShuffle, BN
            self.conv, self.up, self.map = nn.Conv2d(c, c * r2, 3, padding=1), nn.PixelShuffle(2), rbn(c)
        elif how == "pixel_shuffle":
            self.conv, self.map = nn.Conv2d(c, c * r2, 3, padding=1), rbn(c)
        elif how == "unshuffle_scalar":  # a scalar map is constant over each block
            self.conv, self.up = nn.Conv2d(c, c, 3, padding=1), nn.PixelUnshuffle(2)
        elif how == "unshuffle_bn":  # refused: the BN's constants vary within each block
            self.conv, self.up, self.map = nn.Conv2d(c, c, 3, padding=1), nn.PixelUnshuffle(2), rbn(c * r2)
        elif how == "nearest_bn":  # FPN-like lateral: 1x1 conv, nearest upsampling, BN
            self.conv, self.up, self.map = nn.Conv2d(c, c, 1), nn.Upsample(scale_factor=2), rbn(c)
        elif how == "nearest_1x1":  # 1x1 conv, F.interpolate(nearest), 1x1 conv + BN
            self.conv, self.map = nn.Conv2d(c, 2 * c, 1), conv_bn(2 * c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "pixel_shuffle":
            return self.map(F.pixel_shuffle(y, 2))
        if self.how == "unshuffle_scalar":
            return self.up(y) * 0.5 + 0.25
        if self.how == "nearest_1x1":
            return self.map(F.interpolate(y, scale_factor=2, mode="nearest"))
        return self.map(self.up(y))


@pytest.mark.parametrize("how", ["shuffle", "pixel_shuffle", "unshuffle_scalar", "nearest_bn", "nearest_1x1"])
def test_pointwise_map_after_a_copying_upsampling_folds_into_the_conv_before_it(how):
    fused = fuse64(Upsampled(how), torch.randn(2, 8, 6, 6, dtype=torch.float64))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert [n for n in fused.graph.nodes if n.op in ("call_function", "call_method")
            and n.target in (operator.mul, operator.add)] == []
    assert fused.report.refusals == []


def test_batchnorm_after_a_pixel_unshuffle_is_refused_with_its_reason():
    fused = fuse64(Upsampled("unshuffle_bn"), torch.randn(2, 8, 6, 6, dtype=torch.float64))
    assert n_convs(fused) == 1 and n_bns(fused) == 1
    (reason,) = refusals_naming(fused, "map")
    assert "constants differ within the 4 channels" in reason


def test_a_map_after_upsampling_a_conv_read_elsewhere_is_refused_and_accounted():
    class Two(Upsampled):
        def forward(self, x):
            y = self.conv(x)
            return self.map(self.up(y)), y

    m = Two("shuffle").double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(m, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 1
    (reason,) = refusals_naming(fused, "map")
    assert reason.startswith("kept after the upsampling") and "also read" in reason
    assert unaccounted_linear_ops(fused) == []
    for a, b in zip(fused(x), m(x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how", ["shuffle", "nearest_bn", "nearest_1x1"])
def test_accounting_sees_pairs_across_a_copying_upsampling(how):
    """Left unfused (the traced graph itself), the pair is one the report must explain."""
    m = Upsampled(how).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    gm, _ = trace(m, (x,))
    propagate_shapes(gm, (x,))
    pairs = ["conv -> map"] if how != "nearest_1x1" else ["conv -> map.0", "map.0 -> map.1"]
    assert unaccounted_linear_ops(gm, Report(model="m")) == pairs


class ExpandedScale(nn.Module):
    """`y * self.g[:, None, None].expand_as(y)`: the constant is expanded with `y`'s shape."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = conv_bn(c, c, 3)
        self.g = nn.Parameter(torch.rand(c) + 0.5)
        self.b = nn.Parameter(torch.rand(c))

    def forward(self, x):
        y = self.conv(x)
        y = y * self.g[:, None, None].expand_as(y)
        return y + self.b.view(1, -1, 1, 1).expand(y.shape)


def test_expand_as_of_a_constant_reads_as_a_per_channel_map():
    fused = fuse64(ExpandedScale(), torch.randn(2, 8, 6, 6, dtype=torch.float64))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert [n.target for n in fused.graph.nodes if n.op in ("call_function", "call_method")] == []


class NormThenShuffle(nn.Module):
    """A BatchNorm after an activation, then a pixel (un)shuffle and a 1x1 conv (space-to-depth
    stems and downsamplers); the norm has no conv before it to fold into."""

    def __init__(self, how, equal_blocks=False):
        super().__init__()
        self.how = how
        self.conv0 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = rbn(4)
        if equal_blocks:  # the same constants for the 4 channels that become one: shuffle-able
            for t in (self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var):
                t.data = t.data[:1].repeat(4)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.conv = nn.Conv2d(16 if how != "shuffle" else 1, 8, 1)

    def forward(self, x):
        y = self.bn(torch.relu(self.conv0(x)))
        if self.how == "module":
            y = self.unshuffle(y)
        elif self.how == "function":
            y = F.pixel_unshuffle(y, 2)
        else:
            y = F.pixel_shuffle(y, 2)
        return self.conv(y)


@pytest.mark.parametrize("how, equal_blocks", [("module", False), ("function", False), ("shuffle", True)])
def test_batchnorm_before_a_pixel_shuffle_folds_into_the_conv_after_it(how, equal_blocks):
    m = NormThenShuffle(how, equal_blocks)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = fuse64(m, x)
    assert n_bns(fused) == 0 and n_convs(fused) == 2 and not modules_of(fused, ChannelAffine)
    assert fused.report.refusals == [] and unaccounted_linear_ops(fused) == []
    assert_same(m, fused, torch.randn(1, 4, 8, 10, dtype=torch.float64))


def test_batchnorm_before_a_pixel_shuffle_that_would_act_on_positions_is_refused():
    m = NormThenShuffle("shuffle")
    fused = fuse64(m, torch.randn(2, 4, 6, 6, dtype=torch.float64))
    assert n_bns(fused) == 1 and n_convs(fused) == 2
    (refusal,) = fused.report.refusals
    assert refusal.where == "bn, pixel_shuffle, conv" and "kept before the pixel shuffle" in refusal.reason


# -- 3. per-channel maps along another axis than a Linear's (ResMLP) ---------------------------------
class Affine(nn.Module):
    """timm's ResMLP Affine: a per-channel map over the last axis."""

    def __init__(self, dim, spelling):
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(1, 1, dim) + 0.5)
        self.beta = nn.Parameter(torch.rand(1, 1, dim))
        self.spelling = spelling

    def forward(self, x):
        if self.spelling == "addcmul":
            return torch.addcmul(self.beta, self.alpha, x)
        return x * self.alpha + self.beta


class ResMLPBlock(nn.Module):
    """ResMLP's token mixing: Affine over channels, transpose, Linear over the tokens, layer scale."""

    def __init__(self, dim=8, tokens=6, spelling="addcmul"):
        super().__init__()
        self.norm1 = Affine(dim, spelling)
        self.linear_tokens = nn.Linear(tokens, tokens)
        self.ls1 = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x + self.ls1 * self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("spelling", ["addcmul", "mul_add"])
def test_per_channel_map_along_another_axis_than_the_linear_is_refused_with_its_reason(spelling):
    fused = fuse64(ResMLPBlock(spelling=spelling), torch.randn(2, 6, 8, dtype=torch.float64))
    assert len(modules_of(fused, nn.Linear)) == 1  # the Linear over the tokens stays alone
    reasons = refusals_naming(fused, "linear_tokens")
    assert len(reasons) == 2
    assert any(r.startswith("kept apart: per-channel map along another axis than the Linear's") for r in reasons)
    assert any(r.startswith("kept apart: Linear along another axis than the per-channel map's") for r in reasons)
    assert unaccounted_linear_ops(fused) == []


def test_timm_resmlp_explains_every_linear_operation_it_keeps():
    from reparam.optional import MissingExtra, install_command, require

    try:
        timm = require("timm", "the ResMLP accounting test")
    except MissingExtra:
        pytest.skip(f"timm is not installed: {install_command('timm')}")
    m = timm.create_model("resmlp_12_224", pretrained=False, img_size=32).double().eval()
    m.blocks = m.blocks[:3]  # the blocks are alike: three keep the test fast
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.rsplit(".", 1)[-1] in ("alpha", "beta", "ls1", "ls2"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    fused = fuse64(m, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert len(refusals_naming(fused, "blocks.2.linear_tokens")) == 2


# -- 4. a BatchNorm over the leading factor of a reshaped conv's channels (RepMLPNet's fc3) ----------
class ChannelPerceptron(nn.Module):
    """RepMLPNet's RepMLPBlock, channel perceptron: partitions, a grouped 1x1 conv (fc3) over
    S*h*w channels, `reshape(-1, S, h, w)`, BatchNorm2d(S), partitions put back. (The authors end with
    `reshape(*origin_shape)`, which torch.fx cannot trace; `reshape(origin_shape)` is the same.)"""

    def __init__(self, s=4, h=3, w=3, groups=2, read_fc3=False):
        super().__init__()
        self.S, self.h, self.w, self.read_fc3 = s, h, w, read_fc3
        self.fc3 = nn.Conv2d(s * h * w, s * h * w, 1, groups=groups)
        self.fc3_bn = rbn(s)

    def forward(self, inputs):
        origin_shape = inputs.size()
        h_parts = origin_shape[2] // self.h
        w_parts = origin_shape[3] // self.w
        partitions = inputs.reshape(-1, self.S, h_parts, self.h, w_parts, self.w).permute(0, 2, 4, 1, 3, 5)
        fc3_in = partitions.reshape(-1, self.S * self.h * self.w, 1, 1)
        fc3 = self.fc3(fc3_in)
        fc3_out = self.fc3_bn(fc3.reshape(-1, self.S, self.h, self.w))
        fc3_out = fc3_out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w).permute(0, 3, 1, 4, 2, 5)
        out = fc3_out.reshape(origin_shape)
        return (out, fc3) if self.read_fc3 else out


def test_batchnorm_over_the_leading_factor_of_a_reshaped_conv_folds_into_it():
    m = ChannelPerceptron()
    fused = fuse64(m, torch.randn(2, 4, 6, 6, dtype=torch.float64))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    (conv,) = modules_of(fused, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.groups) == (36, 36, 2)
    assert fused.report.refusals == []
    x = torch.randn(1, 4, 9, 12, dtype=torch.float64)  # another number of partitions
    torch.testing.assert_close(fused(x), m(x), rtol=1e-12, atol=1e-12)


def test_batchnorm_over_a_reshaped_conv_read_elsewhere_is_refused_with_its_reason():
    m = ChannelPerceptron(read_fc3=True).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(m, x)
    assert n_convs(fused) == 1 and len(modules_of(fused, (nn.BatchNorm2d, ChannelAffine))) == 1
    (reason,) = refusals_naming(fused, "fc3_bn")
    assert reason.startswith("kept after the reshape") and "also read" in reason
    assert unaccounted_linear_ops(fused) == []
    for a, b in zip(fused(x), m(x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- from the sweep of timm models --------------------------------------------------------------------
class TalkingHeads(nn.Module):
    """EfficientFormerV2's attention: `(q @ k) * scale + bias` (the bias varies along heads and
    both token axes), then a 1x1 conv over the heads."""

    def __init__(self, heads=2, n=6):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(heads, n, n))
        self.talking_head1 = nn.Conv2d(heads, heads, 1)
        self.scale = 0.5

    def forward(self, q, k):
        attn = (q @ k) * self.scale
        attn = attn + self.bias
        return self.talking_head1(attn).softmax(dim=-1)


def test_constant_along_several_axes_before_a_conv_is_refused_naming_the_conv():
    q, k = torch.randn(1, 2, 6, 4, dtype=torch.float64), torch.randn(1, 2, 4, 6, dtype=torch.float64)
    fused = fuse64(TalkingHeads(), q, k)
    assert n_convs(fused) == 1
    (reason,) = refusals_naming(fused, "talking_head1")
    assert reason == "the constant varies along several axes: not a per-channel map"
