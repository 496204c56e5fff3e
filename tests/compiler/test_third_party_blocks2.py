"""More blocks written as their authors write them, from further repositories.

Each test builds a block the way its repository spells it (YOLOv7 and ultralytics RepConv, PP-YOLOE's
RepVggBlock with a learnable alpha, ECBSR, SESR, RepSR, VanillaNet, NFNet's weight-standardized
convs, GhostNet, ResMLP's `addcmul` affine, ...), randomizes its BatchNorms, fuses it in float64 and
checks the numbers, what is gone, what must stay, and that no pair of linear operations is left
without a word in the report.
"""

from __future__ import annotations

import functools
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops

from .helpers import BN_TYPES, assert_same, call_targets, modules_of, n_bns, n_convs, n_sums, randomize_bn
from .test_pad_fill import BNAndPad

torch.manual_seed(0)


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics and affine parameters for every norm with running statistics, and random
    learnable scales (alphas, gains, layer scales): fresh values (ones, zeros) hide bugs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            randomize_bn(m, g)
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            constant = p.numel() == 1 or bool((p == p.reshape(-1)[0]).all())
            if constant and p.requires_grad and name.rsplit(".", 1)[-1] not in ("weight", "bias"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.double().eval()


def _fuse(model: nn.Module, x: torch.Tensor):
    """Fuse in float64; outputs equal, nothing linear left unexplained."""
    model = _randomized(model)
    x = x.double()
    fused = reparam.fuse(model, x)
    assert_same(model, fused, x)
    assert unaccounted_linear_ops(fused) == []
    return fused


def _calls(fused, *targets) -> int:
    return sum(t in targets for t in call_targets(fused))


def _module_count(fused, types) -> int:
    return len(modules_of(fused, types))


# ------------------------------------------------------------------------------------------------
# Detection necks: RepConv as YOLOv7, ultralytics and PP-YOLOE write it
# ------------------------------------------------------------------------------------------------

class YoloV7RepConv(nn.Module):
    """YOLOv7: the identity branch is None when the shapes differ, and `id_out = 0` then."""

    def __init__(self, c1, c2, k=3, s=1, g=1):
        super().__init__()
        self.act = nn.SiLU()
        self.rbr_identity = nn.BatchNorm2d(num_features=c1) if c2 == c1 and s == 1 else None
        self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(c2))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, 0, groups=g, bias=False), nn.BatchNorm2d(c2))

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class UltralyticsConv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class UltralyticsRepConv(nn.Module):
    """ultralytics: `self.act(self.conv1(x) + self.conv2(x) + id_out)`, with a class-level SiLU."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, bn=False):
        super().__init__()
        self.act = self.default_act
        self.bn = nn.BatchNorm2d(num_features=c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = UltralyticsConv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = UltralyticsConv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


class PPYoloRepVggBlock(nn.Module):
    """PP-YOLOE / RT-DETR: the 1x1 branch is weighted by a learnable scalar `alpha`."""

    def __init__(self, c1, c2):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c1, c2, 3, 1, 1, bias=False), nn.BatchNorm2d(c2))
        self.conv2 = nn.Sequential(nn.Conv2d(c1, c2, 1, 1, 0, bias=False), nn.BatchNorm2d(c2))
        self.act = nn.ReLU()
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if hasattr(self, "conv"):
            y = self.conv(x)
        elif self.alpha is not None:
            y = self.conv1(x) + self.alpha * self.conv2(x)
        else:
            y = self.conv1(x) + self.conv2(x)
        return self.act(y)


@pytest.mark.parametrize("make, convs", [
    (lambda: nn.Sequential(YoloV7RepConv(8, 8), YoloV7RepConv(8, 16, s=2), YoloV7RepConv(16, 16, g=2)), 3),
    (lambda: nn.Sequential(UltralyticsRepConv(8, 8), UltralyticsRepConv(8, 8, bn=True)), 2),
    (lambda: nn.Sequential(PPYoloRepVggBlock(8, 8), PPYoloRepVggBlock(8, 8)), 2),
], ids=["yolov7", "ultralytics", "ppyoloe-alpha"])
def test_detection_repconvs_are_one_conv_per_block(make, convs):
    fused = _fuse(make(), torch.randn(2, 8, 10, 10))
    assert n_convs(fused) == convs and n_bns(fused) == 0
    assert _module_count(fused, nn.SiLU) + _module_count(fused, nn.ReLU) == convs  # activations stay


# ------------------------------------------------------------------------------------------------
# Super-resolution: ECBSR, SESR, RepSR
# ------------------------------------------------------------------------------------------------

_EDGE_MASKS = {
    "conv1x1-sobelx": [[1.0, 0, -1], [2, 0, -2], [1, 0, -1]],
    "conv1x1-sobely": [[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]],
    "conv1x1-laplacian": [[0.0, 1, 0], [1, -4, 1], [0, 1, 0]],
}


class SeqConv3x3(nn.Module):
    """ECBSR: a 1x1 conv whose output is padded with its own bias, then a 3x3 conv, or fixed
    Sobel/Laplacian masks with learnable per-channel scales."""

    def __init__(self, seq_type, inp, out, depth_multiplier=1.0):
        super().__init__()
        self.type, self.out_planes = seq_type, out
        if seq_type == "conv1x1-conv3x3":
            mid = int(out * depth_multiplier)
            conv0, conv1 = nn.Conv2d(inp, mid, 1), nn.Conv2d(mid, out, 3)
            self.k0, self.b0, self.k1, self.b1 = conv0.weight, conv0.bias, conv1.weight, conv1.bias
        else:
            conv0 = nn.Conv2d(inp, out, 1)
            self.k0, self.b0 = conv0.weight, conv0.bias
            self.scale = nn.Parameter(torch.randn(out, 1, 1, 1) * 1e-3)
            self.bias = nn.Parameter(torch.randn(out) * 1e-3)
            mask = torch.tensor(_EDGE_MASKS[seq_type]).expand(out, 1, 3, 3).clone()
            self.mask = nn.Parameter(mask, requires_grad=False)

    def forward(self, x):
        y0 = F.conv2d(input=x, weight=self.k0, bias=self.b0, stride=1)
        y0 = F.pad(y0, (1, 1, 1, 1), "constant", 0)
        b0_pad = self.b0.view(1, -1, 1, 1)
        y0[:, :, 0:1, :] = b0_pad
        y0[:, :, -1:, :] = b0_pad
        y0[:, :, :, 0:1] = b0_pad
        y0[:, :, :, -1:] = b0_pad
        if self.type == "conv1x1-conv3x3":
            return F.conv2d(input=y0, weight=self.k1, bias=self.b1, stride=1)
        return F.conv2d(input=y0, weight=self.scale * self.mask, bias=self.bias, stride=1, groups=self.out_planes)


class ECB(nn.Module):
    def __init__(self, inp, out, depth_multiplier=1.0, with_idt=True):
        super().__init__()
        self.with_idt = with_idt and inp == out
        self.conv3x3 = nn.Conv2d(inp, out, 3, padding=1)
        self.conv1x1_3x3 = SeqConv3x3("conv1x1-conv3x3", inp, out, depth_multiplier)
        self.conv1x1_sbx = SeqConv3x3("conv1x1-sobelx", inp, out)
        self.conv1x1_sby = SeqConv3x3("conv1x1-sobely", inp, out)
        self.conv1x1_lpl = SeqConv3x3("conv1x1-laplacian", inp, out)
        self.act = nn.PReLU(num_parameters=out)

    def forward(self, x):
        y = self.conv3x3(x) + self.conv1x1_3x3(x) + self.conv1x1_sbx(x) + self.conv1x1_sby(x) + self.conv1x1_lpl(x)
        if self.with_idt:
            y += x
        return self.act(y)


def test_ecbsr_edge_oriented_block_is_one_3x3_conv():
    fused = _fuse(nn.Sequential(ECB(8, 8), ECB(8, 8)), torch.randn(2, 8, 12, 12))
    assert n_convs(fused) == 2 and _module_count(fused, nn.PReLU) == 2
    assert _calls(fused, F.conv2d, torch.conv2d, F.pad) == 0


def test_ecbsr_with_a_wider_middle_is_one_3x3_conv():
    fused = _fuse(ECB(8, 8, depth_multiplier=2.0), torch.randn(2, 8, 12, 12))
    assert n_convs(fused) == 1


class CollapsibleLinearBlock(nn.Module):
    """SESR: a wide kxk conv and a 1x1 squeeze with nothing in between."""

    def __init__(self, in_filters, out_filters, tmp_filters, kernel_size, activation="prelu"):
        super().__init__()
        self.conv_expand = nn.Conv2d(in_filters, tmp_filters, (kernel_size, kernel_size),
                                     padding=(kernel_size - 1) // 2, bias=False)
        self.conv_squeeze = nn.Conv2d(tmp_filters, out_filters, (1, 1), bias=False)
        self.activation = nn.PReLU(out_filters) if activation == "prelu" else nn.Identity()

    def forward(self, x):
        return self.activation(self.conv_squeeze(self.conv_expand(x)))


class ResidualCollapsibleLinearBlock(CollapsibleLinearBlock):
    def __init__(self, filters, tmp_filters, kernel_size):
        super().__init__(filters, filters, tmp_filters, kernel_size)

    def forward(self, x):
        return self.activation(self.conv_squeeze(self.conv_expand(x)) + x)


class SESR(nn.Module):
    def __init__(self, f=8, expand=64, m=2, scale=2):
        super().__init__()
        self.conv_first = CollapsibleLinearBlock(1, f, expand, 5)
        self.residual_block = nn.Sequential(*[ResidualCollapsibleLinearBlock(f, expand, 3) for _ in range(m)])
        self.conv_last = CollapsibleLinearBlock(f, scale ** 2, expand, 5, activation="identity")
        self.depth_to_space = nn.PixelShuffle(scale)

    def forward(self, input):
        x = self.conv_first(input)
        x = self.residual_block(x) + x
        x = self.conv_last(x) + input  # the single input channel broadcast over scale**2 channels
        return self.depth_to_space(x)


def test_sesr_collapsible_linear_blocks_are_one_conv_each():
    fused = _fuse(SESR(), torch.randn(2, 1, 10, 10))
    convs = modules_of(fused, nn.Conv2d)
    assert [tuple(c.kernel_size) for c in convs] == [(5, 5), (3, 3), (3, 3), (5, 5)]
    assert [c.out_channels for c in convs] == [8, 8, 8, 4]  # the 64-wide middles are gone
    assert _module_count(fused, nn.PixelShuffle) == 1 and _module_count(fused, nn.PReLU) == 3


class RepSRBranch(nn.Module):
    def __init__(self, c, mult=2):
        super().__init__()
        self.expand = nn.Conv2d(c, c * mult, 1, bias=False)
        self.conv = nn.Conv2d(c * mult, c * mult, 3, padding=1, bias=False)
        self.squeeze = nn.Conv2d(c * mult, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.squeeze(self.conv(self.expand(x))))


class RepSRBlock(nn.Module):
    def __init__(self, c, n=2):
        super().__init__()
        self.branches = nn.ModuleList(RepSRBranch(c) for _ in range(n))
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.PReLU(c)

    def forward(self, x):
        out = self.conv3(x) + x
        for branch in self.branches:
            out = out + branch(x)
        return self.act(out)


def test_repsr_expand_squeeze_branches_are_one_conv():
    fused = _fuse(nn.Sequential(RepSRBlock(8), RepSRBlock(8)), torch.randn(2, 8, 10, 10))
    assert n_convs(fused) == 2 and n_bns(fused) == 0
    assert all(c.in_channels == c.out_channels == 8 for c in modules_of(fused, nn.Conv2d))


# ------------------------------------------------------------------------------------------------
# VanillaNet: activations annealed to the identity (leaky_relu with slope 1)
# ------------------------------------------------------------------------------------------------

class VanillaActivation(nn.ReLU):
    """VanillaNet's series-informed activation: ReLU, then a depthwise conv and a BatchNorm."""

    def __init__(self, dim, act_num=3):
        super().__init__()
        self.act_num, self.dim = act_num, dim
        self.weight = nn.Parameter(torch.randn(dim, 1, act_num * 2 + 1, act_num * 2 + 1) * 0.02)
        self.bn = nn.BatchNorm2d(dim, eps=1e-6)

    def forward(self, x):
        return self.bn(F.conv2d(super().forward(x), self.weight, padding=(self.act_num * 2 + 1) // 2,
                                groups=self.dim))


