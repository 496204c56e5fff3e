"""Model zoo: reparameterizable networks written in plain training form.

    model = reparam.models.create("fastvit_t8", weights="fastvit_t8.pth.tar")
    fused = reparam.fuse(model, torch.randn(1, 3, 256, 256))

Families: `fastvit` (FastViT t8..ma36, MobileCLIP towers mci0..mci4), `mobileone` (s0..s4),
`repvgg` (a0..b3g4, d2se); all built from the public blocks of `reparam.nn`.

Every family registers its variants here with `register(ModelEntry(...))`: a name, a factory that
takes config overrides, the default input size and classifier width, and (optionally) a function
that maps published checkpoint namings to the model's own. Parameter counts are computed on demand
(on the meta device, so no memory is spent), never stored.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import InputError

__all__ = ["ModelEntry", "register", "list_models", "get_entry", "num_params", "create"]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model."""

    name: str
    family: str  # e.g. "fastvit"; used to find other variants that fit a checkpoint
    factory: Callable[..., nn.Module]  # factory(**overrides) -> model in training form
    input_size: tuple[int, int, int] = (3, 256, 256)  # default (C, H, W) of one input image
    num_classes: int = 1000  # default classifier width
    # maps a state_dict in any published naming to the model's own; returns (state_dict, naming)
    convert_state_dict: Callable[[dict], tuple[dict, str]] | None = None
    # (our naming) weight of the classifier, (num_classes, features); lets create() take the
    # classifier width from a checkpoint
    classifier_key: str | None = None
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add a model to the registry; a name can only be registered once."""
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def list_models(family: str | None = None) -> list[str]:
    """Names of the registered models (of one family if given), sorted."""
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def get_entry(name: str) -> ModelEntry:
    """The registry entry of `name`; unknown names raise InputError naming close matches."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise InputError(f"unknown model {name!r}{hint} Available: {', '.join(list_models())}")


def num_params(name: str, **overrides) -> int:
    """Number of parameters of the training-form model, computed without allocating weights."""
    with torch.device("meta"):
        model = _build(get_entry(name), overrides)
    return sum(p.numel() for p in model.parameters())


def create(name: str, *, weights: str | Path | None = None, num_classes: int | None = None,
           **overrides) -> nn.Module:
    """Build a registered model in training form (train mode, like any new nn.Module).

    name: a name from `list_models()`.
    weights: a local checkpoint to load (see `reparam.checkpoints`): original or timm naming,
        `.pth.tar`/`.pth`/`.pt`/`.bin` (read with weights_only=True) or `.safetensors`.
    num_classes: classifier width; 0 gives a model that returns pooled features. None takes the
        checkpoint's width when `weights` has a classifier, else the variant's default (1000 for
        ImageNet models, 512 for the MobileCLIP towers mci0-2, 768 for mci3-4). An explicit width
        that differs from the checkpoint's loads everything but the classifier and warns
        (`CheckpointWarning`).
    overrides: fields of the family's config, e.g. drop_path_rate=0.1, features_only=True.
    """
    entry = get_entry(name)
    state = None
    if weights is not None:
        from ..checkpoints import read_state_dict

        state = read_state_dict(weights)  # a bad file fails before the model is built
        if num_classes is None:
            num_classes = _classifier_width(entry, state)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = _build(entry, overrides)
    if state is not None:
        from ..checkpoints import load_state

        load_state(model, state, source=str(weights), convert=entry.convert_state_dict,
                   family=entry.family, model_name=entry.name)
    return model


def _classifier_width(entry: ModelEntry, state: dict) -> int | None:
    """The number of classes of a checkpoint's classifier, None if it has none we recognise."""
    if entry.classifier_key is None:
        return None
    from ..checkpoints import select_image_tower

    state, _ = select_image_tower(state)
    if entry.convert_state_dict is not None:
        state, _ = entry.convert_state_dict(state)
    weight = state.get(entry.classifier_key)
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def _build(entry: ModelEntry, overrides: dict) -> nn.Module:
    try:
        return entry.factory(**overrides)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"cannot build {entry.name!r} with {overrides!r}: {exc}") from exc


# Families register their variants on import.
from . import fastvit as fastvit  # noqa: E402
from . import mobileone as mobileone  # noqa: E402
from . import repvgg as repvgg  # noqa: E402
