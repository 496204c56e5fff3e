"""Public entry points: `fuse` and `explain`.

The pipeline, on a private eval-mode copy of the caller's model:

    trace -> propagate shapes -> fold constants -> linear forms -> lower -> fuse inside leaves -> verify
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import replace
import copy
import copyreg
import gc
import time
from collections import OrderedDict
from functools import partial

import torch
import torch.fx
from torch import nn
from torch.nn.utils.prune import BasePruningMethod as _Pruning
from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _WeightNorm
from torch.utils._pytree import tree_flatten, tree_map

from .errors import InputError, TraceFailure, VerificationError, first_line
from .measure import count_params, counts
from .module_table import module_table
from .passes.distribute import distribute_linear_maps
from .passes.transposed import fold_maps_into_transposed_convs
from .passes.fill import fill_borders
from .passes.functionalize import functionalize
from .passes.linear_forms import LinearFormPass, is_metadata_read
from .passes.cleanup import (deduplicate_metadata_checks, drop_implied_rank_checks, drop_permute_round_trips,
                             drop_reshape_round_trips, restore_in_place)
from .passes.lower import lower_forms
from .report import Counts, FusedRegion, Leaf, Refusal, Report
from .trace import (CallerHooks, caller_hooks, dtype_of, fold_constants, graph_arguments, is_shape_query,
                    mark_hooked, propagate_shapes, trace)
from .verify import check, compare

# Forward pre-hooks of torch.nn.utils that compute a weight before every call (see `_apply_weight_hook`).
_WEIGHT_HOOKS = (_WeightNorm, _SpectralNorm, _Pruning)


def fuse(model: nn.Module, example_input, *, verify: bool | str = True, rtol: float | None = None,
         atol: float | None = None) -> torch.fx.GraphModule:
    """Return the inference form of `model`: every exactly fusible linear structure in one conv.

    Args:
        model: any `nn.Module` in its training form. It is never modified. Hooks registered on
            it never fire while fusing; a module that carries forward hooks is kept whole and the
            fused model runs its hooks as the original does (the report names it). The weights that
            `torch.nn.utils.weight_norm`, `spectral_norm` and `prune` compute before each call are
            computed once, as in eval mode.
        example_input: the positional arguments of `model.forward`: a tensor or a dict of tensors
            (one argument), or a tuple or list with one value per argument, each a tensor or a
            tuple, list or dict of tensors (`((x1, x2),)` passes one pair). Further arguments of
            `forward` keep their defaults (`forward(x, norm=True)`): the fused model computes that
            case and fails with an AssertionError for another value. Used for tracing shapes, cost
            decisions, the report's counts, and verification. It is never modified (every run
            reads a copy, so a model that updates its input in place is fine).
        verify: how to check the fused model on `example_input`; `VerificationError` if it fails.
            - True (default): run the original (in eval mode) and the fused module in the model's
              own dtype and compare. When they disagree, both are also compared in float64: if
              they agree there, the fusion is exact and the model itself amplifies float32
              rounding, and the error says so (with |original32 - original64| and
              |fused64 - original64|) instead of reporting a bug.
            - "float64": check the algebra only: a float64 copy of the original and of the
              fused model (fused again from float64 weights) must agree to float64 rounding.
              For models that are too sensitive to float32 rounding to be compared in float32.
            - False: no check.
        rtol, atol: the allowed difference is `atol + rtol * max|original output|` per output
            tensor; defaults depend on the dtype (see `reparam.verify.DEFAULT_TOLERANCES`). They
            apply to the check in the model's dtype; the float64 check uses the float64 defaults.

    Returns:
        A `torch.fx.GraphModule` in eval mode, on the model's device and in its dtype, with the
        fusion report as its `.report` attribute. When the model's own `forward` cannot be traced,
        its submodules are fused separately and the result is a private copy of the model itself
        (same class, fused submodules), with the same `.report` (its first leaf says why).
    """
    name = _check_model(model)
    inputs = _check_inputs(example_input, name)
    if verify not in (True, False, "float64"):
        raise InputError(f"verify must be True, False or \"float64\", got {verify!r}")
    with _gc_paused(), torch.no_grad():
        work = _private_copy(model, name)
        reference = _run_reference(work, _cloned(inputs), name) if verify is True else None
        start = time.perf_counter()
        fused, report = _fuse_top(work, inputs, name)
        report.fuse_seconds = time.perf_counter() - start
        if verify is True:
            output = fused(*_cloned(inputs))
            result = compare(reference, output, rtol, atol)
            if not result.ok:
                _explain_failure(model, inputs, name, reference, output, rtol, atol)
            report.max_abs_diff, report.tolerance = result.max_abs_diff, result.allowed
        elif verify == "float64":
            _, _, result = _compare_in_float64(model, inputs, name)
            if not result.ok:
                raise VerificationError(
                    f"fused {name} disagrees with the original in float64 on the example input: max "
                    f"|difference| {result.max_abs_diff:.3g} at {result.where}, allowed {result.allowed:.3g}. "
                    "This is a bug in reparam (please report it with the model); pass verify=False to "
                    "get the fused model anyway.", result.max_abs_diff, result.allowed)
            report.max_abs_diff, report.tolerance = result.max_abs_diff, result.allowed
    report.notes += _weight_hook_notes(model)
    report.notes += _restore_hooks(fused)  # after every run: the caller's hooks never fire while fusing
    fused.report = report
    return fused


def explain(model: nn.Module, example_input, *, verify: bool | str = True, rtol: float | None = None,
            atol: float | None = None) -> Report:
    """The report `fuse` would attach, without keeping the fused model. `print()` it for a table.

    `verify`, `rtol`, `atol`: as for `fuse` (True, "float64" or False)."""
    return fuse(model, example_input, verify=verify, rtol=rtol, atol=atol).report


# --------------------------------------------------------------------------------------------
# Verification: a bug or the model's own sensitivity to rounding?
# --------------------------------------------------------------------------------------------

def _compare_in_float64(model: nn.Module, inputs: tuple, name: str):
    """Original and fused, both in float64 (fused again from float64 copies of the weights).

    Returns (original output, fused output, comparison at the float64 tolerance)."""
    work64 = _private_copy(model, name).double()
    inputs64 = tuple(_as_float64(v) for v in inputs)
    reference64 = _run_reference(work64, _cloned(inputs64), name)
    fused64, _ = _fuse_top(work64, inputs64, name)
    output64 = fused64(*_cloned(inputs64))
    return reference64, output64, compare(reference64, output64)


def _explain_failure(model, inputs, name, reference, output, rtol, atol):
    """Raise the right VerificationError for a failed check in the model's dtype."""
    try:
        reference64, _, exact = _compare_in_float64(model, inputs, name)
    except Exception:  # the model does not run in float64: say what we know
        exact = None
    if exact is not None and exact.ok:
        result = compare(reference, output, rtol, atol)
        own = compare(reference64, _as_float64(reference))
        fused = compare(reference64, _as_float64(output))
        raise VerificationError(
            f"fused {name} differs from the original by {result.max_abs_diff:.3g} at {result.where} on the "
            f"example input (allowed {result.allowed:.3g}), but the fusion is exact: in float64 they agree "
            f"to {exact.max_abs_diff:.3g} (allowed {exact.allowed:.3g}). The model itself is sensitive to "
            f"rounding: |original - original in float64| = {own.max_abs_diff:.3g} and |fused - original "
            f"in float64| = {fused.max_abs_diff:.3g}. Pass verify=\"float64\" to check the fusion in "
            "float64 only, rtol/atol to accept this much rounding, or verify=False.",
            result.max_abs_diff, result.allowed)
    check(reference, output, name, rtol, atol)  # raises: the fused model is wrong


