"""Pieces shared by the model families: the classifier head and config overrides."""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..errors import InputError
from ..nn import Dropout, Identity

__all__ = ["ClassifierHead", "StemStagesClassifier", "release_stage_naming", "release_stage_parts", "replace_config"]


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


def replace_config(name: str, base, overrides: dict):
    """`base` (a frozen config dataclass) with some fields replaced; unknown or invalid fields
    raise InputError naming the variant and the valid options. Lists become tuples."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise InputError(f"{name} has no option {', '.join(map(repr, unknown))}; "
                         f"options: {', '.join(sorted(fields))}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    try:
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid options for {name}: {exc}") from exc


class StemStagesClassifier(nn.Module):
    """A stem, a sequence of stages and a classifier head (MobileOne, RepVGG, FastViT): the feature
    and head methods shared by such models. Subclasses build `self.stem` and `self.stages`, set
    `self.features_only`, then call `_init_features_and_head(cfg)` (`cfg.widths`,
    `cfg.features_only`, `cfg.num_classes`, `cfg.drop_rate`)."""

    def _init_features_and_head(self, cfg) -> None:
        #: channels and output stride of each stage's feature map
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i, c in enumerate(cfg.widths)]
        self.num_features = cfg.widths[-1]
        if cfg.features_only:
            self.head = Identity()
            self.head_key_prefixes = ("head.",)  # checkpoint prefixes this model does not use
        else:
            self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.drop_rate)
            self.head_key_prefixes = ("head.fc.",)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each stage (strides 4, 8, 16, 32, and 64 for a fifth stage)."""
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))


def release_stage_naming(keys, release: str) -> str | None:
    """"timm" for keys in timm's naming (`stem.`, `stages.`), `release` for an original release's
    (`stage0.` is the stem, `stageN.` stage N-1, `linear.` the classifier), else None."""
    keys = list(keys)
    if any(k.startswith(("stem.", "stages.")) for k in keys):
        return "timm"
    if any(k.startswith(("stage0.", "stage1.", "linear.")) for k in keys):
        return release
    return None


def release_stage_parts(parts: list[str]) -> list[str]:
    """The leading segments of an original release's key in timm's layout (see above)."""
    m = re.match(r"^stage(\d+)$", parts[0])
    if m:
        s = int(m.group(1))
        return ["stem"] + parts[1:] if s == 0 else ["stages", str(s - 1)] + parts[1:]
    if parts[0] == "linear":
        return ["head", "fc"] + parts[1:]
    return parts
