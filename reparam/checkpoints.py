"""Reading published checkpoints safely and loading them into models.

    result = load_checkpoint(model, "fastvit_t8.pth.tar")   # usually via reparam.models.create

Files:
- `.pth.tar`, `.pth`, `.pt`, `.bin` (and any other suffix): `torch.load(path, weights_only=True,
  map_location="cpu")`, which refuses pickles that hold anything but tensors and plain containers,
  so a checkpoint cannot run code. `{'state_dict': ...}` and `{'model': ...}` wrappers are
  unwrapped and `module.` prefixes (DataParallel) stripped.
- `.safetensors`: read with the `safetensors` package (imported only when needed).

Naming: the model family's converter (e.g. `reparam.models.fastvit.checkpoint_keys.to_our_naming`)
detects the naming (original release, timm, ours) from the keys and renames to ours. Loading is
strict: every model tensor must be filled, every checkpoint tensor used, every shape equal.
Otherwise an InputError names the file and lists missing keys, unexpected keys and shape
mismatches (first few of each, with counts), and names the registered variant whose shapes fit,
if there is one.

Multi-model releases: a CLIP checkpoint that holds an image tower beside a text tower (MobileCLIP
as released by apple/ml-mobileclip, the image encoder under `image_encoder.model.`; open_clip's
`visual.trunk.`) loads into the image model: the tower's tensors are picked out by their prefix and
the rest is ignored, with a one-line note (`select_image_tower`).

The one tolerated difference is the classifier (the model's `head_key_prefixes`, `head.fc.` for
FastViT): a checkpoint with a different number of classes, or a model built with num_classes=0 or
features_only=True, loads everything else. Such notes are returned in `LoadResult.notes` and each
is also emitted as a `CheckpointWarning` (a UserWarning), always both.

All errors are `reparam.errors.InputError` and name the file.
"""

from __future__ import annotations

import functools
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import InputError

__all__ = ["CheckpointWarning", "LoadResult", "read_state_dict", "load_checkpoint", "load_state",
           "select_image_tower"]

_WRAPPER_KEYS = ("state_dict", "model")
_SHOW = 5  # how many keys of each kind an error message lists
#: prefixes under which CLIP releases store their image tower: apple/ml-mobileclip, open_clip
_IMAGE_TOWER_PREFIXES = ("image_encoder.model.", "visual.trunk.")


class CheckpointWarning(UserWarning):
    """A checkpoint was loaded with a tolerated difference (the classifier was left out)."""


@dataclass
class LoadResult:
    """What `load_checkpoint` did."""

    path: str
    naming: str  # naming the checkpoint came in: "apple", "timm", "unknown" ...
    loaded: int  # number of tensors copied into the model
    skipped: list[str] = field(default_factory=list)  # checkpoint keys that were not loaded
    not_loaded: list[str] = field(default_factory=list)  # model keys left at their initialization
    notes: list[str] = field(default_factory=list)  # each also emitted as a CheckpointWarning


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped, with `module.` prefixes stripped."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise InputError(f"checkpoint {path} is not a file")
    if path.name.endswith(".safetensors"):
        obj = _read_safetensors(path)
    else:
        obj = _read_torch(path)
    return _unwrap(obj, path)


def _read_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text:  # the weights-only unpickler met a class or function reference
            detail = _line_with(text, "GLOBAL")
            raise InputError(
                f"refused to load {path}: it holds Python objects other than tensors and plain "
                f"containers, and unpickling it could run code (read with torch.load(weights_only=True)). "
                f"Re-save it as a plain state_dict or as .safetensors. ({detail})"
            ) from None
        if _looks_like_safetensors(path):
            return _read_safetensors(path)
        raise InputError(f"cannot read {path}: not a PyTorch checkpoint "
                         f"({_line_with(text, 'Unsupported') or type(exc).__name__})") from None
    except Exception as exc:  # zip errors, truncated files, EOF, ...
        if _looks_like_safetensors(path):
            return _read_safetensors(path)
        raise InputError(f"cannot read {path}: not a PyTorch checkpoint "
                         f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None


def _line_with(text: str, word: str) -> str:
    """The first line of `text` that contains `word`, shortened; '' if none."""
    line = next((l.strip() for l in text.splitlines() if word in l), "")
    return line if len(line) <= 240 else line[:237] + "..."


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise InputError(
            f"reading {path} needs the safetensors package: pip install 'reparam[safetensors]'"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise InputError(f"cannot read {path}: not a valid safetensors file ({exc})") from None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {'state_dict': {...}}, {'model': {...}}, possibly nested
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping):
        raise InputError(f"cannot use {path}: it holds a {type(obj).__name__}, not a state_dict")
    tensors = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            key = str(key)
            while key.startswith("module."):
                key = key[len("module."):]
            tensors[key] = value
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:10]))
        raise InputError(f"cannot use {path}: it holds no tensors (top-level keys: {keys})")
    return tensors


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    convert: Callable[[dict], tuple[dict, str]] | None = None,
    family: str | None = None,
    model_name: str | None = None,
) -> LoadResult:
    """Read a checkpoint file and load it into `model` strictly (classifier excepted, see the
    module docstring). `reparam.models.create(name, weights=path)` calls this.

    convert: maps the checkpoint's naming to the model's, returning (state_dict, naming);
        `create` passes the family's converter.
    family: registered family to search for a variant that fits when the shapes do not.
    model_name: the model's name in messages (default: its class name).
    """
    return load_state(model, read_state_dict(path), source=str(path), convert=convert,
                      family=family, model_name=model_name)


