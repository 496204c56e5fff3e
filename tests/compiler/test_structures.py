"""Structures that must fuse: each test checks what is left in the graph and the numbers.

Models run in float64 with randomized BatchNorm statistics, so a wrong fold cannot hide.
"""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam

from .helpers import BN_FOR, CONV_FOR, assert_same, call_targets, conv_bn, modules_of, n_bns, n_convs, n_sums, rbn

torch.manual_seed(0)


def fused64(model, x):
    model = model.double().eval()
    x = x.double()
    fused = reparam.fuse(model, x)
    return fused, x


# 1. ConvNd + BatchNorm ------------------------------------------------------------------------
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn(nd, bias):
    model = nn.Sequential(CONV_FOR[nd](3, 6, 3, padding=1, bias=bias), rbn(6, nd), nn.ReLU())
    fused, x = fused64(model, torch.randn(2, 3, *([7] * nd)))
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    assert len(fused.report.regions) == 1 and fused.report.regions[0].members == ("0", "1")
    assert_same(model, fused, x)


# 2. BN-only and identity skips ----------------------------------------------------------------
class Skips(nn.Module):
    def __init__(self, c=8, groups=1):
        super().__init__()
        self.conv = conv_bn(c, c, 3, groups=groups)
        self.skip = rbn(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.skip(x) + self.conv(x))
        return x + self.conv2(x) + y  # identity shortcut over x, joined with another source


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_bn_skip_and_identity_shortcut(groups):
    model = Skips(groups=groups)
    fused, x = fused64(model, torch.randn(2, 8, 9, 9))
    assert n_bns(fused) == 0
    # skip+conv -> one conv; x + conv2(x) -> one conv; the final join of two sources stays an add
    assert n_convs(fused) == 2
    assert n_sums(fused) == 1
    assert_same(model, fused, x)


# 3. Parallel branches sharing a centre -----------------------------------------------------------
class Branches(nn.Module):
    def __init__(self, ci, co, kernels, stride=1, groups=1, dilation=1):
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn(ci, co, k, stride, groups=groups, dilation=dilation if max(k if isinstance(k, tuple) else (k,)) > 1 else 1)
            for k in kernels)

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return torch.relu(out)