class VanillaBlock(nn.Module):
    def __init__(self, dim, dim_out, act_learn=1.0, stride=2):
        super().__init__()
        self.act_learn = act_learn
        self.conv1 = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1), nn.BatchNorm2d(dim, eps=1e-6))
        self.conv2 = nn.Sequential(nn.Conv2d(dim, dim_out, kernel_size=1), nn.BatchNorm2d(dim_out, eps=1e-6))
        self.pool = nn.Identity() if stride == 1 else nn.MaxPool2d(stride)
        self.act = VanillaActivation(dim_out)

    def forward(self, x):
        x = self.conv1(x)
        x = F.leaky_relu(x, self.act_learn)
        x = self.conv2(x)
        x = self.pool(x)
        return self.act(x)


def test_vanillanet_block_with_annealed_activation_is_its_deploy_form():
    # After training `act_learn` is 1: the two 1x1 convs meet through an identity.
    fused = _fuse(VanillaBlock(8, 16), torch.randn(2, 8, 12, 12))
    convs = modules_of(fused, nn.Conv2d)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(8, 16, (1, 1)), (16, 16, (7, 7))]
    assert n_bns(fused) == 0 and _calls(fused, F.leaky_relu) == 0
    assert _module_count(fused, nn.MaxPool2d) == 1 and _calls(fused, F.relu, torch.relu) == 1


