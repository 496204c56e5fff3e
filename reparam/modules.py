"""Small modules the lowering emits where no torch.nn module fits."""

from __future__ import annotations

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """`y = x * scale + shift` along the channel axis `dim` (a per-channel affine map)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, dim: int, ndim: int):
        super().__init__()
        view = [1] * ndim
        view[dim] = -1
        self.scale = nn.Parameter(scale.reshape(view))
        self.shift = nn.Parameter(shift.reshape(view))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, dim={self.dim}"


class AxisLinear(nn.Linear):
    """A linear map over axis `dim` (not the last one) of its input."""

    def __init__(self, in_features: int, out_features: int, dim: int, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(self.dim, -1)).movedim(-1, self.dim)
