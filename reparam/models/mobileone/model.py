"""The MobileOne network: configuration, stage, model.

Reads top-down: `MobileOneConfig` (every architectural choice, one field each),
`MobileOneStage` (depthwise + pointwise MobileOne block pairs), `MobileOne` (stem, four
stages, head). The block itself is `reparam.nn.MobileOneBlock`; the variants are rows of the
table in `variants.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...nn import MobileOneBlock
from ..common import StemStagesClassifier


@dataclass(frozen=True)
class MobileOneConfig:
    """Everything that distinguishes one MobileOne from another."""

    width_multipliers: tuple[float, ...]  # per stage: width = base_widths[i] * multiplier (alpha in the paper)
    num_blocks: tuple[int, ...] = (2, 8, 10, 1)  # per stage: number of depthwise+pointwise block pairs
    num_conv_branches: int = 1  # k of the paper: parallel kxk branches in every block after the stem
    se_blocks: tuple[int, ...] = (0, 0, 0, 0)  # per stage: the last n pairs have squeeze-excitation
    base_widths: tuple[int, ...] = (64, 128, 256, 512)  # per stage: width before the multiplier
    in_chans: int = 3  # input image channels
    num_classes: int = 1000  # classifier outputs; 0 = no classifier, forward returns pooled features
    drop_rate: float = 0.0  # dropout before the classifier (training only)
    features_only: bool = False  # build no head; forward returns the four stage outputs as a list

    def __post_init__(self):
        n = len(self.num_blocks)
        for field in ("width_multipliers", "se_blocks", "base_widths"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"MobileOneConfig.{field} needs one entry per stage ({n}), "
                                 f"got {getattr(self, field)!r}")
        for se, depth in zip(self.se_blocks, self.num_blocks):
            if not 0 <= se <= depth:
                raise ValueError(f"se_blocks {self.se_blocks} must lie in 0..num_blocks {self.num_blocks}")
        if self.num_conv_branches < 1:
            raise ValueError(f"num_conv_branches must be >= 1, got {self.num_conv_branches}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    @property
    def stem_width(self) -> int:
        """Width of the stem: the first stage's width, at most 64."""
        return min(64, int(self.base_widths[0] * self.width_multipliers[0]))

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(b * w) for b, w in zip(self.base_widths, self.width_multipliers))


class MobileOneStage(nn.Sequential):
    """One stage: `num_blocks` pairs of a 3x3 depthwise MobileOne block (the first with stride 2)
    and a 1x1 pointwise MobileOne block, ReLU after each. The last `se_blocks` pairs apply
    squeeze-excitation in both blocks."""

    def __init__(self, cfg: MobileOneConfig, index: int, in_chs: int):
        blocks = []
        depth, out_chs = cfg.num_blocks[index], cfg.widths[index]
        for i in range(depth):
            use_se = i >= depth - cfg.se_blocks[index]
            kw = dict(use_se=use_se, num_conv_branches=cfg.num_conv_branches, act_layer=nn.ReLU)
            blocks.append(MobileOneBlock(in_chs, in_chs, 3, stride=2 if i == 0 else 1, groups=in_chs, **kw))
            blocks.append(MobileOneBlock(in_chs, out_chs, 1, **kw))
            in_chs = out_chs
        super().__init__(*blocks)


class MobileOne(StemStagesClassifier):
    """MobileOne, from Vasu, Gabriel, Zhu, Tuzel and Ranjan, "MobileOne: An Improved One
    millisecond Mobile Backbone", CVPR 2023 (arXiv:2206.04040).

    Written in training form only: every branch is an explicit module and `reparam.fuse(model,
    x)` produces the inference form (one conv + ReLU per block). State-dict names follow timm's
    MobileOne except that squeeze-excitation is `se` (timm: `attn`); timm and apple/ml-mobileone
    checkpoints are renamed on loading (`checkpoint_keys.py`).

    Structure: `stem` (3x3 stride-2 MobileOne block, single kxk branch) -> `stages[0..3]`
    (strides 4, 8, 16, 32) -> `head` (global average pool, linear). Interfaces as FastViT's:
    `forward`, `forward_features`, `forward_head`, `forward_intermediates`.
    """

    def __init__(self, cfg: MobileOneConfig):
        super().__init__()
        self.cfg = cfg
        self.features_only = cfg.features_only
        self.num_classes = 0 if cfg.features_only else cfg.num_classes
        self.stem = MobileOneBlock(cfg.in_chans, cfg.stem_width, 3, stride=2, act_layer=nn.ReLU)
        stages, in_chs = [], cfg.stem_width
        for i in range(len(cfg.num_blocks)):
            stages.append(MobileOneStage(cfg, i, in_chs))
            in_chs = cfg.widths[i]
        self.stages = nn.Sequential(*stages)
        self._init_features_and_head(cfg)
