"""ONNX: the fused model as a .onnx file, checked with onnx.checker and ONNX Runtime.

Exporter: `torch.onnx.export(..., dynamo=True)` applied to the `torch.export` program of the fused
GraphModule: deterministic output (same bytes every run), a dynamic batch axis (named `batch` in
the file), weights embedded in the single file below ~1.8 GB (`<file>.data` beside it above). The
legacy TorchScript exporter (`exporter="torchscript"`) is never chosen silently: where
torch.export fails (data-dependent control flow) it records the branch taken for the example
input only, so the file could be right on the checked batch and wrong on others.

Check: `onnx.checker.check_model(full_check=True)`, then ONNX Runtime (CPU) on a random batch
against the fused and the unfused PyTorch model (`reparam.verify.compare`, per output).
"""

from __future__ import annotations

import collections
import io
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, first_line
from ..optional import require
from .core import (Check, CheckFailure, ExportError, Written, compare_outputs, count_outputs, quiet,
                   rerun_hint, trace_for_export)

NAME = "onnx"
SUFFIX = "onnx"
DESCRIPTION = "ONNX (ONNX Runtime, TensorRT, OpenVINO, ...)"
IS_FOLDER = False
DYNAMIC_BATCH = True  # a dynamic batch axis unless a fixed batch size is asked for
OPTIONS = ("opset", "exporter")
REQUIRES = ("onnx", "onnxscript")  # imported before any work, so a missing extra fails fast
FEATURE = "exporting to ONNX"
MIN_OPSET, MAX_OPSET = 7, 30  # the range accepted here; the exporter may refuse some of it
_LARGE_MODEL_BYTES = 1_800_000_000  # beyond this, weights go to an external .data file


def validate(*, opset: int | None = None, exporter: str = "dynamo") -> None:
    """InputError for options this format cannot honour, before any work is done."""
    if exporter not in ("dynamo", "torchscript"):
        raise InputError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"--opset {opset} is out of range; give an ONNX opset from {MIN_OPSET}"
                         f" to {MAX_OPSET}")


def write(fused: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
          dynamic_batch: bool = True, verbose: bool = False, opset: int | None = None,
          exporter: str = "dynamo") -> Written:
    """Write `fused` as ONNX to `path`.

    exporter: "dynamo" (torch.export, then torch.onnx's translation of the program; the default)
    or "torchscript" (the legacy torch.onnx tracer, `dynamo=False`, opset 17 unless given).
    """
    for module in REQUIRES:
        require(module, FEATURE)
    validate(opset=opset, exporter=exporter)
    path = Path(path)
    n_out = count_outputs(fused, example)
    output_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    if exporter == "dynamo":
        program = trace_for_export(
            fused, example, dynamic_batch, verbose=verbose,
            alternative="`--exporter torchscript` may export it, but records only the control"
                        " flow taken for the example input")
        log = io.StringIO()
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
                              f" {type(exc).__name__}: {first_line(exc)}"
                              + rerun_hint(log.getvalue())) from exc
        return Written("torch.export + torch.onnx (dynamo)")
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
                          f" {first_line(exc)}" + rerun_hint(log.getvalue())) from exc
    return Written("torchscript (torch.onnx, dynamo=False)",
                   notes=["the TorchScript exporter records the control flow taken for the"
                          " example input only"])


def check(path: str | os.PathLike, fused: nn.Module, original: nn.Module | None,
          batch: torch.Tensor, *, rtol: float | None = None, atol: float | None = None,
          **options) -> list[Check]:
    """onnx.checker, then ONNX Runtime (CPU) on `batch` against the fused and original models.

    Raises CheckFailure when the checker rejects the file or ONNX Runtime cannot run it; returns
    the numerical checks (the caller decides what a failed comparison means).
    """
    onnx = require("onnx", "checking ONNX files")
    ort = require("onnxruntime", "checking ONNX files")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise CheckFailure(f"onnx.checker rejects the exported file: {first_line(exc)}") from None
    try:
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        session = ort.InferenceSession(str(path), session_options,
                                       providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: batch.detach().cpu().numpy()}
        outputs = session.run(None, feed)
    except Exception as exc:
        raise CheckFailure(f"ONNX Runtime cannot run the exported file on a batch of"
                           f" {batch.shape[0]}: {first_line(exc)}") from None
    return compare_outputs(outputs, fused, original, batch, rtol=rtol, atol=atol)


def op_counts(path: str | os.PathLike) -> dict[str, int]:
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


def opset_of(path: str | os.PathLike) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def describe(path: str | os.PathLike) -> tuple[str, dict[str, int]]:
    """(label, operator counts) of the written file, for the summary."""
    return f"ONNX operators (opset {opset_of(path)})", op_counts(path)


def _name_batch_axis(path: str | os.PathLike, name: str = "batch") -> None:
    """Rename the exporter's symbol for the batch axis (e.g. 's77') to `name` everywhere."""
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


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size()
               for t in list(module.parameters()) + list(module.buffers()))
