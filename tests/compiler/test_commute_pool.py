"""A per-channel affine (a BatchNorm after a residual sum) before global average pooling folds into
the Linear / 1x1 convolution after the pool: `avg(s*x + b) = s*avg(x) + b` for every average whose
weights sum to one (passes/commute.py). Where it cannot, the report says why, and
`unaccounted_linear_ops` looks through the pool so that no such map is left unexplained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops
from reparam.optional import MissingExtra, install_command, require
from reparam.trace import propagate_shapes

from .helpers import assert_same, modules_of, n_bns, randomize_bn, rbn


def _x(c=6, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c, h, w, generator=g, dtype=torch.float64)


class Residual(nn.Module):
    """`x + conv(x)`: a sum a following BatchNorm cannot fold backward into."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class SelectPool(nn.Module):
    """Like timm's SelectAdaptivePool2d: a pool and a flatten in one module."""

    def __init__(self):
        super().__init__()
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten(1)

    def forward(self, x):
        return self.flatten(self.pool(x))


class Head(nn.Module):
    def __init__(self, c, pool, classes=5, dropout=False):
        super().__init__()
        self.body, self.norm = Residual(c), rbn(c)
        self.pool_kind = pool
        self.select = SelectPool()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.3) if dropout else nn.Identity()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.norm(self.body(x))
        if self.pool_kind == "module":
            x = torch.flatten(self.pool(x), 1)
        elif self.pool_kind == "mean":
            x = x.mean((2, 3))
        elif self.pool_kind == "mean_neg":
            x = x.mean([-2, -1], keepdim=True).flatten(1)
        elif self.pool_kind == "functional":
            x = F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], -1)
        elif self.pool_kind == "select":
            x = self.select(x)
        return self.fc(self.drop(x))


@pytest.mark.parametrize("pool", ["module", "mean", "mean_neg", "functional", "select"])
@pytest.mark.parametrize("dropout", [False, True])
def test_bn_before_global_pool_folds_into_the_linear_head(pool, dropout):
    torch.manual_seed(1)
    model = Head(6, pool, dropout=dropout).double().eval()
    x = _x()
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 0
    linears = modules_of(fused, (nn.Linear, nn.Conv1d, nn.Conv2d))
    assert len(linears) == 2  # the residual's conv and the head, nothing for the BatchNorm
    assert any("norm" in r.members and "fc" in r.members for r in fused.report.regions)
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)
    assert_same(model, fused, _x(h=9, w=4, seed=3))  # any input size: the pool is global


class PoolThenConv(nn.Module):
    """BN -> avg_pool -> 1x1 conv, for the averages that keep constants and the one that does not."""

    def __init__(self, c, **pool):
        super().__init__()
        self.body, self.norm = Residual(c), rbn(c)
        self.pool = pool
        self.proj = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.proj(F.avg_pool2d(self.norm(self.body(x)), **self.pool))


@pytest.mark.parametrize("pool", [dict(kernel_size=3, stride=1, padding=1, count_include_pad=False),
                                  dict(kernel_size=3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
                                  dict(kernel_size=2, stride=2, ceil_mode=True)])
def test_bn_moves_through_an_average_that_keeps_constants(pool):
    torch.manual_seed(2)
    model = PoolThenConv(6, **pool).double().eval()
    x = _x()
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 0 and len(modules_of(fused, (nn.Conv2d,))) == 2
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)


def test_bn_before_a_pool_that_counts_padding_stays_with_a_reason():
    """count_include_pad=True averages zeros in at the border: the shift does not commute."""
    torch.manual_seed(3)
    model = PoolThenConv(6, kernel_size=3, stride=1, padding=1, count_include_pad=True).double().eval()
    x = _x()
    fused = reparam.fuse(model, x)
    assert any("norm" in r.where and "shift" in r.reason for r in fused.report.refusals)
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)


class SharedNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body, self.norm, self.fc = Residual(c), rbn(c), nn.Linear(c, 3)

    def forward(self, x):
        y = self.norm(self.body(x))
        return self.fc(y.mean((2, 3))), torch.relu(y)


def test_bn_also_read_elsewhere_stays_and_is_named():
    torch.manual_seed(4)
    model = SharedNorm(6).double().eval()
    x = _x()
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 1
    assert any("norm" in r.where and "also read by" in r.reason for r in fused.report.refusals)
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


class NothingAfter(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body, self.norm = Residual(c), rbn(c)

    def forward(self, x):
        return torch.sigmoid(self.norm(self.body(x)).mean((2, 3)))


def test_bn_with_nothing_linear_after_the_pool_is_named():
    torch.manual_seed(5)
    model = NothingAfter(6).double().eval()
    x = _x()
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 1
    assert any("norm" in r.where and "nothing linear" in r.reason for r in fused.report.refusals)
    assert_same(model, fused, x)


class ConvPoolLinear(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(c, c, 3, padding=1), nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(self.conv(torch.relu(x)).mean((2, 3)))


def test_kxk_conv_before_the_pool_is_named_not_silent():
    torch.manual_seed(6)
    model = ConvPoolLinear(6).double().eval()
    x = _x()
    fused = reparam.fuse(model, x)
    assert any("neighbouring" in r.reason for r in fused.report.refusals)
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)


def test_unaccounted_linear_ops_looks_through_the_pool():
    """The accounting check catches a BatchNorm left before pool -> Linear without a word."""
    torch.manual_seed(7)
    model = Head(6, "select").double().eval()
    traced = torch.fx.symbolic_trace(model)
    propagate_shapes(traced, (_x(),))
    missing = unaccounted_linear_ops(traced, report=_EmptyReport())
    assert any("norm" in m and "fc" in m for m in missing)


class _EmptyReport:
    refusals = ()
    regions = ()


def test_timm_nextvit_small_leaves_no_batchnorm():
    try:
        timm = require("timm", "the nextvit_small check")
    except MissingExtra:
        pytest.skip(f"timm is not installed: {install_command('timm')}")
    torch.manual_seed(8)
    model = timm.create_model("nextvit_small", pretrained=False, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    model = model.double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fused = reparam.fuse(model, x, verify=False)  # compared below, once
    assert n_bns(fused) == 0
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x, rel=1e-8)