def _as_float64(value):
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)


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


def _check_inputs(example_input, name: str) -> tuple:
    """The positional arguments `example_input` stands for: a tensor or a dict is one argument, a
    tuple or list holds one per argument. Each is a tensor, or a tuple, list or dict of tensors
    (nested as deep as the model takes them)."""
    if isinstance(example_input, (tuple, list)):
        inputs = tuple(example_input)
    else:
        inputs = (example_input,)
    if not inputs:
        raise InputError("`example_input` is empty: pass a tensor or a tuple of tensors that "
                         f"{name} accepts")
    for i, value in enumerate(inputs):
        what = "`example_input`" if len(inputs) == 1 and not isinstance(example_input, (tuple, list)) \
            else f"`example_input[{i}]`"
        if not _is_input(value):
            raise InputError(f"{what} must be a torch.Tensor, or a tuple, list or dict of tensors, got "
                             f"{_describe_value(value)}; pass a tensor, or a tuple with one such value per "
                             f"positional argument of {name}.forward")
    return inputs


def _is_input(value) -> bool:
    """A tensor, or a tuple, list or dict of tensors: what reparam traces as an input."""
    leaves = tree_flatten(value)[0]
    return bool(leaves) and all(isinstance(t, torch.Tensor) for t in leaves) and _plain_containers(value)


