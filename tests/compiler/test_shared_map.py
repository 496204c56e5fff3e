"""A per-channel map read by several linear operations folds into each of them:
`a(m(x)), b(m(x))` becomes `(a.m)(x), (b.m)(x)`, and `m` is no longer computed. Each reader's
geometry is its own, so each copy is free; only when every reader takes it in (otherwise nothing
is saved and the report says which reader could not)."""

from __future__ import annotations

import torch
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops
from reparam.modules import ChannelAffine

from .helpers import assert_close_float32, assert_same, modules_of, n_bns, n_convs, rbn

torch.manual_seed(0)


def _x(c=8, size=7, seed=0):
    return torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class DistilledHead(nn.Module):
    """A final norm, global pooling, and a classifier beside a distillation head whose outputs are
    averaged at inference (EfficientFormer, LeViT, DeiT write their heads this way)."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = rbn(c)
        self.head = nn.Linear(c, classes)
        self.head_dist = nn.Linear(c, classes)

    def forward(self, x):
        x = self.norm(torch.relu(self.conv(x)))
        x = x.flatten(2).mean(-1)
        return (self.head(x) + self.head_dist(x)) / 2


def test_norm_before_a_pool_read_by_two_heads_folds_into_them():
    model = DistilledHead().double().eval()
    x = _x()
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 0
    linears = modules_of(fused, nn.Linear)
    assert len(linears) == 1  # the two heads and the norm are one Linear
    assert any(n.target == "mean" for n in fused.graph.nodes)  # the pool stays
    assert not fused.report.refusals and unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)


class Readers(nn.Module):
    """A BatchNorm read by a 1x1 conv, an unpadded 3x3 conv and another BatchNorm."""

    def __init__(self, c=8, padded=False, nonlinear=False):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = rbn(c)
        self.a = nn.Conv2d(c, c, 1)
        self.b = nn.Conv2d(c, 4, 3, padding=1 if padded else 0)
        self.c = rbn(c)
        self.nonlinear = nonlinear

    def forward(self, x):
        y = self.norm(torch.relu(self.conv(x)))
        third = torch.sigmoid(y) if self.nonlinear else torch.sigmoid(self.c(y))
        return self.a(y).sum((2, 3)) + self.b(y).mean() + third.mean((2, 3))


def test_norm_read_by_three_linear_operations_folds_into_each():
    model = Readers().double().eval()
    x = _x()
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 0
    assert n_convs(fused) == 3  # conv, and the two readers with the norm inside
    assert len(modules_of(fused, ChannelAffine)) == 1  # norm then c: one per-channel map
    assert not fused.report.refusals and unaccounted_linear_ops(fused) == []
    assert sorted(len(r.members) for r in fused.report.regions) == [2, 2, 2]
    assert_same(model, fused, x)
    assert n_bns(assert_close_float32(Readers(), x.float())) == 0  # float32 end to end


def test_norm_stays_when_one_reader_cannot_take_it_and_the_report_says_which():
    for model, culprit, why in ((Readers(padded=True), "b", "zero-padded"),
                                (Readers(nonlinear=True), "sigmoid", "cannot take a per-channel map")):
        model = model.double().eval()
        x = _x()
        fused = reparam.fuse(model, x)
        # `norm` stays whole, for every reader: folding it into some of them saves nothing.
        assert "norm" in {n.target for n in fused.graph.nodes if n.op == "call_module"}
        refusal = next(r for r in fused.report.refusals if r.where.startswith("norm,"))
        assert culprit in refusal.reason and why in refusal.reason and "read by 3 operations" in refusal.reason
        assert unaccounted_linear_ops(fused) == []
        assert_same(model, fused, x)


def test_accounting_names_a_shared_norm_left_unexplained():
    model = Readers(padded=True).double().eval()
    x = _x()
    fused = reparam.fuse(model, x)
    assert unaccounted_linear_ops(fused) == []
    fused.report.refusals.clear()  # as if the pass had said nothing
    missing = unaccounted_linear_ops(fused)
    assert missing and missing[0].startswith("norm -> ")


class QKV(nn.Module):
    """Separate query, key and value projections of one normed token sequence."""

    def __init__(self, c=8):
        super().__init__()
        self.norm = nn.BatchNorm1d(c)
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, 2 * c)

    def forward(self, x):  # x: [B, C]
        x = self.norm(torch.tanh(x))
        attn = torch.softmax(self.q(x) * self.k(x), -1)
        return self.v(x).reshape(x.shape[0], 2, -1).sum(1) * attn


def test_norm_read_by_query_key_and_value_projections_folds_into_all_three():
    model = QKV()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-1, 1)
    model = model.double().eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 0 and len(modules_of(fused, nn.Linear)) == 3
    assert not fused.report.refusals
    assert_same(model, fused, x)