def test_vanillanet_block_during_annealing_keeps_its_leaky_relu():
    fused = _fuse(VanillaBlock(8, 16, act_learn=0.3), torch.randn(2, 8, 12, 12))
    assert _calls(fused, F.leaky_relu) == 1 and n_convs(fused) == 3 and n_bns(fused) == 0


@pytest.mark.parametrize("act", [lambda: nn.LeakyReLU(1.0), lambda: nn.LeakyReLU(negative_slope=1, inplace=True),
                                 lambda: nn.LeakyReLU(0.1)], ids=["module", "module-inplace", "slope-0.1"])
def test_leaky_relu_is_an_identity_only_with_slope_one(act):
    model = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), act(),
                          nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
    fused = _fuse(model, torch.randn(2, 8, 6, 6))
    identity = model[2].negative_slope == 1
    assert n_convs(fused) == (1 if identity else 2)
    assert _module_count(fused, nn.LeakyReLU) == (0 if identity else 1)


# ------------------------------------------------------------------------------------------------
# Norms: instance norm with running statistics folds; per-sample norms stay
# ------------------------------------------------------------------------------------------------

class ConvNormConv(nn.Module):
    def __init__(self, norm: nn.Module, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = norm
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.proj(self.norm(self.conv(x)))


class FunctionalInstanceNorm(nn.InstanceNorm2d):
    """An instance norm written with F.instance_norm, reading running statistics in eval."""

    def forward(self, x):
        return F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                               use_input_stats=self.training, momentum=0.1, eps=self.eps)


