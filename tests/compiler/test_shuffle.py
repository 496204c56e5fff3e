"""A per-channel map after a channel shuffle moves before it (passes/distribute.py, rewrite 4):
bn(P(y)) = P(bn'(y)) with bn' the BatchNorm's constants permuted by P^-1, so ShuffleNet's
BatchNorm after the shuffle folds into the grouped 1x1 convolution before it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops

from .helpers import assert_same, n_bns, n_convs, rbn


def channel_shuffle(x, groups):
    """ShuffleNetV2's helper, as published (torchvision spells it the same way)."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, -1, height, width)
    return x


class ShuffleUnit(nn.Module):
    """Grouped 1x1 conv, channel shuffle, BatchNorm, ReLU (ShuffleNet v1's first unit, reordered)."""

    def __init__(self, c, g, how="view"):
        super().__init__()
        self.g, self.how = g, how
        self.conv = nn.Conv2d(c, c, 1, groups=g, bias=False)
        self.bn = rbn(c)
        self.shuffle = nn.ChannelShuffle(g)

    def forward(self, x):
        x = self.conv(x)
        if self.how == "view":
            b, c, h, w = x.size()
            x = x.view(b, self.g, c // self.g, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        elif self.how == "reshape_permute":
            b, c, h, w = x.shape
            x = x.reshape(b, self.g, c // self.g, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)
        elif self.how == "function":
            x = channel_shuffle(x, self.g)
        elif self.how == "torch":
            x = torch.channel_shuffle(x, self.g)
        else:
            x = self.shuffle(x)
        return F.relu(self.bn(x))


def _has_shuffle(fused) -> bool:
    return any(n.target in ("transpose", "permute", torch.transpose, torch.channel_shuffle)
               or (n.op == "call_module" and isinstance(fused.get_submodule(n.target), nn.ChannelShuffle))
               for n in fused.graph.nodes)


@pytest.mark.parametrize("how", ["view", "reshape_permute", "function", "torch", "module"])
def test_batchnorm_after_a_channel_shuffle_folds_into_the_grouped_conv(how):
    torch.manual_seed(0)
    model = ShuffleUnit(12, 3, how).double().eval()
    x = torch.randn(2, 12, 5, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert conv.groups == 3  # the map folded into the grouped conv, which stays grouped
    assert _has_shuffle(fused)  # the permutation itself stays
    assert fused.report.refusals == []
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(1, 12, 3, 7, dtype=torch.float64))
    assert unaccounted_linear_ops(fused) == []


class ShuffleThenBNAndScale(ShuffleUnit):
    def __init__(self, c, g):
        super().__init__(c, g, "function")
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return F.relu(self.gamma * self.bn(channel_shuffle(self.conv(x), self.g)))


def test_a_chain_of_maps_after_the_shuffle_moves_one_map_at_a_time():
    torch.manual_seed(1)
    model = ShuffleThenBNAndScale(8, 2).double().eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert not [n for n in fused.graph.nodes if n.target in ("mul", torch.mul) or "mul" in n.name]
    assert_same(model, fused, x)
    assert unaccounted_linear_ops(fused) == []


class ShuffleV2Block(nn.Module):
    """ShuffleNetV2's stride-1 unit, as published, with a BatchNorm after the shuffle added."""

    def __init__(self, c, bn_after=False, last_relu=True):
        super().__init__()
        b = c // 2
        self.branch2 = nn.Sequential(
            nn.Conv2d(b, b, 1, bias=False), rbn(b), nn.ReLU(inplace=True),
            nn.Conv2d(b, b, 3, 1, 1, groups=b, bias=False), rbn(b),
            nn.Conv2d(b, b, 1, bias=False), rbn(b), *([nn.ReLU(inplace=True)] if last_relu else []))
        self.bn = rbn(c) if bn_after else None

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch2(x2)), dim=1)
        out = channel_shuffle(out, 2)
        return out if self.bn is None else self.bn(out)


def test_shufflenet_v2_unit_fuses_its_branch_and_keeps_the_shuffle():
    torch.manual_seed(2)
    model = ShuffleV2Block(8).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    # 1x1+BN and dw3x3+BN+1x1+BN: the depthwise conv and its BN fold into the 1x1 after it only
    # when cheaper; at least every BatchNorm is gone.
    assert n_bns(fused) == 0 and n_convs(fused) in (2, 3) and _has_shuffle(fused)
    assert_same(model, fused, x)
    assert unaccounted_linear_ops(fused) == []


@pytest.mark.parametrize("last_relu", [True, False])
def test_batchnorm_after_a_shufflenet_v2_unit_stays_exact(last_relu):
    """Moved before the shuffle, the map would act on the concatenation, whose first input (a chunk
    of the block's input) has no linear operation to absorb its slice: it stays after the shuffle,
    named when the other input is linear (a branch ending in a BatchNorm), silently when neither is."""
    torch.manual_seed(3)
    model = ShuffleV2Block(8, bn_after=True, last_relu=last_relu).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert _has_shuffle(fused) and n_bns(fused) == 1
    assert list(fused.graph.nodes)[-2].target == "bn"  # still after the shuffle
    named = [r for r in fused.report.refusals if "bn" in r.where.split(", ")]
    if last_relu:
        assert named == []
    else:
        assert len(named) == 1 and "input 0 of cat" in named[0].reason, fused.report.refusals
    assert_same(model, fused, x)
    assert unaccounted_linear_ops(fused) == []


class NotAShuffle(nn.Module):
    """`view` + `transpose` that moves spatial positions: no channel permutation."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 1, bias=False), rbn(c)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).transpose(1, 2).reshape(b, c, h, w)
        return F.relu(self.bn(x))


def test_layout_changes_that_are_no_channel_permutation_keep_the_map_with_a_reason():
    torch.manual_seed(4)
    model = NotAShuffle(4).double().eval()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 1
    assert any("spatial axes" in r.reason and "bn" in r.where for r in fused.report.refusals)
    assert_same(model, fused, x)
    assert unaccounted_linear_ops(fused) == []


class ShuffleReadTwice(ShuffleUnit):
    def forward(self, x):
        y = self.conv(x)
        return F.relu(self.bn(channel_shuffle(y, self.g))) + y


def test_shuffle_of_a_value_read_elsewhere_keeps_the_map_with_a_reason():
    torch.manual_seed(5)
    model = ShuffleReadTwice(6, 2).double().eval()
    x = torch.randn(1, 6, 3, 3, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 1
    assert any("also read" in r.reason for r in fused.report.refusals)
    assert_same(model, fused, x)
    assert unaccounted_linear_ops(fused) == []
