"""Core ML ML programs (.mlpackage, a folder) for iPhones, iPads and Macs, via coremltools.

Writer: `torch.export` of the fused model (fixed shapes), then `coremltools.convert(...,
convert_to="mlprogram")` with the chosen compute precision (float16 by default, as Core ML's own
default; float32 on request) and minimum deployment target (coremltools' default, iOS15, unless
given).

Check: Core ML runs predictions only on macOS. Everywhere, the written package is loaded back and
its program inspected: the operation histogram holds no batch norm and as many convolutions as the
fused model, and the input and output names and shapes are those of the fused model. On macOS the
package is also run on a random batch and compared with the fused and unfused PyTorch model; on
other systems the summary says plainly that numerical verification needs macOS.
"""

from __future__ import annotations

import collections
import io
import os
import re
import sys

import torch
from torch import nn

from ..errors import InputError, first_line
from ..optional import require
from ..verify import DEFAULT_TOLERANCES
from .core import (Check, CheckFailure, ExportError, Written, compare_outputs, output_list, quiet,
                   rerun_hint, trace_for_export)

NAME = "coreml"
SUFFIX = "mlpackage"
DESCRIPTION = "Core ML ML program (iPhone, iPad, Mac; Neural Engine)"
IS_FOLDER = True
DYNAMIC_BATCH = False
OPTIONS = ("precision", "deployment_target")
REQUIRES = ("coremltools",)
PRECISIONS = ("float16", "float32")
FEATURE = "exporting to Core ML (--format coreml)"
NO_PREDICTION = ("numerical verification of Core ML packages needs macOS (Core ML cannot run"
                 " predictions on this system); the checks above cover the program's structure only")
NO_PREDICTION_ON_MAC = ("coremltools cannot run predictions here (its native extension does not"
                        " load); the checks above cover the program's structure only")

_CONV_TARGETS = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution",
                 "aten._convolution")


def coremltools():
    """coremltools, imported quietly (it prints notes about versions it was not tested with)."""
    with quiet():
        return require("coremltools", FEATURE)


def validate(*, precision: str = "float16", deployment_target: str | None = None) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use float16 or float32")
    if deployment_target is not None:
        _target(deployment_target)


def _target(name: str):
    ct = coremltools()
    members = {k.lower(): v for k, v in ct.target.__members__.items()}
    target = members.get(name.lower())
    if target is None:
        known = ", ".join(k for k in ct.target.__members__)
        raise InputError(f"unknown Core ML deployment target {name!r}; use one of {known}")
    if target.value < ct.target.iOS15.value:
        raise InputError(f"Core ML ML programs need iOS15 / macOS12 or later, not {name}")
    return target


def write(fused: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
          dynamic_batch: bool = False, verbose: bool = False, precision: str = "float16",
          deployment_target: str | None = None) -> Written:
    """Convert `fused` to a Core ML ML program and save the .mlpackage folder at `path`."""
    ct = coremltools()
    validate(precision=precision, deployment_target=deployment_target)
    program = trace_for_export(fused, example, dynamic_batch, verbose=verbose)
    log = io.StringIO()
    try:
        with quiet(not verbose) as log:
            program = program.run_decompositions({})
            kwargs = {}
            if deployment_target is not None:
                kwargs["minimum_deployment_target"] = _target(deployment_target)
            compute = ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32
            mlmodel = ct.convert(program, convert_to="mlprogram", compute_precision=compute,
                                 **kwargs)
    except Exception as exc:
        raise ExportError(_conversion_error(exc) + rerun_hint(log.getvalue())) from exc
    try:
        with quiet(not verbose) as log:
            mlmodel.save(str(path))
    except Exception as exc:
        raise ExportError(f"coremltools could not save the package: {type(exc).__name__}:"
                          f" {first_line(exc)}" + rerun_hint(log.getvalue())) from exc
    target = deployment_target or "coremltools' default (iOS15)"
    return Written(f"torch.export + coremltools {ct.__version__} (mlprogram)",
                   details=[f"Core ML: compute precision {precision}, minimum deployment target"
                            f" {target}"])


def operation_counts(spec) -> dict[str, int]:
    """How many operations of each type the ML program holds (constants left out)."""
    counts: collections.Counter[str] = collections.Counter()

    def walk(block) -> None:
        for op in block.operations:
            if op.type != "const":
                counts[op.type] += 1
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return dict(counts)