class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's LayerNorm for channels-first tensors, written by hand."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.rand(c) - 0.5)
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


@pytest.mark.parametrize("make", [lambda: nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
                                  lambda: nn.InstanceNorm2d(8, affine=False, track_running_stats=True),
                                  lambda: FunctionalInstanceNorm(8, affine=True, track_running_stats=True)],
                         ids=["module", "no-affine", "functional"])
def test_instance_norm_reading_running_statistics_folds(make):
    fused = _fuse(ConvNormConv(make()), torch.randn(2, 8, 6, 6))
    assert n_convs(fused) == 1 and _module_count(fused, nn.InstanceNorm2d) == 0
    assert _calls(fused, F.instance_norm) == 0


@pytest.mark.parametrize("make, kept", [
    (lambda: nn.InstanceNorm2d(8, affine=True), nn.InstanceNorm2d),
    (lambda: nn.GroupNorm(2, 8), nn.GroupNorm),
    (lambda: nn.GroupNorm(1, 8), nn.GroupNorm),
], ids=["instance-norm", "group-norm", "group-norm-1"])
def test_norms_with_per_sample_statistics_stay(make, kept):
    fused = _fuse(ConvNormConv(make()), torch.randn(2, 8, 6, 6))
    assert n_convs(fused) == 2 and _module_count(fused, kept) == 1