def _plain_containers(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if type(value) in (tuple, list):
        return all(_plain_containers(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) for k in value) and all(_plain_containers(v) for v in value.values())
    return False


def _describe_value(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {str(value.dtype).replace('torch.', '')} tensor"
    if type(value) in (tuple, list, dict):
        items = value.values() if isinstance(value, dict) else value
        kinds = sorted({type(v).__name__ for v in items})
        return f"a {type(value).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(value).__name__


def _private_copy(model: nn.Module, name: str) -> nn.Module:
    # Plain parameters and buffers are cloned up front: copy.deepcopy's generic path for tensors
    # is a large share of the copying time. Shared tensors stay shared in the copy.
    memo: dict = {}
    for m in model.modules():  # one walk over the modules (`parameters()` and `buffers()` are one each)
        for p in m._parameters.values():
            if type(p) is nn.Parameter and id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
        for b in m._buffers.values():
            if type(b) is torch.Tensor and id(b) not in memo:
                memo[id(b)] = b.detach().clone()
    try:
        work = _copy_module(model, memo)
    except Exception as exc:
        raise InputError(f"cannot copy {name} with copy.deepcopy ({type(exc).__name__}: {exc}); reparam "
                         "works on a copy so that the caller's model is never modified") from exc
    if _GENERIC in memo:
        # Some module was copied by copy.deepcopy or trains in its own way (a `train` of its
        # own): the copy is made an inference model by the walk those need. (`_copy_module` did
        # this already for every other module while copying it.)
        work.eval()
        copies = [v for v in memo.values() if isinstance(v, nn.Module)]  # also those in plain lists
        for m in copies:
            if m.training:
                m.eval()
        for m in copies:  # no hooks fire from the copy
            for hooks in _DROPPED_HOOKS:
                if isinstance(getattr(m, hooks, None), OrderedDict):
                    getattr(m, hooks).clear()
            for p in m._parameters.values():
                if p is not None:
                    p.requires_grad_(False)
    return work


_GENERIC = "generic copy"  # a memo key (not an id) set when the fast path did not cover a module


# Hooks the private copy drops (it is an inference model: none fire from it).
_DROPPED_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks")
_ATOMIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout)
_COPY_PROTOCOL = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__copy__")
_plain_classes: dict[type, bool] = {}


def _copies_like_a_module(cls: type) -> bool:
    """Does `copy.deepcopy` copy instances of `cls` exactly as `nn.Module`'s defaults say (no
    class of its own customizes copying or pickling, no `__slots__`), and does `eval()` only set
    its `training` flag (no `train` or `eval` of its own)?"""
    plain = _plain_classes.get(cls)
    if plain is None:
        own = [c for c in cls.__mro__ if c not in (nn.Module, object)]
        plain = (not any(name in c.__dict__ for c in own for name in (*_COPY_PROTOCOL, "__slots__", "train", "eval"))
                 and cls not in copyreg.dispatch_table and type(cls) is type)
        _plain_classes[cls] = plain
    return plain


def _copy_module(module: nn.Module, memo: dict) -> nn.Module:
    """`copy.deepcopy(module, memo)` in eval mode, minus the hooks, without deepcopy's generic
    path per module.

    What `copy.deepcopy` would do for a module whose class does not customize copying (a new
    instance, `__setstate__` with a deep copy of its `__dict__`), with the per-module containers
    (parameters, buffers, submodules) copied directly, the hook dictionaries left empty and
    `training` False. A module whose class customizes copying (a GraphModule, say) or training is
    copied by `copy.deepcopy`, and marks `memo` for the walk that `_private_copy` then makes."""
    key = id(module)
    if key in memo:
        return memo[key]
    cls = type(module)
    if not _copies_like_a_module(cls):
        memo[_GENERIC] = True
        copied = copy.deepcopy(module, memo)
        for original, copied_module in zip(module.modules(), copied.modules()):
            hooks = _caller_hooks(original)
            if hooks is not None:
                mark_hooked(copied_module, hooks)
        return copied
    new = cls.__new__(cls)
    memo[key] = new
    memo.setdefault(id(memo), []).append(module)  # keep the original alive while ids are keys
    weight_hooks = _weight_hooks(module)
    computed = {_computed_name(hook) for hook in weight_hooks}
    state = {}
    for name, value in module.__dict__.items():
        if name == "_compiled_call_impl" or name in computed:
            continue
        if name in _DROPPED_HOOKS and type(value) is OrderedDict:
            state[name] = OrderedDict()
        elif name == "_modules" and type(value) is dict:
            state[name] = {k: None if m is None else _copy_module(m, memo) for k, m in value.items()}
        elif name in ("_parameters", "_buffers") and type(value) is dict:
            if name == "_parameters" and any(t is not None and id(t) not in memo for t in value.values()):
                memo[_GENERIC] = True  # a parameter of another class: its requires_grad is cleared later
            state[name] = {k: copy.deepcopy(t, memo) for k, t in value.items()}
        elif name == "training":
            state[name] = False
        else:
            state[name] = _copy_value(value, memo)
    new.__setstate__(state)
    for hook in weight_hooks:
        _apply_weight_hook(new, hook)
    hooks = _caller_hooks(module)
    if hooks is not None:
        mark_hooked(new, hooks)
    return new


def _weight_hooks(module: nn.Module) -> list:
    """The forward pre-hooks of `torch.nn.utils.weight_norm`, `spectral_norm` and `prune` on
    `module`: they compute a weight (a plain attribute, not a parameter) before every call."""
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, _WEIGHT_HOOKS)]


