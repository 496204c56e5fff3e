"""Zero `F.pad` is part of the algebra: an identity 1x1 convolution with padding. Padding moves
through compositions where that is exact (DBB's pad-then-valid-conv), and a BatchNorm applied to
a zero-padded tensor is a per-channel map whose border is its shift."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import affine

from .helpers import assert_same, modules_of, n_bns, n_convs, rbn


class PadThenValidConv(nn.Module):
    def __init__(self, c, p=1, module=False):
        super().__init__()
        self.pad = nn.ZeroPad2d(p) if module else None
        self.p = p
        self.conv = nn.Conv2d(c, c, 3, bias=False)
        self.bn = rbn(c)

    def forward(self, x):
        y = self.pad(x) if self.pad is not None else F.pad(x, [self.p] * 4)
        return self.bn(self.conv(y))


def test_pad_then_valid_conv_and_bn_become_one_padded_conv():
    torch.manual_seed(0)
    for module in (False, True):
        model = PadThenValidConv(6, module=module).double().eval()
        x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
        fused = reparam.fuse(model, x)
        convs = modules_of(fused, (nn.Conv2d,))
        assert len(convs) == 1 and convs[0].padding == (1, 1) and n_bns(fused) == 0
        assert not [n for n in fused.graph.nodes if n.target is F.pad]
        assert_same(model, fused, x)


class BNThenPad(nn.Module):
    """DBB's BNAndPad as a composition: `conv_valid(bn(F.pad(x)))`: the border is bn's shift."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = rbn(c), nn.Conv2d(c, c, 3)

    def forward(self, x):
        return self.conv(self.bn(F.pad(x, [1, 1, 1, 1])))


def test_bn_of_a_zero_padded_tensor_folds_into_the_valid_conv():
    torch.manual_seed(1)
    model = BNThenPad(4).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert_same(model, fused, x)


class PadAfterBN(nn.Module):
    """`F.pad(bn(x))` with zeros then a valid conv: the border is zero, not bn's shift: refused."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = rbn(c), nn.Conv2d(c, c, 3)

    def forward(self, x):
        return self.conv(F.pad(self.bn(x), [1, 1, 1, 1]))


def test_zero_pad_after_a_shift_is_refused():
    torch.manual_seed(2)
    model = PadAfterBN(4).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert any("shift" in r.reason for r in fused.report.refusals)
    assert_same(model, fused, x)


def test_asymmetric_pad_is_refused_with_a_reason():
    class Asym(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 2)

        def forward(self, x):
            return self.conv(F.pad(x, [0, 1, 0, 1]))

    model = Asym().double().eval()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert any("differently" in r.reason for r in fused.report.refusals)
    assert_same(model, fused, x)


def test_pad_in_the_algebra():
    torch.manual_seed(3)
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    pad = affine.zero_pad(3, (1, 2), 2)
    assert torch.equal(pad.apply(x), F.pad(x, [2, 2, 1, 1]))
    conv = affine.from_conv(torch.randn(4, 3, 3, 3), torch.randn(4), padding=1)
    both = affine.compose(conv, pad)
    assert both.padding == (2, 3)
    assert torch.allclose(both.apply(x), F.conv2d(F.pad(x, [2, 2, 1, 1]), conv.weight, conv.bias, padding=1))
