"""FastViT building blocks, in training form only.

Every re-parameterizable structure is written as the plain sum of its branches (a Conv2d without
bias followed by BatchNorm2d, a BatchNorm-only skip, an identity shortcut, a layer scale multiplied
in `forward`). There is no `reparameterize()` and no inference-mode flag: `reparam.fuse` derives the
inference form from the traced graph. Everything here is torch.fx traceable: no Python control flow
depends on tensor values, and attributes that may be absent are `Identity` modules that trace to
nothing.

Module and parameter names follow timm's FastViT, so timm checkpoints load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def trunc_normal_(w: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Fill `w` with a normal(0, std) truncated to +-2 std, by inverting the CDF (fast, exact)."""
    with torch.no_grad():
        bound = math.erf(2.0 / math.sqrt(2.0))  # 2 * Phi(2) - 1
        return w.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2.0))


class Identity(nn.Module):
    """Returns its input. Unlike `nn.Identity` it is traced through, so it leaves no graph node."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


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


class ConvBN(nn.Module):
    """A convolution without bias followed by BatchNorm2d: one linear branch."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018): global average, reduce with ReLU, expand, sigmoid
    gate per channel. Not linear in its input, so the compiler keeps it."""

    def __init__(self, channels: int, rd_ratio: float):
        super().__init__()
        rd_channels = max(1, int(round(channels * rd_ratio)))
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class LayerScale2d(nn.Module):
    """A learnable per-channel scale `gamma` of shape (C, 1, 1). Blocks multiply by `.gamma` in
    their own `forward` so the algebra reads in one line."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class MobileOneBlock(nn.Module):
    """MobileOne block (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone",
    CVPR 2023) in training form:

        out = act(se(conv_kxk[0](x) + ... + conv_scale(x) + identity(x)))

    `conv_kxk`: `num_conv_branches` parallel kxk ConvBN branches; `conv_scale`: a parallel 1x1
    ConvBN branch (only when k > 1 and `use_scale_branch`); `identity`: a BatchNorm-only skip (only
    when the shapes allow it: in == out channels and stride 1).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_se: bool = False,
        use_act: bool = True,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
    ):
        super().__init__()
        # Registration order matches timm's so that state_dict keys come out in the same order.
        self.se = SqueezeExcite(out_chs, rd_ratio=1 / 16) if use_se else Identity()
        self.identity = nn.BatchNorm2d(in_chs) if in_chs == out_chs and stride == 1 else None
        self.conv_kxk = nn.ModuleList(
            ConvBN(in_chs, out_chs, kernel_size, stride=stride, groups=groups)
            for _ in range(num_conv_branches)
        )
        self.conv_scale = (
            ConvBN(in_chs, out_chs, 1, stride=stride, groups=groups)
            if kernel_size > 1 and use_scale_branch else None
        )
        self.act = nn.GELU() if use_act else Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [conv(x) for conv in self.conv_kxk]
        if self.conv_scale is not None:
            branches.append(self.conv_scale(x))
        if self.identity is not None:
            branches.append(self.identity(x))
        out = branches[0]
        for b in branches[1:]:
            out = out + b
        return self.act(self.se(out))


class ReparamLargeKernelConv(nn.Module):
    """Large-kernel convolution with a parallel small-kernel branch (RepLKNet, Ding et al., CVPR
    2022): `act(se(large_conv(x) + small_conv(x)))`. Both branches are ConvBN with the same stride
    and groups. `act` and `se` are used only by the MobileCLIP towers; the original FastViT models
    apply neither (the reference computes an activation and discards it, and the published weights
    were trained that way)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int,
                 small_kernel: int = 3, use_se: bool = False, use_act: bool = False):
        super().__init__()
        self.large_conv = ConvBN(in_chs, out_chs, kernel_size, stride=stride, groups=groups)
        self.small_conv = ConvBN(in_chs, out_chs, small_kernel, stride=stride, groups=groups)
        self.se = SqueezeExcite(out_chs, rd_ratio=0.25) if use_se else Identity()
        self.act = nn.GELU() if use_act else Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.large_conv(x) + self.small_conv(x)))


class PatchEmbed(nn.Module):
    """Downsampling between stages: a depthwise-grouped kxk stride-2 large-kernel conv (C -> C_out,
    groups=C) followed by a 1x1 MobileOne block with GELU."""

    def __init__(self, in_chs: int, embed_dim: int, patch_size: int = 7, stride: int = 2,
                 use_se: bool = False, lkc_use_act: bool = False):
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_chs, embed_dim, patch_size, stride, groups=in_chs,
                                   small_kernel=3, use_se=use_se, use_act=lkc_use_act),
            MobileOneBlock(embed_dim, embed_dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def convolutional_stem(in_chs: int, out_chs: int) -> nn.Sequential:
    """Three MobileOne blocks with GELU: 3x3 stride 2 (with a 1x1 branch), 3x3 stride-2 depthwise
    (with a 1x1 depthwise branch), 1x1 (with a BatchNorm skip). Output stride 4."""
    return nn.Sequential(
        MobileOneBlock(in_chs, out_chs, kernel_size=3, stride=2),
        MobileOneBlock(out_chs, out_chs, kernel_size=3, stride=2, groups=out_chs),
        MobileOneBlock(out_chs, out_chs, kernel_size=1, stride=1),
    )


class RepMixer(nn.Module):
    """RepMixer token mixer: `x + gamma * (mixer(x) - norm(x))`.

    `mixer` = BN skip + depthwise kxk ConvBN + depthwise 1x1 ConvBN; `norm` = a BN-only branch.
    The whole expression is linear in x, so the compiler folds it into one depthwise kxk conv.
    """

    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init: float = 1e-5):
        super().__init__()
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False,
                                   use_scale_branch=False, num_conv_branches=0)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False)
        self.layer_scale = LayerScale2d(dim, layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale.gamma * (self.mixer(x) - self.norm(x))


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


class RepCPE(nn.Module):
    """Conditional positional encoding (Chu et al., 2021) with its skip: `x + pos_enc(x)`, where
    `pos_enc` is a depthwise kxk conv with bias."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.pos_enc = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_enc(x)


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
    `x = x + gamma1 * attn(norm(x)); x = x + gamma2 * mlp(x)`, norm being BatchNorm2d."""

    def __init__(self, dim: int, mlp_ratio: float, head_dim: int = 32, layer_scale_init: float = 1e-5,
                 proj_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = Attention(dim, head_dim=head_dim, proj_drop=proj_drop)
        self.layer_scale_1 = LayerScale2d(dim, layer_scale_init)
        self.drop_path1 = DropPath(drop_path)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.layer_scale_2 = LayerScale2d(dim, layer_scale_init)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.layer_scale_1.gamma * self.token_mixer(self.norm(x)))
        return x + self.drop_path2(self.layer_scale_2.gamma * self.mlp(x))


class ClassifierHead(nn.Module):
    """Global average pooling, dropout and a linear classifier (`fc`; absent when num_classes=0,
    in which case the pooled features are returned)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.drop = Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)
