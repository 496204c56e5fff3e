"""torch.export programs (.pt2): the fused model as `torch.export.save` writes it.

Check: the program loaded back with `torch.export.load` and run on a random batch, against the
fused and the unfused PyTorch model (`reparam.verify.compare`, per output).
"""

from __future__ import annotations

import io
import os

import torch
from torch import nn

from ..errors import first_line
from .core import (Check, CheckFailure, ExportError, Written, compare_outputs, output_list, quiet,
                   rerun_hint, trace_for_export)

NAME = "pt2"
SUFFIX = "pt2"
DESCRIPTION = "torch.export program (torch.export.load; for PyTorch runtimes)"
IS_FOLDER = False
DYNAMIC_BATCH = True
OPTIONS = ()
REQUIRES = ()
FEATURE = "exporting a torch.export program"


def validate() -> None:
    """pt2 takes no options of its own."""


def write(fused: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
          dynamic_batch: bool = True, verbose: bool = False) -> Written:
    """Write `fused` as a torch.export program (`torch.export.save`)."""
    program = trace_for_export(fused, example, dynamic_batch, verbose=verbose)
    log = io.StringIO()
    try:
        with quiet(not verbose) as log:
            torch.export.save(program, str(path))
    except Exception as exc:
        raise ExportError(f"torch.export.save could not write the program: {type(exc).__name__}:"
                          f" {first_line(exc)}" + rerun_hint(log.getvalue())) from exc
    return Written("torch.export")


def check(path: str | os.PathLike, fused: nn.Module, original: nn.Module | None,
          batch: torch.Tensor, *, rtol: float | None = None, atol: float | None = None,
          **options) -> list[Check]:
    """Load the program back with torch.export.load and compare it on `batch`."""
    try:
        with quiet():
            program = torch.export.load(str(path))
        with torch.no_grad():
            outputs = program.module()(batch)
    except Exception as exc:
        raise CheckFailure(f"the saved program cannot be loaded back and run on a batch of"
                           f" {batch.shape[0]}: {type(exc).__name__}: {first_line(exc)}") from None
    return compare_outputs(output_list(outputs), fused, original, batch, rtol=rtol, atol=atol)


def describe(path: str | os.PathLike) -> tuple[str, dict[str, int]]:
    """A .pt2 program's operators are those of torch.export; the summary lists none."""
    return "", {}
