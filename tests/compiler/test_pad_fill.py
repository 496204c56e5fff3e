"""DBB's BNAndPad as its authors write it: BatchNorm, `F.pad` with zeros, then the border set to
the BatchNorm's shift by four slice assignments, then a valid kxk conv. That is the conv applied
to the BatchNorm of the zero-padded input: one padded conv after fusion (passes/fill.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops

from .helpers import assert_close_float32, assert_same, n_bns, n_convs, rbn


class BNAndPad(nn.Module):
    """As in the DiverseBranchBlock authors' code (written again here, same operations)."""

    def __init__(self, c, pad_pixels, affine=True):
        super().__init__()
        self.bn = rbn(c)
        if not affine:
            self.bn = nn.BatchNorm2d(c, affine=False)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.25, 1.75)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                    self.bn.running_var + self.bn.eps)
            else:
                pad_values = -self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


class Branch(nn.Module):
    """DBB's 1x1 -> kxk branch: conv1x1, BNAndPad, valid kxk conv, BN."""

    def __init__(self, c, p, affine=True):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = BNAndPad(c, p, affine)
        self.conv2 = nn.Conv2d(c, c, 2 * p + 1, bias=False)
        self.bn2 = rbn(c)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_pad_then_fill_fuses_to_one_padded_conv(p, affine):
    torch.manual_seed(p)
    model = Branch(4, p, affine).double().eval()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert conv.kernel_size == (2 * p + 1,) * 2 and conv.padding == (p, p)
    assert not [n for n in fused.graph.nodes if n.target in (F.pad,) or "setitem" in str(n.target)]
    assert not fused.report.refusals and not fused.report.leaves
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(1, 4, 5, 9, dtype=torch.float64))


def test_pad_then_fill_in_float32():
    torch.manual_seed(3)
    model = Branch(8, 1).eval()
    x = torch.randn(2, 8, 9, 9)
    fused = assert_close_float32(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0


class WrongFill(nn.Module):
    """The border set to something other than the BatchNorm's shift: not a zero-padded input."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = rbn(c), nn.Conv2d(c, c, 3)
        self.fill = nn.Parameter(torch.rand(1, c, 1, 1))

    def forward(self, x):
        out = F.pad(self.bn(x), [1, 1, 1, 1])
        out[:, :, :1, :] = self.fill
        out[:, :, -1:, :] = self.fill
        out[:, :, :, :1] = self.fill
        out[:, :, :, -1:] = self.fill
        return self.conv(out)


def test_a_border_of_other_values_stays_with_a_reason():
    torch.manual_seed(4)
    model = WrongFill(4).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 1
    assert any("bn" in r.where and "zero input" in r.reason for r in fused.report.refusals)
    assert_same(model, fused, x)


class PartialFill(nn.Module):
    """Only the top border set: stays an in-place update (exact, reported), nothing fused wrongly."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = rbn(c), nn.Conv2d(c, c, 3)

    def forward(self, x):
        out = F.pad(self.bn(x), [1, 1, 1, 1])
        out[:, :, :1, :] = 1.0
        return self.conv(out)


def test_a_partial_fill_is_kept_in_place_and_reported():
    torch.manual_seed(5)
    model = PartialFill(4).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert any("in place" in r.reason for r in fused.report.refusals)
    assert_same(model, fused, x)