def test_layer_norm_written_by_hand_stays_and_its_affine_folds_forward():
    fused = _fuse(ConvNormConv(ChannelsFirstLayerNorm(8)), torch.randn(2, 8, 6, 6))
    assert n_convs(fused) == 2
    assert _calls(fused, torch.sqrt) == 1 and len(fused.report.regions) == 1  # weight/bias folded into proj


def test_batch_norms_without_affine_fold_and_without_running_statistics_stay():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False))
    fused = _fuse(model, torch.randn(2, 8, 6, 6))
    assert n_convs(fused) == 2 and n_bns(fused) == 1
    assert any("batch statistics" in r.reason for r in fused.report.refusals)


# ------------------------------------------------------------------------------------------------
# Spellings of linear maps: addcmul (timm's Affine), x @ W, custom conv classes, weight tricks
# ------------------------------------------------------------------------------------------------

class Affine(nn.Module):
    """timm's ResMLP Affine: `torch.addcmul(beta, alpha, x)` on channels-last tokens."""

    def __init__(self, dim):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones((1, 1, dim)))
        self.beta = nn.Parameter(torch.zeros((1, 1, dim)))

    def forward(self, x):
        return torch.addcmul(self.beta, self.alpha, x)


class ChannelMlpBlock(nn.Module):
    """ResMLP's channel-mixing half: `x + ls2 * mlp_channels(norm2(x))`."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.norm2 = Affine(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.ls2 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x + self.ls2 * self.fc2(self.act(self.fc1(self.norm2(x))))


def test_addcmul_affine_folds_into_the_following_linear():
    fused = _fuse(ChannelMlpBlock(8, 16), torch.randn(2, 5, 8))
    assert _module_count(fused, nn.Linear) == 2
    assert _calls(fused, torch.addcmul, operator.mul) == 0  # both the affine and ls2 are folded


@pytest.mark.parametrize("spelling", ["shift", "scale-per-channel", "scale-scalar-value"])
def test_addcmul_spellings_after_a_conv(spelling):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.a = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
            self.b = nn.Parameter(torch.rand(8, 1, 1) - 0.5)

        def forward(self, x):
            y = self.conv(x)
            if spelling == "shift":
                return torch.addcmul(y, self.a, self.b)
            if spelling == "scale-per-channel":
                return torch.addcmul(self.b, y, self.a)
            return torch.addcmul(self.b, self.a, y, value=-0.5)

    fused = _fuse(Block(), torch.randn(2, 8, 6, 6))
    assert n_convs(fused) == 1 and _calls(fused, torch.addcmul) == 0


def test_addcmul_that_broadcasts_its_tensor_stays():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.b = nn.Parameter(torch.randn(3, 1, 8))

        def forward(self, x):  # x: (1, 5, 8) broadcast to (3, 5, 8)
            return torch.addcmul(self.b, self.fc(x), self.b)

    fused = _fuse(Block(), torch.randn(1, 5, 8))
    assert _calls(fused, torch.addcmul) == 1


class Projection(nn.Module):
    """CLIP-style projections: `x @ self.proj` with a parameter matrix."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 8)
        self.proj = nn.Parameter(torch.randn(8, 4))
        self.left = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        if self.spelling == "operator":
            return self.bn(x) @ self.proj
        if self.spelling == "torch.matmul":
            return torch.matmul(self.fc(x), self.proj)
        if self.spelling == "method":
            return self.fc(self.bn(x)).matmul(self.proj)
        return self.left @ self.fc(x)  # acts on the batch axis: not a map on the channels


