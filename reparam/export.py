"""Writing fused models to ONNX and torch.export (.pt2) files, and checking what was written.

The command line (`python -m reparam.cli export ...`) is a thin layer over this module:

    from reparam.export import export_model
    result = export_model(model, example_input, "model.onnx")     # fuse, write, check
    print(result.summary())

What `export_model` does:

1. checks the destination before any expensive work (folder exists and is writable, no existing
   file unless `force=True`);
2. fuses the model with `reparam.fuse` (verified on the example input unless `verify=False`);
3. traces the fused GraphModule with `torch.export` (dynamic batch axis unless a fixed batch size is
   asked for) and writes either the ONNX translation of that program (`torch.onnx.export` with
   `dynamo=True`, weights embedded in the single .onnx file below 2 GB) or the program itself
   (`torch.export.save`, .pt2);
4. checks the written file: `onnx.checker.check_model`, then ONNX Runtime (CPU) on a random batch
   of two against the fused PyTorch model *and* the original unfused model (for .pt2: the program
   loaded back with `torch.export.load`, same comparisons);
5. moves the file into place with `os.replace` only if every check passed. Everything is written
   in a temporary folder inside the destination folder (same file system, so the final rename is
   atomic); on any failure it is removed and no file is left behind.

Tolerance. Outputs are compared in float32 with `allowed = ATOL + RTOL * max|reference|`, i.e.
1e-4 of the output scale plus 1e-5 absolute. float32 rounding differences between two correct
implementations of a deep network (different kernels, different summation order, fused weights
computed in float64 and rounded once) stay around 1e-6 of the output scale; a wrong weight, a
dropped branch or a misplaced bias shows up at 1e-2 and more. The margin leaves room for deep
models without hiding real errors.

Exporter. `torch.onnx.export(..., dynamo=True)` (the default of torch >= 2.9) applied to the
`torch.export.ExportedProgram` of the fused GraphModule: deterministic output (same bytes every
run), a dynamic batch axis through `dynamic_shapes` (renamed `batch` in the file), and one traced
program shared by the ONNX and the .pt2 writers. The legacy TorchScript exporter (`dynamo=False`)
is available with `exporter="torchscript"` but never chosen silently: where torch.export fails
(data-dependent control flow, e.g. inside a submodule the compiler kept as a leaf) it records the
branch taken for the example input only, so the file could be right on the checked batch and
wrong on others.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import InputError, ReparamError
from .report import format_table

__all__ = [
    "ATOL",
    "RTOL",
    "CHECK_BATCH",
    "ExportError",
    "CheckFailure",
    "Check",
    "LoadedModel",
    "ExportResult",
    "parse_input_shape",
    "resolve_model",
    "import_factory",
    "load_weights_into",
    "registered_input_size",
    "check_input_accepted",
    "default_output_path",
    "check_output_path",
    "allowed_difference",
    "export_model",
    "write_onnx",
    "write_pt2",
    "check_onnx_file",
    "check_pt2_file",
    "onnx_op_counts",
    "registered_models",
    "quiet",
]

RTOL = 1e-4  # relative to the largest absolute value of the reference output
ATOL = 1e-5  # absolute floor, for outputs that are all close to zero
CHECK_BATCH = 2  # the batch size of the random batch the written file is checked on
CHECK_SEED = 20240229  # fixed, so that exports and checks are reproducible
INIT_SEED = 0  # seed used before building a model without weights (reproducible random init)
_LARGE_MODEL_BYTES = 1_800_000_000  # beyond this, ONNX weights go to an external .data file


class ExportError(ReparamError):
    """The exporter could not translate the fused model (exit code 1 on the command line)."""


class CheckFailure(ReparamError):
    """A written file failed a check; nothing was written (exit code 1 on the command line)."""

    def __init__(self, message: str, checks: Sequence["Check"] = ()):
        super().__init__(message)
        self.checks = list(checks)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to export: the module in eval mode and the shape of its example input."""

    name: str  # display name, also the default output file stem
    model: nn.Module
    input_shape: tuple[int, ...]  # full shape of the example input, batch axis first
    weights: str | None  # the checkpoint it was loaded from, None for random initialisation
    registered: bool  # True for a registered name, False for package.module:factory
    notes: list[str] = field(default_factory=list)  # e.g. checkpoint warnings, shown to the user

    def example_input(self) -> torch.Tensor:
        return _random_input(self.input_shape, CHECK_SEED + 1)