def describe(path: str | os.PathLike) -> tuple[str, dict[str, int]]:
    """(label, operation histogram) of the written package, for the summary."""
    return "Core ML operations", operation_counts(_load(path, run=False).get_spec())


def can_predict() -> bool:
    """Core ML predictions need macOS and coremltools' native extension (macOS wheels ship it)."""
    if sys.platform != "darwin":
        return False
    import importlib.util

    try:
        return importlib.util.find_spec("coremltools.libcoremlpython") is not None
    except (ImportError, ValueError):
        return False


def check(path: str | os.PathLike, fused: nn.Module, original: nn.Module | None,
          batch: torch.Tensor, *, rtol: float | None = None, atol: float | None = None,
          precision: str = "float16", **options) -> list[Check]:
    """Structure everywhere (spec loads, no batch norm, the fused model's convolutions, names and
    shapes); on macOS also a prediction on `batch` compared with the fused and original models."""
    mlmodel = _load(path, run=False)
    spec = mlmodel.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise CheckFailure(f"the written package holds a {spec.WhichOneof('Type')}, not an ML program")
    ops = operation_counts(spec)
    checks = [Check("the package loads and holds an ML program", structural=True,
                    detail=f"specification version {spec.specificationVersion}")]
    norms = {k: v for k, v in ops.items() if "batch_norm" in k}
    checks.append(Check("no batch norm in the program", structural=True, passed=not norms,
                        detail=", ".join(f"{k} x{v}" for k, v in norms.items()) or "none"))
    expected = _count_convolutions(fused, batch)
    got = ops.get("conv", 0) + ops.get("conv_transpose", 0)
    checks.append(Check("convolutions as in the fused model", structural=True,
                        passed=got == expected, detail=f"{got}, expected {expected}"))
    with torch.no_grad():
        outputs = output_list(fused(batch))
    want_in = [("input", tuple(batch.shape))]
    got_in = [(i.name, tuple(i.type.multiArrayType.shape)) for i in spec.description.input]
    got_out = [(o.name, tuple(o.type.multiArrayType.shape)) for o in spec.description.output]
    shapes_ok = ([s for _, s in got_in] == [s for _, s in want_in]
                 and [s for _, s in got_out] == [tuple(t.shape) for t in outputs])
    checks.append(Check("input and output shapes", structural=True, passed=shapes_ok,
                        detail="; ".join(f"{n} {'x'.join(map(str, s))}" for n, s in got_in + got_out)))
    if can_predict():
        checks.extend(_predict(path, spec, fused, original, batch, rtol, atol, precision))
    return checks


def _predict(path, spec, fused, original, batch, rtol, atol, precision) -> list[Check]:
    try:
        with quiet():
            model = _load(path, run=True)
            names = [o.name for o in spec.description.output]
            result = model.predict({spec.description.input[0].name: batch.detach().numpy()})
        outputs = [torch.as_tensor(result[n]).float() for n in names]
    except Exception as exc:
        raise CheckFailure(f"Core ML cannot run the written package: {type(exc).__name__}:"
                           f" {first_line(exc)}") from None
    if precision == "float16":
        default_rtol, default_atol = DEFAULT_TOLERANCES[torch.float16]
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol
    return compare_outputs(outputs, fused, original, batch, rtol=rtol, atol=atol)


def _load(path, *, run: bool):
    ct = coremltools()
    try:
        with quiet():
            return ct.models.MLModel(str(path), skip_model_load=not run)
    except Exception as exc:
        raise CheckFailure(f"the written Core ML package cannot be loaded back:"
                           f" {type(exc).__name__}: {first_line(exc)}") from None


def _count_convolutions(fused: nn.Module, batch: torch.Tensor) -> int:
    with quiet():
        program = torch.export.export(fused, (batch,)).run_decompositions({})
    return sum(1 for n in program.graph.nodes if n.op == "call_function"
               and str(getattr(n.target, "_name", "")).replace("::", ".") in _CONV_TARGETS)


def _conversion_error(exc: BaseException) -> str:
    text = str(exc)
    match = (re.search(r"Unsupported fx node (\w+)", text)
             or re.search(r"convert function for op '(\w+)' not implemented", text))
    if match:
        op = match.group(1)
        return (f"Core ML (coremltools) cannot convert the operator {op}: coremltools has no"
                " conversion for it; replace it in the model, or export to ONNX, pt2 or pte"
                " instead")
    return f"coremltools could not convert the fused model: {type(exc).__name__}: {first_line(exc)}"
