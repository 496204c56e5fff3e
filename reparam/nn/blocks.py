"""Reparameterizable blocks in training form.

Each block is written as the plain sum of its linear branches and nothing else: no
`reparameterize()`, no deploy flag. `reparam.fuse(model, x)` turns every block, built in its
fusible form, into exactly one convolution followed by the block's nonlinearity (activation,
squeeze-excitation), because every branch is an affine map of the same input with the same
stride and centre (see the operator algebra in the README).

Notation in the docstrings: `BN(y) = a * y + b` per channel in eval mode, with
`a = gamma / sqrt(running_var + eps)` and `b = beta - running_mean * a`; `conv_kxk` is a
convolution with a k x k kernel and "same" padding; `act` and `se` are the optional
activation and squeeze-excitation applied after the sum.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ActLayer, Identity, SqueezeExcite, make_act

__all__ = ["ConvBN", "RepVGGBlock", "MobileOneBlock", "ACBlock", "DiverseBranchBlock", "LargeKernelReparam"]


def _same_padding(kernel_size, dilation=1):
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    return tuple(dilation * (k - 1) // 2 for k in ks)


class ConvBN(nn.Module):
    """A convolution without bias followed by BatchNorm2d: `BN(conv(x))`.

    Inference form: one convolution with bias, `W' = a * W`, `b' = b` (per output channel).
    `kernel_size` may be an int or a (kh, kw) pair; padding defaults to "same" (centred) padding,
    which is what lets parallel branches of different kernel sizes be summed into one kernel.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size, stride: int = 1, groups: int = 1,
                 padding=None, dilation: int = 1):
        super().__init__()
        if padding is None:
            padding = _same_padding(kernel_size, dilation)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class RepVGGBlock(nn.Module):
    """RepVGG block (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021):

        out = act(se(BN(conv_kxk(x)) + BN(conv_1x1(x)) + BN(x)))

    `conv_kxk`, `conv_1x1`: ConvBN branches with the same stride and groups; `identity`: a
    BatchNorm-only skip, present only when the shapes allow it (in == out channels, stride 1)
    and `use_identity`. Inference form: one kxk convolution with bias (the 1x1 kernel placed at
    the centre, the skip as a centred (grouped) identity kernel), then `se` and `act`.
    Names follow timm (`identity`, `conv_kxk`, `conv_1x1`, `attn` for the squeeze-excitation).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, use_se: bool = False, se_ratio: float = 1 / 16,
                 act_layer: ActLayer = nn.ReLU, use_identity: bool = True):
        super().__init__()
        has_skip = use_identity and in_chs == out_chs and stride == 1
        self.identity = nn.BatchNorm2d(in_chs) if has_skip else None
        self.conv_kxk = ConvBN(in_chs, out_chs, kernel_size, stride=stride, groups=groups)
        self.conv_1x1 = ConvBN(in_chs, out_chs, 1, stride=stride, groups=groups) if kernel_size > 1 else None
        self.attn = SqueezeExcite(out_chs, se_ratio) if use_se else Identity()
        self.act = make_act(act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_kxk(x)
        if self.conv_1x1 is not None:
            out = out + self.conv_1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(self.attn(out))


class MobileOneBlock(nn.Module):
    """MobileOne block (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone",
    CVPR 2023), also the building block of FastViT's stem, patch embeddings and RepMixer:

        out = act(se(sum_i BN_i(conv_kxk[i](x)) + BN(conv_1x1(x)) + BN(x)))

    `conv_kxk`: `num_conv_branches` parallel kxk ConvBN branches (over-parameterization factor
    k of the paper); `conv_scale`: the 1x1 "scale" ConvBN branch (only when kernel_size > 1 and
    `use_scale_branch`); `identity`: a BatchNorm-only skip (only when in == out channels, stride
    1 and `use_identity`). All branches share stride and groups. Inference form: one kxk
    convolution with bias, then `se` and `act`.
    Names follow timm's FastViT (`se`, `identity`, `conv_kxk.<i>`, `conv_scale`).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_se: bool = False,
        se_ratio: float = 1 / 16,
        act_layer: ActLayer = nn.ReLU,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
        use_identity: bool = True,
    ):
        super().__init__()
        # Registration order matches timm's FastViT so that state_dict keys come out in its order.
        self.se = SqueezeExcite(out_chs, se_ratio) if use_se else Identity()
        has_skip = use_identity and in_chs == out_chs and stride == 1
        self.identity = nn.BatchNorm2d(in_chs) if has_skip else None
        self.conv_kxk = nn.ModuleList(
            ConvBN(in_chs, out_chs, kernel_size, stride=stride, groups=groups)
            for _ in range(num_conv_branches)
        )
        self.conv_scale = (
            ConvBN(in_chs, out_chs, 1, stride=stride, groups=groups)
            if kernel_size > 1 and use_scale_branch else None
        )
        self.act = make_act(act_layer)

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