def _computed_name(hook) -> str:
    return hook._tensor_name if isinstance(hook, _Pruning) else hook.name


def _apply_weight_hook(module: nn.Module, hook) -> None:
    """Compute the weight `hook` computes before each call once, as the eval-mode model does, and
    make it a parameter of `module` (a part of the private copy, which runs no hooks)."""
    if isinstance(hook, _SpectralNorm):
        weight = hook.compute_weight(module, do_power_iteration=False)  # what eval mode computes
    elif isinstance(hook, _Pruning):
        weight = hook.apply_mask(module)
    else:
        weight = hook.compute_weight(module)
    module.register_parameter(_computed_name(hook), nn.Parameter(weight.detach().clone(), requires_grad=False))


def _caller_hooks(module: nn.Module) -> CallerHooks | None:
    """The forward hooks and forward pre-hooks of its user `module` carries (not weight hooks)."""
    if not module._forward_hooks and all(isinstance(h, _WEIGHT_HOOKS) for h in module._forward_pre_hooks.values()):
        return None
    tables = {}
    for table in _HOOK_TABLES:
        hooks = getattr(module, table, None)
        if isinstance(hooks, dict):
            tables[table] = {k: h for k, h in hooks.items() if not isinstance(h, _WEIGHT_HOOKS)}
    return CallerHooks(tables)


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _restore_hooks(fused: nn.Module) -> list[str]:
    """Register on the fused model the caller's hooks of the modules kept whole for them (and of
    the model itself); returns a note per module. Weight hooks were applied once: not these."""
    notes = []
    for path, m in fused.named_modules(remove_duplicate=True):
        hooks = caller_hooks(m)
        if hooks is None:
            continue
        for table, entries in hooks.tables.items():
            kind = type(getattr(m, table, None))
            setattr(m, table, OrderedDict(entries) if kind is OrderedDict else dict(entries))
        where = path or f"{type(m).__name__} (the model itself)"
        notes.append(f"{where}: carries {hooks.describe()}, which the fused model runs as the original does")
    return notes


