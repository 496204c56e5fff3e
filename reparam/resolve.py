"""From what a user types to a model ready to fuse: registered names, `module:factory`, `--weights`.

Every command of the command line (`export`, `explain`, `list`, benchmarks) builds its model here:

    loaded = resolve_model("fastvit_t12", weights="fastvit_t12.pth.tar")
    loaded = resolve_model("mynets:build_net", input_shape=(1, 3, 224, 224))
    x = loaded.example_input()

A model is named either by a name registered in `reparam.models` or as `package.module:factory`,
a callable returning an `nn.Module` (a function, a class) or an `nn.Module` instance; the current
folder is importable. Everything a user must fix is an `InputError` that says what to do.

Random initialisation is reproducible (seed `INIT_SEED`) without touching the caller's global
random generator: the model is built inside `torch.random.fork_rng`, which restores it afterwards.
Example inputs come from local `torch.Generator`s.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import InputError, first_line

__all__ = [
    "INIT_SEED",
    "EXAMPLE_SEED",
    "LoadedModel",
    "parse_input_shape",
    "is_factory_spec",
    "import_factory",
    "models_module",
    "registered_models",
    "registered_input_size",
    "resolve_model",
    "load_weights_into",
    "check_input_accepted",
    "random_input",
]

INIT_SEED = 0  # seed of the random initialisation of a model built without weights
EXAMPLE_SEED = 20240230  # seed of the example input: fixed, so that runs are reproducible


def random_input(shape: Sequence[int], seed: int) -> torch.Tensor:
    """A standard normal tensor drawn from a local generator (the global one is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator)


