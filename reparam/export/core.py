"""What every format shares: errors, the result record, output paths written atomically, the
comparison of a written file's outputs with the PyTorch models, and silencing exporters' output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..errors import InputError, ReparamError, first_line
from ..report import format_table
from ..verify import compare

CHECK_BATCH = 2  # the batch size of the random batch a file with a dynamic batch is checked on
CHECK_SEED = 20240229  # fixed, so that exports and checks are reproducible


class ExportError(ReparamError):
    """The exporter could not translate the fused model (exit code 1 on the command line)."""


class CheckFailure(ReparamError):
    """A written file failed a check; nothing was written (exit code 1 on the command line)."""

    def __init__(self, message: str, checks: Sequence["Check"] = ()):
        super().__init__(message)
        self.checks = list(checks)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One check of the written file: a numerical comparison against a PyTorch model
    (`reparam.verify.compare`, per output), or a structural fact (`structural=True`)."""

    against: str  # "fused PyTorch model", or what a structural check verifies
    max_abs_diff: float = 0.0
    allowed: float = 0.0
    batch: int = 0
    where: str = ""  # the output with the largest excess ("output 2")
    structural: bool = False
    passed: bool = True  # structural checks only
    detail: str = ""  # structural checks: what was found

    @property
    def ok(self) -> bool:
        return self.passed if self.structural else self.max_abs_diff <= self.allowed

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        if self.structural:
            return f"{self.against}" + (f" ({self.detail})" if self.detail else "") + f": {verdict}"
        where = f" at {self.where}" if self.where and not self.ok else ""
        return (f"max |file - {self.against}| = {self.max_abs_diff:.3g}{where} on a batch of"
                f" {self.batch} (allowed {self.allowed:.3g} per output): {verdict}")


@dataclass
class Written:
    """What a format's `write` produced, for the summary."""

    exporter: str  # e.g. "torch.export + torch.onnx (dynamo)"
    notes: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # lines of the summary, e.g. delegation


