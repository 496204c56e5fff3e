"""Tracing: torch.fx symbolic tracing with a leaf fallback, constant folding and shape propagation.

A submodule whose `forward` cannot be traced (data-dependent control flow, say) is kept whole as a
leaf call; the caller fuses inside it separately. Only the model's own top-level `forward` must be
traceable. A submodule that carries the caller's hooks is kept whole too (see `mark_hooked`); one
whose instance has a `forward` of its own when called (mmcv patches one in for a single call) is
traced through that function. Further arguments of the top-level `forward` (`norm=True`) are fixed
to their defaults, or to the values given, under a guard; inputs given as tuples, lists or dicts of
tensors become one graph input per tensor.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import inspect
import linecache
import operator
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.fx import traceback as fx_traceback
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph import CodeGen, _PyTreeCodeGen
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils._pytree import tree_flatten, tree_map

from .affine import widened
from .concrete import (GRAD_MODE_MESSAGE, ExampleValues, _untraced, describe, guard_message, metadata_sources,
                       outcome_matters, reads_requires_grad, reads_sizes, tests_emptiness)
from .errors import TraceFailure, first_line
from .passes.cleanup import is_in_place, remove_dead_nodes
from .shape_rules import shape_only_nodes, stand_in


class _Proxy(torch.fx.Proxy):
    """A proxy that records `out += y` as the in-place update it is.

    torch.fx's own proxy has no `__iadd__`, so Python records `out += y` as `out = out + y`: right
    when nothing else holds `out`, wrong when a view of it or a graph input it aliases is read
    afterwards (the original updates those too). Recorded as `operator.iadd`, the update is
    rewritten out of place later only where no reader can tell (see `passes.functionalize`)."""

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other):
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other):
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other):
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})

    def __setitem__(self, key, value):  # `out[:, :, :p] = v`: an in-place update, recorded as one
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    # Python numbers and lengths of values computed from parameters, buffers and literals alone
    # (`t, i, h, w = self.weight.size(); groups = int(t / g)`, OREPA's weight generation): the
    # same for every input, so the trace uses them as they are. Anything else stays untraceable.
    def __int__(self):
        return int(self.tracer.constant_value(self, "int()"))

    def __index__(self):
        return operator.index(self.tracer.constant_value(self, "an index"))

    def __float__(self):
        return float(self.tracer.constant_value(self, "float()"))

    def __getattr__(self, k: str):
        return _Attribute(self, k)

    def __len__(self):
        return _length(self)


def _length(proxy: torch.fx.Proxy) -> int:
    """`len(conv.weight.shape)`, `len(x.shape)`: a rank, known from the example input (see
    `_FallbackTracer.length_of`); torch.fx itself cannot take the length of a traced value."""
    if not isinstance(proxy.tracer, _FallbackTracer):
        return torch.fx.Proxy.__len__(proxy)
    length = proxy.tracer.length_of(proxy)
    if length is None:  # `len(self.scales)`: a parameter's length is the same for every input
        value = _constant_value(proxy.tracer.root, proxy.tracer.graph, proxy.node)
        if value is not _NOT_CONSTANT and not isinstance(value, torch.fx.Proxy):
            return len(value)
    return torch.fx.Proxy.__len__(proxy) if length is None else length


class _Attribute(torch.fx.proxy.Attribute):
    """An attribute of a traced value (`w.shape`) with the length `_Proxy` gives."""

    def __len__(self):
        return _length(self)

    __int__, __index__, __float__ = _Proxy.__int__, _Proxy.__index__, _Proxy.__float__


class _ModuleStack(OrderedDict):
    """The tracer's stack of module calls. torch.fx stores a copy of it in every node's meta
    (`nn_module_stack`) with `copy.copy`, whose generic path for an OrderedDict is a large share
    of tracing: the same copy, made directly."""

    def __copy__(self):
        return OrderedDict(self)


# Modules of the private copy `fuse` works on whose originals carry forward hooks (or forward
# pre-hooks), with those hooks. The copy runs no hooks (fusing must not fire the caller's); such a
# module is kept whole, as a leaf no rule reads as its class, and the hooks are registered on it
# again in the fused model, where they run as they do in the original.
@dataclass(frozen=True)
class CallerHooks:
    """The forward hooks of one of the caller's modules: {name of an `nn.Module` hook table
    (`_forward_hooks`, `_forward_pre_hooks`, ...): its entries}."""

    tables: dict[str, dict]

    def describe(self) -> str:
        """'forward pre-hook <lambda>, forward hook log_output', for reports."""
        def name(hook) -> str:
            return getattr(hook, "__qualname__", None) or getattr(hook, "__name__", None) or type(hook).__name__
        names = [f"forward pre-hook {name(h)}" for h in self.tables.get("_forward_pre_hooks", {}).values()]
        names += [f"forward hook {name(h)}" for h in self.tables.get("_forward_hooks", {}).values()]
        return ", ".join(names)


_HOOKED: "weakref.WeakKeyDictionary[nn.Module, CallerHooks]" = weakref.WeakKeyDictionary()


def mark_hooked(module: nn.Module, hooks: CallerHooks) -> None:
    """Keep `module` (a part of the private copy) whole, for `hooks` to run around it."""
    _HOOKED[module] = hooks


def caller_hooks(module: nn.Module) -> CallerHooks | None:
    """The caller's hooks `module` (a part of the private copy) must run, if any."""
    return _HOOKED.get(module)


