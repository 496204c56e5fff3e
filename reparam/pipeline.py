"""Public entry points: `fuse` and `explain`.

The pipeline, on a private eval-mode copy of the caller's model:

    trace -> propagate shapes -> fold constants -> linear forms -> lower -> fuse inside leaves -> verify
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from collections import OrderedDict
from functools import partial

import torch
import torch.fx
from torch import nn

from .errors import InputError, TraceFailure, first_line
from .measure import count_macs, count_params, counts
from .passes.functionalize import functionalize
from .passes.linear_forms import LinearFormPass
from .passes.lower import lower_forms
from .report import Counts, FusedRegion, Leaf, Refusal, Report
from .trace import dtype_of, fold_constants, is_shape_query, propagate_shapes, trace
from .verify import check


def fuse(model: nn.Module, example_input, *, verify: bool = True, rtol: float | None = None,
         atol: float | None = None) -> torch.fx.GraphModule:
    """Return the inference form of `model`: every exactly fusible linear structure in one conv.

    Args:
        model: any `nn.Module` in its training form. It is never modified.
        example_input: a tensor, or a tuple of tensors, that `model` accepts. Used for tracing
            shapes, cost decisions, the report's counts, and verification.
        verify: run the original (in eval mode) and the fused module on `example_input` and raise
            `VerificationError` if they disagree beyond the tolerance.
        rtol, atol: the allowed difference is `atol + rtol * max|original output|` per output
            tensor; defaults depend on the dtype (see `reparam.verify.DEFAULT_TOLERANCES`).

    Returns:
        A `torch.fx.GraphModule` in eval mode, on the model's device and in its dtype, with the
        fusion report as its `.report` attribute.
    """
    name = _check_model(model)
    inputs = _check_inputs(example_input, name)
    with _gc_paused(), torch.no_grad():
        work = _private_copy(model, name)
        reference = _run_reference(work, _cloned(inputs), name) if verify else None
        start = time.perf_counter()
        fused, report = _fuse_module(work, inputs, name)
        report.fuse_seconds = time.perf_counter() - start
        report.after = Counts(len(fused.graph.nodes), count_params(fused), count_macs(fused))
        if verify:
            output = fused(*_cloned(inputs))
            result = check(reference, output, name, rtol, atol)
            report.max_abs_diff, report.tolerance = result.max_abs_diff, result.allowed
    fused.report = report
    return fused


def explain(model: nn.Module, example_input, *, verify: bool = True, rtol: float | None = None,
            atol: float | None = None) -> Report:
    """The report `fuse` would attach, without keeping the fused model. `print()` it for a table."""
    return fuse(model, example_input, verify=verify, rtol=rtol, atol=atol).report


# --------------------------------------------------------------------------------------------
# Checks of the caller's arguments
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector: copying and tracing create many small objects
    that it would otherwise scan over and over (a third of the time for large graphs)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_model(model) -> str:
    if not isinstance(model, nn.Module):
        raise InputError(f"reparam.fuse expects a torch.nn.Module as `model`, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError("reparam.fuse needs a plain nn.Module, not a TorchScript module: pass the "
                         "model before torch.jit.script/trace")
    name = type(model).__name__
    if next(iter(model.parameters()), None) is None and next(iter(model.buffers()), None) is None:
        raise InputError(f"{name} has no parameters or buffers: there is nothing to fuse")
    return name


def _check_inputs(example_input, name: str) -> tuple[torch.Tensor, ...]:
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs:
        raise InputError("`example_input` is empty: pass a tensor or a tuple of tensors that "
                         f"{name} accepts")
    for i, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            what = "`example_input`" if len(inputs) == 1 else f"`example_input[{i}]`"
            raise InputError(f"{what} must be a torch.Tensor, got {type(value).__name__}; pass a tensor or "
                             f"a tuple of tensors that {name} accepts")
    return tuple(inputs)


def _private_copy(model: nn.Module, name: str) -> nn.Module:
    # Plain parameters and buffers are cloned up front: copy.deepcopy's generic path for tensors
    # is a large share of the copying time. Shared tensors stay shared in the copy.
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        if type(p) is nn.Parameter:
            memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    for b in model.buffers():
        if type(b) is torch.Tensor:
            memo[id(b)] = b.detach().clone()
    try:
        work = copy.deepcopy(model, memo)
    except Exception as exc:
        raise InputError(f"cannot copy {name} with copy.deepcopy ({type(exc).__name__}: {exc}); reparam "
                         "works on a copy so that the caller's model is never modified") from exc
    work.eval()
    for m in work.modules():  # the copy is an inference model: no hooks fire from it
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                      "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            if isinstance(getattr(m, hooks, None), OrderedDict):
                getattr(m, hooks).clear()
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def _run_reference(work: nn.Module, inputs, name: str):
    try:
        return work(*inputs)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)
        raise InputError(f"{name} rejected example_input ({shapes}): {type(exc).__name__}: "
                         f"{first_line(exc)}") from exc


def _cloned(inputs: tuple) -> tuple:
    """Copies of the example inputs: a model may update its input in place, and the caller's
    tensors must stay as they were (and every run must see the same values)."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