CASES = {
    "kxk+1x1": [3, 1],
    "acnet": [3, (1, 3), (3, 1)],
    "large-kernel": [7, 3],
    "mobileone": [3, 3, 3, 1],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_parallel_branches(case, stride, groups):
    model = Branches(8, 8, CASES[case], stride, groups)
    fused, x = fused64(model, torch.randn(2, 8, 13, 12))
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    conv = modules_of(fused, nn.Conv2d)[0]
    assert conv.stride == (stride, stride) and conv.groups == groups
    assert conv.kernel_size == ((7, 7) if case == "large-kernel" else (3, 3))
    assert_same(model, fused, x)


def test_dilated_branches():
    model = Branches(8, 8, [3, 1, 5], 1, 2, dilation=2)
    fused, x = fused64(model, torch.randn(2, 8, 15, 15))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert_same(model, fused, x)


def test_branches_output_the_expected_shape_for_other_inputs():
    model = Branches(8, 8, [3, 1], 2, 1)
    fused, _ = fused64(model, torch.randn(1, 8, 16, 16))
    assert_same(model, fused, torch.randn(3, 8, 9, 21, dtype=torch.float64))


# 4. Differences and constant scales --------------------------------------------------------------
class RepMixer(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.norm = rbn(c)
        self.mixer_conv = conv_bn(c, c, 3, groups=c)
        self.mixer_scale = conv_bn(c, c, 1, groups=c)
        self.mixer_skip = rbn(c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        mixer = self.mixer_skip(x) + self.mixer_conv(x) + self.mixer_scale(x)
        return x + self.gamma * (mixer - self.norm(x))


def test_repmixer_collapses_to_one_depthwise_conv():
    model = RepMixer()
    fused, x = fused64(model, torch.randn(2, 8, 9, 9))
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    assert modules_of(fused, nn.Conv2d)[0].groups == 8
    assert not any(t in (operator.mul, operator.sub, operator.add) for t in call_targets(fused))
    assert_same(model, fused, x)


class Scales(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.ls = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.ls * self.conv(x)  # a layer scale after a conv folds into it
        y = torch.relu(y)
        return -self.conv2(y) * 0.5 + 2.0 - y / 4.0


def test_negation_scalars_and_layer_scale():
    model = Scales()
    fused, x = fused64(model, torch.randn(2, 4, 6, 6))
    assert n_convs(fused) == 2
    targets = call_targets(fused)
    assert not any(t in (operator.mul, operator.neg, operator.truediv, operator.sub, operator.add) for t in targets)
    assert "ls" not in dict(fused.named_parameters())
    assert_same(model, fused, x)


# 5. AvgPool branch (DBB) ---------------------------------------------------------------------------
class DBB(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.kxk = conv_bn(c, c, 3)
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), rbn(c))
        self.one = conv_bn(c, c, 1)

    def forward(self, x):
        return self.kxk(x) + self.pool(x) + self.one(x)


def test_avg_pool_branch():
    model = DBB()
    fused, x = fused64(model, torch.randn(2, 8, 9, 9))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert not any(isinstance(m, nn.AvgPool2d) for m in fused.modules())
    assert_same(model, fused, x)


# 6. Concatenation of branches ----------------------------------------------------------------------
class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(8, 6, 3)
        self.b = conv_bn(8, 2, 3)
        self.c = conv_bn(8, 4, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], dim=1)


def test_concat_of_branches():
    model = Inception()
    fused, x = fused64(model, torch.randn(2, 8, 7, 7))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert modules_of(fused, nn.Conv2d)[0].out_channels == 12
    assert torch.cat not in call_targets(fused)
    assert_same(model, fused, x)


# 7. Sequential composition, only when not more expensive ------------------------------------------
class Sequential2(nn.Module):
    def __init__(self, ci, cm, co, k2):
        super().__init__()
        self.pw = nn.Conv2d(ci, cm, 1, bias=False)
        self.kxk = nn.Conv2d(cm, co, k2, padding=k2 // 2)

    def forward(self, x):
        return self.kxk(self.pw(x))


def test_pointwise_then_kxk_composes_when_cheaper():
    model = Sequential2(4, 16, 4, 3)  # 4*16 + 16*4*9 MACs > 4*4*9
    fused, x = fused64(model, torch.randn(2, 4, 8, 8))
    assert n_convs(fused) == 1 and modules_of(fused, nn.Conv2d)[0].kernel_size == (3, 3)
    assert_same(model, fused, x)


def test_pointwise_then_kxk_kept_when_dearer():
    model = Sequential2(16, 4, 16, 3)  # 16*4 + 4*16*9 < 16*16*9: composing would cost more
    fused, x = fused64(model, torch.randn(2, 16, 8, 8))
    assert n_convs(fused) == 2
    assert any("not cheaper" in r.reason for r in fused.report.refusals)
    assert_same(model, fused, x)


def test_anything_then_unpadded_1x1():
    model = nn.Sequential(nn.Conv2d(8, 4, 3, stride=2, padding=1), rbn(4), nn.Conv2d(4, 2, 1))
    fused, x = fused64(model, torch.randn(2, 8, 9, 9))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert_same(model, fused, x)


# 8. Linear and BatchNorm1d ----------------------------------------------------------------------------
def test_linear_bn1d_both_orders():
    model = nn.Sequential(nn.Linear(6, 10), rbn(10, 1), nn.ReLU(), rbn(10, 1), nn.Linear(10, 3))
    fused, x = fused64(model, torch.randn(5, 6))
    assert n_bns(fused) == 0
    assert len(modules_of(fused, nn.Linear)) == 2
    assert_same(model, fused, x)


# 9. Functional convolutions with weights computed from parameters ----------------------------------
class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3))
        id_tensor = torch.zeros(8, 8, 3, 3)
        id_tensor[range(8), range(8), 1, 1] = 1
        self.register_buffer("id_tensor", id_tensor)
        self.bn = rbn(8)
        # OREPA-style: the kernel is generated from a basis and coefficients in forward
        self.basis = nn.Parameter(torch.randn(4, 9))
        self.coeff = nn.Parameter(torch.randn(8, 8, 4))
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x):
        y = self.bn(F.conv2d(x, self.weight + self.id_tensor, None, 1, 1))
        generated = (self.coeff @ self.basis).reshape(8, 8, 3, 3)
        return y + F.conv2d(x, generated, self.bias, padding=1)