def _copy_value(value, memo: dict):
    kind = type(value)
    if kind in _ATOMIC:
        return value
    if kind is tuple and all(type(v) in _ATOMIC for v in value):
        return value
    if kind is set and all(type(v) in _ATOMIC for v in value):
        return set(value)
    # An empty hook dictionary (two per module) or a list of numbers (a conv's padding): what
    # deepcopy's generic path gives, at a fraction of its cost; shared ones stay shared.
    if (kind is OrderedDict and not value) or (kind is list and all(type(v) in _ATOMIC for v in value)):
        copied = memo.get(id(value))
        if copied is None:
            copied = memo[id(value)] = kind(value)
            memo.setdefault(id(memo), []).append(value)  # keep the original alive while ids are keys
        return copied
    if isinstance(value, nn.Module):
        return _copy_module(value, memo)
    known = len(memo)
    copied = copy.deepcopy(value, memo)
    if len(memo) > known and any(isinstance(v, nn.Module) for v in list(memo.values())[known:]):
        memo[_GENERIC] = True  # modules inside a container: copied the generic way
    return copied


def _run_reference(work: nn.Module, inputs, name: str):
    try:
        return work(*inputs)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor)
                           else _describe_value(t) for t in inputs)
        hint = _arguments_hint(work, inputs, name) if isinstance(exc, TypeError) else ""
        raise InputError(f"{name} rejected example_input ({shapes}): {type(exc).__name__}: "
                         f"{first_line(exc)}{hint}") from exc


