"""Shapes without arithmetic: which nodes of a graph may skip computing their values.

`trace.propagate_shapes` runs the graph once on the example input to learn every node's shape.
Nearly all of that time is convolution arithmetic, and the compiler needs only the shapes (and the
real inputs of untraceable submodules). So a convolution, a linear layer, an eval-mode BatchNorm
(module or `F.batch_norm`) or an elementwise activation module may return zeros of the right shape,
dtype, device and strides instead of its value (`trace.propagate_shapes` asks for them on the meta
device, which holds no memory, and runs what consumes them there too), wherever that cannot change
any shape or any value that is still needed:

* every value computed from such a zero-filled stand-in ("tainted") must be consumed only by ops
  whose result shape depends on the shapes of their inputs alone (`_*_CONSUMERS`), and in the
  argument positions where that holds (`x[mask]` with a tainted mask is value-dependent; `x[i]`
  with a tainted `x` is not);
* a metadata read (`x.shape`, `x.size()`) of a tainted value is exact, and its result is not tainted;
* an untraceable submodule (a leaf) must receive real values: the compiler traces and fuses inside
  it with them; so must anything not on the list;
* an in-place update that writes a tainted value must write into memory only tainted values hold
  (memory allocated by a tainted op): otherwise a real value read later would change;
* each stand-in checks what the real op would check (ranks, channel counts, dtypes, output sizes
  of at least 1) and, when anything is unusual, the op runs for real (and raises its own error).

A convolution upstream of a value that breaks these rules runs for real; the rest still skip. An
example input too small for the arithmetic to matter is run for real throughout (`propagate_shapes`).
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .passes.functionalize import (_ALLOCATING_FUNCTIONS, _ALLOCATING_METHODS, _ALLOCATING_MODULES,
                                   updates_in_place)

_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_BN_MODULES = {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d}
# Elementwise activations: the result has the input's shape, dtype and (dense) layout.
_ACTIVATION_MODULES = {nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                       nn.LeakyReLU, nn.Mish, nn.ELU}
_FLOATS = {torch.float32, torch.float64, torch.float16, torch.bfloat16}

# Ops whose result shape depends only on the shapes of their inputs, and which raise no error that
# depends on values. "any": every tensor argument may be tainted; "first": only the first (the
# input: the others are sizes, dims, indices); "setitem": the target and the value, not the key.
_FUNCTION_CONSUMERS = {
    **{f: "any" for f in (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos,
        operator.matmul, operator.iadd, operator.isub, operator.imul, operator.itruediv,
        torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.bmm, torch.cat, torch.concat,
        torch.stack, F.linear, F.batch_norm, F.layer_norm, F.group_norm, *_CONV_FUNCTIONS)},
    **{f: "first" for f in (
        operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.relu,
        torch.sigmoid, torch.tanh, torch.softmax, torch.mean, torch.sum, torch.chunk, torch.split,
        torch.unsqueeze, torch.squeeze, torch.clamp, F.relu, F.relu6, F.gelu, F.silu, F.hardswish,
        F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.softmax, F.dropout, F.pad, F.avg_pool1d,
        F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        F.interpolate)},
    operator.setitem: "setitem",
}
_METHOD_CONSUMERS = {
    **{m: "any" for m in ("add", "sub", "mul", "div", "matmul", "add_", "sub_", "mul_", "div_",
                          "expand_as", "view_as", "reshape_as")},
    **{m: "first" for m in ("view", "reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze",
                            "contiguous", "chunk", "split", "mean", "sum", "softmax", "expand", "relu",
                            "sigmoid", "tanh", "clamp", "relu_", "sigmoid_", "clamp_", "neg")},
}
_MODULE_CONSUMERS = {
    *_CONV_MODULES, *_BN_MODULES, nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Mish, nn.ELU, nn.Softmax, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten,
}
# Conversions (`to`, `type_as`, `long`) are left out on purpose: integer zeros can divide by zero.
_FIRST_KEYS = {0, "input", "self"}


def shape_only_nodes(gm: torch.fx.GraphModule, leaves: set[str], modules: dict | None = None) -> set[torch.fx.Node]:
    """The nodes whose values may be replaced by zeros of the right shape (see the module doc).

    `modules`: `dict(gm.named_modules())`, when the caller has it already."""
    if _global_hooks() or _autocast():
        return set()
    if modules is None:
        modules = dict(gm.named_modules())
    candidates = {n for n in gm.graph.nodes if _is_candidate(n, modules, leaves)}
    while candidates:
        tainted, blocked = _taint(gm, candidates, leaves, modules)
        if not blocked:
            return candidates
        for node in blocked:  # every candidate a blocked value comes from runs for real
            stack = [a for a in node.all_input_nodes if a in tainted]
            seen = set(stack)
            while stack:
                value = stack.pop()
                candidates.discard(value)
                for a in value.all_input_nodes:
                    if a in tainted and a not in seen:
                        seen.add(a)
                        stack.append(a)
    return set()


def _is_candidate(node: torch.fx.Node, modules: dict, leaves: set[str]) -> bool:
    if node.op == "call_module":
        if node.target in leaves:
            return False
        module = modules[node.target]
        kind = type(module)
        if kind in _ACTIVATION_MODULES:
            return getattr(module, "inplace", False) is False  # in place, it returns its input itself
        return kind in _CONV_MODULES or kind is nn.Linear or kind in _BN_MODULES
    if node.op == "call_function":
        if node.target is F.batch_norm:  # in eval mode only: training updates the running statistics
            training = node.kwargs["training"] if "training" in node.kwargs else (
                node.args[5] if len(node.args) > 5 else False)
            return training is False
        return node.target in _CONV_FUNCTIONS or node.target is F.linear
    return False


def _taint(gm, candidates, leaves, modules):
    """(tainted nodes, nodes that may not consume a tainted value), in one pass."""
    from .trace import is_shape_query  # (trace imports this module)

    tainted: set[torch.fx.Node] = set()
    fake_memory: set[torch.fx.Node] = set()  # tainted nodes whose memory only tainted values hold
    blocked: list[torch.fx.Node] = []
    for node in gm.graph.nodes:
        if node in candidates:
            tainted.add(node)
            fake_memory.add(node)
            continue
        if node.op in ("placeholder", "get_attr", "output") or is_shape_query(node):
            continue
        if not any(a in tainted for a in node.all_input_nodes):
            continue
        positions = _tainted_positions(node, tainted)
        if not positions:
            continue
        if not _consumes(node, positions, modules, leaves):
            blocked.append(node)
            continue
        in_place = node.target is operator.setitem or updates_in_place(gm, node, modules)
        target = node.args[0] if node.args else None
        if in_place and not (isinstance(target, torch.fx.Node) and target in fake_memory):
            blocked.append(node)
            continue
        tainted.add(node)
        if in_place or _allocates(node, modules):
            fake_memory.add(node)
        elif isinstance(target, torch.fx.Node) and target in fake_memory:
            fake_memory.add(node)  # a view of (or the same as) memory only tainted values hold
    return tainted, blocked


def _tainted_positions(node: torch.fx.Node, tainted: set) -> set:
    positions = set()
    for key, arg in [*enumerate(node.args), *node.kwargs.items()]:
        found = []
        torch.fx.node.map_arg(arg, lambda n: found.append(n) if n in tainted else None)
        if found:
            positions.add(key)
    return positions


def _consumes(node, positions, modules, leaves) -> bool:
    if "out" in node.kwargs:
        return False
    if node.op == "call_module":
        if node.target in leaves:
            return False
        module = modules[node.target]
        return type(module) in _MODULE_CONSUMERS and not _has_hooks(module)
    if node.op == "call_function":
        rule = _FUNCTION_CONSUMERS.get(node.target)
    elif node.op == "call_method":
        rule = _METHOD_CONSUMERS.get(node.target)
    else:
        return False
    if rule == "any":
        return True
    if rule == "first":
        return positions <= _FIRST_KEYS
    if rule == "setitem":
        return positions <= {0, 2}
    return False


def _allocates(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _ALLOCATING_MODULES)
    if node.op == "call_method":
        return node.target in _ALLOCATING_METHODS
    return node.target in _ALLOCATING_FUNCTIONS


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def _autocast() -> bool:
    try:
        return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    except Exception:  # pragma: no cover - an older torch: assume it may be on
        return True


# --------------------------------------------------------------------------------------------
# The stand-ins: zeros of the shape the op would return, or None (run the op for real)
# --------------------------------------------------------------------------------------------

def stand_in(node: torch.fx.Node, module: nn.Module | None, args: tuple, kwargs: dict, *, meta: bool = False):
    """Zeros shaped like `node`'s result on these arguments, or None when anything is unusual.

    `meta=True`: a tensor on the meta device instead (no memory at all), whose input may itself
    be such a stand-in: `trace.propagate_shapes` runs what consumes it on the meta device too."""
    if module is not None:
        if _has_hooks(module):
            return None
        kind = type(module)
        if kind in _CONV_MODULES:
            if module.padding_mode != "zeros" or kwargs or len(args) != 1:
                return None
            return _conv(_CONV_MODULES[kind], args[0], module.weight, module.bias, module.stride,
                         module.padding, module.dilation, module.groups, meta)
        if kind is nn.Linear:
            if kwargs or len(args) != 1:
                return None
            return _linear(args[0], module.weight, module.bias, meta)
        if kind in _BN_MODULES:
            if kwargs or len(args) != 1 or module.training or module.running_mean is None:
                return None
            rank = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}[kind]
            return _batch_norm(args[0], rank, module.num_features, module.weight, module.bias,
                               module.running_mean, module.running_var, meta)
        if kind in _ACTIVATION_MODULES:
            x = args[0] if len(args) == 1 and not kwargs else None
            if getattr(module, "inplace", False) is not False or not isinstance(x, torch.Tensor):
                return None
            return _zeros(x, x.shape, meta) if _like(x) and _dense(x) else None
        return None
    try:
        bound = _signature(node.target).bind(*args, **kwargs)
    except TypeError:
        return None
    a = bound.arguments
    if node.target is F.batch_norm:
        x, mean = a.get("input"), a.get("running_mean")
        if a.get("training", False) is not False or not isinstance(x, torch.Tensor) or not isinstance(
                mean, torch.Tensor) or x.dim() < 2:
            return None
        return _batch_norm(x, (x.dim(),), x.shape[1], a.get("weight"), a.get("bias"), mean, a.get("running_var"),
                           meta)
    if node.target is F.linear:
        return _linear(a.get("input"), a.get("weight"), a.get("bias"), meta)
    nd = _CONV_FUNCTIONS.get(node.target)
    if nd is None:
        return None
    return _conv(nd, a.get("input"), a.get("weight"), a.get("bias"), a.get("stride", 1),
                 a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1), meta)


_SIGNATURES: dict = {}


def _signature(fn) -> inspect.Signature:
    sig = _SIGNATURES.get(fn)
    if sig is None:
        if fn in (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d):
            params = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
            defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        elif fn is F.batch_norm:
            params = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
            defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        else:  # F.linear
            params, defaults = ["input", "weight", "bias"], {"bias": None}
        sig = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   default=defaults.get(p, inspect.Parameter.empty))
                                 for p in params])
        _SIGNATURES[fn] = sig
    return sig


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _like(x: torch.Tensor, *others, meta: bool = False) -> bool:
    """A plain floating-point tensor, and others (None allowed) of its dtype and device (with
    `meta`, any device when `x` is a meta stand-in: the real op saw them on one device)."""
    if not _plain(x) or x.dtype not in _FLOATS:
        return False
    any_device = meta and x.is_meta
    return all(o is None or (_plain(o) and o.dtype == x.dtype and (any_device or o.device == x.device))
               for o in others)


def _dense(t: torch.Tensor) -> bool:
    """Strides of a freshly allocated tensor of its shape (the layout the op's result then has)."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    return t.stride() == tuple(reversed(expected))


def _zeros(x: torch.Tensor, shape, meta: bool = False) -> torch.Tensor:
    if meta:
        return torch.empty(shape, dtype=x.dtype, device="meta")
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def _tuple(value, nd: int):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * nd
    if isinstance(value, (tuple, list)) and len(value) == nd and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    if isinstance(value, (tuple, list)) and len(value) == 1 and nd > 1:
        return _tuple(value[0], nd)
    return None


def _conv(nd, x, weight, bias, stride, padding, dilation, groups, meta=False):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or not _like(x, weight, bias, meta=meta):
        return None
    if weight.dim() != nd + 2 or x.dim() != nd + 2 or not _dense(x) or not _dense(weight):
        return None  # unbatched inputs and other memory layouts: run it
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        return None
    n, c = x.shape[:2]
    out_channels, per_group = weight.shape[:2]
    if c != per_group * groups or out_channels % groups or (bias is not None and bias.shape != (out_channels,)):
        return None
    kernel = tuple(weight.shape[2:])
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    if stride is None or dilation is None or min(stride) < 1 or min(dilation) < 1 or min(kernel) < 1:
        return None
    if padding == "same":
        if any(s != 1 for s in stride):
            return None
        return _zeros(x, (n, out_channels, *x.shape[2:]), meta)
    padding = (0,) * nd if padding == "valid" else _tuple(padding, nd)
    if padding is None or min(padding) < 0:
        return None
    size = []
    for length, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation):
        span = length + 2 * p - d * (k - 1) - 1
        if span < 0:
            return None
        size.append(span // s + 1)
    return _zeros(x, (n, out_channels, *size), meta)


def _linear(x, weight, bias, meta=False):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or not _like(x, weight, bias, meta=meta):
        return None
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or not _dense(x):
        return None
    if bias is not None and bias.shape != (weight.shape[0],):
        return None
    return _zeros(x, (*x.shape[:-1], weight.shape[0]), meta)


def _batch_norm(x, ranks, features, weight, bias, mean, var, meta=False):
    if not isinstance(x, torch.Tensor) or not isinstance(var, torch.Tensor) or not _like(
            x, weight, bias, mean, var, meta=meta):
        return None
    if x.dim() not in ranks or x.shape[1] != features or not _dense(x):
        return None
    if any(t is not None and t.shape != (features,) for t in (weight, bias, mean, var)):
        return None
    return _zeros(x, x.shape, meta)


__all__ = ["shape_only_nodes", "stand_in"]