def load_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "<state_dict>",
    convert: Callable[[dict], tuple[dict, str]] | None = None,
    family: str | None = None,
    model_name: str | None = None,
) -> LoadResult:
    """`load_checkpoint` for a state_dict already in memory; `source` names it in messages."""
    name = model_name or type(model).__name__
    naming = "as stored"
    state, tower_note = select_image_tower(state, source)
    if convert is not None:
        state, naming = convert(state)

    own = model.state_dict()
    head = tuple(getattr(model, "head_key_prefixes", ()))

    def is_head(key: str) -> bool:
        return bool(head) and key.startswith(head)

    missing = [k for k in own if k not in state and not is_head(k)]
    unexpected = [k for k in state if k not in own and not is_head(k)]
    mismatched = [k for k in own if k in state and not is_head(k)
                  and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        raise InputError(_mismatch_message(source, naming, name, state, own, missing, unexpected,
                                           mismatched, family))

    notes, skipped, not_loaded = [tower_note] if tower_note else [], [], []
    own_head = {k: tuple(v.shape) for k, v in own.items() if is_head(k)}
    ckpt_head = {k: tuple(v.shape) for k, v in state.items() if is_head(k)}
    if own_head != ckpt_head:
        skipped = sorted(ckpt_head)
        not_loaded = sorted(own_head)
        notes.append(f"{source}: classifier not loaded: {_describe_head(ckpt_head)} in the checkpoint, "
                     f"{_describe_head(own_head)} in the model; "
                     + ("the model's classifier keeps its fresh initialization" if own_head else
                        "the model has none, the checkpoint's was ignored"))
        state = {k: v for k, v in state.items() if not is_head(k)}

    result = model.load_state_dict(state, strict=not not_loaded)
    leftover = sorted(set(result.missing_keys) - set(not_loaded))
    if leftover or result.unexpected_keys:  # excluded by the checks above; kept as a guard
        raise InputError(f"{source}: loading left {leftover} unfilled and {result.unexpected_keys} unused")
    for note in notes:
        warnings.warn(note, CheckpointWarning, stacklevel=3)
    return LoadResult(source, naming, len(state), skipped, not_loaded, notes)


def select_image_tower(state: Mapping[str, torch.Tensor], source: str = "<state_dict>") -> tuple[dict, str | None]:
    """(the image tower's tensors with their prefix removed, a one-line note) when `state` is a
    CLIP checkpoint with the image tower under a known prefix; (a copy of `state`, None) otherwise."""
    for prefix in _IMAGE_TOWER_PREFIXES:
        tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if tower:
            others = len(state) - len(tower)
            note = (f"{source}: loaded the image tower ({len(tower)} tensors under '{prefix}')"
                    + (f"; ignored the {others} other tensors (text tower, logit scale, ...)" if others else ""))
            return tower, note
    return dict(state), None


def _describe_head(shapes: dict[str, tuple]) -> str:
    if not shapes:
        return "no classifier"
    return ", ".join(f"{k} {list(s)}" for k, s in sorted(shapes.items()))


def _mismatch_message(source, naming, name, state, own, missing, unexpected, mismatched, family) -> str:
    lines = [f"checkpoint {source} ({naming} naming, {len(state)} tensors) does not fit {name} "
             f"({len(own)} tensors):"]
    if missing:
        lines.append(f"  {len(missing)} missing keys (in the model, not in the checkpoint): "
                     + _first(missing))
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys (in the checkpoint, not in the model): "
                     + _first(unexpected))
    if mismatched:
        shown = [f"{k} checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                 for k in mismatched[:_SHOW]]
        more = f", ... ({len(mismatched) - _SHOW} more)" if len(mismatched) > _SHOW else ""
        lines.append(f"  {len(mismatched)} shape mismatches: " + ", ".join(shown) + more)
    fits = _variants_that_fit(state, family)
    if fits:
        lines.append(f"The checkpoint's shapes fit {', '.join(repr(f) for f in fits)}: "
                     f"use reparam.models.create({fits[0]!r}, weights={source!r}).")
    elif naming in ("unknown", "as stored"):
        lines.append("The keys are in no naming this model family knows.")
    return "\n".join(lines)


def _first(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _variants_that_fit(state: dict, family: str | None) -> list[str]:
    """Registered models (of `family`) whose state_dict shapes equal the checkpoint's, classifier
    width aside."""
    from . import models

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    fits = []
    for name in models.list_models(family):
        own, head = _shapes_of(name)
        if not own:
            continue
        strip = lambda d: {k: s for k, s in d.items() if not (head and k.startswith(head))}  # noqa: E731
        if strip(own) == strip(shapes):
            fits.append(name)
    return fits


@functools.lru_cache(maxsize=None)
def _shapes_of(name: str) -> tuple[dict, tuple]:
    """state_dict shapes of a registered model, built on the meta device (no memory, no init cost
    beyond module construction)."""
    from . import models

    try:
        with torch.device("meta"):
            model = models.get_entry(name).factory()
    except Exception:
        return {}, ()
    return ({k: tuple(v.shape) for k, v in model.state_dict().items()},
            tuple(getattr(model, "head_key_prefixes", ())))