def _arguments_hint(model: nn.Module, inputs: tuple, name: str) -> str:
    """When `forward` takes fewer positional arguments than `example_input` gave: how to pass one
    tuple or list as a single argument."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return ""
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return ""
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(inputs) <= len(positional):
        return ""
    return (f". A tuple or list as example_input holds one value per positional argument; {name}.forward "
            f"takes {len(positional)} ({', '.join(positional)}): to pass a tuple or list as one argument, wrap "
            f"it: example_input=((x1, x2),)")


def _cloned(inputs: tuple) -> tuple:
    """Copies of the example inputs: a model may update its input in place, and the caller's
    tensors must stay as they were (and every run must see the same values)."""
    return tuple(tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, v) for v in inputs)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

def _weight_hook_notes(model: nn.Module) -> list[str]:
    notes = []
    for path, m in module_table(model).items():
        for hook in _weight_hooks(m):
            how = ("spectral_norm" if isinstance(hook, _SpectralNorm) else "prune" if isinstance(hook, _Pruning)
                   else "weight_norm")
            notes.append(f"{path or type(model).__name__}: its {_computed_name(hook)} is computed by torch.nn.utils.{how} "
                         "before every call; the fused model computes it once, as the model in eval mode does")
    return notes


def _fuse_top(work: nn.Module, inputs: tuple, name: str) -> tuple[nn.Module, Report]:
    """Fuse the model; when its own forward cannot be traced, fuse inside its submodules."""
    try:
        fused, report = _fuse_module(work, inputs, name)
        hooks = caller_hooks(work)
        if hooks is not None:  # the model's own hooks run around the fused graph
            mark_hooked(fused, hooks)
        return fused, report
    except TraceFailure as exc:
        failure = exc
    report = Report(model=name)
    inside = _fuse_inside(work, inputs, {}, "", report, totals=True)
    if inside is None:
        raise TraceFailure(f"{failure}; none of its submodules can be traced either, so there is nothing "
                           "reparam can fuse (Python control flow on tensor values must be inside "
                           "submodules for their neighbours to be fused)", failure.reason) from failure
    report.leaves.insert(0, Leaf(f"{name} (the model itself)", f"{failure.reason}; its submodules were "
                                 "fused separately", inside))
    params = count_params(work)
    if report.before is not None:  # parameters of the whole model, not only of the traced parts
        untraced = params - report.after.params
        report.before = replace(report.before, params=report.before.params + untraced)
        report.after = replace(report.after, params=params)
    work.eval()
    return work, report


def _fuse_module(module: nn.Module, inputs: tuple, name: str, prefix: str = "",
                 given: dict | None = None) -> tuple[torch.fx.GraphModule, Report]:
    """Fuse a traceable module in place of its graph; recurses into untraceable submodules.

    `given`: values of further (non-tensor) arguments of its forward, by name (see `trace.trace`).
    Raises `TraceFailure` when `module.forward` itself cannot be traced."""
    if "forward" in vars(module):
        # `self.forward = self.forward_layer_scale` in __init__ (FasterNet, mmcv): torch.fx traces
        # the class's forward, not the one this module runs.
        reason = "its forward is replaced on the instance (self.forward = ...), which torch.fx does not trace"
        raise TraceFailure(f"cannot trace {name}.forward with torch.fx: {reason}", reason)
    gm, failed = trace(module, inputs, given)
    try:
        _, leaf_inputs = propagate_shapes(gm, graph_arguments(gm, _cloned(inputs)), set(failed), values=False)
    except Exception as exc:
        _run_reference(module, _cloned(inputs), name)  # raises the clear error if the input is at fault
        raise TraceFailure(f"the traced graph of {name} fails where the module itself runs: "
                           f"{type(exc).__name__}: {first_line(exc)}") from exc
    report = Report(model=name)
    report.before = counts(gm)
    fixed = gm.meta.get("reparam_fixed_arguments")
    if fixed:
        where = prefix[:-1] or name
        values = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
        report.notes.append(f"{where}: traced with {values} (the values it was called with, or their defaults): the "
                            "fused model computes that case only, and another value for any of them fails with "
                            "an AssertionError")
    referenced = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    fill_borders(gm)  # DBB's pad-then-fill-the-border, before its in-place updates are judged
    kept = functionalize(gm, is_shape_query)
    consts = fold_constants(gm)
    kept += distribute_linear_maps(gm, consts)  # maps across cat/split, stack sums (its refusals too)
    transposed_regions: list = []  # BatchNorms after a ConvTranspose folded into it (its refusals too)
    kept += fold_maps_into_transposed_convs(gm, consts, transposed_regions)
    forms = LinearFormPass(gm, consts).run()
    device = _device_of(module, inputs)
    report.regions = _prefixed(transposed_regions + lower_forms(gm, forms, dtype_of, device), prefix)
    deduplicate_metadata_checks(gm, is_metadata_read)
    drop_implied_rank_checks(gm)
    drop_reshape_round_trips(gm)
    drop_permute_round_trips(gm)
    restore_in_place(gm, is_metadata_read)  # last: no later pass may judge values by their readers
    report.refusals = [Refusal(_prefix_names(r.where, prefix), r.reason)
                       for r in [*kept, *consts.unfolded, *forms.refusals]]
    sites: dict[str, list] = {}
    for node, call in leaf_inputs.items():
        sites.setdefault(node.target, []).append(call)
    for target, calls in sites.items():
        # Fusion is exact for every input, so one call's inputs serve all call sites.
        args, kwargs = calls[0]
        if caller_hooks(gm.get_submodule(target)) is not None:
            # Kept whole for its hooks, but its own forward may well be traceable.
            regions = _fuse_child(gm, target, calls, f"{prefix}{target}.", report, listed=True)
        else:
            regions = _fuse_inside(gm.get_submodule(target), args, kwargs, f"{prefix}{target}.", report)
        reason = failed[target] + (f" (called at {len(calls)} places)" if len(calls) > 1 else "")
        report.leaves.append(Leaf(f"{prefix}{target}", reason, regions))
    for qualname, reason in failed.items():  # leaves never reached on the example input
        if qualname not in sites:
            report.leaves.append(Leaf(f"{prefix}{qualname}", reason + " (not called on the example input)", 0))
    gm.graph.lint()
    # A fresh GraphModule holds only what the rewritten graph still uses.
    fused = torch.fx.GraphModule(gm, gm.graph, class_name=name)
    fused.eval()
    report.after = counts(fused)
    fused.meta["reparam_referenced"] = referenced
    return fused, report


def _fuse_inside(module: nn.Module, args: tuple, kwargs: dict, prefix: str, report: Report,
                 totals: bool = False) -> int | None:
    """Fuse the submodules an untraceable module calls, each separately, in place.

    The submodules fused are the outermost ones called by `module.forward` (the elements of a
    ModuleList it loops over, say). Returns the number of regions fused, or None when no submodule
    with parameters or buffers, at any depth, could be traced. Whatever could not be done is added
    to `report` with its reason. `totals`: add the submodules' counts to `report.before`/`after`
    (for a model whose own forward is not traceable)."""
    calls: dict[str, list] = {}

    def record(child_name, _module, c_args, c_kwargs):
        calls.setdefault(child_name, []).append((_cloned(c_args), c_kwargs))

    where = prefix[:-1] or type(module).__name__
    handles = [child.register_forward_pre_hook(partial(record, child_name), with_kwargs=True)
               for child_name, child in module.named_modules() if child_name]
    try:
        module(*_cloned(args), **kwargs)
    except Exception as exc:
        report.refusals.append(Refusal(where, f"not fused inside: running it to find the inputs of its "
                                              f"submodules failed: {type(exc).__name__}: {first_line(exc)}"))
        return 0
    finally:
        for h in handles:
            h.remove()
    fused, traced = 0, False
    for child_name in _outermost(calls):
        outcome = _fuse_child(module, child_name, calls[child_name], f"{prefix}{child_name}.", report, totals)
        if outcome is not None:
            fused += outcome
            traced = traced or outcome > 0 or _has_state(module.get_submodule(child_name))
    return fused if traced else None


def _fuse_child(module: nn.Module, child_name: str, calls: list, prefix: str, report: Report,
                totals: bool = False, listed: bool = False) -> int | None:
    """Fuse submodule `child_name` of `module` whole (traced with the arguments of `calls`, its
    calls seen on the example input), or else inside; it is replaced in `module` when regions
    were fused. Returns the number of regions fused, or None when nothing in it could be traced.
    `listed`: the caller lists it among the leaves already (when it cannot be traced)."""
    child = module.get_submodule(child_name)
    c_args, given, why_not = _call_arguments(child, calls)
    if why_not is not None:
        report.refusals.append(Refusal(prefix[:-1], f"not fused: {why_not}"))
        return None
    try:
        child_gm, inner = _fuse_module(child, c_args, type(child).__name__, prefix, given)
    except TraceFailure:
        inside = _fuse_inside(child, *calls[0], prefix, report, totals)
        if inside is not None and not listed:
            report.leaves.append(Leaf(prefix[:-1], "its forward cannot be traced", inside))
        return inside
    except Exception as exc:
        report.refusals.append(Refusal(prefix[:-1], f"not fused: fusing it failed with "
                                       f"{type(exc).__name__}: {first_line(exc)}"))
        return None
    if inner.regions:
        owner, _, attr = child_name.rpartition(".")
        replacement = _with_interface_of(child, child_gm)
        if caller_hooks(child) is not None:
            mark_hooked(replacement, caller_hooks(child))
        setattr(module.get_submodule(owner) if owner else module, attr, replacement)
        report.regions.extend(inner.regions)
    report.refusals.extend(inner.refusals)
    report.leaves.extend(inner.leaves)
    report.notes.extend(inner.notes)
    if totals:
        _add_counts(report, inner)
    # A traced submodule without parameters or buffers (an activation) has nothing to fuse.
    return len(inner.regions) if (inner.regions or _has_state(child)) else None


def _call_arguments(module: nn.Module, calls: list) -> tuple[tuple, dict, str | None]:
    """(inputs, other arguments by name, None) to trace `module` with, from the calls its
    untraceable caller makes (`self.block(x, activate=False)`, `blk(x, H, W)`); or a reason why
    it cannot be.

    The inputs are the leading arguments that are tensors (or tuples, lists, dicts of them) or
    ints (sizes, such as `H, W`: traced as inputs, so that the fused form takes any size). The
    arguments after them are fixed while tracing (and guarded), so every call must pass the same."""
    split = [_split_call(module, args, kwargs) for args, kwargs in calls]
    for inputs, given, why_not in split:
        if why_not is not None:
            return (), {}, why_not
    inputs, given, _ = split[0]

    def same(a, b) -> bool:
        return a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)

    for _, other, _ in split[1:]:
        if other.keys() != given.keys() or not all(same(other[k], v) for k, v in given.items()):
            return (), {}, ("called with different non-tensor arguments at different places; one fused form "
                            "computes one case")
    from .trace import fixed_arguments
    fixed = fixed_arguments(module, len(inputs), given)
    unguarded = [k for k in given if k not in fixed]
    if unguarded:
        return (), {}, (f"called with {', '.join(unguarded)} of a kind reparam cannot fix while tracing "
                        "(not None, a bool, a number or a string)")
    return inputs, given, None


def _split_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict, str | None]:
    """One call's (inputs, fixed arguments by name, None), or a reason (see `_call_arguments`)."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return (), {}, "called with arguments its forward's signature does not take"
    inputs: list = []
    given: dict = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if value:
                return (), {}, "called with arguments into *args or **kwargs, which reparam cannot trace it with"
            continue
        if _is_input(value) or type(value) is int:
            if given or kind is inspect.Parameter.KEYWORD_ONLY:
                return (), {}, (f"called with {name} (a tensor or a size) after arguments that are fixed while "
                                "tracing, which reparam cannot trace it with")
            inputs.append(value)
        else:
            given[name] = value
    if not inputs or not _is_input(inputs[0]):
        return (), {}, "called without a tensor as its first argument, which reparam cannot trace it with"
    return tuple(inputs), given, None


