"""Norms applied on reshaped views whose channel axis stays whole fold into the neighbouring
Linear: `bn(x.flatten(0, 1)).reshape_as(x)` (BatchNorm1d over batch*tokens), `view_as`,
`view(*shape)`, `reshape(b, n, c)` with sizes from `x.shape`, `unflatten`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam

from .helpers import assert_same, modules_of, randomize_bn


def bn1d(c):
    return randomize_bn(nn.BatchNorm1d(c))


class LinearNorm(nn.Module):
    """Linear on tokens [B, N, C] then BatchNorm1d over the flattened batch and tokens."""

    def __init__(self, ci, co, spelling):
        super().__init__()
        self.linear = nn.Linear(ci, co, bias=False)
        self.bn = bn1d(co)
        self.spelling = spelling

    def forward(self, x):
        x = self.linear(x)
        if self.spelling == "reshape_as":
            return self.bn(x.flatten(0, 1)).reshape_as(x)
        if self.spelling == "view_as":
            return self.bn(x.flatten(0, 1)).view_as(x)
        if self.spelling == "view_shape":
            shape = x.shape
            return self.bn(x.flatten(0, 1)).view(shape)  # `view(*shape)` cannot be traced by torch.fx
        if self.spelling == "reshape_bnc":
            b, n, c = x.shape
            return self.bn(x.reshape(b * n, c)).reshape(b, n, c)
        if self.spelling == "unflatten":
            b, n = x.shape[0], x.shape[1]
            return self.bn(x.flatten(0, 1)).unflatten(0, (b, n))
        raise ValueError(self.spelling)


SPELLINGS = ["reshape_as", "view_as", "view_shape", "reshape_bnc", "unflatten"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_batchnorm_over_batch_and_tokens_folds_into_the_linear(spelling):
    torch.manual_seed(0)
    model = nn.Sequential(LinearNorm(8, 12, spelling), nn.GELU(), LinearNorm(12, 6, spelling)).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert len(modules_of(fused, (nn.Linear,))) == 2
    assert not modules_of(fused, (nn.BatchNorm1d,))
    assert not fused.report.refusals
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(3, 7, 8, dtype=torch.float64))  # other batch and token counts


def test_norm_on_a_view_that_splits_channels_is_not_folded():
    """`x.reshape(b, n * 2, c // 2)`: the channel axis does not stay whole, nothing folds."""

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)
            self.bn = bn1d(4)

        def forward(self, x):
            b, n, c = x.shape
            y = self.linear(x).reshape(b * n * 2, c // 2)
            return self.bn(y)

    torch.manual_seed(1)
    model = Split().double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert len(modules_of(fused, (nn.BatchNorm1d,))) + len(
        [m for m in fused.modules() if type(m).__name__ == "ChannelAffine"]) == 1
    assert_same(model, fused, x)


def test_unflatten_module_and_spatial_view():
    """Conv + BN, then `flatten(2)` and `nn.Unflatten`: the BN still folds into the conv."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(6)),
                          nn.Flatten(2), nn.Unflatten(2, (4, 5)), nn.ReLU()).double().eval()
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert len(modules_of(fused, (nn.Conv2d,))) == 1 and not modules_of(fused, (nn.BatchNorm2d,))
    assert_same(model, fused, x)