@pytest.mark.parametrize("spelling, linears, matmuls", [
    ("operator", 1, 0), ("torch.matmul", 1, 0), ("method", 1, 0), ("left", 1, 1)])
def test_matmul_by_a_constant_matrix_is_a_linear(spelling, linears, matmuls):
    fused = _fuse(Projection(spelling), torch.randn(3, 8))
    assert _module_count(fused, nn.Linear) == linears and n_bns(fused) == 0
    assert _calls(fused, operator.matmul, torch.matmul, "matmul") == matmuls


class StdConv2d(nn.Conv2d):
    """BiT / timm: the weight standardized in forward with F.batch_norm in training mode."""

    def __init__(self, cin, cout, k, eps=1e-6):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """NFNet / timm: standardized weight times a learnable gain and a fixed scale."""

    def __init__(self, cin, cout, k, gamma=1.0, eps=1e-6):
        super().__init__(cin, cout, k, padding=k // 2, bias=True)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NFBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = ScaledStdConv2d(c, c, 1), ScaledStdConv2d(c, c, 3)
        self.skipinit_gain = nn.Parameter(torch.tensor(0.7))
        self.alpha, self.beta = 0.2, 1.0

    def forward(self, x):
        out = self.conv2(F.gelu(self.conv1(F.gelu(x) * self.beta)))
        return out * self.alpha * self.skipinit_gain + x


def test_weight_standardized_convs_fold_with_their_neighbours():
    fused = _fuse(NFBlock(8), torch.randn(2, 8, 6, 6))
    assert n_convs(fused) == 2 and _calls(fused, F.conv2d, torch.conv2d, F.batch_norm) == 0
    fused = _fuse(nn.Sequential(StdConv2d(8, 8, 3), nn.BatchNorm2d(8)), torch.randn(2, 8, 6, 6))
    assert n_convs(fused) == 1 and n_bns(fused) == 0


class PlainConv(nn.Module):
    """A conv class of its own (not an nn.Conv2d), calling F.conv2d with its stored geometry."""

    def __init__(self, cin, cout, k, padding=0, dilation=1, groups=1):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = (1, 1), (padding, padding), (dilation, dilation), groups
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, k, k) * 0.1)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GatedRep(nn.Module):
    """Branches behind `torch.jit.is_scripting()` / `is_tracing()` checks, as timm writes them."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = PlainConv(c, c, 3, padding=1), PlainConv(c, c, 1)
        self.dilated = PlainConv(c, c, 3, padding=2, dilation=2, groups=2)
        self.bn = nn.BatchNorm2d(c)
        self.grad_checkpointing = False

    def forward(self, x):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            y = torch.utils.checkpoint.checkpoint(self.a, x)
        else:
            y = self.a(x)
        if torch.jit.is_tracing():
            return F.relu(self.bn(y + self.b(x)))
        return F.relu(self.bn(y + self.b(x) + x)) + self.dilated(x)


def test_custom_conv_classes_behind_scripting_checks_fuse():
    fused = _fuse(GatedRep(8), torch.randn(2, 8, 10, 10))
    assert n_convs(fused) == 1 and n_bns(fused) == 0  # a + b + x + bn
    assert _calls(fused, F.conv2d, torch.conv2d) == 1  # the dilated branch alone stays as written


def test_parametrized_weight_norm_folds():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(8, 8, 3, padding=1)), nn.BatchNorm2d(8),
                          nn.ReLU(), parametrizations.spectral_norm(nn.Conv2d(8, 8, 1)), nn.BatchNorm2d(8))
    fused = _fuse(model, torch.randn(2, 8, 6, 6))
    assert n_convs(fused) == 2 and n_bns(fused) == 0


# ------------------------------------------------------------------------------------------------
# GhostNet: BNs fold, the cheap depthwise branch stays beside its primary conv
# ------------------------------------------------------------------------------------------------

class GhostModule(nn.Module):
    def __init__(self, inp, oup, ratio=2, dw_size=3, relu=True):
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = nn.Sequential(nn.Conv2d(inp, init_channels, 1, 1, 0, bias=False),
                                          nn.BatchNorm2d(init_channels),
                                          nn.ReLU(inplace=True) if relu else nn.Sequential())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels), nn.ReLU(inplace=True) if relu else nn.Sequential())

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.oup, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, cin, mid, cout):
        super().__init__()
        self.ghost1 = GhostModule(cin, mid, relu=True)
        self.ghost2 = GhostModule(mid, cout, relu=False)
        self.shortcut = nn.Sequential()

    def forward(self, x):
        residual = x
        x = self.ghost1(x)
        x = self.ghost2(x)
        x += self.shortcut(residual)
        return x


def test_ghostnet_bottleneck_folds_its_batch_norms_and_keeps_the_cheap_branch():
    fused = _fuse(GhostBottleneck(16, 32, 16), torch.randn(2, 16, 8, 8))
    assert n_convs(fused) == 4 and n_bns(fused) == 0
    assert any("not cheaper" in r.reason for r in fused.report.refusals)  # dense 3x3 would cost more


# ------------------------------------------------------------------------------------------------
# A forward set on the instance: the module computes that, not what its class computes
# ------------------------------------------------------------------------------------------------

def _conv_bn_forward(bn, conv, x):
    """mmcv's efficient conv-bn evaluation: the BatchNorm folded into the weight on the fly."""
    coeff = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * coeff.reshape(-1, 1, 1, 1)
    bias = bn.bias + coeff * ((conv.bias if conv.bias is not None else 0) - bn.running_mean)
    return conv._conv_forward(x, weight, bias)