def _outermost(names) -> list[str]:
    """The names not inside another of `names` (`blocks.0`, not `blocks.0.conv`), in order."""
    chosen = set(names)

    def inside_another(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in chosen for i in range(1, len(parts)))

    return [n for n in names if not inside_another(n)]


def _has_state(module: nn.Module) -> bool:
    return next(iter(module.parameters()), None) is not None or next(iter(module.buffers()), None) is not None


def _add_counts(report: Report, inner: Report) -> None:
    """Totals over the submodules fused separately (when the model itself is not traceable)."""
    for attr in ("before", "after"):
        a, b = getattr(report, attr), getattr(inner, attr)
        if b is not None:
            setattr(report, attr, b if a is None else Counts(a.nodes + b.nodes, a.params + b.params, a.macs + b.macs,
                                                             a.latency_us + b.latency_us))


_PRESERVED = "_user_preserved_attributes"  # GraphModule's deepcopy restores meta[this] as attributes


def _module_init(self, *args, **kwargs):
    nn.Module.__init__(self)


class _KeepsInterface:
    """First base of a fused submodule that keeps its original class (see `_with_interface_of`)."""

    def __deepcopy__(self, memo):
        copied = torch.fx.GraphModule.__deepcopy__(self, memo)
        # GraphModule's copy keeps only what its graph reads; the caller may read more.
        for store in ("_parameters", "_buffers", "_modules"):
            for name, value in getattr(self, store).items():
                if name not in getattr(copied, store):
                    getattr(copied, store)[name] = copy.deepcopy(value, memo)
        copied._non_persistent_buffers_set = set(self._non_persistent_buffers_set)
        return copied