# Arguments recorded as they are: torch.fx's `Tracer.create_arg` looks for parameters, buffers,
# modules, named tuples, constants and opaque objects before it returns these unchanged.
_ATOMIC_ARGS = frozenset({str, int, float, bool, complex, type(None), type(...), torch.dtype, torch.device,
                          torch.memory_format, torch.layout})


class _FallbackTracer(torch.fx.Tracer):
    """A tracer that turns untraceable submodules into leaves instead of failing."""

    def __init__(self, example_inputs: tuple | None = None):
        super().__init__()
        self.failed_leaves: dict[str, str] = {}
        self.example_inputs = example_inputs
        self._examples: ExampleValues | None = None
        self._grad_mode_checked = False
        self._tensor_names: dict[int, tuple[str, torch.Tensor]] | None = None
        self.module_stack = _ModuleStack(self.module_stack)

    # torch.fx finds the name of a parameter or buffer read in `forward` by scanning every named
    # parameter of the model, on each access: quadratic in the model's size. One table instead.
    def _name_of(self, value: torch.Tensor) -> str | None:
        if self._tensor_names is None:
            table: dict[int, tuple[str, torch.Tensor]] = {}
            for n, p in self.root.named_parameters():
                table.setdefault(id(p), (n, p))
            for n, b in self.root.named_buffers():
                table.setdefault(id(b), (n, b))
            self._tensor_names = table
        entry = self._tensor_names.get(id(value))
        return entry[0] if entry is not None and entry[1] is value else None

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        is_param = isinstance(attr_val, nn.Parameter)
        if is_param or (self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor)):
            name = self._name_of(attr_val)
            if name is None:
                return super().getattr(attr, attr_val, parameter_proxy_cache) if is_param else attr_val
            if name not in parameter_proxy_cache:
                parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
            return parameter_proxy_cache[name]
        return attr_val

    def create_arg(self, a):
        # The most common arguments first, with what torch.fx would return for them.
        if isinstance(a, torch.fx.Proxy):
            return a.node
        if type(a) in _ATOMIC_ARGS:
            return a
        if type(a) is tuple:
            return tuple(self.create_arg(v) for v in a)
        if type(a) is list:
            return [self.create_arg(v) for v in a]
        if isinstance(a, torch.Tensor):
            name = self._name_of(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def constant_value(self, proxy: torch.fx.Proxy, use: str):
        """The value of `proxy` when it is computed from parameters, buffers and literals alone, by
        functions and methods (no module calls, nothing random, nothing those values go through
        updated in place); else TypeError, as torch.fx raises for `use` of a traced value."""
        value = _constant_value(self.root, self.graph, proxy.node)
        if value is _NOT_CONSTANT or isinstance(value, torch.fx.Proxy):
            raise TypeError(f"{use} of a traced value ({proxy.node.name}) that depends on the input: "
                            "torch.fx cannot trace it")
        return value

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        """`assert cond` on a traced value becomes a `torch._assert` node; other truth tests fail.

        An assertion only ever lets execution continue one way, so the trace can take that way if
        the graph checks the condition where the statement stood: an input that would have failed
        the assertion fails the node instead. (torch.fx's own `trace_asserts` does not recognise
        the bytecode of Python 3.11 and later.)"""
        frame = inspect.currentframe()
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        fails_when = _assertion_outcome(caller.f_code, caller.f_lasti) if caller is not None else None
        if fails_when is None:
            decided = self._decide_on_metadata(obj, caller)
            return super().to_bool(obj) if decided is None else decided
        where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
        source = linecache.getline(caller.f_code.co_filename, caller.f_lineno).strip()
        condition = obj if fails_when is False else self.create_proxy("call_function", operator.not_, (obj,), {})
        self.create_proxy("call_function", torch._assert, (condition, f"{source} failed ({where})"), {})
        return not fails_when

    def _decide_on_metadata(self, obj: torch.fx.Proxy, caller) -> bool | None:
        """A branch on metadata only (`if x.numel() == 0:`) takes the way the example input does,
        and the graph records a guard that fails for an input taking the other way (see `concrete`).
        None: the condition reads values, or there is no example input to decide it."""
        if self.example_inputs is None or caller is None:
            return None
        if self._examples is None:
            self._examples = ExampleValues(self.root, self.graph, self.example_inputs)
        decided = self._examples.decide(obj.node)
        if decided is None:
            return None
        jump = _conditional_jump(caller.f_code, caller.f_lasti)
        if jump is not None and not outcome_matters(caller, _instructions(caller.f_code)[1], jump, decided):
            return decided  # either way leads to the same code: nothing to guard
        if reads_sizes(obj.node) and not tests_emptiness(obj.node):
            # A branch on sizes (`if H % window:`, `if h == ws and w == ws:`) guarded for the
            # example's sizes would make the fused model refuse every other size, where the
            # module kept whole (an untraceable leaf, fused inside) still takes any.
            return None
        if reads_requires_grad(obj.node) and not self._grad_mode_checked:
            self._grad_mode_checked = True
            # Decided without gradients; with them, every value computed from parameters needs
            # gradients, but the fused graph may read `requires_grad` of an earlier value instead
            # (metadata reads of a fused value move to one of the same shape): check the mode.
            grad_mode = self.create_proxy("call_function", torch.is_grad_enabled, (), {})
            self.create_proxy("call_function", torch._assert,
                              (self.create_proxy("call_function", operator.not_, (grad_mode,), {}),
                               GRAD_MODE_MESSAGE), {})
        where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
        source = linecache.getline(caller.f_code.co_filename, caller.f_lineno).strip()
        message = guard_message(source, where, describe(obj.node), decided)
        truth = obj if isinstance(self._examples.value(obj.node), bool) else \
            self.create_proxy("call_function", operator.truth, (obj,), {})
        condition = self.create_proxy("call_function", operator.eq, (truth, decided), {})
        self.create_proxy("call_function", torch._assert, (condition, message), {})
        return decided

    def length_of(self, proxy: torch.fx.Proxy) -> int | None:
        """The length of a size read from metadata only (`w.shape`, `x.size()`), on the example
        input; None when the value is anything else. The length of a parameter's or buffer's shape
        is fixed; that of an input's is its rank, which the graph then checks."""
        if self.example_inputs is None:
            return None
        sources = metadata_sources(proxy.node)
        if sources is None:
            return None
        if self._examples is None:
            self._examples = ExampleValues(self.root, self.graph, self.example_inputs)
        try:
            value = self._examples.value(proxy.node)
        except Exception:  # noqa: BLE001 - not known: torch.fx's own error follows
            return None
        if not isinstance(value, (torch.Size, tuple)) or isinstance(value, torch.fx.Proxy):
            return None
        if any(s.op != "get_attr" for s in sources):
            caller = inspect.currentframe()
            while caller is not None and caller.f_code.co_filename == __file__:  # the model's line
                caller = caller.f_back
            where = f"{caller.f_code.co_filename}:{caller.f_lineno}" if caller is not None else "?"
            source = linecache.getline(caller.f_code.co_filename, caller.f_lineno).strip() if caller else ""
            length = self.create_proxy("call_function", len, (proxy,), {})
            same = self.create_proxy("call_function", operator.eq, (length, len(value)), {})
            self.create_proxy("call_function", torch._assert, (same, guard_message(
                source, where, f"len({describe(proxy.node)}) == {len(value)}", True)), {})
        return len(value)

    def trace(self, root, concrete_args=None):
        self._tensor_names = None
        self._examples = None
        self._grad_mode_checked = False
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.failed_leaves or m in _HOOKED:
            return True
        if "forward" in vars(m):
            # A forward set on the instance (`conv.forward = partial(conv_bn, bn, conv)`, mmcv's
            # efficient conv-bn evaluation, set and deleted again around the call): a call of the
            # module would run the class's forward; tracing through runs the function it has now.
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        hooks = _HOOKED.get(m)
        if hooks is not None and qualname not in self.failed_leaves:
            self.failed_leaves[qualname] = (
                f"carries {hooks.describe()}: kept whole, and the fused model runs its hooks as the "
                "original does (remove the hooks before fusing to fuse it)")
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        if "forward" in vars(m):
            # Traced through or not at all: a leaf call would run the class's forward instead, so
            # the module that makes this call is kept whole (it sets the forward it calls).
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception as exc:
                reason = (f"{qualname} runs a forward set on its instance ({_callable_name(vars(m)['forward'])}), "
                          f"which cannot be traced: {type(exc).__name__}: {first_line(exc)}")
                raise TraceFailure(reason, reason) from exc
        last = self.graph._root.prev  # the newest node before this call
        stack = dict(self.module_stack) if hasattr(self, "module_stack") else None
        calls = dict(self.num_calls) if hasattr(self, "num_calls") else None
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # roll back what the failed call added, then keep it whole
            for node in reversed(_nodes_after(self.graph, last)):
                self.graph.erase_node(node)
            if self._examples is not None:  # values computed by the removed nodes may be stale
                self._examples.forget()
            self._grad_mode_checked = False  # the check may have been among the removed nodes
            if stack is not None:
                self.module_stack.clear()
                self.module_stack.update(stack)
            if calls is not None:
                self.num_calls.clear()
                self.num_calls.update(calls)
            self.failed_leaves[qualname] = f"{type(exc).__name__}: {first_line(exc)}"
            return super().call_module(m, forward, args, kwargs)


def _callable_name(fn) -> str:
    if isinstance(fn, functools.partial):
        return f"partial({_callable_name(fn.func)}, ...)"
    return getattr(fn, "__qualname__", None) or type(fn).__name__


@functools.lru_cache(maxsize=256)
def _instructions(code) -> tuple[dict[int, int], tuple[dis.Instruction, ...]]:
    insts = tuple(dis.get_instructions(code))
    return {inst.offset: i for i, inst in enumerate(insts)}, insts


def _conditional_jump(code, offset: int) -> int | None:
    """The index of the conditional jump that the truth test at `offset` of `code` decides."""
    index, insts = _instructions(code)
    i = index.get(offset)
    if i is not None and insts[i].opname == "TO_BOOL":  # Python 3.13: the truth test comes before the jump
        i += 1
    if i is None or i >= len(insts) or "JUMP" not in insts[i].opname or "NONE" in insts[i].opname:
        return None
    return i if insts[i].opname.endswith(("IF_TRUE", "IF_FALSE")) else None


def _assertion_outcome(code, offset: int) -> bool | None:
    """If the truth test at `offset` of `code` decides an `assert` statement, the truth value
    that makes the assertion fail (False for `assert cond`, True for `assert not cond`); else None.

    An assertion compiles to a conditional jump one of whose two ways starts with
    LOAD_ASSERTION_ERROR; the other way is where execution goes on."""
    index, insts = _instructions(code)
    i = index.get(offset)
    if i is None:
        return None
    if insts[i].opname == "TO_BOOL":  # Python 3.13: the truth test comes before the jump
        i += 1
    jump = insts[i] if i < len(insts) else None
    if jump is None or "JUMP" not in jump.opname or "NONE" in jump.opname or i + 1 >= len(insts):
        return None
    if_true = jump.opname.endswith("IF_TRUE")
    if not (if_true or jump.opname.endswith("IF_FALSE")):
        return None
    fall_through = insts[i + 1].opname == "LOAD_ASSERTION_ERROR"
    target = index.get(jump.argval)
    jumps_to_error = target is not None and insts[target].opname == "LOAD_ASSERTION_ERROR"
    if fall_through == jumps_to_error:
        return None
    # Falling through to the error happens when the jump is not taken.
    return (not if_true) if fall_through else if_true


_NOT_CONSTANT = object()


def _constant_value(root: nn.Module, graph: torch.fx.Graph, node: torch.fx.Node):
    """`node`'s value computed from parameters, buffers and literals, or `_NOT_CONSTANT`."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if n.op != "get_attr" and (n.op not in ("call_function", "call_method") or n.target in _RANDOM
                                   or n.kwargs.get("out") is not None):
            return _NOT_CONSTANT
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    for n in graph.nodes:  # one of them updated in place so far: its value is not the one recorded
        if n.op in ("call_function", "call_method") and n.args and n.args[0] in seen and is_in_place(None, n):
            return _NOT_CONSTANT
    evaluator = ExampleValues(root, graph, ())  # no inputs: only these nodes are computed
    with torch.no_grad(), _untraced():
        for n in graph.nodes:  # graph order: arguments before their readers
            if n not in seen:
                continue
            try:
                evaluator.values[n] = evaluator.compute(n)
            except Exception:  # noqa: BLE001 - not computable here: leave it to torch.fx
                return _NOT_CONSTANT
            if n is node:
                break
    return evaluator.values.get(node, _NOT_CONSTANT)


def _nodes_after(graph: torch.fx.Graph, last: torch.fx.Node) -> list[torch.fx.Node]:
    nodes, node = [], last.next
    while node is not graph._root:
        nodes.append(node)
        node = node.next
    return nodes


try:  # generates the Python code of the graph only if it is run: the passes only rewrite it
    from torch.fx._lazy_graph_module import _LazyGraphModule as _WorkingGraphModule
except ImportError:  # pragma: no cover - older or newer torch without it
    _WorkingGraphModule = torch.fx.GraphModule


def trace(model: nn.Module, example_inputs: tuple | None = None,
          given: dict[str, object] | None = None) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """Symbolically trace `model`; returns the GraphModule and {leaf module name: why}.

    `example_inputs`: the positional inputs of `model.forward`; Python branches on their metadata
    (shape, dtype, `requires_grad`, ...) then take the way these inputs do, under a guard.
    `given`: values of further arguments of `forward` (by name) the model is called with, such as
    `activate=False`. These, and the defaults of the arguments neither the example inputs nor
    `given` supply (`forward(x, activate=True, norm=True)`), are fixed while tracing, so that
    `if norm:` takes its way; the graph keeps each as an argument of the same name and default,
    guarded: another value fails with an AssertionError that names it. The fixed values are in
    `gm.meta["reparam_fixed_arguments"]` ({name: value})."""
    name = type(model).__name__
    fixed = fixed_arguments(model, len(example_inputs) if example_inputs is not None else None, given or {})
    structured = _structured_arguments(model, example_inputs)
    tracer = _FallbackTracer(_example_arguments(model, example_inputs, fixed))
    try:
        graph = tracer.trace(model, concrete_args={**structured, **fixed} or None)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        raise TraceFailure(f"cannot trace {name}.forward with torch.fx: {reason}", reason) from exc
    if fixed:
        _name_fixed_arguments(graph, fixed, name)
    if isinstance(graph._codegen, _PyTreeCodeGen):
        graph._codegen = _StructuredInputs(graph._codegen.pytree_info)
    gm = _WorkingGraphModule(model, graph, class_name=name)
    gm.meta["reparam_fixed_arguments"] = fixed
    return gm, dict(tracer.failed_leaves)


# Values torch.fx can guard when it fixes an argument (it compares them with `==`, or checks None).
_GUARDED_TYPES = (bool, int, float, complex, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def fixed_arguments(model: nn.Module, n_inputs: int | None, given: dict[str, object]) -> dict[str, object]:
    """{argument of `model.forward`: value} for the arguments the trace fixes (see `trace`).

    Arguments after the `n_inputs` positional example inputs that have a default (or a value in
    `given`) of a type the graph can check; `*args`, `**kwargs` and other defaults stay arguments
    of the graph, as torch.fx makes them."""
    if n_inputs is None:
        return {}
    try:
        signature = inspect.signature(inspect.unwrap(type(model).forward))
    except (TypeError, ValueError):
        return {}
    params = list(signature.parameters.values())[1:]  # without self
    fixed: dict[str, object] = {}
    positional = 0
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if p.kind is p.VAR_POSITIONAL:
                positional = n_inputs  # the inputs beyond the named ones go into *args
            continue
        if p.kind is not p.KEYWORD_ONLY and positional < n_inputs:
            positional += 1
            continue
        value = given.get(p.name, p.default)
        if value is p.empty:
            continue
        if value is None or type(value) in _GUARDED_TYPES:
            fixed[p.name] = value
    return fixed


class _StructuredInputs(_PyTreeCodeGen):
    """The code of a graph whose inputs were traced as tuples, lists or dicts of tensors (torch.fx
    flattens them into one graph input per tensor, and the generated `forward` takes them as the
    model did). Arguments with defaults keep them in `forward`'s signature, where torch.fx would
    write them into the line that unpacks the flattened inputs (not valid Python)."""

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
        defaults = {}
        names = []
        for var in free_vars:
            head, sep, default = var.partition(" = ")
            name = head.split(":")[0].split("#")[0].strip()
            names.append(name)
            if sep:
                defaults[name] = default.split("  #")[0].strip()
        info = self.pytree_info
        fn_args = [a + (f" = {defaults[a]}" if a in defaults else "") for a in info.orig_args]
        if info.orig_args and info.orig_args[0] == "self":
            names.insert(0, "self")
        definition = CodeGen.gen_fn_def(self, fn_args, maybe_return_annotation, expanded_def=expanded_def)
        if names:
            definition += self.gen_var_bindings(info.orig_args, names, expanded_def)
        return definition


def _structured_arguments(model: nn.Module, inputs: tuple | None) -> dict[str, object]:
    """{argument: its structure} for the example inputs that are tuples, lists or dicts of tensors
    (`forward(self, inputs)` given `(x1, x2)` or `{"img": x}`): traced as one graph input per
    tensor, which the GraphModule takes in the same structure."""
    if inputs is None or all(isinstance(v, torch.Tensor) for v in inputs):
        return {}
    params = [p for p in list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())[1:]
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {p.name: tree_map(lambda _: torch.fx.PH, value)
            for p, value in zip(params, inputs) if not isinstance(value, torch.Tensor)}


def _example_arguments(model: nn.Module, inputs: tuple | None, fixed: dict[str, object]) -> tuple | None:
    """The value of each argument of the graph being recorded, in order, as far as known: the
    example inputs (one per tensor, when one is a tuple, list or dict), then the fixed values or
    defaults of the further named arguments."""
    if inputs is None:
        return inputs
    flat = tuple(t for v in inputs for t in tree_flatten(v)[0])
    if not fixed:
        return flat
    params = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())[1 + len(inputs):]
    values = list(flat)
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            break
        if p.name in fixed:
            values.append(fixed[p.name])
        elif p.default is not p.empty:
            values.append(p.default)
        else:
            break
    return tuple(values)


def graph_arguments(gm: torch.fx.GraphModule, inputs: tuple) -> tuple:
    """The positional arguments that run `gm`'s graph (an Interpreter fills only positional ones)
    as the module was traced: `inputs`, then the fixed values (or the defaults) of the rest."""
    fixed = gm.meta.get("reparam_fixed_arguments")
    if not fixed:
        return inputs
    values = list(inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders[len(tree_flatten(inputs)[0]):]:
        if node.target in fixed:
            values.append(fixed[node.target])
        elif node.args:
            values.append(node.args[0])
        else:
            break
    return tuple(values)


def _name_fixed_arguments(graph: torch.fx.Graph, fixed: dict[str, object], model_name: str) -> None:
    """torch.fx names the argument it fixes `norm_1`, and its guard's message speaks of
    specializing: the argument keeps its own name (so `fused(x, norm=False)` reaches the guard
    instead of failing as an unknown keyword), and the message says what to do."""
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        base, _, count = str(node.target).rpartition("_")
        if base not in fixed or count != "1":
            continue
        node.target = base
        message = (f"{model_name} was fused with {base}={fixed[base]!r} (its value when fused): the fused "
                   f"model computes only that case; fuse it again with that argument to get another")
        for user in list(node.users):
            if user.op == "call_function" and user.target is _assert_is_none:
                # torch.fx's own check of None is not known to have an effect: dead-code removal
                # would drop it. The same check, as `torch._assert`.
                with graph.inserting_before(user):
                    is_none = graph.call_function(operator.is_, (node, None))
                    graph.call_function(torch._assert, (is_none, message))
                graph.erase_node(user)
                continue
            guards = [user] if user.target is not operator.eq else list(user.users)
            for guard in guards:
                if guard.op == "call_function" and len(guard.args) == 2 and isinstance(guard.args[1], str):
                    guard.args = (guard.args[0], message)


# --------------------------------------------------------------------------------------------
# Constant folding: computations on parameters and buffers alone
# --------------------------------------------------------------------------------------------

_RANDOM = {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.bernoulli, torch.multinomial, torch.normal, torch.poisson,
    torch.nn.functional.dropout, torch.dropout,
}


@dataclass(frozen=True)
class Unfolded:
    """A computation on parameters and buffers alone that could not be evaluated once."""

    where: str
    reason: str


@dataclass
class Constants:
    """Values of constant nodes in float64 (for the algebra), and the computations left unfolded."""

    values: dict[torch.fx.Node, torch.Tensor] = field(default_factory=dict)
    unfolded: list[Unfolded] = field(default_factory=list)
    # Parameters and buffers read as they are, in the model's dtype: their float64 copies are made
    # on each read and live only as long as the algebra needs them (a whole model in float64 at
    # once would double the memory `fuse` needs).
    stored: dict[torch.fx.Node, torch.Tensor] = field(default_factory=dict)

    def get(self, node) -> torch.Tensor | None:
        value = self.values.get(node)
        if value is None:
            value = self.stored.get(node)
            if value is not None and value.is_floating_point():
                value = _float64(value)
        return value


def fold_constants(gm: torch.fx.GraphModule) -> Constants:
    """Replace every node computed from parameters and buffers alone by one buffer.

    In eval mode such a computation (a weight built in `forward`, `self.weight + self.id_tensor`,
    OREPA-style weight generators) is a constant. A function or method is evaluated twice: in the
    dtype of its inputs for the buffer the graph reads, and again from float64 copies of the
    floating-point inputs for the algebra (integer tensors keep their dtype). A submodule call is
    evaluated once, in its own dtype, and its result converted to float64 for the algebra.
    A computation that fails to evaluate is left in the graph and listed in `Constants.unfolded`.
    """
    from .passes.functionalize import values_updated_in_place

    # A value some node updates in place is not a constant (and folding the update would apply it
    # once, to a stored copy, instead of on every call).
    updated = values_updated_in_place(gm, is_shape_query)
    consts = Constants()
    env: dict[torch.fx.Node, object] = {}
    env64 = _Float64Env(consts.stored)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            if node in updated:
                continue
            value = _fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                env[node] = value.detach()
                consts.stored[node] = value.detach()
            continue
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        inputs = node.all_input_nodes
        if not inputs or any(n not in env for n in inputs) or node.target in _RANDOM:
            continue
        if node in updated:  # an update in place, or a value it changes
            continue
        if node.op == "call_method" and node.target in ("dropout", "bernoulli_", "normal_", "uniform_"):
            continue
        try:
            value = _run(gm, node, env)
            # A submodule keeps its own dtype; everything else is recomputed in float64.
            value64 = value if node.op == "call_module" else _run(gm, node, env64)
        except Exception as exc:
            consts.unfolded.append(Unfolded(node.name, (
                f"computed from parameters and buffers alone, but evaluating it once failed "
                f"({type(exc).__name__}: {first_line(exc)}): it stays a computation, and the operations "
                "that use it are not fused")))
            continue
        if not isinstance(value, torch.Tensor) or not isinstance(value64, torch.Tensor):
            # Not a tensor (a device, a dtype, a size read from a parameter): it stays in the graph,
            # but what is computed from it can still fold (`w + t.to(w.device)`).
            env[node], env64[node] = value, value64
            continue
        if value64.is_floating_point():
            value64 = value64.double()
        # Replace the computation by a buffer holding its value.
        attr = f"_reparam_const_{count}"
        count += 1
        gm.register_buffer(attr, value.detach().clone())
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(attr)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        env[new] = value.detach()
        env64[new] = value64.detach()
        consts.values[new] = env64[new]
    if count:
        remove_dead_nodes(gm)
    alive = set(gm.graph.nodes)  # constants whose nodes were removed as dead code are dropped
    consts.values = {n: v for n, v in consts.values.items() if n in alive}
    consts.stored = {n: v for n, v in consts.stored.items() if n in alive}
    return consts


class _Float64Env(dict):
    """Values of computed constants in float64; parameters and buffers are converted on each read."""

    def __init__(self, stored: dict):
        super().__init__()
        self.stored = stored

    def __missing__(self, node):
        value = self.stored[node]
        return _float64(value) if value.is_floating_point() else value


# Below this many elements a float64 copy is made without remembering its float32 original: only
# large weights are stored back in float32 (see `passes.linear_forms._FormStore`).
_SMALL = 4096


def _float64(value: torch.Tensor) -> torch.Tensor:
    return value.detach().double() if value.numel() <= _SMALL else widened(value)


def _fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run(gm: torch.fx.GraphModule, node: torch.fx.Node, env: dict):
    args = torch.fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
    with torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        return gm.get_submodule(node.target)(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Shape propagation
# --------------------------------------------------------------------------------------------

class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the graph once, storing each node's tensor metadata; records leaf inputs.

    The nodes in `shape_only` return stand-ins of the shape of their value on the meta device
    (see `shape_rules`): no memory, no arithmetic. What consumes them runs on the meta device too
    (the real tensors it also reads are given as meta tensors, a module with weights gets zeros
    instead), so the stand-ins' consumers, large elementwise sums and scales on activations, cost
    only their bookkeeping. A device query (`x.device`) of such a value answers the real device."""

    def __init__(self, gm: torch.fx.GraphModule, leaves: set[str], shape_only: set[torch.fx.Node] = frozenset()):
        super().__init__(gm)
        self.leaves = leaves
        self.shape_only = shape_only
        self.leaf_inputs: dict[torch.fx.Node, tuple] = {}
        self.real_device: dict[torch.fx.Node, torch.device] = {}  # of the nodes whose value is a meta stand-in

    def fetch_attr(self, target: str):
        # Submodules (and the modules holding parameters and buffers) from the table the
        # Interpreter builds anyway: walking the dotted path through nn.Module.__getattr__ on every
        # call is a large share of running small convolutions.
        module = self.submodules.get(target)
        if module is not None:
            return module
        owner, _, name = target.rpartition(".")
        parent = self.submodules.get(owner)
        if parent is not None:
            try:
                return getattr(parent, name)
            except AttributeError:
                pass  # torch.fx's own look-up raises the error
        return super().fetch_attr(target)

    def _set_current_node(self, node: torch.fx.Node):
        # torch.fx records the node being run for code that preserves node metadata while it
        # traces; when nothing does, that record is a context manager per node that does nothing.
        if fx_traceback.has_preserved_node_meta():
            return super()._set_current_node(node)
        return _NOTHING_TO_RECORD

    def run_node(self, n: torch.fx.Node):
        result = None
        if n.op == "call_module" and n.target in self.leaves:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.leaf_inputs[n] = (args, kwargs)
        elif n in self.shape_only:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            module = self.fetch_attr(n.target) if n.op == "call_module" else None
            result = stand_in(n, module, args, kwargs, meta=True)
            if result is not None:
                self.real_device[n] = self._device_of(n, module, args, kwargs)
        if result is None:
            stand_ins = [a for a in n.all_input_nodes if a in self.real_device] if self.real_device else ()
            if stand_ins:
                result = self._run_on_meta(n, stand_ins)
            else:
                result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _meta(result)
            n.meta["reparam_shape"] = tuple(result.shape)
        else:
            n.meta.pop("tensor_meta", None)
            n.meta.pop("reparam_shape", None)
        return result

    def _device_of(self, n: torch.fx.Node, module, args, kwargs) -> torch.device:
        """The device `n`'s value would be on: that of the module's weights or of its real tensor
        arguments, else that of the stand-in it reads."""
        if module is not None:
            for t in (*module._parameters.values(), *module._buffers.values()):
                if t is not None:
                    return t.device
        for t in _tensors((args, kwargs)):
            if not t.is_meta:
                return t.device
        return next(self.real_device[a] for a in n.all_input_nodes if a in self.real_device)

    def _run_on_meta(self, n: torch.fx.Node, stand_ins: list):
        """Run a node that reads stand-ins: sums, products and views on the meta device, anything
        else for real on zeros. (torch's meta kernels for most other ops are written in Python:
        the first of them costs seconds of set-up and each one more than running it.)"""
        if n.op == "output":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        device = self.real_device[stand_ins[0]]
        if is_shape_query(n):
            if _asks_device(n):  # the real device, not "meta"
                real = torch.empty(0, device=device)
                if n.op == "call_function":
                    return getattr(real, args[1])
                return getattr(real, n.target)(*args[1:], **kwargs)
            return getattr(self, n.op)(n.target, args, kwargs)
        result = _elementwise_on_meta(n, args, kwargs)
        if result is None and _is_view(n, args, kwargs):
            result = getattr(self, n.op)(n.target, args, kwargs)
        if result is None:  # zeros in place of the stand-ins (their values never matter)
            args, kwargs = _on_real_device((args, kwargs), device)
            return getattr(self, n.op)(n.target, args, kwargs)
        if isinstance(result, torch.Tensor) and result.is_meta:
            self.real_device[n] = device
        elif isinstance(result, (tuple, list)) and all(isinstance(t, torch.Tensor) and t.is_meta for t in result):
            self.real_device[n] = device  # chunk, split, unbind: their items are read by getitem
        return result


# Views of one tensor: their meta results are computed in C++ (strides and sizes only).
_VIEW_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "unsqueeze", "squeeze",
                 "expand", "contiguous", "chunk", "split", "unbind", "view_as", "reshape_as", "expand_as"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze,
                   torch.chunk, torch.split, torch.unbind, operator.getitem}


