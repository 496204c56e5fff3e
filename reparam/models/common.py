"""Pieces shared by the model families: the classifier head and config overrides."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import InputError
from ..nn import Dropout, Identity

__all__ = ["ClassifierHead", "replace_config"]


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