@dataclass
class Check:
    """One numerical comparison of the written file against a PyTorch model."""

    against: str
    max_abs_diff: float
    allowed: float
    batch: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.allowed

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"max |file - {self.against}| = {self.max_abs_diff:.3g} on a batch of {self.batch}"
                f" (allowed {self.allowed:.3g}): {verdict}")


@dataclass
class ExportResult:
    """What `export_model` wrote and what it checked."""

    path: Path
    format: str  # "onnx" or "pt2"
    exporter: str  # "torch.export + torch.onnx (dynamo)", "torchscript", "torch.export"
    dynamic_batch: bool
    size_bytes: int
    seconds: float
    report: Any  # reparam.report.Report of the fusion
    checks: list[Check] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)  # ONNX only
    opset: int | None = None
    extra_files: list[Path] = field(default_factory=list)  # external data written beside
    notes: list[str] = field(default_factory=list)
    verified: bool = True

    def summary(self) -> str:
        """A short human-readable summary: counts, operators, checks, size and time."""
        lines = []
        rep = self.report
        before, after = getattr(rep, "before", None), getattr(rep, "after", None)
        if before is not None and after is not None:
            rows = [
                ["parameters", f"{before.params:,}", f"{after.params:,}"],
                ["MACs", f"{before.macs:,}", f"{after.macs:,}"],
                ["graph nodes", f"{before.nodes:,}", f"{after.nodes:,}"],
            ]
            lines.append(format_table(["", "before fusion", "after fusion"], rows, right_align=True))
        regions = len(getattr(rep, "regions", []) or [])
        refusals = len(getattr(rep, "refusals", []) or [])
        lines.append(f"fused regions: {regions}, refusals: {refusals}"
                     " (run `reparam explain` for details)")
        diff, allowed = getattr(rep, "max_abs_diff", None), getattr(rep, "tolerance", None)
        if diff is not None:
            lines.append(f"fusion verified on the example input: max |fused - original| ="
                         f" {diff:.3g}" + (f" (allowed {allowed:.3g})" if allowed is not None else ""))
        if self.format == "onnx":
            ops = ", ".join(f"{k}: {v}" for k, v in sorted(self.op_counts.items(),
                                                         key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"ONNX operators (opset {self.opset}): {ops}")
        batch = "dynamic batch axis" if self.dynamic_batch else "fixed batch size"
        lines.append(f"exporter: {self.exporter}, {batch}")
        if self.verified:
            lines.extend(f"check: {c}" for c in self.checks)
        else:
            lines.append("checks skipped (--no-verify)")
        lines.extend(f"note: {n}" for n in self.notes)
        size = _human_size(self.size_bytes)
        extra = "".join(f" + {p.name} ({_human_size(p.stat().st_size)})" for p in self.extra_files
                        if p.exists())
        lines.append(f"wrote {self.path} ({size}{extra}) in {self.seconds:.1f} s")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Models: registered names and package.module:factory
# --------------------------------------------------------------------------------------------


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or '1x3x224x224') -> (1, 3, 224, 224); InputError when malformed."""
    import re

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
        raise InputError(f"importing {module_name!r} (from {spec!r}) failed: {_one_line(exc)}") from None
    except Exception as exc:  # SyntaxError, errors raised at import time...
        raise InputError(f"importing {module_name!r} (from {spec!r}) failed:"
                         f" {type(exc).__name__}: {_one_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_")
                           and callable(getattr(module, n, None)))
            hint = _close(attr, names)
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
                         f" {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        kind = type(model).__qualname__
        if type(model).__module__ != "builtins":
            kind = f"{type(model).__module__}.{kind}"
        raise InputError(f"the factory {spec!r} returned a {kind}, not a torch.nn.Module")
    return attr, model


def _models_module():
    try:
        return importlib.import_module("reparam.models")
    except ImportError as exc:
        raise InputError(f"no registered models are available (reparam.models cannot be imported:"
                         f" {_one_line(exc)}); use package.module:factory") from None


def registered_models() -> list[str]:
    """Names accepted by `reparam.models.create`."""
    return list(_models_module().list_models())


def registered_input_size(name: str, model: nn.Module | None = None) -> tuple[int, ...] | None:
    """The default input size (C, H, W) of a model, or None if it has none.

    For a registered name: `reparam.models.get_entry(name).input_size`. For any model instance:
    a `default_input_size` or `input_size` attribute, or timm's `default_cfg['input_size']`.
    """
    candidates: list[Any] = []
    if name is not None and not is_factory_spec(name):
        try:
            models = importlib.import_module("reparam.models")
            candidates.append(_size_of(models.get_entry(name)))
        except Exception:
            pass
    if model is not None:
        candidates.append(_size_of(model))
    for c in candidates:
        shape = _as_shape(c)
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
    as batch. InputError for anything the user must fix.
    """
    if weights is not None:
        wpath = Path(weights)
        if not wpath.exists():
            raise InputError(f"weights file not found: {wpath}")
        if wpath.is_dir():
            raise InputError(f"weights path is a folder, not a checkpoint file: {wpath}")
        if not os.access(wpath, os.R_OK):
            raise InputError(f"weights file is not readable: {wpath}")
    torch.manual_seed(INIT_SEED)  # random initialisation is reproducible
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if is_factory_spec(spec):
            name, model = import_factory(spec)
            registered = False
            if weights is not None:
                load_weights_into(model, weights)
        else:
            models = _models_module()
            kwargs = {"weights": str(weights)} if weights is not None else {}
            model = models.create(spec, **kwargs)
            if not isinstance(model, nn.Module):  # pragma: no cover - the registry's contract
                raise InputError(f"reparam.models.create({spec!r}) did not return an nn.Module")
            name, registered = spec, True
    # checkpoint notes (e.g. a classifier left out) are worth showing; library chatter is not
    notes = [str(w.message) for w in caught
             if w.category.__name__ == "CheckpointWarning"]
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
                         f" {_one_line(exc)}; check --input-shape / --image-size") from None


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------