def _is_view(n: torch.fx.Node, args: tuple, kwargs: dict) -> bool:
    if n.op == "call_method":
        if n.target not in _VIEW_METHODS:
            return False
    elif n.op != "call_function" or n.target not in _VIEW_FUNCTIONS:
        return False
    if not args or not isinstance(args[0], (torch.Tensor, tuple, list)):
        return False
    if isinstance(args[0], (tuple, list)):  # an item of chunk/split/unbind's result
        return n.target is operator.getitem and isinstance(args[1], int) and all(
            isinstance(t, torch.Tensor) and t.is_meta for t in args[0])
    if n.target in ("view_as", "reshape_as", "expand_as"):
        return True  # the other tensor gives only its shape, on whichever device
    return args[0].is_meta and not _tensors((args[1:], kwargs))  # tensor indices and the like: run for real


_SUMS_AND_PRODUCTS = {operator.add: False, operator.sub: False, operator.mul: False, operator.truediv: False,
                      torch.add: False, torch.sub: False, torch.mul: False, torch.div: False,
                      operator.iadd: True, operator.isub: True, operator.imul: True, operator.itruediv: True,
                      "add": False, "sub": False, "mul": False, "div": False,
                      "add_": True, "sub_": True, "mul_": True, "div_": True}


def _elementwise_on_meta(n: torch.fx.Node, args: tuple, kwargs: dict):
    """The meta result of a sum, difference, product or quotient of contiguous tensors (or of a
    tensor and a number), or None. torch computes meta results of these in Python, at the cost of
    running them on small tensors; their shape, dtype and (dense) layout follow from broadcasting."""
    if kwargs or len(args) != 2 or n.op not in ("call_function", "call_method"):
        return None
    in_place = _SUMS_AND_PRODUCTS.get(n.target)
    if in_place is None:
        return None
    a, b = args
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    if not isinstance(a, torch.Tensor) or any(not isinstance(t, (torch.Tensor, int, float)) or isinstance(t, bool)
                                              for t in args):
        return None
    if any(not t.is_contiguous() or t.is_sparse or t.is_complex() for t in tensors):
        return None
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point:
        return None  # integer quotients and the like: let torch decide
    shape = _broadcast(tensors)
    if shape is None:
        return None
    if in_place:
        if shape != a.shape or not torch.can_cast(dtype, a.dtype) or not a.is_meta:
            return None
        return a
    return torch.empty(shape, dtype=dtype, device="meta")


