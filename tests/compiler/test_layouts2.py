"""Linear structures across layout changes and upsampling, as third-party models write them: a
Linear on the channel axis between permutes after a kxk conv (ConvNeXt-style channels-last MLPs),
BatchNorm after PixelShuffle and nearest upsampling, per-channel maps along another axis than a
Linear's (ResMLP), and a BatchNorm over a reshaped 1x1 conv's channels (RepMLPNet's fc3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reparam.measure import unaccounted_linear_ops

from .helpers import conv_bn, fuse64, modules_of, n_bns, n_convs, rbn


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
