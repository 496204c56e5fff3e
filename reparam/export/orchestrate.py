"""`export_model`: fuse, write in one format, check the written output, move it into place.

1. checks the destination and the format's options before any expensive work (folder exists and
   is writable, no existing output unless `force=True`, the format's optional packages import);
2. fuses a private copy of the model with `reparam.fuse` (verified on the example input unless
   `verify=False`); the caller's model, its `training` flags and the global random generator are
   left as they were;
3. writes the fused model with the format's `write` (one `torch.export` trace; a dynamic batch
   axis where the format allows it and no fixed batch size is asked for) into a temporary folder
   beside the destination;
4. checks what was written with the format's `check` (numerically against the fused *and* the
   unfused model on a random batch, with `reparam.verify.compare`; structurally where a runtime
   is not available);
5. moves it into place (atomically, `os.replace`) only if every check passed. On any failure
   nothing is left behind, and an existing output replaced with `force` stays as it was.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..resolve import random_input
from .core import (CHECK_BATCH, CHECK_SEED, Check, CheckFailure, ExportError, ExportResult, Staging,
                   check_output_path, quiet)
from .formats import format_module, format_options, require_extras, resolve_format


def export_model(model: nn.Module, example_input: torch.Tensor, output, *,
                 format: str | None = None, opset: int | None = None,
                 batch_size: int | None = None, verify: bool = True, force: bool = False,
                 exporter: str = "dynamo", precision: str | None = None,
                 deployment_target: str | None = None, verbose: bool = False,
                 rtol: float | None = None, atol: float | None = None,
                 fuse: Callable[..., Any] | None = None,
                 log: Callable[[str], None] | None = None) -> ExportResult:
    """Fuse `model`, write it to `output`, check it, and move it into place.

    format: "onnx", "pt2", "pte" (ExecuTorch, XNNPACK) or "coreml" (.mlpackage); default: from
        the output's suffix, else onnx.
    batch_size: None for a dynamic batch axis (checked on a random batch of two) where the format
        has one (onnx, pt2); pte and coreml then fix the example input's batch size. An int fixes
        the batch size of the output (checked on a batch of that size).
    opset, exporter: ONNX only. precision ("float16", Core ML's default, or "float32") and
        deployment_target (e.g. "iOS17"): Core ML only.
    verify: fuse with verification and check the written output; False skips every check.
    rtol, atol: tolerance of the checks, per output (default: `reparam.verify.DEFAULT_TOLERANCES`
        for the output's dtype).
    fuse: the fusing function (default `reparam.fuse`), replaceable for tests.
    Raises InputError (bad destination or options), MissingExtra (a format's optional package is
    not installed), ExportError (exporter failed), CheckFailure (a check failed), and what
    `reparam.fuse` raises. On any failure no output is left behind.
    """
    start = time.perf_counter()
    say = log or (lambda message: None)
    name = resolve_format(format, output)
    fmt = format_module(name)
    options = format_options(name, opset=opset, exporter=exporter, precision=precision,
                             deployment_target=deployment_target)
    out = check_output_path(output, force=force, directory=fmt.IS_FOLDER)
    require_extras(name)
    fmt.validate(**options)

    if fuse is None:
        from ..pipeline import fuse
    original = copy.deepcopy(model).eval()  # the caller's model keeps its mode
    say("fusing" + (" and verifying on the example input" if verify else ""))
    with quiet(not verbose):
        fused = fuse(original, example_input, verify=verify)
    fused.eval()
    report = getattr(fused, "report", None)

    dynamic = batch_size is None and fmt.DYNAMIC_BATCH
    check_batch_size = CHECK_BATCH if dynamic else (batch_size or int(example_input.shape[0]))
    rest = tuple(example_input.shape[1:])
    export_example = random_input((check_batch_size,) + rest, CHECK_SEED + 2)
    check_batch = random_input((check_batch_size,) + rest, CHECK_SEED)

    with Staging(out) as staging:
        tmp = staging.path()
        say(f"exporting to {name}")
        try:
            written = fmt.write(fused, export_example, tmp, dynamic_batch=dynamic,
                                verbose=verbose, **options)
        except ExportError as exc:
            leaves = list(getattr(report, "leaves", None) or [])
            if leaves:  # the likely culprit: submodules torch.fx could not trace either
                names = ", ".join(f"{leaf.module} ({leaf.reason})" for leaf in leaves[:3])
                raise ExportError(f"{exc}\nsubmodules kept whole because they cannot be traced"
                                  f" (data-dependent control flow?): {names}") from exc
            raise
        checks: list[Check] = []
        if verify:
            say(f"checking the output on a random batch of {check_batch_size}")
            checks = fmt.check(tmp, fused, original, check_batch, rtol=rtol, atol=atol, **options)
            failed = [c for c in checks if not c.ok]
            if failed:
                details = "\n".join(f"  {c}" for c in checks)
                what = ("disagrees with the PyTorch model beyond the tolerance (each output within"
                        " atol + rtol * max|that output|)" if any(not c.structural for c in failed)
                        else "fails a structural check")
                raise CheckFailure(f"the exported {name} output {what}; nothing was"
                                   f" written:\n{details}", checks)
        label, op_counts = fmt.describe(tmp)
        result = ExportResult(path=out, format=name, exporter=written.exporter,
                              dynamic_batch=dynamic, size_bytes=staging.size(), seconds=0.0,
                              report=report, checks=checks, op_counts=op_counts, op_label=label,
                              notes=list(written.notes), details=list(written.details),
                              verified=verify, batch_size=None if dynamic else check_batch_size)
        if name == "onnx":
            result.opset = fmt.opset_of(tmp)
        if verify and name == "coreml" and not fmt.can_predict():
            import sys

            result.notes.append(fmt.NO_PREDICTION if sys.platform != "darwin"
                                else fmt.NO_PREDICTION_ON_MAC)
        result.extra_files = staging.commit(force=force)
    result.seconds = time.perf_counter() - start
    return result
