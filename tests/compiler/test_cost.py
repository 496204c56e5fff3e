"""The cost model: channel-wise structures judged by estimated latency, others by MACs; the
report's before/after counts use the same terms, and `explain` shows the figures compared."""

from __future__ import annotations

import torch
from torch import nn

import reparam
from reparam import affine

from .helpers import assert_same, conv_bn, modules_of, n_bns, n_convs, randomize_bn


class Pair(nn.Module):
    """ACNet-style asymmetric pair: `bn(conv1xk(x)) + bn(convkx1(x))`."""

    def __init__(self, c, k, groups):
        super().__init__()
        self.h = conv_bn(c, c, (1, k), groups=groups)
        self.v = conv_bn(c, c, (k, 1), groups=groups)

    def forward(self, x):
        return self.h(x) + self.v(x)


def test_depthwise_1x3_3x1_pair_becomes_one_depthwise_3x3():
    torch.manual_seed(0)
    model = Pair(32, 3, groups=32).double().eval()
    x = torch.randn(1, 32, 56, 56, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    convs = modules_of(fused, (nn.Conv2d,))
    assert len(convs) == 1 and convs[0].kernel_size == (3, 3) and convs[0].groups == 32
    assert n_bns(fused) == 0 and not fused.report.refusals
    assert len(fused.report.regions) == 1
    assert_same(model, fused, x)
    # More MACs, but less estimated time: the counts say so, with the rule's own terms.
    before, after = fused.report.before, fused.report.after
    assert after.macs > before.macs - 2 * 32 * 56 * 56  # 9 taps against 3 + 3 (+ the two norms)
    assert after.latency_us <= before.latency_us


def test_dense_1x7_7x1_pair_is_refused_with_its_figures():
    torch.manual_seed(1)
    model = Pair(16, 7, groups=1).double().eval()
    x = torch.randn(1, 16, 20, 20, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert sorted(m.kernel_size for m in modules_of(fused, (nn.Conv2d,))) == [(1, 7), (7, 1)]
    assert n_bns(fused) == 0
    assert_same(model, fused, x)
    (refusal,) = fused.report.refusals
    assert "not cheaper as one" in refusal.reason and "7x7" in refusal.reason
    assert f"{16 * 16 * 49 * 400:,} MACs" in refusal.reason  # the figures it compared
    text = str(reparam.explain(model, x))
    assert "Refused" in text and "MACs against" in text


def test_depthwise_7x7_then_dense_1x1_refusal_shows_both_figures():
    torch.manual_seed(2)
    model = nn.Sequential(conv_bn(16, 16, 7, groups=16), nn.Conv2d(16, 64, 1)).double().eval()
    x = torch.randn(1, 16, 24, 24, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 2 and n_bns(fused) == 0
    (refusal,) = fused.report.refusals
    assert "MACs against" in refusal.reason and "us" in refusal.reason
    assert_same(model, fused, x)


def test_counts_treat_a_norm_like_the_op_replacing_it():
    """A lone BatchNorm behind a Dropout: no fused region, and the counts do not grow."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Dropout(0.1), randomize_bn(nn.BatchNorm2d(8)),
                          nn.ReLU()).double().eval()
    x = torch.randn(1, 4, 10, 10, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert fused.report.regions == []
    before, after = fused.report.before, fused.report.after
    assert after.macs == before.macs == 8 * 8 * 8 * (4 * 9 + 1)
    assert after.latency_us <= before.latency_us
    assert_same(model, fused, x)


def test_lone_bn_is_not_a_region():
    model = nn.Sequential(randomize_bn(nn.BatchNorm2d(8))).double().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert fused.report.regions == []
    assert fused.report.after.macs == fused.report.before.macs
    assert_same(model, fused, x)


def test_accepted_fusions_never_raise_the_estimate():
    torch.manual_seed(4)
    for model in (Pair(8, 3, groups=8), Pair(8, 3, groups=1),
                  nn.Sequential(conv_bn(8, 8, 3), randomize_bn(nn.BatchNorm2d(8)))):
        model = model.double().eval()
        x = torch.randn(1, 8, 16, 16, dtype=torch.float64)
        fused = reparam.fuse(model, x)
        assert fused.report.regions
        assert fused.report.after.latency_us <= fused.report.before.latency_us


def test_cost_model_terms():
    m = affine.CostModel(overhead=10.0, mac=1.0, mac_grouped=3.0, byte=0.5)
    dense = affine.from_conv(torch.zeros(4, 8, 3, 3), padding=1)  # >= GROUPED_BELOW channels per group
    depthwise = affine.from_conv(torch.zeros(4, 1, 3, 3), padding=1, groups=4)
    # overhead + MACs * rate + bytes * (input + output + weights + bias)
    assert m.conv(dense, 8 * 25, 25, itemsize=1) == 10 + 1.0 * 4 * 8 * 9 * 25 + 0.5 * (200 + 100 + 288 + 4)
    assert m.conv(depthwise, 4 * 25, 25, itemsize=1) == 10 + 3.0 * 4 * 9 * 25 + 0.5 * (100 + 100 + 36 + 4)
    assert m.elementwise(100, 2, itemsize=1) == 10 + 0.5 * 300
