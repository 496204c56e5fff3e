"""ExecuTorch programs (.pte) lowered to the XNNPACK backend, for phones and embedded CPUs.

Writer: `torch.export` of the fused model (fixed shapes: the runtime plans its memory for them),
then `executorch.exir.to_edge_transform_and_lower` with the XNNPACK partitioner, then
`to_executorch()`. Operators XNNPACK does not take stay in the program and run on ExecuTorch's
portable kernels; the summary lists them. An operator outside the Core ATen set that ExecuTorch
runs is an ExportError naming it.

Check: the written file loaded with the ExecuTorch runtime (`executorch.runtime.Runtime`) and run
on a random batch, against the fused and the unfused PyTorch model (`reparam.verify.compare`).
"""

from __future__ import annotations

import collections
import io
import os
import re

import torch
from torch import nn

from ..errors import first_line
from ..optional import require
from .core import (Check, CheckFailure, ExportError, Written, compare_outputs, quiet, rerun_hint,
                   trace_for_export)

NAME = "pte"
SUFFIX = "pte"
DESCRIPTION = "ExecuTorch program lowered to XNNPACK (Android, iOS, embedded CPUs)"
IS_FOLDER = False
DYNAMIC_BATCH = False  # the runtime plans memory for fixed shapes
OPTIONS = ()
REQUIRES = ("executorch.exir", "executorch.backends.xnnpack.partition.xnnpack_partitioner",
            "executorch.runtime")
FEATURE = "exporting to ExecuTorch (--format pte)"

_DELEGATE_CALL = "executorch_call_delegate"


def validate() -> None:
    """pte takes no options of its own."""


def write(fused: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
          dynamic_batch: bool = False, verbose: bool = False) -> Written:
    """Lower `fused` to XNNPACK and write the ExecuTorch program to `path`."""
    with quiet(not verbose):
        exir = require("executorch.exir", FEATURE)
        partitioner = require("executorch.backends.xnnpack.partition.xnnpack_partitioner",
                              FEATURE).XnnpackPartitioner
    program = trace_for_export(fused, example, dynamic_batch, verbose=verbose)
    log = io.StringIO()
    try:
        with quiet(not verbose) as log:
            edge = exir.to_edge_transform_and_lower(program, partitioner=[partitioner()])
    except Exception as exc:
        raise ExportError(_lowering_error(exc) + rerun_hint(log.getvalue())) from exc
    delegated, outside = delegation(edge.exported_program().graph_module)
    try:
        with quiet(not verbose) as log:
            buffer = edge.to_executorch().buffer
        with open(path, "wb") as f:
            f.write(buffer)
    except Exception as exc:
        raise ExportError(f"ExecuTorch could not write the program: {type(exc).__name__}:"
                          f" {first_line(exc)}" + rerun_hint(log.getvalue())) from exc
    if outside:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(outside.items(), key=lambda kv: (-kv[1], kv[0])))
        where = f"outside XNNPACK (portable kernels): {ops}"
    else:
        where = "outside XNNPACK: none"
    details = [f"XNNPACK delegate: {delegated} subgraph{'s' if delegated != 1 else ''}; operators"
               f" {where}"]
    return Written("torch.export + executorch (XNNPACK)", details=details)


def delegation(graph_module: torch.fx.GraphModule) -> tuple[int, dict[str, int]]:
    """(number of XNNPACK subgraphs, {operator: count} of the operators left outside them)."""
    delegated = 0
    outside: collections.Counter[str] = collections.Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == _DELEGATE_CALL:
            delegated += 1
        elif name not in ("getitem",):
            outside[name] += 1
    return delegated, dict(outside)


def check(path: str | os.PathLike, fused: nn.Module, original: nn.Module | None,
          batch: torch.Tensor, *, rtol: float | None = None, atol: float | None = None,
          **options) -> list[Check]:
    """Run the written program with the ExecuTorch runtime on `batch`; compare with both models."""
    with quiet():
        runtime_module = require("executorch.runtime", "checking ExecuTorch programs")
    log = io.StringIO()
    try:
        with quiet() as log:
            runtime = runtime_module.Runtime.get()
            method = runtime.load_program(str(path)).load_method("forward")
            outputs = method.execute([batch.detach().contiguous()])
    except Exception as exc:
        missing = re.findall(r"[Mm]issing (?:out variants?|operator)[:\s]+\{?'?([\w.:]+)", 
                             log.getvalue() + str(exc))
        what = f" (operator not in this runtime: {', '.join(sorted(set(missing)))})" if missing else ""
        raise CheckFailure(f"the ExecuTorch runtime cannot run the written program on a batch of"
                           f" {batch.shape[0]}{what}: {type(exc).__name__}: {first_line(exc)}") from None
    return compare_outputs(list(outputs), fused, original, batch, rtol=rtol, atol=atol)


def describe(path: str | os.PathLike) -> tuple[str, dict[str, int]]:
    """The delegation summary comes from `write`; the summary lists no further operators."""
    return "", {}


def _op_name(target) -> str:
    """'aten.mean.dim' for an edge operator, 'executorch_call_delegate', 'getitem'."""
    name = getattr(target, "__name__", None) or str(target)
    overload = getattr(target, "_op", None) or target
    qualified = getattr(overload, "_name", None)  # OpOverload: 'aten::mean' + overloadname
    if isinstance(qualified, str) and "::" in qualified:  # 'aten::mean.dim'
        return qualified.replace("::", ".")
    return name


def _lowering_error(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"Operator torch\._ops\.([\w.]+) is not in Core ATen", text)
    if match:
        op = match.group(1)
        return (f"ExecuTorch cannot export the operator {op}: it is not in the Core ATen operator"
                " set that ExecuTorch runs (neither XNNPACK nor its portable kernels implement"
                " it); replace it in the model, or export to ONNX or pt2 instead")
    return f"ExecuTorch could not lower the fused model: {type(exc).__name__}: {first_line(exc)}"