def test_functional_convs_with_computed_weights():
    model = Functional()
    fused, x = fused64(model, torch.randn(2, 8, 7, 7))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert F.conv2d not in call_targets(fused) and operator.matmul not in call_targets(fused)
    assert_same(model, fused, x)


def test_spellings_of_add_are_one_op():
    class Spellings(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (conv_bn(4, 4, 3) for _ in range(4))

        def forward(self, x):
            y = torch.add(self.a(x), self.b(x))
            y = y.add(self.c(x))
            return operator.add(y, self.d(x)).sub(x)

    model = Spellings()
    fused, x = fused64(model, torch.randn(1, 4, 6, 6))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert_same(model, fused, x)


# Channels-last layout: BatchNorm before flatten/transpose folds into the Linear after it -----------
class TokenMixer(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.norm = rbn(c)
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.proj = nn.Linear(c, c)
        self.ls = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        B, C, H, W = x.shape
        t = self.norm(x).flatten(2).transpose(-2, -1)
        q, k, v = self.qkv(t).reshape(B, H * W, 3, C).permute(2, 0, 1, 3).unbind(0)
        t = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        t = self.proj(t).transpose(-2, -1).reshape(B, C, H, W)
        return x + self.ls * t


def test_bn_folds_through_layout_into_linear():
    model = TokenMixer()
    fused, x = fused64(model, torch.randn(2, 8, 5, 4))
    assert n_bns(fused) == 0
    assert "ls" not in dict(fused.named_parameters())
    assert len(modules_of(fused, nn.Linear)) == 2
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(1, 8, 3, 6, dtype=torch.float64))


class MixerThenFFN(nn.Module):
    """A fused mixer whose output is needed twice (residual and FFN), the FFN's conv+BN reading it."""

    def __init__(self, c=8):
        super().__init__()
        self.mixer = RepMixer(c)
        self.dw = conv_bn(c, c, 7, groups=c)
        self.fc1 = nn.Conv2d(c, 4 * c, 1)
        self.fc2 = nn.Conv2d(4 * c, c, 1)
        self.ls = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        x = self.mixer(x)
        return x + self.ls * self.fc2(torch.relu(self.fc1(self.dw(x))))


def test_fused_value_feeding_another_fused_region():
    model = nn.Sequential(MixerThenFFN(), MixerThenFFN())
    fused, x = fused64(model, torch.randn(2, 8, 9, 9))
    # per block: mixer -> 1 conv, dw+BN -> 1 conv, fc1, fc2 with the layer scale folded in
    assert n_bns(fused) == 0 and n_convs(fused) == 8
    assert n_sums(fused) == 2 and operator.mul not in call_targets(fused)
    assert_same(model, fused, x)


def test_value_added_to_itself():
    class Double(nn.Module):
        def __init__(self):
            super().__init__()
            self.cb = conv_bn(4, 4, 3)

        def forward(self, x):
            y = self.cb(x)
            return torch.relu(y + y)

    model = Double()
    fused, x = fused64(model, torch.randn(1, 4, 6, 6))
    assert n_convs(fused) == 1 and n_bns(fused) == 0 and len(fused.report.regions) == 1
    assert_same(model, fused, x)


def test_in_place_update_after_its_last_plain_read_is_made_out_of_place():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(4, 4, 3)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(torch.relu(self.stem(x)))
            z = y * 2.0  # reads y before the update: a new tensor, not a view
            y.add_(1.0)  # no reader of the old value follows, so this is y + 1
            return z + y

    model = InPlace()
    fused, x = fused64(model, torch.randn(1, 4, 6, 6))
    # z + (y + 1) = 3 * conv(.) + 1: one conv, nothing in place left
    assert [r.members for r in fused.report.regions] == [
        ("stem.0", "stem.1"), ("conv", "mul", "add_out_of_place", "add")]
    assert n_convs(fused) == 2 and n_bns(fused) == 0
    targets = call_targets(fused)
    assert "add_" not in targets and operator.mul not in targets and operator.add not in targets
    assert not fused.report.refusals
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(2, 4, 5, 7, dtype=torch.float64))


def test_inplace_activation_after_conv_bn_still_fuses():
    model = nn.Sequential(conv_bn(4, 4, 3), nn.ReLU(inplace=True), conv_bn(4, 4, 1))
    fused, x = fused64(model, torch.randn(1, 4, 6, 6))
    assert n_convs(fused) == 2 and n_bns(fused) == 0
    assert_same(model, fused, x)