def _fuse_module(module: nn.Module, inputs: tuple, name: str, prefix: str = "") -> tuple[torch.fx.GraphModule, Report]:
    """Fuse a traceable module in place of its graph; recurses into untraceable submodules."""
    gm, failed = trace(module)
    try:
        _, leaf_inputs = propagate_shapes(gm, _cloned(inputs), set(failed))
    except Exception as exc:
        _run_reference(module, inputs, name)  # raises the clear error if the input is at fault
        raise TraceFailure(f"the traced graph of {name} fails where the module itself runs: "
                           f"{type(exc).__name__}: {first_line(exc)}") from exc
    report = Report(model=name)
    report.before = counts(gm)
    kept = functionalize(gm, is_shape_query)
    consts = fold_constants(gm)
    forms = LinearFormPass(gm, consts).run()
    device = _device_of(module, inputs)
    report.regions = _prefixed(lower_forms(gm, forms, dtype_of, device), prefix)
    report.refusals = [Refusal(_prefix_names(r.where, prefix), r.reason) for r in kept + forms.refusals]
    for node, (args, kwargs) in leaf_inputs.items():
        leaf_module = gm.get_submodule(node.target)
        regions = _fuse_inside(leaf_module, args, kwargs, f"{prefix}{node.target}.", report)
        report.leaves.append(Leaf(f"{prefix}{node.target}", failed[node.target], regions))
    for qualname, reason in failed.items():  # leaves never reached on the example input
        if not any(leaf.module == f"{prefix}{qualname}" for leaf in report.leaves):
            report.leaves.append(Leaf(f"{prefix}{qualname}", reason, 0))
    gm.graph.lint()
    # A fresh GraphModule holds only what the rewritten graph still uses.
    fused = torch.fx.GraphModule(gm, gm.graph, class_name=name)
    fused.eval()
    return fused, report


def _fuse_inside(module: nn.Module, args: tuple, kwargs: dict, prefix: str, report: Report) -> int:
    """Fuse each direct child of an untraceable module separately; returns regions fused."""
    calls: dict[str, list] = {}

    def record(child_name, _module, c_args, c_kwargs):
        calls.setdefault(child_name, []).append((c_args, c_kwargs))

    handles = [child.register_forward_pre_hook(partial(record, child_name), with_kwargs=True)
               for child_name, child in module.named_children()]
    try:
        module(*args, **kwargs)
    except Exception:
        return 0
    finally:
        for h in handles:
            h.remove()
    fused = 0
    for child_name, child in list(module.named_children()):
        seen = calls.get(child_name, [])
        if len(seen) != 1 or seen[0][1] or not all(isinstance(a, torch.Tensor) for a in seen[0][0]):
            continue  # called several times or with non-tensor arguments: leave it
        c_args = seen[0][0]
        try:
            child_gm, inner = _fuse_module(child, c_args, type(child).__name__, f"{prefix}{child_name}.")
        except TraceFailure:
            fused += _fuse_inside(child, c_args, {}, f"{prefix}{child_name}.", report)
            continue
        if inner.regions:
            setattr(module, child_name, child_gm)
            report.regions.extend(inner.regions)
            fused += len(inner.regions)
        report.refusals.extend(inner.refusals)
        report.leaves.extend(inner.leaves)
    return fused


def _prefixed(regions: list[FusedRegion], prefix: str) -> list[FusedRegion]:
    if not prefix:
        return regions
    return [FusedRegion(prefix + r.name, r.op, tuple(prefix + m for m in r.members), r.source) for r in regions]


def _prefix_names(where: str, prefix: str) -> str:
    return where if not prefix else ", ".join(prefix + part for part in where.split(", "))


def _device_of(module: nn.Module, inputs: tuple) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return inputs[0].device


__all__ = ["fuse", "explain"]
