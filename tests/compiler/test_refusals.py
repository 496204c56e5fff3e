"""Structures that must be refused: left as they were, with the reason in the report."""

import torch
from torch import nn

import reparam

from .helpers import assert_same, conv_bn, modules_of, n_bns, n_convs, rbn


def fused64(model, x):
    model = model.double().eval()
    return reparam.fuse(model, x.double()), x.double()


def reasons(fused, name):
    return [r.reason for r in fused.report.refusals if name in r.where.split(", ")]


def test_batchnorm_without_running_stats_stays():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False))
    fused, x = fused64(model, torch.randn(2, 4, 6, 6))
    assert n_bns(fused) == 1 and n_convs(fused) == 1
    assert any("batch statistics" in r for r in reasons(fused, "1"))
    assert_same(model, fused, x)


def test_shift_before_padded_conv_stays():
    model = nn.Sequential(rbn(4), nn.Conv2d(4, 4, 3, padding=1))
    fused, x = fused64(model, torch.randn(2, 4, 6, 6))
    assert n_bns(fused) == 1 and n_convs(fused) == 1
    assert any("border" in r for r in reasons(fused, "0"))
    assert_same(model, fused, x)


def test_shift_before_unpadded_conv_fuses():
    model = nn.Sequential(rbn(4), nn.Conv2d(4, 4, 3, padding=0))
    fused, x = fused64(model, torch.randn(2, 4, 6, 6))
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    assert_same(model, fused, x)


class ReflectBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.a_bn = rbn(4)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.a_bn(self.a(x)) + self.b(x)


def test_reflect_padding_branches_stay_but_bn_after_it_folds():
    model = ReflectBranches()
    fused, x = fused64(model, torch.randn(2, 4, 6, 6))
    assert n_convs(fused) == 2 and n_bns(fused) == 0  # BN after a reflect conv is still exact
    assert [m.padding_mode for m in modules_of(fused, nn.Conv2d)].count("reflect") == 1
    assert any("padding_mode" in r for r in reasons(fused, "b"))
    assert_same(model, fused, x)


class TwoStrides(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 5, stride=1, padding=0)

    def forward(self, x):  # on 8x8 both give 4x4, from different strides
        return self.a(x) + self.b(x)


def test_branches_with_different_strides_stay():
    model = TwoStrides()
    fused, x = fused64(model, torch.randn(1, 4, 8, 8))
    assert n_convs(fused) == 2
    assert any("stride" in r for r in reasons(fused, "a"))
    assert_same(model, fused, x)


class TwoCentres(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 2, stride=2)
        self.b = nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x):  # same output size on even inputs, but kernels centred differently
        return self.a(x) + self.b(x)


def test_branches_with_different_centres_stay():
    model = TwoCentres()
    fused, x = fused64(model, torch.randn(1, 4, 8, 8))
    assert n_convs(fused) == 2
    assert any("centred" in r for r in reasons(fused, "b"))
    assert_same(model, fused, x)


class ConvFFN(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.dw = conv_bn(c, c, 7, groups=c)
        self.fc1 = nn.Conv2d(c, 4 * c, 1)

    def forward(self, x):
        return self.fc1(self.dw(x))


def test_composition_dearer_than_its_parts_is_refused():
    model = ConvFFN()
    fused, x = fused64(model, torch.randn(1, 8, 9, 9))
    convs = modules_of(fused, nn.Conv2d)
    assert n_bns(fused) == 0 and len(convs) == 2  # the BN folds into the depthwise conv only
    assert convs[0].groups == 8 and convs[0].kernel_size == (7, 7) and convs[1].kernel_size == (1, 1)
    assert any("not cheaper" in r for r in reasons(fused, "fc1"))
    assert_same(model, fused, x)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = conv_bn(4, 4, 3)

    def forward(self, x):
        return self.block(torch.relu(self.block(x)))


def test_module_called_twice_is_fused_per_call_site_and_never_edited():
    model = Shared().double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 0 and n_convs(fused) == 2
    assert len(fused.report.regions) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert_same(model, fused, x)


def test_concat_dearer_than_branches_is_refused():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    model = Cat()
    fused, x = fused64(model, torch.randn(1, 8, 5, 5))
    assert n_convs(fused) == 2
    assert any("not cheaper" in r for r in reasons(fused, "a"))
    assert_same(model, fused, x)
