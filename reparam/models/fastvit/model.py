"""The FastViT network: configuration, stage, model.

Reads top-down: `FastViTConfig` (every architectural choice, one field each), `FastViTStage`
(downsampling + optional positional encoding + blocks), `FastViT` (stem, four stages (five in MobileCLIP2's mci3/mci4), head).
The variants themselves are rows of the table in `variants.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import (
    AttentionBlock,
    ClassifierHead,
    Identity,
    MobileOneBlock,
    PatchEmbed,
    RepCPE,
    RepMixerBlock,
    convolutional_stem,
    trunc_normal_,
)
from ..common import StemStagesClassifier


@dataclass(frozen=True)
class FastViTConfig:
    """Everything that distinguishes one FastViT (or MobileCLIP image tower) from another."""

    layers: tuple[int, ...]  # number of blocks in each stage
    embed_dims: tuple[int, ...]  # channel width of each stage (stage i runs at stride 4 * 2**i)
    mlp_ratio: float  # ConvFFN hidden width = mlp_ratio * stage width
    token_mixers: tuple[str, ...]  # per stage: "repmixer" or "attention"
    pos_embs: tuple[bool, ...]  # per stage: a RepCPE (x + dwconv7x7(x)) before the blocks
    se_downsamples: tuple[bool, ...] = (False,) * 4  # per stage: squeeze-excitation in its patch embedding
    lkc_use_act: bool = False  # GELU after the large-kernel conv of patch embeddings (MobileCLIP only)
    layer_scale_init: float = 1e-5  # initial value of every layer scale gamma
    attn_norm: str = "batchnorm"  # norm before attention: "batchnorm", or "layernorm" (LayerNorm2d, MobileCLIP2)
    stem_scale_branch: bool = True  # 1x1 scale branches in the stem's 3x3 blocks (False in MobileCLIP2)
    repmixer_kernel_size: int = 3  # kernel of RepMixer's depthwise conv
    down_patch_size: int = 7  # kernel of the large-kernel conv in patch embeddings
    down_stride: int = 2  # stride of patch embeddings
    cpe_kernel_size: int = 7  # kernel of the RepCPE depthwise conv
    head_dim: int = 32  # channels per attention head
    cls_ratio: float = 2.0  # width of the final MobileOne block = cls_ratio * last stage width
    in_chans: int = 3  # input image channels
    num_classes: int = 1000  # classifier outputs; 0 = no classifier, forward returns pooled features
    drop_rate: float = 0.0  # dropout before the classifier (training only)
    proj_drop_rate: float = 0.0  # dropout inside ConvFFN and after the attention projection (training only)
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 to this over all blocks
    features_only: bool = False  # build no head; forward returns the stage outputs as a list

    def __post_init__(self):
        n = len(self.layers)
        for field in ("embed_dims", "token_mixers", "pos_embs", "se_downsamples"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"FastViTConfig.{field} needs one entry per stage ({n}), "
                                 f"got {getattr(self, field)!r}")
        for mixer in self.token_mixers:
            if mixer not in ("repmixer", "attention"):
                raise ValueError(f"unknown token mixer {mixer!r}; use 'repmixer' or 'attention'")
        if self.attn_norm not in ("batchnorm", "layernorm"):
            raise ValueError(f"unknown attn_norm {self.attn_norm!r}; use 'batchnorm' or 'layernorm'")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


class FastViTStage(nn.Module):
    """One stage: `blocks(pos_emb(downsample(x)))`. Stage 0 has no downsampling (the stem did it)."""

    def __init__(self, cfg: FastViTConfig, index: int, dim_in: int, drop_path_rates: list[float]):
        super().__init__()
        dim = cfg.embed_dims[index]
        if index > 0:
            self.downsample = PatchEmbed(dim_in, dim, patch_size=cfg.down_patch_size, stride=cfg.down_stride,
                                         use_se=cfg.se_downsamples[index], lkc_use_act=cfg.lkc_use_act)
        else:
            self.downsample = Identity()
        self.pos_emb = RepCPE(dim, cfg.cpe_kernel_size) if cfg.pos_embs[index] else Identity()
        blocks = []
        for rate in drop_path_rates:
            if cfg.token_mixers[index] == "repmixer":
                blocks.append(RepMixerBlock(dim, cfg.mlp_ratio, kernel_size=cfg.repmixer_kernel_size,
                                            layer_scale_init=cfg.layer_scale_init,
                                            proj_drop=cfg.proj_drop_rate, drop_path=rate))
            else:
                blocks.append(AttentionBlock(dim, cfg.mlp_ratio, head_dim=cfg.head_dim,
                                             layer_scale_init=cfg.layer_scale_init,
                                             proj_drop=cfg.proj_drop_rate, drop_path=rate,
                                             norm=cfg.attn_norm))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.pos_emb(self.downsample(x)))


class FastViT(StemStagesClassifier):
    """FastViT, from Vasu, Gabriel, Zhu, Tuzel and Ranjan, "FastViT: A Fast Hybrid Vision
    Transformer using Structural Reparameterization", ICCV 2023 (arXiv:2303.14189); the same
    network family also gives the MobileCLIP image towers (Vasu et al., "MobileCLIP", CVPR 2024;
    mci0-2) and the larger MobileCLIP2 towers (Faghri et al., "MobileCLIP2", 2025; mci3, mci4:
    five stages, LayerNorm2d before attention, no scale branches in the stem).

    Written in training form only: every re-parameterizable branch is an explicit module and
    `reparam.fuse(model, x)` produces the inference form. State-dict names follow timm's FastViT.

    Structure: `stem` (stride 4) -> `stages[0..3]` (strides 4, 8, 16, 32) -> `final_conv` (3x3
    depthwise-grouped MobileOne block, C -> cls_ratio*C, with squeeze-excitation) -> `head`
    (global average pool, linear). Interfaces:

    - `forward(x)`: logits, or pooled features when num_classes == 0, or with
      `features_only=True` the list of the stage outputs;
    - `forward_features(x)`: the map after `final_conv` (B, cls_ratio*C, H/32, W/32);
    - `forward_head(x, pre_logits=False)`;
    - `forward_intermediates(x)`: list of the stage outputs (for SA/MA models the last one is
      after the attention blocks).
    """

    def __init__(self, cfg: FastViTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = 0 if cfg.features_only else cfg.num_classes
        self.features_only = cfg.features_only
        self.stem = convolutional_stem(cfg.in_chans, cfg.embed_dims[0], cfg.stem_scale_branch)

        total = sum(cfg.layers)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, dim_in, start = [], cfg.embed_dims[0], 0
        for i, depth in enumerate(cfg.layers):
            stages.append(FastViTStage(cfg, i, dim_in, rates[start:start + depth]))
            dim_in, start = cfg.embed_dims[i], start + depth
        self.stages = nn.Sequential(*stages)
        #: channels and output stride of each stage's feature map
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i, c in enumerate(cfg.embed_dims)]

        if cfg.features_only:
            self.num_features = cfg.embed_dims[-1]
            self.final_conv = Identity()
            self.head = Identity()
            #: state_dict prefixes a checkpoint may have that this model does not use
            self.head_key_prefixes = ("final_conv.", "head.")
        else:
            self.num_features = int(cfg.embed_dims[-1] * cfg.cls_ratio)
            self.final_conv = MobileOneBlock(cfg.embed_dims[-1], self.num_features, kernel_size=3,
                                             groups=cfg.embed_dims[-1], use_se=True, act_layer=nn.GELU)
            self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.drop_rate)
            self.head_key_prefixes = ("head.fc.",)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(self.stages(self.stem(x)))


def _init_weights(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for linear and 1x1 FFN convs, as in the
    reference; other modules keep PyTorch's defaults."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