def _broadcast(tensors) -> torch.Size | None:
    """The broadcast shape of `tensors` (torch's own is written in Python and costs more), or None."""
    ndim = max(t.dim() for t in tensors)
    sizes = [1] * ndim
    for t in tensors:
        for i, size in enumerate(t.shape, start=ndim - t.dim()):
            if size != sizes[i]:
                if sizes[i] != 1 and size != 1:
                    return None
                if size != 1:
                    sizes[i] = size
    return torch.Size(sizes)


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _on_real_device(tree, device):
    def real(t):
        if isinstance(t, torch.Tensor) and t.is_meta:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).zero_()
        return t
    return torch.utils._pytree.tree_map(real, tree)


_DEVICE_QUERIES = {"device", "is_cuda", "is_meta", "is_cpu", "get_device"}


def _asks_device(n: torch.fx.Node) -> bool:
    if n.op == "call_function":
        return n.args[1] in _DEVICE_QUERIES
    return n.op == "call_method" and n.target in _DEVICE_QUERIES


_NOTHING_TO_RECORD = contextlib.nullcontext()


def _meta(t: torch.Tensor) -> TensorMetadata:
    return TensorMetadata(tuple(t.shape), t.dtype, t.requires_grad, t.stride(), torch.contiguous_format,
                          False, {})


