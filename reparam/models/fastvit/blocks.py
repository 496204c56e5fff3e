"""FastViT building blocks, in training form only.

The reparameterizable blocks (MobileOne block, large-kernel conv, RepMixer, RepCPE, layer
scale) are the public ones of `reparam.nn`; this module adds what only FastViT uses: patch
embedding, stem, ConvFFN, attention, the MetaFormer blocks and the classifier head. There is no
`reparameterize()` and no inference-mode flag: `reparam.fuse` derives the inference form from the
traced graph. Everything here is torch.fx traceable.

Module and parameter names follow timm's FastViT, so timm checkpoints load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from ...nn import (
    ConvBN,
    DropPath,
    Dropout,
    Identity,
    LargeKernelReparam,
    LayerNorm2d,
    LayerScale,
    MobileOneBlock,
    RepCPE,
    RepMixer,
    SqueezeExcite,
)
from ...nn.layers import trunc_normal_
from ..common import ClassifierHead

# The names this module used before the blocks became public, kept for existing imports.
LayerScale2d = LayerScale
ReparamLargeKernelConv = LargeKernelReparam

__all__ = [
    "ConvBN", "DropPath", "Dropout", "Identity", "LargeKernelReparam", "LayerNorm2d", "LayerScale",
    "LayerScale2d", "MobileOneBlock", "RepCPE", "RepMixer", "ReparamLargeKernelConv", "SqueezeExcite",
    "trunc_normal_", "PatchEmbed", "convolutional_stem", "ConvMlp", "Attention", "RepMixerBlock",
    "AttentionBlock", "ClassifierHead",
]


class PatchEmbed(nn.Module):
    """Downsampling between stages: a depthwise-grouped kxk stride-2 large-kernel conv (C -> C_out,
    groups=C) followed by a 1x1 MobileOne block with GELU."""

    def __init__(self, in_chs: int, embed_dim: int, patch_size: int = 7, stride: int = 2,
                 use_se: bool = False, lkc_use_act: bool = False):
        super().__init__()
        self.proj = nn.Sequential(
            LargeKernelReparam(in_chs, embed_dim, patch_size, stride, groups=in_chs, small_kernel=3,
                               use_se=use_se, act_layer=nn.GELU if lkc_use_act else None),
            MobileOneBlock(embed_dim, embed_dim, kernel_size=1, act_layer=nn.GELU),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def convolutional_stem(in_chs: int, out_chs: int, use_scale_branch: bool = True) -> nn.Sequential:
    """Three MobileOne blocks with GELU: 3x3 stride 2 (with a 1x1 branch), 3x3 stride-2 depthwise
    (with a 1x1 depthwise branch), 1x1 (with a BatchNorm skip). Output stride 4. The MobileCLIP2
    towers (mci3, mci4) have no 1x1 scale branches here (`use_scale_branch=False`)."""
    kw = dict(act_layer=nn.GELU, use_scale_branch=use_scale_branch)
    return nn.Sequential(
        MobileOneBlock(in_chs, out_chs, kernel_size=3, stride=2, **kw),
        MobileOneBlock(out_chs, out_chs, kernel_size=3, stride=2, groups=out_chs, **kw),
        MobileOneBlock(out_chs, out_chs, kernel_size=1, stride=1, **kw),
    )


class ConvMlp(nn.Module):
    """ConvFFN: depthwise 7x7 ConvBN -> 1x1 conv (expansion, with bias) -> GELU -> 1x1 conv."""

    def __init__(self, in_chs: int, hidden_chs: int, drop: float = 0.0):
        super().__init__()
        self.conv = ConvBN(in_chs, in_chs, 7, groups=in_chs)
        self.fc1 = nn.Conv2d(in_chs, hidden_chs, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_chs, in_chs, kernel_size=1)
        self.drop = Dropout(drop)
        for conv in (self.conv.conv, self.fc1, self.fc2):  # the reference's initialization
            trunc_normal_(conv.weight, std=0.02)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.conv(x)))
        x = self.drop(x)
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W tokens of a (B, C, H, W) map. qkv has no bias, the
    output projection has one."""

    def __init__(self, dim: int, head_dim: int = 32, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_drop = Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        tokens = x.flatten(2).transpose(-2, -1)  # (B, N, C)
        qkv = self.qkv(tokens).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, heads, N, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        tokens = (attn @ v).transpose(1, 2).reshape(B, N, C)
        tokens = self.proj_drop(self.proj(tokens))
        return tokens.transpose(-2, -1).reshape(B, C, H, W)


class RepMixerBlock(nn.Module):
    """MetaFormer block with RepMixer: `x = token_mixer(x); x = x + gamma * mlp(x)`."""

    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int = 3, layer_scale_init: float = 1e-5,
                 proj_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.layer_scale = LayerScale2d(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale.gamma * self.mlp(x))


class AttentionBlock(nn.Module):
    """MetaFormer block with self-attention:
    `x = x + gamma1 * attn(norm(x)); x = x + gamma2 * mlp(x)`, norm being BatchNorm2d or, in
    the MobileCLIP2 towers (mci3, mci4), LayerNorm2d over channels with eps 1e-5."""

    def __init__(self, dim: int, mlp_ratio: float, head_dim: int = 32, layer_scale_init: float = 1e-5,
                 proj_drop: float = 0.0, drop_path: float = 0.0, norm: str = "batchnorm"):
        super().__init__()
        if norm not in ("batchnorm", "layernorm"):
            raise ValueError(f"unknown attention norm {norm!r}; use 'batchnorm' or 'layernorm'")
        self.norm = nn.BatchNorm2d(dim) if norm == "batchnorm" else LayerNorm2d(dim, eps=1e-5)
        self.token_mixer = Attention(dim, head_dim=head_dim, proj_drop=proj_drop)
        self.layer_scale_1 = LayerScale2d(dim, layer_scale_init)
        self.drop_path1 = DropPath(drop_path)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.layer_scale_2 = LayerScale2d(dim, layer_scale_init)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.layer_scale_1.gamma * self.token_mixer(self.norm(x)))
        return x + self.drop_path2(self.layer_scale_2.gamma * self.mlp(x))
