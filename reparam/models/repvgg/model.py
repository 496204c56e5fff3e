"""The RepVGG network: configuration, stage, model.

Reads top-down: `RepVGGConfig` (every architectural choice, one field each), `RepVGGStage`
(a sequence of RepVGG blocks, the first with stride 2), `RepVGG` (stem, four stages, head).
The block itself is `reparam.nn.RepVGGBlock`; the variants are rows of the table in
`variants.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...nn import RepVGGBlock
from ..common import StemStagesClassifier


@dataclass(frozen=True)
class RepVGGConfig:
    """Everything that distinguishes one RepVGG from another."""

    num_blocks: tuple[int, ...]  # per stage: number of RepVGG blocks (the first has stride 2)
    width_multipliers: tuple[float, ...]  # per stage: width = base_widths[i] * multiplier (a, b in the paper)
    groups: int = 1  # groups of the 3x3 and 1x1 convs in the layers listed in grouped_layers
    grouped_layers: tuple[int, ...] = ()  # layer indices (stem = 0, then 1, 2, ... over all stages) using `groups`
    use_se: bool = False  # squeeze-excitation (reduction 1/16) after every block's sum, stem included
    base_widths: tuple[int, ...] = (64, 128, 256, 512)  # per stage: width before the multiplier
    in_chans: int = 3  # input image channels
    num_classes: int = 1000  # classifier outputs; 0 = no classifier, forward returns pooled features
    drop_rate: float = 0.0  # dropout before the classifier (training only)
    features_only: bool = False  # build no head; forward returns the four stage outputs as a list

    def __post_init__(self):
        n = len(self.num_blocks)
        for field in ("width_multipliers", "base_widths"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"RepVGGConfig.{field} needs one entry per stage ({n}), "
                                 f"got {getattr(self, field)!r}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    @property
    def stem_width(self) -> int:
        """Width of the stem: the first stage's width, at most 64."""
        return min(64, int(self.base_widths[0] * self.width_multipliers[0]))

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(b * w) for b, w in zip(self.base_widths, self.width_multipliers))


class RepVGGStage(nn.Sequential):
    """One stage: `num_blocks` RepVGG blocks with ReLU; the first has stride 2 (and so no skip).
    `first_layer` is the index of its first block in the paper's numbering (stem = 0)."""

    def __init__(self, cfg: RepVGGConfig, index: int, in_chs: int, first_layer: int):
        blocks = []
        out_chs = cfg.widths[index]
        for i in range(cfg.num_blocks[index]):
            groups = cfg.groups if first_layer + i in cfg.grouped_layers else 1
            blocks.append(RepVGGBlock(in_chs, out_chs, 3, stride=2 if i == 0 else 1, groups=groups,
                                      use_se=cfg.use_se, act_layer=nn.ReLU))
            in_chs = out_chs
        super().__init__(*blocks)


class RepVGG(StemStagesClassifier):
    """RepVGG, from Ding, Zhang, Ma, Han, Ding and Sun, "RepVGG: Making VGG-style ConvNets Great
    Again", CVPR 2021 (arXiv:2101.03697).

    Written in training form only: every branch is an explicit module and `reparam.fuse(model,
    x)` produces the inference form, a plain stack of 3x3 convs with ReLU. State-dict names
    follow timm's RepVGG; checkpoints of the original release (DingXiaoH/RepVGG) are renamed on
    loading (`checkpoint_keys.py`).

    Structure: `stem` (3x3 stride-2 RepVGG block) -> `stages[0..3]` (strides 4, 8, 16, 32) ->
    `head` (global average pool, linear). Interfaces as FastViT's: `forward`,
    `forward_features`, `forward_head`, `forward_intermediates`.
    """

    def __init__(self, cfg: RepVGGConfig):
        super().__init__()
        self.cfg = cfg
        self.features_only = cfg.features_only
        self.num_classes = 0 if cfg.features_only else cfg.num_classes
        self.stem = RepVGGBlock(cfg.in_chans, cfg.stem_width, 3, stride=2, use_se=cfg.use_se, act_layer=nn.ReLU)
        stages, in_chs, layer = [], cfg.stem_width, 1
        for i, depth in enumerate(cfg.num_blocks):
            stages.append(RepVGGStage(cfg, i, in_chs, first_layer=layer))
            in_chs, layer = cfg.widths[i], layer + depth
        self.stages = nn.Sequential(*stages)
        self._init_features_and_head(cfg)
