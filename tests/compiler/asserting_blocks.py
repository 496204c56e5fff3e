"""Blocks with Python `assert` statements in forward.

They live outside the test modules because pytest rewrites the `assert` statements of test modules
into other bytecode; here they compile as in any user's code. (PYTEST_DONT_REWRITE)
"""

from __future__ import annotations

import torch
from torch import nn

from .helpers import conv_bn, rbn


class AssertingBlock(nn.Module):
    """Python `assert` statements in forward, as research code writes them: on ranks, channel
    counts, devices, and on values."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = rbn(c)
        self.pw = conv_bn(c, c, 1)

    def forward(self, x):
        assert x.dim() == 4, f"expected a 4-D input, got {x.dim()}-D"
        B, C, H, W = x.shape
        assert C == self.c, "wrong number of channels"
        assert not x.is_cuda
        assert x.ndim == 4 and x.shape[1] == self.c
        y = self.bn(self.conv(x))
        assert y.shape == x.shape
        y = y + self.pw(x)
        assert torch.isfinite(y).all(), "non-finite activations"
        return torch.relu(y)


class OrAssert(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        assert x.dim() == 4 or x.dim() == 3  # the first operand alone does not decide: not traced
        return self.block(x)


def truth_tests(x):
    """One of each: assert x / assert not x / assert x and x / assert x or x / if x."""
    assert x
    assert not x
    assert x and x
    assert x or x
    if x:
        pass
    return x