@dataclass
class ExportResult:
    """What `export_model` wrote and what it checked."""

    path: Path
    format: str  # "onnx", "pt2", "pte" or "coreml"
    exporter: str  # "torch.export + torch.onnx (dynamo)", "torchscript", "torch.export", ...
    dynamic_batch: bool
    size_bytes: int
    seconds: float
    report: Any  # reparam.report.Report of the fusion
    checks: list[Check] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)  # operators in the written file
    op_label: str = ""  # how the summary names them, e.g. "ONNX operators (opset 18)"
    opset: int | None = None  # ONNX only
    extra_files: list[Path] = field(default_factory=list)  # external data written beside
    notes: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    verified: bool = True
    batch_size: int | None = None  # the fixed batch size, None with a dynamic batch axis

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
        if self.op_counts:
            ops = ", ".join(f"{k}: {v}" for k, v in sorted(self.op_counts.items(),
                                                         key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"{self.op_label or 'operators'}: {ops}")
        lines.extend(self.details)
        batch = ("dynamic batch axis" if self.dynamic_batch
                 else f"fixed batch size" + (f" {self.batch_size}" if self.batch_size else ""))
        lines.append(f"exporter: {self.exporter}, {batch}")
        if self.verified:
            lines.extend(f"check: {c}" for c in self.checks)
        else:
            lines.append("checks skipped (--no-verify)")
        lines.extend(f"note: {n}" for n in self.notes)
        size = human_size(self.size_bytes)
        extra = "".join(f" + {p.name} ({human_size(p.stat().st_size)})" for p in self.extra_files
                        if p.exists())
        lines.append(f"wrote {self.path} ({size}{extra}) in {self.seconds:.1f} s")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Output paths, written atomically
# --------------------------------------------------------------------------------------------


def default_output_path(name: str, suffix: str, folder: str | os.PathLike | None = None) -> Path:
    """<folder>/<name>.<suffix>, with characters unsafe in file names replaced."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"
    return Path(folder or os.getcwd()) / f"{stem}.{suffix.lstrip('.')}"


def check_output_path(path: str | os.PathLike, *, force: bool = False,
                      directory: bool = False) -> Path:
    """Fail early (InputError) if `path` cannot be written, or exists and `force` is False.

    directory: the output is a folder (a Core ML .mlpackage); with `force`, an existing folder of
    that name is replaced (only once the new one is complete), but only if it is one such output.
    """
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = Path(os.getcwd()) / path
    folder = path.parent
    if path.is_dir() and not directory:
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
    if path.exists() or path.is_symlink():
        if not force:
            raise InputError(f"{path} already exists; pass --force to overwrite it")
        if path.is_dir() and not (path / "Manifest.json").is_file():
            raise InputError(f"{path} is a folder that is not a Core ML package; it is not"
                             " replaced even with --force: choose another output name")
    return path


class Staging:
    """A temporary folder beside the destination where outputs are written and checked.

    Files and folders (a Core ML package) are both written under `staging.path(name)`; `commit`
    moves them into place with `os.replace` (same file system, so each rename is atomic). A folder
    that already exists is first renamed aside and removed only after the new one is in place,
    so an interrupted `--force` never leaves the destination half written. `close` removes
    whatever was not committed.
    """

    def __init__(self, destination: Path):
        self.destination = destination
        self.folder = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp",
                                            dir=destination.parent))

    def path(self) -> Path:
        """Where to write the main output (the destination's own name, so that external data
        references written beside it stay valid)."""
        return self.folder / self.destination.name

    def extras(self) -> list[Path]:
        """What was written beside the main output (ONNX external data)."""
        return [p for p in self.folder.iterdir() if p.name != self.destination.name]

    def size(self) -> int:
        main = self.path()
        if main.is_dir():
            return sum(f.stat().st_size for f in main.rglob("*") if f.is_file())
        return main.stat().st_size

    def commit(self, *, force: bool) -> list[Path]:
        """Move the outputs into place; returns the extra files moved beside the main one."""
        out = self.destination
        extras = self.extras()
        if not force:
            for p in [out] + [out.parent / e.name for e in extras]:
                if p.exists() or p.is_symlink():
                    raise InputError(f"{p} already exists; pass --force to overwrite it")
        moved = []
        for p in extras:  # external data first, then the file that refers to it
            os.replace(p, out.parent / p.name)
            moved.append(out.parent / p.name)
        new = self.path()
        if new.is_dir() or out.is_dir():
            aside = None
            if out.exists() or out.is_symlink():
                aside = self.folder / (".previous-" + out.name)
                os.replace(out, aside)
            try:
                os.replace(new, out)
            except BaseException:
                if aside is not None:
                    os.replace(aside, out)
                raise
        else:
            os.replace(new, out)
        return moved

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Tracing the fused model once, for every format
# --------------------------------------------------------------------------------------------


def torch_export(module: nn.Module, example: torch.Tensor, dynamic_batch: bool):
    """`torch.export.export` the module with a dynamic batch axis (or fixed shapes)."""
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        text = str(exc)
        if dynamic_batch and ("batch" in text and ("onstraint" in text or "specializ" in text)):
            raise ExportError("the model fixes its batch size, so it cannot be exported with a"
                              " dynamic batch axis; pass --batch-size N to export a fixed batch"
                              f" ({type(exc).__name__}: {first_line(exc)})") from exc
        raise


def trace_for_export(module: nn.Module, example: torch.Tensor, dynamic_batch: bool, *,
                     verbose: bool = False, alternative: str = ""):
    """`torch_export` with exporter chatter silenced and one ExportError for every failure."""
    log = io.StringIO()
    try:
        with quiet(not verbose) as log:
            return torch_export(module, example, dynamic_batch)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.export could not trace the fused model: {type(exc).__name__}:"
                          f" {first_line(exc)}" + (f"; {alternative}" if alternative else "")
                          + rerun_hint(log.getvalue())) from exc


# --------------------------------------------------------------------------------------------
# Comparing a file's outputs with the PyTorch models
# --------------------------------------------------------------------------------------------


def output_list(value: Any) -> list[Any]:
    """The tensors of a (nested) output, in order: what a runtime returns as its list."""
    from torch.utils import _pytree

    return [v for v in _pytree.tree_leaves(value)
            if isinstance(v, torch.Tensor) or hasattr(v, "__array__")]


def references(fused: nn.Module, original: nn.Module | None, batch: torch.Tensor):
    """[(name, outputs as a list)] of the fused and (if given) the original model on `batch`."""
    with torch.no_grad():
        refs = [("fused PyTorch model", output_list(fused(batch)))]
        if original is not None:
            refs.append(("original (unfused) model", output_list(original(batch))))
    return refs


def compare_outputs(outputs: Sequence[Any], fused: nn.Module, original: nn.Module | None,
                    batch: torch.Tensor, *, rtol: float | None = None,
                    atol: float | None = None) -> list[Check]:
    """One `Check` per reference model: `reparam.verify.compare` of the file's outputs (a flat
    list, as runtimes return them) with the model's, each output against its own scale."""
    checks = []
    for name, reference in references(fused, original, batch):
        result = compare(reference, list(outputs), rtol, atol)
        checks.append(Check(name, result.max_abs_diff, result.allowed, int(batch.shape[0]),
                            result.where))
    return checks


def count_outputs(module: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        return max(1, len(output_list(module(example))))


# --------------------------------------------------------------------------------------------
# Quiet exporters
# --------------------------------------------------------------------------------------------

_CHATTY_LOGGERS = ["torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript",
                   "onnx_ir", "onnx", "executorch", "coremltools"]


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[io.StringIO]:
    """Silence exporter chatter: warnings, library logging, and what C++ code prints.

    Redirects the process's stdout/stderr file descriptors into a temporary file while active.
    Yields a StringIO that holds the captured text once the block ends (for error messages).
    """
    captured = io.StringIO()
    if not enabled:
        yield captured
        return
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
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


def rerun_hint(log: str) -> str:
    return " (rerun with -v to see the exporter's messages)" if log.strip() else ""


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