@dataclass
class LoadedModel:
    """A model ready to fuse or export: the module in eval mode and the shape of its input."""

    name: str  # display name, also the default output file stem
    model: nn.Module
    input_shape: tuple[int, ...]  # full shape of the example input, batch axis first
    weights: str | None  # the checkpoint it was loaded from, None for random initialisation
    registered: bool  # True for a registered name, False for package.module:factory
    notes: list[str] = field(default_factory=list)  # e.g. checkpoint warnings, shown to the user

    def example_input(self) -> torch.Tensor:
        return random_input(self.input_shape, EXAMPLE_SEED)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or '1x3x224x224') -> (1, 3, 224, 224); InputError when malformed."""
    raw = text.strip().strip("()[]").strip()
    parts = [p.strip() for p in re.split(r"[,x]", raw)] if raw else []
    if not any(parts):
        raise InputError(f"--input-shape {text!r} is empty; expected e.g. 1,3,224,224")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"--input-shape {text!r} is not a comma-separated list of integers;"
                         " expected e.g. 1,3,224,224 (batch first)") from None
    if any(d <= 0 for d in dims):
        raise InputError(f"--input-shape {text!r} has a dimension <= 0; every size must be positive")
    if len(dims) < 2:
        raise InputError(f"--input-shape {text!r} has {len(dims)} dimension; give the full shape"
                         " with the batch axis first, e.g. 1,3,224,224")
    return dims


def is_factory_spec(spec: str) -> bool:
    return ":" in spec


def import_factory(spec: str) -> tuple[str, nn.Module]:
    """'package.module:factory' -> (factory name, module). The current folder is importable.

    The attribute may be a callable returning an nn.Module (a function or a class) or an
    nn.Module instance. Every failure is an InputError that says what went wrong.
    """
    module_name, _, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise InputError(f"model {spec!r}: expected a registered name or package.module:factory")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if missing == module_name or module_name.startswith(missing + "."):
            raise InputError(f"cannot import {module_name!r} (from {spec!r}): no module named"
                             f" {missing!r} in the current folder or on PYTHONPATH") from None
        raise InputError(f"importing {module_name!r} (from {spec!r}) failed:"
                         f" {first_line(exc)}") from None
    except Exception as exc:  # SyntaxError, errors raised at import time...
        raise InputError(f"importing {module_name!r} (from {spec!r}) failed:"
                         f" {type(exc).__name__}: {first_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_")
                           and callable(getattr(module, n, None)))
            close = difflib.get_close_matches(attr, names, n=3, cutoff=0.5)
            hint = ", ".join(repr(c) for c in close)
            raise InputError(f"module {module_name!r} has no attribute {attr!r}"
                             + (f"; did you mean {hint}?" if hint else "")) from None
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return attr, obj
    if not callable(obj):
        raise InputError(f"{spec!r} is a {type(obj).__name__}, not a callable returning an nn.Module")
    try:
        model = obj()
    except Exception as exc:
        raise InputError(f"calling the factory {spec!r}() failed: {type(exc).__name__}:"
                         f" {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        kind = type(model).__qualname__
        if type(model).__module__ != "builtins":
            kind = f"{type(model).__module__}.{kind}"
        raise InputError(f"the factory {spec!r} returned a {kind}, not a torch.nn.Module")
    return attr, model


def models_module():
    """`reparam.models`, or an InputError saying that only module:factory models are available."""
    try:
        return importlib.import_module("reparam.models")
    except ImportError as exc:
        raise InputError(f"no registered models are available (reparam.models cannot be imported:"
                         f" {first_line(exc)}); use package.module:factory") from None


def registered_models() -> list[str]:
    """Names accepted by `reparam.models.create`."""
    return list(models_module().list_models())


def registered_input_size(name: str | None, model: nn.Module | None = None) -> tuple[int, ...] | None:
    """The default input size (C, H, W) of a model, or None if it has none.

    For a registered name: `reparam.models.get_entry(name).input_size`. For any model instance:
    a `default_input_size` or `input_size` attribute, or timm's `default_cfg['input_size']`.
    """
    candidates: list[Any] = []
    if name is not None and not is_factory_spec(name):
        try:
            candidates.append(_size_of(models_module().get_entry(name)))
        except Exception:  # an unknown name has no registered size; the caller reports it
            pass
    if model is not None:
        candidates.append(_size_of(model))
    for candidate in candidates:
        shape = _as_shape(candidate)
        if shape:
            return shape
    return None


def _size_of(obj: Any) -> Any:
    for attr in ("default_input_size", "input_size", "image_size"):
        value = obj.get(attr) if isinstance(obj, dict) else getattr(obj, attr, None)
        if value is not None:
            return value
    for attr in ("default_cfg", "pretrained_cfg", "cfg"):
        cfg = obj.get(attr) if isinstance(obj, dict) else getattr(obj, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size") is not None:
            return cfg["input_size"]
    return None


def _as_shape(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (3, value, value)
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(shape) == 2:  # (H, W)
        shape = (3,) + shape
    return shape if shape and all(d > 0 for d in shape) else None


def resolve_model(spec: str, *, weights: str | os.PathLike | None = None,
                  input_shape: Sequence[int] | None = None, image_size: int | None = None,
                  batch_size: int | None = None) -> LoadedModel:
    """Build the model named by `spec` (registered name or package.module:factory), in eval mode.

    `input_shape` is the full example shape (batch first). Without it, the registered default
    input size is used, with `image_size` replacing its spatial sizes and `batch_size` (default 1)
    as batch. InputError for anything the user must fix. The global random generator is left as
    it was.
    """
    if weights is not None:
        wpath = Path(weights)
        if not wpath.exists():
            raise InputError(f"weights file not found: {wpath}")
        if wpath.is_dir():
            raise InputError(f"weights path is a folder, not a checkpoint file: {wpath}")
        if not os.access(wpath, os.R_OK):
            raise InputError(f"weights file is not readable: {wpath}")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
        torch.manual_seed(INIT_SEED)  # reproducible initialisation; fork_rng restores the state
        warnings.simplefilter("always")
        if is_factory_spec(spec):
            name, model = import_factory(spec)
            registered = False
            if weights is not None:
                load_weights_into(model, weights)
        else:
            models = models_module()
            kwargs = {"weights": str(weights)} if weights is not None else {}
            model = models.create(spec, **kwargs)
            if not isinstance(model, nn.Module):  # pragma: no cover - the registry's contract
                raise InputError(f"reparam.models.create({spec!r}) did not return an nn.Module")
            name, registered = spec, True
    # checkpoint notes (e.g. a classifier left out) are worth showing; library chatter is not
    notes = [str(w.message) for w in caught if w.category.__name__ == "CheckpointWarning"]
    model.eval()

    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if batch_size is not None and shape[0] != batch_size:
            raise InputError(f"--batch-size {batch_size} contradicts --input-shape"
                             f" {','.join(map(str, shape))} (its first axis is the batch)")
        if image_size is not None:
            raise InputError("give either --input-shape or --image-size, not both")
    else:
        default = registered_input_size(spec, model)
        if default is None:
            what = "has no registered input size" if not registered else "has no default input size"
            raise InputError(f"model {spec!r} {what}; give --input-shape, e.g."
                             " --input-shape 1,3,224,224 (batch first)")
        if image_size is not None:
            if image_size <= 0:
                raise InputError(f"--image-size must be positive, got {image_size}")
            if len(default) < 3:
                raise InputError(f"--image-size needs an image model; {spec!r} takes inputs of"
                                 f" shape {default}; give --input-shape instead")
            default = tuple(default[:-2]) + (image_size, image_size)
        shape = (batch_size or 1,) + tuple(default)
    if batch_size is not None and batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    return LoadedModel(name=name, model=model, input_shape=shape,
                       weights=None if weights is None else str(weights), registered=registered,
                       notes=notes)


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a checkpoint into a user's model strictly (`reparam.checkpoints.load_checkpoint`).

    A missing or unreadable file, or keys/shapes that do not fit, raise InputError with a summary.
    Returns the loader's notes (e.g. a classifier left out).
    """
    from .checkpoints import load_checkpoint

    return list(load_checkpoint(model, path).notes)


def check_input_accepted(model: nn.Module, example: torch.Tensor, name: str = "model") -> Any:
    """Run the model once on `example`; an InputError if it rejects that shape."""
    try:
        with torch.no_grad():
            return model(example)
    except Exception as exc:
        shape = ",".join(str(d) for d in example.shape)
        raise InputError(f"{name} rejects an input of shape {shape}: {type(exc).__name__}:"
                         f" {first_line(exc)}; check --input-shape / --image-size") from None
