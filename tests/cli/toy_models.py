"""Tiny models for the command-line tests, imported as `toy_models:<factory>`.

Every factory is deterministic (seeded) and small enough to export in well under a second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that every branch matters numerically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()


class RepBlock(nn.Module):
    """kxk conv+BN and 1x1 conv+BN branches summed, plus a BN-only skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))
        self.k1 = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), nn.BatchNorm2d(c_out))
        self.skip = nn.BatchNorm2d(c_out) if c_in == c_out and stride == 1 else None

    def forward(self, x):
        y = self.k3(x) + self.k1(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return F.relu(y)


class RepNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = RepBlock(3, width, stride=2)
        self.block = RepBlock(width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(x.mean((2, 3)))


def rep_net() -> nn.Module:
    """No registered input size: needs --input-shape."""
    torch.manual_seed(0)
    return _randomize_bn(RepNet())


def rep_net_sized() -> nn.Module:
    """Declares its default input size (C, H, W), so --input-shape is optional."""
    model = rep_net()
    model.default_input_size = (3, 32, 32)
    return model


class FlatNet(nn.Module):
    """Accepts only 3x16x16 inputs (a Linear layer on the flattened image)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def flat_net() -> nn.Module:
    torch.manual_seed(0)
    return FlatNet().eval()


class FixedBatch(nn.Module):
    """Hard-codes a batch of two: exportable only with a fixed batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).reshape(2, -1).sum(1)


def fixed_batch() -> nn.Module:
    torch.manual_seed(0)
    return FixedBatch().eval()


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = RepBlock(3, 4)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return y, self.b(y)


def two_outputs() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(TwoOutputs())


def not_a_module():
    return {"not": "a module"}


def raising_factory():
    raise RuntimeError("the factory is broken on purpose")


module_instance = rep_net()  # an nn.Module instance is accepted as well


def rep_net_wide() -> nn.Module:
    """Same structure as rep_net, twice as wide: its checkpoints do not fit rep_net."""
    torch.manual_seed(0)
    return _randomize_bn(RepNet(width=16))


def example(batch: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


class BnBeforePaddedConv(nn.Module):
    """A BatchNorm (non-zero shift) before a padded 3x3 conv: cannot be folded exactly."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


def refused_net() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(BnBeforePaddedConv())


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx and torch.export cannot trace it."""

    def forward(self, x):
        if x.mean() > 0:
            return x * 2
        return x - 1


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.bn(self.conv(x)))


def gated_net() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(GatedNet())