# Below this many input elements the arithmetic costs about what deciding which of it to skip does.
_WORTH_SKIPPING = 8192


def propagate_shapes(gm: torch.fx.GraphModule, args: tuple, leaves: set[str] = frozenset(), *,
                     values: bool = True):
    """Annotate every node with the shape of its value on `args`; returns (output, leaf inputs).

    `values=False`: only the shapes, dtypes and the inputs of the leaves are wanted, so the
    convolutions, linear layers, norms and activations whose values nothing else needs skip their arithmetic
    (`shape_rules`); the returned output then has the right shape but not the right values. Errors
    are those of running the graph either way: a stand-in that meets anything unusual runs the op."""
    small = sum(a.numel() for a in args if isinstance(a, torch.Tensor)) < _WORTH_SKIPPING
    recorder = _ShapeRecorder(gm, set(leaves))
    if not values and not small:
        recorder.shape_only = shape_only_nodes(gm, recorder.leaves, recorder.submodules)
    with torch.no_grad():
        out = recorder.run(*args)
    return out, recorder.leaf_inputs


def shape_of(node) -> tuple[int, ...] | None:
    return node.meta.get("reparam_shape") if isinstance(node, torch.fx.Node) else None


def dtype_of(node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return meta.dtype if meta is not None else None


SHAPE_QUERIES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse",
                 "is_quantized", "is_meta"}


def is_shape_query(user: torch.fx.Node) -> bool:
    """A user that reads only the shape/dtype/device of its input, not its values."""
    if user.op == "call_function" and user.target is getattr and len(user.args) >= 2:
        return user.args[1] in SHAPE_QUERIES
    if user.op == "call_method" and user.target in ("size", "dim", "numel", "ndimension", "get_device"):
        return True
    return user.op == "call_function" and user.target in (torch.numel,) or False


__all__ = ["trace", "graph_arguments", "CallerHooks", "caller_hooks", "mark_hooked", "fold_constants", "propagate_shapes", "shape_of", "dtype_of", "is_shape_query",
           "Constants", "Unfolded"]
