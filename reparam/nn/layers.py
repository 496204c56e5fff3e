"""Plain helper layers used by the reparameterizable blocks: identity, dropout, drop-path,
squeeze-excitation, LayerNorm over channels, truncated-normal initialization.

None of them is a branch structure; they exist so that blocks trace to clean graphs (an
`Identity` that leaves no node, dropout that vanishes in eval mode).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Identity", "Dropout", "DropPath", "SqueezeExcite", "LayerNorm2d", "trunc_normal_", "make_act"]

#: what blocks accept as an activation: a module class (or factory) called with no arguments,
#: or None for no activation
ActLayer = Callable[[], nn.Module] | None


def trunc_normal_(w: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Fill `w` with a normal(0, std) truncated to +-2 std, by inverting the CDF (fast, exact)."""
    with torch.no_grad():
        bound = math.erf(2.0 / math.sqrt(2.0))  # 2 * Phi(2) - 1
        return w.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2.0))


class Identity(nn.Module):
    """Returns its input. Unlike `nn.Identity` it is traced through, so it leaves no graph node."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_act(act_layer: ActLayer) -> nn.Module:
    """`act_layer()` or an `Identity` when it is None."""
    return Identity() if act_layer is None else act_layer()


class Dropout(nn.Dropout):
    """`nn.Dropout` that leaves no graph node when it cannot act (eval mode or p == 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return F.dropout(x, self.p, training=True, inplace=self.inplace)


class DropPath(nn.Module):
    """Stochastic depth for residual branches of 4-D feature maps: during training each sample's
    branch is zeroed with probability `p` and survivors are scaled by 1/(1-p). Identity in eval."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.rand_like(x[:, :1, :1, :1]) < keep  # one draw per sample
        return x * mask.to(x.dtype) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018): global average, 1x1 reduce with ReLU, 1x1
    expand, sigmoid gate per channel: `x * sigmoid(fc2(relu(fc1(mean(x)))))`. Not linear in its
    input, so the compiler keeps it (it fuses what comes before it)."""

    def __init__(self, channels: int, rd_ratio: float = 1 / 16):
        super().__init__()
        rd_channels = max(1, int(round(channels * rd_ratio)))
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (each pixel normalized on its own).
    Not an affine map of its input, so the compiler keeps it."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