def _with_interface_of(original: nn.Module, fused: torch.fx.GraphModule) -> nn.Module:
    """`fused`, answering like `original` to whatever the caller's untraceable forward reads from it.

    The caller may read plain attributes (`self.attn.resolution`), buffers, caches and methods of
    the submodule it calls. `fused` takes the original's class as a base (for its methods and
    properties), its plain attributes and buffers, and the parameters and submodules its own
    forward never used; parameters folded into fused weights are not kept."""
    referenced = fused.meta.pop("reparam_referenced", set())
    cls = type(original)
    try:
        # GraphModule's own __init__ (also run by deepcopy) must not reach the original's __init__.
        init_shim = type(cls.__name__, (cls,), {"__init__": _module_init, "__module__": cls.__module__})
        base = type(cls.__name__, (_KeepsInterface, torch.fx.GraphModule, init_shim), {"__module__": cls.__module__})
        # Like every GraphModule, the instance gets a class of its own named GraphModuleImpl,
        # which holds the generated forward (deepcopy builds a fresh one over `base`).
        impl = type("GraphModuleImpl", (base,), {"__module__": cls.__module__})
        fused.__class__ = impl
        fused.recompile()
    except TypeError:
        pass  # an incompatible class layout: attributes and buffers are still carried over
    plain = {key: value for key, value in original.__dict__.items() if key not in fused.__dict__}
    fused.__dict__.update(plain)
    fused.meta[_PRESERVED] = {**fused.meta.get(_PRESERVED, {}), **plain}  # kept by deepcopy
    for name, buf in original._buffers.items():
        if buf is not None and name not in fused._buffers and not hasattr(fused, name):
            fused.register_buffer(name, buf, persistent=name not in original._non_persistent_buffers_set)
    for name, param in original._parameters.items():
        if param is not None and name not in referenced and not hasattr(fused, name):
            fused.register_parameter(name, param)
    for name, sub in original._modules.items():
        used = any(t == name or t.startswith(name + ".") for t in referenced)
        if sub is not None and not used and not hasattr(fused, name):
            fused.add_module(name, sub)
    fused.train(original.training)
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
    return next(t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)).device


__all__ = ["fuse", "explain"]
