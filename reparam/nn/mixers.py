"""Token mixers and residual scales of FastViT-style networks, in training form."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import MobileOneBlock

__all__ = ["LayerScale", "RepMixer", "RepCPE"]


class LayerScale(nn.Module):
    """A learnable per-channel scale (Touvron et al., "Going deeper with Image Transformers"
    (CaiT), ICCV 2021): `gamma * x`, `gamma` of shape (C, 1, 1).

    Inference form: nothing of its own; the scale is folded into the convolution that produces
    `x` (or the residual sum it feeds). Blocks may also multiply by `.gamma` in their own
    `forward`, which reads the same to the compiler.
    """

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class RepMixer(nn.Module):
    """RepMixer token mixer (Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using
    Structural Reparameterization", ICCV 2023):

        out = x + gamma * (mixer(x) - norm(x))
        mixer(x) = BN(dwconv_kxk(x)) + BN(dwconv_1x1(x)) + BN(x)     (a MobileOneBlock)
        norm(x)  = BN(x)                                              (a BN-only MobileOneBlock)

    The whole expression is linear in x. Inference form: one depthwise kxk convolution with
    bias (identity, skip, branches and layer scale folded together).
    """

    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init: float = 1e-5):
        super().__init__()
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, act_layer=None,
                                   use_scale_branch=False, num_conv_branches=0)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, act_layer=None)
        self.layer_scale = LayerScale(dim, layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale.gamma * (self.mixer(x) - self.norm(x))


class RepCPE(nn.Module):
    """Conditional positional encoding with its skip (Chu et al., "Conditional Positional
    Encodings for Vision Transformers", ICLR 2023; reparameterized as in FastViT):

        out = x + dwconv_kxk(x)          (depthwise conv with bias)

    Inference form: one depthwise kxk convolution with bias (identity added at the centre).
    """

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.pos_enc = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_enc(x)
