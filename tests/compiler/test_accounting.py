"""No silent misses: every pair of adjacent linear operations left in a fused graph is explained
by the report (a refusal naming one of them), across the structure families."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops

from .helpers import assert_same, conv_bn, randomize_bn, rbn


class RepVGG(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.kxk, self.one, self.skip = conv_bn(c, c, 3), conv_bn(c, c, 1), rbn(c)

    def forward(self, x):
        return F.relu(self.kxk(x) + self.one(x) + self.skip(x))


class MobileOne(nn.Module):
    def __init__(self, c, k=3):
        super().__init__()
        self.scale = conv_bn(c, c, 1, groups=c)
        self.convs = nn.ModuleList([conv_bn(c, c, k, groups=c) for _ in range(3)])
        self.skip = rbn(c)

    def forward(self, x):
        out = self.scale(x) + self.skip(x)
        for conv in self.convs:
            out += conv(x)
        return F.relu(out)


class RepMixer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.mixer = rbn(c), conv_bn(c, c, 3, groups=c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1))

    def forward(self, x):
        return x + self.gamma * (self.mixer(x) - self.norm(x))


class BNBeforePadded(nn.Module):
    """Refused: a BN shift before a zero-padded conv."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = rbn(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


class DwThenDense(nn.Module):
    """Refused by cost: depthwise 7x7 + BN then a dense expanding 1x1."""

    def __init__(self, c):
        super().__init__()
        self.dw, self.pw = conv_bn(c, c, 7, groups=c), nn.Conv2d(c, 4 * c, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class AsymmetricPair(nn.Module):
    """Refused by cost: dense 1x7 + 7x1 kept as two convolutions."""

    def __init__(self, c):
        super().__init__()
        self.h, self.v = conv_bn(c, c, (1, 7)), conv_bn(c, c, (7, 1))

    def forward(self, x):
        return self.h(x) + self.v(x)


class TokenNorm(nn.Module):
    """Linear + BatchNorm1d over batch*tokens, then a Linear: everything folds."""

    def __init__(self, c):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(c, c), randomize_bn(nn.BatchNorm1d(c)), nn.Linear(c, c)

    def forward(self, x):
        y = self.a(x)
        return F.gelu(self.b(self.bn(y.flatten(0, 1)).reshape_as(y)))


class Pooled(nn.Module):
    """DBB-style: 3x3 + avg-pool branches, layer scale."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv_bn(c, c, 3)
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), rbn(c))
        self.ls = nn.Parameter(torch.rand(c, 1, 1))

    def forward(self, x):
        return F.relu(self.ls * (self.conv(x) + self.pool(x)))


FAMILIES = [
    (RepVGG, (1, 8, 8, 8)), (MobileOne, (1, 8, 8, 8)), (RepMixer, (1, 8, 8, 8)),
    (BNBeforePadded, (1, 8, 8, 8)), (DwThenDense, (1, 8, 24, 24)), (AsymmetricPair, (1, 8, 16, 16)),
    (TokenNorm, (2, 5, 8)), (Pooled, (1, 8, 8, 8)),
]


@pytest.mark.parametrize("family,shape", FAMILIES, ids=[f.__name__ for f, _ in FAMILIES])
def test_every_linear_op_left_is_accounted_for(family, shape):
    torch.manual_seed(0)
    model = family(shape[-1] if family is TokenNorm else shape[1]).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, x)


def test_the_helper_finds_a_silent_miss():
    """With the report's refusals removed, the kept pairs show up."""
    torch.manual_seed(1)
    model = BNBeforePadded(4).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    fused.report.refusals.clear()
    assert unaccounted_linear_ops(fused) == ["bn -> conv"]