class ACBlock(nn.Module):
    """Asymmetric convolution block (Ding et al., "ACNet: Strengthening the Kernel Skeletons for
    Powerful CNN via Asymmetric Convolution Blocks", ICCV 2019):

        out = act(BN(conv_kxk(x)) + BN(conv_1xk(x)) + BN(conv_kx1(x)))

    The three ConvBN branches share stride, groups and centre. Inference form: one kxk
    convolution with bias, the 1xk and kx1 kernels added to the middle row and column.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act_layer: ActLayer = None):
        super().__init__()
        k = kernel_size
        self.square = ConvBN(in_chs, out_chs, (k, k), stride=stride, groups=groups)
        self.hor = ConvBN(in_chs, out_chs, (1, k), stride=stride, groups=groups)
        self.ver = ConvBN(in_chs, out_chs, (k, 1), stride=stride, groups=groups)
        self.act = make_act(act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.square(x) + self.hor(x) + self.ver(x))


class _PointwiseThen(nn.Module):
    """`bn(op(conv1x1(x)))`, with an optional BatchNorm right after the 1x1 conv."""

    def __init__(self, in_chs: int, mid_chs: int, op: nn.Module, out_chs: int, groups: int, inner_bn: bool):
        super().__init__()
        self.conv1x1 = nn.Conv2d(in_chs, mid_chs, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs) if inner_bn else Identity()
        self.op = op
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.op(self.bn1(self.conv1x1(x))))


class DiverseBranchBlock(nn.Module):
    """Diverse Branch Block (Ding et al., "Diverse Branch Block: Building a Convolution as an
    Inception-like Unit", CVPR 2021), built in its exactly fusible form:

        out = act(BN(conv_kxk(x))                    # dbb_origin
                  + BN(conv_1x1(x))                  # dbb_1x1 (when kernel_size > 1)
                  + BN(conv_kxk'(conv_1x1'(x)))      # dbb_1x1_kxk
                  + BN(avg_kxk(conv_1x1''(x))))      # dbb_avg

    All branches share stride and groups (the 1x1 convs of the two sequential branches have
    stride 1, the kxk conv / average pool after them carries the stride; the average pool
    counts padding, so it is a depthwise kxk conv of 1/k^2). Inference form: one kxk
    convolution with bias: each sequential branch composes into a kxk kernel because its first
    op is a 1x1 convolution without bias and without padding. `internal_chs` is the width between
    the 1x1 and kxk convs of `dbb_1x1_kxk` (default: in_chs).

    On its own, the `dbb_avg` branch (1x1 conv then average pool) would not be composed: one
    dense kxk conv costs more than a 1x1 conv and a pool. In the sum it joins the dense kxk of
    `dbb_origin`, which has its geometry and groups, at no extra cost, so `reparam.fuse` takes
    the composition there and the whole block becomes one convolution.

    Not exact, so not the default: the paper puts a BatchNorm between the 1x1 conv and the
    padded kxk conv / average pool (`inner_bn=True`). That BatchNorm shifts its output by a
    per-channel constant, and the padded border of the following kxk op sees zeros instead of
    that constant, so the composition is not a convolution near the border. The paper's code
    works around it by padding with the BatchNorm's shift (a special layer); with a plain
    BatchNorm, `reparam.fuse` leaves those two branches as they are and its report says why.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, internal_chs: int | None = None, inner_bn: bool = False,
                 act_layer: ActLayer = None):
        super().__init__()
        k, pad = kernel_size, kernel_size // 2
        mid = internal_chs or in_chs
        if in_chs % groups or out_chs % groups or mid % groups:
            raise ValueError(f"DiverseBranchBlock: channels {in_chs} -> {mid} -> {out_chs} must be "
                             f"divisible by groups={groups}")
        self.dbb_origin = ConvBN(in_chs, out_chs, k, stride=stride, groups=groups)
        self.dbb_1x1 = ConvBN(in_chs, out_chs, 1, stride=stride, groups=groups) if k > 1 else None
        self.dbb_1x1_kxk = _PointwiseThen(
            in_chs, mid, nn.Conv2d(mid, out_chs, k, stride=stride, padding=pad, groups=groups, bias=False),
            out_chs, groups, inner_bn)
        self.dbb_avg = _PointwiseThen(
            in_chs, out_chs, nn.AvgPool2d(k, stride=stride, padding=pad, count_include_pad=True),
            out_chs, groups, inner_bn)
        self.act = make_act(act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(x)
        if self.dbb_1x1 is not None:
            out = out + self.dbb_1x1(x)
        out = out + self.dbb_1x1_kxk(x) + self.dbb_avg(x)
        return self.act(out)


class LargeKernelReparam(nn.Module):
    """Large-kernel convolution with a parallel small-kernel branch (Ding et al., "Scaling Up
    Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs" (RepLKNet), CVPR 2022; used
    by FastViT's patch embeddings):

        out = act(se(BN(conv_KxK(x)) + BN(conv_kxk(x))))     k < K, both odd

    Both ConvBN branches share stride and groups. Inference form: one KxK convolution with
    bias (the small kernel added at the centre), then `se` and `act`.
    Names follow timm's FastViT (`large_conv`, `small_conv`, `se`, `act`).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 small_kernel: int = 3, use_se: bool = False, se_ratio: float = 0.25,
                 act_layer: ActLayer = None):
        super().__init__()
        self.large_conv = ConvBN(in_chs, out_chs, kernel_size, stride=stride, groups=groups)
        self.small_conv = ConvBN(in_chs, out_chs, small_kernel, stride=stride, groups=groups)
        self.se = SqueezeExcite(out_chs, se_ratio) if use_se else Identity()
        self.act = make_act(act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.large_conv(x) + self.small_conv(x)))