class PatchedConvSkip(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv.forward = functools.partial(_conv_bn_forward, self.bn, self.conv)

    def forward(self, x):
        return self.conv(x) + x


def test_conv_with_a_forward_set_on_the_instance_is_not_read_as_a_conv():
    fused = _fuse(PatchedConvSkip(8), torch.randn(2, 8, 6, 6))
    # Traced through the function it runs (not read as a plain conv): its folded conv and the skip
    # are one conv.
    assert [r.members for r in fused.report.regions] == [("conv2d", "add_1")]
    assert n_convs(fused) == 1 and n_sums(fused) == 0


# ------------------------------------------------------------------------------------------------
# Known gaps, as the authors write the blocks (strict: remove the mark when they fuse)
# ------------------------------------------------------------------------------------------------

def BNAndPadLayer(pad_pixels, num_features):
    """DBB's BatchNorm whose zero padding is replaced by its own shift (its argument order)."""
    return BNAndPad(num_features, pad_pixels)


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB: a 1x1 conv initialised at the identity, the identity kept in a plain tensor attribute."""

    def __init__(self, channels):
        super().__init__(channels, channels, 1, 1, 0, bias=False)
        self.id_tensor = torch.eye(channels).reshape(channels, channels, 1, 1)
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device).type_as(self.weight)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


class DiverseBranchBlock(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, internal=None):
        super().__init__()
        p = k // 2
        self.dbb_origin = nn.Sequential(nn.Conv2d(cin, cout, k, stride, p, bias=False), nn.BatchNorm2d(cout))
        self.dbb_avg = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), BNAndPadLayer(p, cout),
                                     nn.AvgPool2d(k, stride, 0), nn.BatchNorm2d(cout))
        self.dbb_1x1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        internal = internal or cin
        first = IdentityBasedConv1x1(cin) if internal == cin else nn.Conv2d(cin, internal, 1, bias=False)
        self.dbb_1x1_kxk = nn.Sequential(first, BNAndPadLayer(p, internal),
                                         nn.Conv2d(internal, cout, k, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


def test_dbb_with_identity_based_1x1_is_one_conv():
    fused = _fuse(DiverseBranchBlock(8, 8), torch.randn(2, 8, 8, 8))
    assert n_convs(fused) == 1 and _calls(fused, F.conv2d, torch.conv2d) == 0


def test_dbb_that_widens_is_one_conv():
    fused = _fuse(DiverseBranchBlock(8, 16, stride=2, internal=16), torch.randn(2, 8, 8, 8))
    assert n_convs(fused) == 1


class Detectron2Conv(nn.Conv2d):
    """detectron2's Conv2d: an empty-input guard on tensor metadata, then an optional norm."""

    def __init__(self, *args, norm=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x):
        if not torch.jit.is_scripting():
            if x.numel() == 0 and self.training:
                assert not isinstance(self.norm, torch.nn.SyncBatchNorm)
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.norm(x) if self.norm is not None else x


def test_detectron2_conv_with_norm_is_one_conv():
    model = nn.Sequential(Detectron2Conv(8, 8, 3, padding=1, bias=False, norm=nn.BatchNorm2d(8)), nn.ReLU(),
                          Detectron2Conv(8, 8, 1, bias=False, norm=nn.BatchNorm2d(8)))
    fused = _fuse(model, torch.randn(2, 8, 6, 6))
    assert len(fused.report.leaves) == 0 and n_bns(fused) == 0


# ------------------------------------------------------------------------------------------------
# Sums as other people write them: keyword arguments, accumulators started with zeros
# ------------------------------------------------------------------------------------------------

class Branches(nn.Module):
    def __init__(self, spelling, c=8):
        super().__init__()
        self.spelling = spelling
        self.branches = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)),
            nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)),
        ])

    def forward(self, x):
        a, b = self.branches
        if self.spelling == "torch.add keywords":
            return torch.add(input=a(x), other=b(x), alpha=0.5)
        if self.spelling == "torch.sub keywords":
            return torch.sub(input=a(x), other=b(x))
        if self.spelling == "torch.mul keywords":
            return torch.mul(input=a(x), other=0.5) + b(x)
        if self.spelling == "new_zeros":
            out = x.new_zeros(x.shape)
            for branch in self.branches:
                out = out + branch(x)
            return out
        if self.spelling == "torch.zeros":
            out = torch.zeros(x.shape, dtype=x.dtype)
            for branch in self.branches:
                out = branch(x) - out
            return out
        out = torch.zeros_like(x)  # "zeros_like in place"
        for branch in self.branches:
            out += branch(x)
        return out


@pytest.mark.parametrize("spelling", [
    "torch.add keywords", "torch.sub keywords", "torch.mul keywords", "new_zeros", "torch.zeros",
    "zeros_like in place",
])
def test_sum_spellings_are_one_conv(spelling):
    fused = _fuse(Branches(spelling), torch.randn(2, 8, 6, 6))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert _calls(fused, torch.zeros_like, torch.zeros, "new_zeros", torch.add, operator.add, operator.iadd) == 0


def test_zeros_of_another_shape_are_not_dropped():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):  # (2, 8, 6, 6) + zeros (3, 1, 1, 1, 1): the shape changes
            return torch.zeros(3, 1, 1, 1, 1, dtype=x.dtype) + self.conv(x)

    fused = _fuse(Broadcast(), torch.randn(2, 8, 6, 6))
    assert _calls(fused, torch.zeros) == 1