def default_output_path(name: str, fmt: str, folder: str | os.PathLike | None = None) -> Path:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"
    return Path(folder or os.getcwd()) / f"{stem}.{fmt}"


def check_output_path(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Fail early (InputError) if `path` cannot be written, or exists and `force` is False."""
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = Path(os.getcwd()) / path
    folder = path.parent
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    if not folder.exists():
        raise InputError(f"output folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".reparam-probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"output folder {folder} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    if path.exists() and not force:
        raise InputError(f"{path} already exists; pass --force to overwrite it")
    return path


# --------------------------------------------------------------------------------------------
# Quiet exporters
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[io.StringIO]:
    """Silence exporter chatter: warnings, torch/onnxscript logging, and what C++ code prints.

    Redirects the process's stdout/stderr file descriptors into a temporary file while active.
    Yields a StringIO that holds the captured text once the block ends (for error messages).
    """
    captured = io.StringIO()
    if not enabled:
        yield captured
        return
    names = ["torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript",
             "onnx_ir", "onnx"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds: list[int] = []
    with tempfile.TemporaryFile(mode="w+b") as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            try:
                saved_fds = [os.dup(1), os.dup(2)]
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
            except OSError:  # no real file descriptors (embedded interpreters): Python level only
                saved_fds = []
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                yield captured
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            if saved_fds:
                os.dup2(saved_fds[0], 1)
                os.dup2(saved_fds[1], 2)
                for fd in saved_fds:
                    os.close(fd)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            sink.seek(0)
            captured.write(sink.read().decode("utf-8", "replace"))


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _torch_export(module: nn.Module, example: torch.Tensor, dynamic_batch: bool):
    """torch.export the module with a dynamic batch axis (or fixed shapes)."""
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        text = str(exc)
        if dynamic_batch and ("batch" in text and ("onstraint" in text or "specializ" in text)):
            raise ExportError("the model fixes its batch size, so it cannot be exported with a"
                              " dynamic batch axis; pass --batch-size N to export a fixed batch"
                              f" ({type(exc).__name__}: {_one_line(exc)})") from exc
        raise


def write_onnx(fused: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
               opset: int | None = None, dynamic_batch: bool = True, exporter: str = "dynamo",
               verbose: bool = False) -> tuple[str, list[str]]:
    """Write `fused` as ONNX to `path`. Returns (exporter used, notes).

    exporter: "dynamo" (torch.export, then torch.onnx's translation of the program; the default)
    or "torchscript" (the legacy torch.onnx tracer, `dynamo=False`, opset 17 unless given). The
    TorchScript tracer records only the control flow taken for `example`; it is never chosen
    silently, because a file that is right on the checked batch and wrong on others would pass
    every check.
    Weights are embedded in the .onnx file unless the model is larger than ~1.8 GB, in which case
    the exporter writes `<file>.data` beside it.
    """
    if exporter not in ("dynamo", "torchscript"):
        raise InputError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    path = Path(path)
    notes: list[str] = []
    n_out = _count_outputs(fused, example)
    output_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    if exporter == "dynamo":
        log = io.StringIO()
        try:
            with quiet(not verbose) as log:
                program = _torch_export(fused, example, dynamic_batch)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"torch.export could not trace the fused model:"
                              f" {type(exc).__name__}: {_one_line(exc)}; `--exporter torchscript`"
                              " may export it, but records only the control flow taken for the"
                              " example input") from exc
        try:
            with quiet(not verbose) as log:
                onnx_program = torch.onnx.export(
                    program, (example,), dynamo=True, opset_version=opset,
                    input_names=["input"], output_names=output_names, optimize=True,
                    verbose=verbose or None, report=False, verify=False)
                big = _param_bytes(fused) > _LARGE_MODEL_BYTES
                onnx_program.save(str(path), external_data=True if big else None)
            if dynamic_batch:
                _name_batch_axis(path)
        except Exception as exc:
            raise ExportError(f"torch.onnx could not translate the fused model:"
                              f" {type(exc).__name__}: {_one_line(exc)}"
                              + _tail_hint(log.getvalue())) from exc
        return "torch.export + torch.onnx (dynamo)", notes
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {"input": {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
    log = io.StringIO()
    try:
        with quiet(not verbose) as log:
            torch.onnx.export(fused, (example,), str(path), dynamo=False,
                              opset_version=opset or 17, input_names=["input"],
                              output_names=output_names, dynamic_axes=dynamic_axes,
                              verbose=bool(verbose))
    except Exception as exc:
        raise ExportError(f"the TorchScript ONNX exporter failed: {type(exc).__name__}:"
                          f" {_one_line(exc)}" + _tail_hint(log.getvalue())) from exc
    notes.append("the TorchScript exporter records the control flow taken for the example input"
                 " only")
    return "torchscript (torch.onnx, dynamo=False)", notes


def write_pt2(fused: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
              dynamic_batch: bool = True, verbose: bool = False) -> tuple[str, list[str]]:
    """Write `fused` as a torch.export program (`torch.export.save`). Returns (exporter, notes)."""
    log = io.StringIO()
    try:
        with quiet(not verbose) as log:
            program = _torch_export(fused, example, dynamic_batch)
            torch.export.save(program, str(path))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.export could not trace the fused model: {type(exc).__name__}:"
                          f" {_one_line(exc)}" + _tail_hint(log.getvalue())) from exc
    return "torch.export", []


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def allowed_difference(reference: Any, rtol: float = RTOL, atol: float = ATOL) -> float:
    """The allowed absolute difference against `reference`: atol + rtol * max|reference|."""
    leaves = [_to_numpy(t) for t in _leaves(reference)]
    scale = max((float(abs(a).max()) for a in leaves if a.size), default=0.0)
    return atol + rtol * scale


def _compare(name: str, got: Sequence[Any], reference: Any, batch: int, rtol: float,
             atol: float) -> Check:
    import numpy as np

    ref = [_to_numpy(t) for t in _leaves(reference)]
    got = [_to_numpy(t) for t in got]
    if len(ref) != len(got):
        return Check(name, float("inf"), allowed_difference(reference, rtol, atol), batch)
    diff = 0.0
    for a, b in zip(got, ref):
        if a.shape != b.shape:
            return Check(name, float("inf"), allowed_difference(reference, rtol, atol), batch)
        if a.size:
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            diff = max(diff, float(np.nan_to_num(d, nan=np.inf).max()))
    return Check(name, diff, allowed_difference(reference, rtol, atol), batch)


def _references(fused: nn.Module, original: nn.Module | None, batch: torch.Tensor):
    with torch.no_grad():
        refs = [("fused PyTorch model", fused(batch))]
        if original is not None:
            refs.append(("original (unfused) model", original(batch)))
    return refs


def check_onnx_file(path: str | os.PathLike, fused: nn.Module, original: nn.Module | None,
                    batch: torch.Tensor, *, rtol: float = RTOL, atol: float = ATOL) -> list[Check]:
    """onnx.checker, then ONNX Runtime (CPU) on `batch` against the fused and original models.

    Raises CheckFailure when the checker rejects the file or ONNX Runtime cannot run it; returns
    the numerical checks (the caller decides what a failed comparison means).
    """
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise CheckFailure(f"onnx.checker rejects the exported file: {_one_line(exc)}") from None
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: batch.detach().cpu().numpy()}
        outputs = session.run(None, feed)
    except Exception as exc:
        raise CheckFailure(f"ONNX Runtime cannot run the exported file on a batch of"
                           f" {batch.shape[0]}: {_one_line(exc)}") from None
    return [_compare(name, outputs, ref, int(batch.shape[0]), rtol, atol)
            for name, ref in _references(fused, original, batch)]


def check_pt2_file(path: str | os.PathLike, fused: nn.Module, original: nn.Module | None,
                   batch: torch.Tensor, *, rtol: float = RTOL, atol: float = ATOL) -> list[Check]:
    """Load the program back with torch.export.load and compare it on `batch`."""
    try:
        with quiet():
            program = torch.export.load(str(path))
        with torch.no_grad():
            outputs = program.module()(batch)
    except Exception as exc:
        raise CheckFailure(f"the saved program cannot be loaded back and run on a batch of"
                           f" {batch.shape[0]}: {type(exc).__name__}: {_one_line(exc)}") from None
    return [_compare(name, list(_leaves(outputs)), ref, int(batch.shape[0]), rtol, atol)
            for name, ref in _references(fused, original, batch)]


def _name_batch_axis(path: str | os.PathLike, name: str = "batch") -> None:
    """Rename the exporter's symbol for the batch axis (e.g. 's77') to `name` everywhere."""
    import re

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    symbol = dims[0].dim_param if len(dims) and dims[0].HasField("dim_param") else ""
    if not symbol or symbol == name:
        return
    pattern = re.compile(rf"\b{re.escape(symbol)}\b")
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = pattern.sub(name, dim.dim_param)
    onnx.save(model, str(path))


def onnx_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each operator type the ONNX file holds (subgraphs included)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: collections.Counter[str] = collections.Counter()

    def walk(graph) -> None:
        for node in graph.node:
            counts[node.op_type if not node.domain or node.domain == "ai.onnx"
                   else f"{node.domain}.{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:  # local functions, if the exporter kept any
        for node in fn.node:
            counts[node.op_type] += 1
    return dict(counts)


def onnx_opset(path: str | os.PathLike) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


# --------------------------------------------------------------------------------------------
# The whole export
# --------------------------------------------------------------------------------------------


def export_model(model: nn.Module, example_input: torch.Tensor, output: str | os.PathLike, *,
                 format: str | None = None, opset: int | None = None,
                 batch_size: int | None = None, verify: bool = True, force: bool = False,
                 exporter: str = "dynamo", verbose: bool = False, rtol: float = RTOL,
                 atol: float = ATOL, fuse: Callable[..., Any] | None = None,
                 log: Callable[[str], None] | None = None) -> ExportResult:
    """Fuse `model`, write it to `output` (ONNX or .pt2), check it, and move it into place.

    format: "onnx" or "pt2" (default: from the file suffix, else onnx).
    batch_size: None for a dynamic batch axis (checked on a random batch of two); an int to fix
    the batch size of the file (checked on a batch of that size).
    verify: fuse with verification and check the written file; False skips every check.
    fuse: the fusing function (default `reparam.fuse`), replaceable for tests.
    Raises InputError (bad destination), ExportError (exporter failed), CheckFailure (a check
    failed), and what `reparam.fuse` raises. On any failure no file is left behind.
    """
    start = time.perf_counter()
    say = log or (lambda message: None)
    out = Path(output)
    fmt = (format or out.suffix.lstrip(".") or "onnx").lower()
    if fmt not in ("onnx", "pt2"):
        raise InputError(f"unknown format {fmt!r}; use onnx or pt2")
    if opset is not None and fmt == "onnx" and not 7 <= opset <= 30:
        raise InputError(f"--opset {opset} is out of range; ONNX opsets run from 7 to about 23")
    out = check_output_path(out, force=force)
    model = model.eval()

    if fuse is None:
        fuse = _default_fuse()
    say("fusing" + (" and verifying on the example input" if verify else ""))
    with quiet(not verbose):
        fused = fuse(model, example_input, verify=verify)
    fused.eval()
    report = getattr(fused, "report", None)

    dynamic = batch_size is None
    check_batch_size = CHECK_BATCH if dynamic else batch_size
    rest = tuple(example_input.shape[1:])
    export_example = _random_input((check_batch_size,) + rest, CHECK_SEED + 2)
    check_batch = _random_input((check_batch_size,) + rest, CHECK_SEED)

    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp = tmpdir / out.name  # the final name, so external data references stay valid
        say(f"exporting to {fmt}")
        try:
            if fmt == "onnx":
                used, notes = write_onnx(fused, export_example, tmp, opset=opset,
                                         dynamic_batch=dynamic, exporter=exporter, verbose=verbose)
            else:
                used, notes = write_pt2(fused, export_example, tmp, dynamic_batch=dynamic,
                                        verbose=verbose)
        except ExportError as exc:
            leaves = list(getattr(report, "leaves", None) or [])
            if leaves:  # the likely culprit: submodules torch.fx could not trace either
                names = ", ".join(f"{leaf.module} ({leaf.reason})" for leaf in leaves[:3])
                raise ExportError(f"{exc}\nsubmodules kept whole because they cannot be traced"
                                  f" (data-dependent control flow?): {names}") from exc
            raise
        checks: list[Check] = []
        if verify:
            say(f"checking the file on a random batch of {check_batch_size}")
            checker = check_onnx_file if fmt == "onnx" else check_pt2_file
            checks = checker(tmp, fused, model, check_batch, rtol=rtol, atol=atol)
            failed = [c for c in checks if not c.ok]
            if failed:
                details = "\n".join(f"  {c}" for c in checks)
                raise CheckFailure(f"the exported file disagrees with the PyTorch model beyond the"
                                   f" tolerance (allowed = {atol:g} + {rtol:g} * max|output|);"
                                   f" nothing was written:\n{details}", checks)
        result = ExportResult(path=out, format=fmt, exporter=used, dynamic_batch=dynamic,
                              size_bytes=tmp.stat().st_size, seconds=0.0, report=report,
                              checks=checks, notes=notes, verified=verify)
        if fmt == "onnx":
            result.op_counts = onnx_op_counts(tmp)
            result.opset = onnx_opset(tmp)
        extras = [p for p in tmpdir.iterdir() if p.name != out.name]
        if not force:
            for p in [out] + [out.parent / e.name for e in extras]:
                if p.exists():
                    raise InputError(f"{p} already exists; pass --force to overwrite it")
        for p in extras:  # external data first, then the file that refers to it
            os.replace(p, out.parent / p.name)
            result.extra_files.append(out.parent / p.name)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _default_fuse() -> Callable[..., Any]:
    import reparam

    fn = reparam.fuse
    return fn if not hasattr(fn, "fuse") else fn.fuse  # the function, not the submodule


def _default_explain() -> Callable[..., Any]:
    import reparam

    fn = reparam.explain
    return fn if not hasattr(fn, "explain") else fn.explain


def _random_input(shape: Sequence[int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator)


def _leaves(value: Any) -> list[Any]:
    from torch.utils import _pytree

    return [v for v in _pytree.tree_leaves(value) if isinstance(v, torch.Tensor) or hasattr(v, "shape")]


def _to_numpy(value: Any):
    import numpy as np

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy() if value.is_floating_point() \
            else value.detach().cpu().numpy()
    return np.asarray(value)


def _count_outputs(module: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        return max(1, len(_leaves(module(example))))


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _tail_hint(log: str) -> str:
    return " (rerun with -v to see the exporter's messages)" if log.strip() else ""


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _close(word: str, names: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, names, n=3, cutoff=0.5)
    return ", ".join(repr(c) for c in close)


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
