"""Weights generated in `forward` from parameters with Python numbers taken from them.

OREPA (Online Convolutional Re-parameterization) and others build the kernel in `forward`: einsums
of several parameters, a depthwise-separable pair turned into a dense kernel with sizes read in
Python (`t, ig, h, w = weight_dw.size(); tg = int(t / groups)`). A proxy cannot become a Python
number, so torch.fx cannot trace that; but these numbers come from parameters alone and are the same
for every input, so the trace uses their values. Numbers read from the input stay untraceable."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reparam.measure import unaccounted_linear_ops

from .helpers import assert_same, fuse64, n_bns, n_convs, rbn


class OREPAConv(nn.Module):
    """A 3x3 conv whose kernel is generated from four branches (origin, 1x1-average, 1x1, a
    depthwise-separable pair) scaled by a learned vector, then BatchNorm, as OREPA writes it."""

    def __init__(self, ci, co, k=3, expand=2):
        super().__init__()
        self.weight_orepa_origin = nn.Parameter(torch.randn(co, ci, k, k))
        self.weight_orepa_avg_conv = nn.Parameter(torch.randn(co, ci, 1, 1))
        self.register_buffer("weight_orepa_avg_avg", torch.ones(k, k).mul(1.0 / k / k))
        self.weight_orepa_1x1 = nn.Parameter(torch.randn(co, ci, 1, 1))
        self.weight_orepa_gconv_dw = nn.Parameter(torch.randn(ci * expand, 1, k, k))
        self.weight_orepa_gconv_pw = nn.Parameter(torch.randn(co, ci * expand, 1, 1))
        self.vector = nn.Parameter(torch.rand(4, co) + 0.5)
        self.bn = rbn(co)

    def dwsc2full(self, weight_dw, weight_pw, groups):
        t, ig, h, w = weight_dw.size()
        o, _, _, _ = weight_pw.size()
        tg = int(t / groups)
        i = int(ig * groups)
        weight_dw = weight_dw.view(groups, tg, ig, h, w)
        weight_pw = weight_pw.squeeze().view(o, groups, tg)
        weight_dsc = torch.einsum("gtihw,ogt->ogihw", weight_dw, weight_pw)
        return weight_dsc.reshape(o, i, h, w)

    def weight_gen(self):
        w0 = torch.einsum("oihw,o->oihw", self.weight_orepa_origin, self.vector[0, :])
        w1 = torch.einsum("oihw,hw->oihw", self.weight_orepa_avg_conv, self.weight_orepa_avg_avg)
        w1 = torch.einsum("oihw,o->oihw", w1, self.vector[1, :])
        w2 = torch.einsum("oihw,o->oihw", F.pad(self.weight_orepa_1x1, [1, 1, 1, 1]), self.vector[2, :])
        w3 = self.dwsc2full(self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw, self.weight_orepa_origin.size(1))
        w3 = torch.einsum("oihw,o->oihw", w3, self.vector[3, :])
        return w0 + w1 + w2 + w3

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight_gen(), None, 1, 1, 1, 1))


def test_orepa_kernel_generation_is_one_conv():
    torch.manual_seed(0)
    model = nn.Sequential(OREPAConv(4, 8), nn.ReLU(), OREPAConv(8, 8))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    fused = fuse64(model, x)
    assert n_convs(fused) == 2 and n_bns(fused) == 0
    assert not fused.report.leaves and not fused.report.refusals
    assert unaccounted_linear_ops(fused) == []
    assert not any(n.op == "call_function" and n.target is torch.einsum for n in fused.graph.nodes)
    assert_same(model, fused, torch.randn(1, 4, 12, 7, dtype=torch.float64))


class LoopOverChannels(nn.Module):
    """`len()` and `range()` of a parameter's size, a float taken from a buffer."""

    def __init__(self, c=6):
        super().__init__()
        self.scales = nn.Parameter(torch.rand(c) + 0.5)
        self.register_buffer("gain", torch.tensor(2.0, dtype=torch.float64))
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = rbn(c)

    def forward(self, x):
        kernel = self.conv.weight
        rows = [kernel[i] * self.scales[i] for i in range(len(self.scales))]
        weight = torch.stack(rows) * float(self.gain)
        return self.bn(F.conv2d(x, weight, None, 1, int(self.conv.weight.shape[-1] // 2)))


def test_numbers_from_parameters_are_used_as_they_are():
    torch.manual_seed(1)
    model = LoopOverChannels()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    fused = fuse64(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0 and not fused.report.leaves
    assert_same(model, fused, torch.randn(3, 6, 4, 8, dtype=torch.float64))


class HalfOfTheInput(nn.Module):
    """A number read from the input's sizes is not a constant: the block stays a leaf."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = rbn(4)

    def forward(self, x):
        half = int(x.shape[-1] / 2)
        return self.bn(self.conv(x[..., :half]))


class UpdatedBeforeRead(nn.Module):
    """A parameter copy updated in place before a number is read from it: not a constant here."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(4) + 1)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        w = self.w.clone()
        w.mul_(2)
        k = int(w.sum())
        return self.conv(x) * k


def test_numbers_from_the_input_or_from_updated_values_stay_untraceable():
    torch.manual_seed(2)
    for block in (HalfOfTheInput(), UpdatedBeforeRead()):
        model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), rbn(4), block)
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        fused = fuse64(model, x)
        assert [leaf.module for leaf in fused.report.leaves] == ["2"], fused.report.leaves
        assert_same(model, fused, x)
