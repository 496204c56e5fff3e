"""Recognising linear operations in an FX graph, whatever their spelling.

`classify(node, ...)` turns one node into a `LinearOp` (what it does to its tensor inputs) or
None when it is not linear. Every spelling of an operation (`x + y`, `torch.add`, `x.add(y)`;
`nn.Conv2d` or `F.conv2d` with constant weights; a BatchNorm module or `F.batch_norm`) maps to one
description, so the propagation pass sees a single form of each.

    rule            graph op                                operator on its input
    conv            ConvNd, F.convNd (constant weight)      itself
    batch_norm      BatchNormNd / F.batch_norm, eval        depthwise 1x1: a = g/sqrt(v+eps), b = beta - m*a
                    InstanceNormNd / F.instance_norm with   the same (eval reads the running statistics)
                    running statistics
    linear          nn.Linear, F.linear, x @ W (constant W) 1x1 over the last axis
    avg_pool        AvgPoolNd, count_include_pad=True       depthwise kxk of 1/k^2
    pad             F.pad / ZeroPadNd with zeros            identity 1x1 with that (symmetric) padding
    crop            x[:, :, a:-a], narrow, F.pad(x, [-a]*2)  identity 1x1 with padding -a (passes/crop.py)
    pad_border      F.pad, then the border set to v         zero padding `op`, if what precedes gives v
                    (passes/fill.py)                        for a zero input (passes/commute.py)
    identity        Identity, Dropout (eval), contiguous,   depthwise 1x1 of ones
                    leaky_relu with negative_slope 1
    scale           x * c, c * x, x / c, -x,                depthwise 1x1 of c
                    x * c.expand_as(x) (or c.expand(...))
    shift           x + c, x - c, c - x                     bias c (c - x also scales by -1)
    addcmul         torch.addcmul(b, x, a) (timm's Affine)  per-channel a*x + b
    sum             x + y, x - y                            A + B over a common source
                    zeros + x (an accumulator started with  x
                    zeros_like / new_zeros / torch.zeros)
    concat          torch.cat(dim=channels)                 outputs stacked
    layout          flatten, transpose, permute, reshape,   moves the channel axis (pointwise only)
                    view, view_as, reshape_as, unflatten
    average         AdaptiveAvgPoolNd, x.mean(spatial dims),  an average that keeps constants: pointwise
                    avg_pool without padding or with          maps commute with it (passes/commute.py)
                    count_include_pad=False
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import affine
from ..trace import Constants, caller_hooks, dtype_of, is_shape_query, shape_of
from .crop import classify_crop
from .fill import pad_border
from .functionalize import values_updated_in_place

# Argument names of the functional forms, for binding positional and keyword arguments alike.
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_LINEAR_ARGS = ("input", "weight", "bias")
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
              "divisor_override")
_DROPOUT_ARGS = ("input", "p", "training", "inplace")
_INSTANCE_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum",
                       "eps")
_ADDCMUL_ARGS = ("input", "tensor1", "tensor2")

_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_POOL_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, torch.avg_pool1d: 1}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORM_MODULES = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}
_POOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_POOL_MODULES = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_ADAPTIVE_POOL_FUNCS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
                        torch.adaptive_avg_pool1d: 1}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

_ADD = {operator.add, torch.add, operator.iadd}
_SUB = {operator.sub, torch.sub, torch.subtract, operator.isub}
_MUL = {operator.mul, torch.mul, torch.multiply, operator.imul}
_DIV = {operator.truediv, torch.div, torch.true_divide, torch.divide, operator.itruediv}
_NEG = {operator.neg, torch.neg, torch.negative}
_MATMUL = {operator.matmul, torch.matmul}
# Tensors of zeros made from a shape: `out = torch.zeros_like(x)`, then `out += branch(x)`.
_ZEROS_FUNCS = {torch.zeros_like, torch.zeros}
_ZEROS_METHODS = {"new_zeros"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_LAYOUT_FUNCS = {torch.flatten: "flatten", torch.transpose: "transpose", torch.swapaxes: "transpose",
                 torch.permute: "permute", torch.reshape: "reshape", torch.squeeze: "squeeze",
                 torch.unsqueeze: "unsqueeze", torch.movedim: "movedim", torch.moveaxis: "movedim",
                 torch.unflatten: "reshape"}
_LAYOUT_METHODS = {"flatten": "flatten", "transpose": "transpose", "swapaxes": "transpose",
                   "permute": "permute", "reshape": "reshape", "view": "reshape", "squeeze": "squeeze",
                   "unsqueeze": "unsqueeze", "movedim": "movedim", "moveaxis": "movedim", "unflatten": "reshape"}
_METHOD_ARITH = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg",
                 "__add__": "add", "__sub__": "sub", "__mul__": "mul", "__truediv__": "div",
                 "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}


@dataclass
class LinearOp:
    """What a node does, in the terms of the propagation pass.

    kind:
      "affine"   -> `op` applied to `inputs[0]` at channel axis `axis` (None: decided by the input)
      "sum"      -> sum of `inputs` with `signs`
      "shift"    -> `inputs[0]` plus the constant `shift` (per channel or scalar), times `sign`
      "scale"    -> `inputs[0]` times the constant `scale` (per channel or scalar)
      "concat"   -> concatenation of `inputs` along `axis`
      "identity" -> `inputs[0]` unchanged
      "layout"   -> `inputs[0]` moved around; `layout` names the op
      "average"  -> each channel of `inputs[0]` averaged over the axes `dims` (kept when `keepdim`)
                    with weights that sum to one at every output position
      "refused"  -> linear in principle but not exactly fusible: `reason`
    """

    kind: str
    inputs: list[torch.fx.Node] = field(default_factory=list)
    op: affine.AffineConv | None = None
    axis: int | None = None
    signs: list[float] = field(default_factory=list)
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    sign: float = 1.0
    layout: str = ""
    shape_of: torch.fx.Node | None = None  # layout: the tensor whose shape `reshape_as` copies
    dims: tuple[int, ...] = ()  # average: the axes averaged over
    keepdim: bool = True  # average: are they kept (as size 1 or pooled size)?
    reason: str = ""
    member: str = ""  # name of the operation for the report


def bind(node: torch.fx.Node, names: tuple[str, ...]) -> dict:
    """Positional and keyword arguments of a call, by parameter name."""
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def submodule(gm: nn.Module, target: str) -> nn.Module:
    """`gm.get_submodule(target)` by dictionary look-ups (a call node's target names a module):
    `get_submodule` checks every step of the path with `getattr`, a large share of a pass that
    looks at every call of a large graph."""
    module = gm
    try:
        for part in target.split("."):
            module = module._modules[part]
    except (KeyError, AttributeError, TypeError):
        return gm.get_submodule(target)  # its own error for a wrong path
    if module is None:
        return gm.get_submodule(target)
    return module


def member_name(node: torch.fx.Node) -> str:
    """How the report names an original operation: its module, or the parameter it uses."""
    if node.op == "call_module":
        return str(node.target)
    attrs = [a.target for a in node.all_input_nodes if a.op == "get_attr" and not a.target.startswith("_reparam")]
    return f"{node.name}({attrs[0]})" if attrs else node.name


def _static_sizes(value) -> bool:
    """Is `value` None, an int, or a list or tuple of ints (not a value computed in the graph)?"""
    if isinstance(value, (list, tuple)):
        return all(type(v) is int for v in value)
    return value is None or type(value) is int


_FORWARD_METHODS = ("forward", "_conv_forward", "_check_input_dim")


def computes_as_its_torch_base(m: nn.Module) -> bool:
    """Does `m` compute what the torch.nn class it derives from computes?

    A subclass of a torch.nn layer that overrides `forward` (timm's `Conv2dSame` pads by the input
    size; weight-standardized convs rescale their weight) is another operation, although its
    attributes (`padding`, `weight`) look the same. Such a module is traced through when it can be;
    when it cannot (it stays a leaf call), it must not be read as its base class. The same holds for
    a forward set on the instance (`conv.forward = partial(conv_bn_forward, bn, conv)`, as mmcv's
    efficient conv-bn evaluation does): the module then computes that function."""
    if any(name in vars(m) for name in _FORWARD_METHODS):
        return False
    if m._forward_hooks or m._forward_pre_hooks or caller_hooks(m) is not None:
        return False  # its hooks run around the call (see `trace.mark_hooked`)
    cls = type(m)
    if cls.__module__.startswith("torch.nn"):
        return True
    base = next((b for b in cls.__mro__[1:] if b.__module__.startswith("torch.nn.modules")), None)
    if base is None:
        return False
    return all(getattr(cls, name, None) is getattr(base, name, None) for name in _FORWARD_METHODS)


def _tensor_input(node) -> bool:
    """A tensor computed from the inputs (constants were folded into get_attr nodes)."""
    return isinstance(node, torch.fx.Node) and node.op != "get_attr" and shape_of(node) is not None


class Classifier:
    """Maps nodes to `LinearOp`s, reading constants from the folded-constant table."""

    def __init__(self, gm: torch.fx.GraphModule, consts: Constants, *, stored_weights: bool = False):
        self.gm = gm
        self.consts = consts
        # The weights of convolution and Linear modules as the module stores them (float32, say)
        # instead of float64 copies: for a reader that widens them itself where it computes with
        # them (the linear-form pass), so that a layer never combined with another is never copied.
        self.stored_weights = stored_weights
        # Updates that stay in place (see passes.functionalize), the values they update, and
        # everything sharing memory with those: replacing any of them by another value, or
        # reading them in another order, could change what some reader sees.
        self.mutated = values_updated_in_place(gm, is_shape_query)

    def const(self, value) -> torch.Tensor | None:
        """The float64 value of a constant argument (a number or a parameter/buffer), else None."""
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return torch.tensor(float(value), dtype=torch.float64)
        if isinstance(value, torch.fx.Node):
            v = self.consts.get(value)
            if v is not None and v.is_floating_point():
                return v
        return None

    def __call__(self, node: torch.fx.Node) -> LinearOp | None:
        if shape_of(node) is None or not _is_float(node):
            return None
        if any(n in self.mutated for n in node.all_input_nodes):
            return None
        rule = self._classify(node)
        if rule is not None and node in self.mutated and not (rule.kind == "affine" and not rule.op.is_identity):
            return None  # updated in place: only a fresh value (a new conv) may stand for it, not an alias
        return rule

    def _classify(self, node: torch.fx.Node) -> LinearOp | None:
        if node.op == "call_module":
            return self._module(node, submodule(self.gm, node.target))
        if node.op == "call_function":
            return self._function(node)
        if node.op == "call_method":
            return self._method(node)
        return None

    # -- modules -----------------------------------------------------------------------------
    def _module(self, node, m: nn.Module) -> LinearOp | None:
        if not node.args or not _tensor_input(node.args[0]) or len(node.args) != 1 or node.kwargs:
            return None
        if not computes_as_its_torch_base(m):
            return None  # a subclass that computes something else (TF "same" padding, say)
        x = node.args[0]
        name = str(node.target)
        if isinstance(m, _CONV_MODULES):
            return self._conv(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups,
                              m.padding_mode, name, stored=self.stored_weights)
        if isinstance(m, _BN_MODULES):
            if m.training or m.running_mean is None or m.running_var is None:
                return LinearOp("refused", [x], reason=(
                    "BatchNorm uses batch statistics (track_running_stats=False or training mode): "
                    "not an affine map"), member=name)
            op = affine.batch_norm(m.running_mean, m.running_var, m.weight, m.bias, m.eps, nd=0)
            return LinearOp("affine", [x], op=op, axis=1, member=name)
        if type(m) in _INSTANCE_NORM_MODULES:
            if m.training or not m.track_running_stats or m.running_mean is None:
                return None  # normalizes each sample by its own statistics: not linear
            return self._instance_norm(x, _INSTANCE_NORM_MODULES[type(m)], m.running_mean, m.running_var,
                                       m.weight, m.bias, m.eps, name)
        if isinstance(m, nn.Linear):
            op = (_as_stored(m.weight, m.bias, (), (), (), 1, "zeros") if self.stored_weights
                  else affine.from_linear(m.weight, m.bias))
            return LinearOp("affine", [x], op=op, axis=-1, member=name)
        if isinstance(m, nn.LeakyReLU):
            return LinearOp("identity", [x], member=name) if m.negative_slope == 1 else None
        if type(m) in _POOL_MODULES:
            return self._pool(x, _POOL_MODULES[type(m)], m.kernel_size, m.stride, m.padding, m.ceil_mode,
                              m.count_include_pad, getattr(m, "divisor_override", None), name)
        if type(m) in _ADAPTIVE_POOL_MODULES:
            return self._spatial_average(x, _ADAPTIVE_POOL_MODULES[type(m)], name)
        if isinstance(m, _IDENTITY_MODULES):
            return LinearOp("identity", [x], member=name)
        if isinstance(m, nn.Flatten):
            return LinearOp("layout", [x], layout="flatten", member=name)
        if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                          nn.ConstantPad3d)):
            if m.value != 0:
                return None
            return self._pad(x, list(m.padding), "constant", 0, name)
        if isinstance(m, nn.Unflatten):
            return LinearOp("layout", [x], layout="reshape", member=name)
        return None

    # -- functions ---------------------------------------------------------------------------
    def _function(self, node) -> LinearOp | None:
        t = node.target
        if t in _CONV_FUNCS:
            a = bind(node, _CONV_ARGS)
            weight = self.const(a.get("weight"))
            bias = a.get("bias")
            bias_v = None if bias is None else self.const(bias)
            if weight is None or (bias is not None and bias_v is None) or not _tensor_input(a.get("input")):
                return None
            return self._conv(a["input"], weight, bias_v, a.get("stride", 1), a.get("padding", 0),
                              a.get("dilation", 1), a.get("groups", 1), "zeros", member_name(node))
        if t in (F.batch_norm,):
            a = bind(node, _BN_ARGS)
            x = a.get("input")
            stats = [self.const(a.get(k)) for k in ("running_mean", "running_var")]
            affine_args = [a.get(k) for k in ("weight", "bias")]
            affine_vals = [None if v is None else self.const(v) for v in affine_args]
            if not _tensor_input(x):
                return None
            if a.get("training", False) is not False or any(s is None for s in stats) or any(
                    v is None and arg is not None for v, arg in zip(affine_vals, affine_args)):
                return LinearOp("refused", [x], reason="batch_norm uses batch statistics or non-constant "
                                                         "parameters: not an affine map", member=node.name)
            op = affine.batch_norm(stats[0], stats[1], affine_vals[0], affine_vals[1], a.get("eps", 1e-5), 0)
            return LinearOp("affine", [x], op=op, axis=1, member=member_name(node))
        if t is F.instance_norm:
            return self._functional_instance_norm(node)
        if t is F.leaky_relu:
            return self._leaky_relu(node)
        if t is torch.addcmul:
            return self._addcmul(node)
        if t in _MATMUL:
            return self._matmul(node, *node.args) if len(node.args) == 2 and not node.kwargs else None
        if t in (F.linear,):
            a = bind(node, _LINEAR_ARGS)
            weight = self.const(a.get("weight"))
            bias = a.get("bias")
            bias_v = None if bias is None else self.const(bias)
            if weight is None or weight.dim() != 2 or (bias is not None and bias_v is None) \
                    or not _tensor_input(a.get("input")):
                return None
            return LinearOp("affine", [a["input"]], op=affine.from_linear(weight, bias_v), axis=-1,
                            member=member_name(node))
        if t in _POOL_FUNCS:
            a = bind(node, _POOL_ARGS)
            if not _tensor_input(a.get("input")):
                return None
            return self._pool(a["input"], _POOL_FUNCS[t], a.get("kernel_size"), a.get("stride"),
                              a.get("padding", 0), a.get("ceil_mode", False), a.get("count_include_pad", True),
                              a.get("divisor_override"), node.name)
        if t in _ADAPTIVE_POOL_FUNCS:
            if not node.args or not _tensor_input(node.args[0]):
                return None
            return self._spatial_average(node.args[0], _ADAPTIVE_POOL_FUNCS[t], node.name)
        if t is torch.mean:
            return self._mean(node)
        if t is pad_border:
            return self._pad_border(node)
        if t in (F.pad, torch.constant_pad_nd):
            a = bind(node, ("input", "pad", "mode", "value"))
            return self._pad(a.get("input"), a.get("pad"), a.get("mode", "constant"), a.get("value", 0), node.name)
        if t in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
            a = bind(node, _DROPOUT_ARGS)
            if a.get("training", True) is False and _tensor_input(a.get("input")):
                return LinearOp("identity", [a["input"]], member=node.name)
            return None
        if t in _ADD or t in _SUB or t in _MUL or t in _DIV:
            # `torch.add(a, b)`, `torch.add(input=a, other=b, alpha=2)`, `operator.add(a, b)`
            a = bind(node, ("input", "other"))
            if len(node.args) > 2 or "input" not in a or "other" not in a:
                return None
            if t in _ADD or t in _SUB:
                alpha = a.pop("alpha", 1)
                if set(a) - {"input", "other"} or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                    return None
                return self._add(node, a["input"], a["other"], (1.0 if t in _ADD else -1.0) * alpha)
            if set(a) - {"input", "other"}:
                return None  # rounding_mode, out=: not a plain product or quotient
            return (self._mul if t in _MUL else self._div)(node, a["input"], a["other"])
        if t in _NEG:
            if len(node.args) == 1 and _tensor_input(node.args[0]):
                return LinearOp("scale", [node.args[0]], scale=torch.tensor(-1.0, dtype=torch.float64),
                                member=node.name)
            return None
        if t in _CAT:
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(tensors, (list, tuple)) or not all(_tensor_input(v) for v in tensors):
                return None
            if not isinstance(dim, int):
                return None
            return LinearOp("concat", list(tensors), axis=dim, member=node.name)
        if t is operator.getitem or t is torch.narrow:
            return self._crop(node)
        if t in _LAYOUT_FUNCS and node.args and _tensor_input(node.args[0]):
            return LinearOp("layout", [node.args[0]], layout=_LAYOUT_FUNCS[t], member=node.name)
        return None

    # -- methods -----------------------------------------------------------------------------
    def _method(self, node) -> LinearOp | None:
        name = node.target
        if not node.args or not _tensor_input(node.args[0]):
            return None
        x = node.args[0]
        if name in ("contiguous", "clone") and len(node.args) == 1 and not node.kwargs:
            return LinearOp("identity", [x], member=node.name)
        if name in _LAYOUT_METHODS:
            return LinearOp("layout", [x], layout=_LAYOUT_METHODS[name], member=node.name)
        if name == "narrow":
            return self._crop(node)
        if name == "mean":
            return self._mean(node)
        if name in ("reshape_as", "view_as") and len(node.args) == 2 and _tensor_input(node.args[1]) \
                and not node.kwargs:
            return LinearOp("layout", [x], layout="reshape", shape_of=node.args[1], member=node.name)
        if name in ("matmul", "__matmul__"):
            return self._matmul(node, x, node.args[1]) if len(node.args) == 2 and not node.kwargs else None
        kind = _METHOD_ARITH.get(name)
        if kind is None:
            return None
        if kind == "neg":
            if len(node.args) == 1 and not node.kwargs:
                return LinearOp("scale", [x], scale=torch.tensor(-1.0, dtype=torch.float64), member=node.name)
            return None
        if len(node.args) != 2:
            return None
        if kind in ("add", "sub"):
            alpha = node.kwargs.get("alpha", 1)
            if not isinstance(alpha, (int, float)) or set(node.kwargs) - {"alpha"}:
                return None
            return self._add(node, x, node.args[1], (1.0 if kind == "add" else -1.0) * alpha)
        if node.kwargs:
            return None
        if kind == "mul":
            return self._mul(node, x, node.args[1])
        return self._div(node, x, node.args[1])

    # -- shared builders ---------------------------------------------------------------------
    def _conv(self, x, weight, bias, stride, padding, dilation, groups, padding_mode, name,
              stored: bool = False) -> LinearOp:
        """`stored`: keep a floating-point `weight` and `bias` in their own dtype (see `_as_stored`)."""
        stored = stored and isinstance(weight, torch.Tensor) and weight.is_floating_point() and (
            bias is None or isinstance(bias, torch.Tensor) and bias.is_floating_point())
        if not stored:
            weight = affine._f64(weight)
        nd = weight.dim() - 2
        k = weight.shape[2:]
        dilation = affine._tuple(dilation, nd)
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            else:  # 'same': symmetric only when every dilation*(k-1) is even
                if any(d * (kk - 1) % 2 for d, kk in zip(dilation, k)):
                    return LinearOp("refused", [x], reason="padding='same' with an even kernel pads one side "
                                                             "more than the other", member=name)
                padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k))
        if stored:
            op = _as_stored(weight, bias, affine._tuple(stride, nd), affine._tuple(padding, nd), dilation,
                            int(groups), padding_mode)
        else:
            op = affine.from_conv(weight, bias, stride, padding, dilation, groups, padding_mode)
        return LinearOp("affine", [x], op=op, axis=1, member=name)

    def _crop(self, node) -> LinearOp | None:
        """A slice or `narrow` dropping both ends of spatial axes (passes/crop.py)."""
        found = classify_crop(node)
        if found is None or not _tensor_input(found[0]):
            return None
        x, op = found
        if op is None:
            return LinearOp("identity", [x], member=node.name)
        if isinstance(op, str):
            return LinearOp("refused", [x], reason=f"crop kept: {op}", member=node.name)
        return LinearOp("affine", [x], op=op, axis=1, member=node.name)

    def _pad(self, x, pad, mode, value, name) -> LinearOp | None:
        """Zero padding of the spatial axes, the same on both sides: an identity conv with padding
        (negative: a crop, passes/crop.py)."""
        shape = shape_of(x)
        if not _tensor_input(x) or not isinstance(pad, (list, tuple)) or shape is None or len(shape) < 3:
            return None
        if mode != "constant" or value not in (0, 0.0, None):
            return None
        if not all(isinstance(p, int) for p in pad) or len(pad) % 2 or len(pad) // 2 > len(shape) - 2:
            return None
        nd = len(shape) - 2
        per_axis = [0] * nd
        for i in range(len(pad) // 2):  # pad lists the last axis first
            left, right = pad[2 * i], pad[2 * i + 1]
            if left != right:
                return LinearOp("refused", [x], reason="F.pad pads (or crops) the two sides of an axis "
                                                         "differently: not a symmetric convolution padding",
                                member=name)
            per_axis[nd - 1 - i] = left
        return LinearOp("affine", [x], op=affine.zero_pad(shape[1], per_axis, nd), axis=1, member=name)

    def _pool(self, x, nd, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor, name):
        if not all(_static_sizes(v) for v in (kernel_size, stride, padding, divisor)):
            return None  # a window computed from the input's shape (`kernel_size=x.size(3)`)
        padded = padding not in (0, (0,) * nd, [0] * nd)
        if divisor is None and (ceil_mode or (padded and not count_include_pad)) and \
                (not padded or not count_include_pad):
            # Every window is divided by the number of input elements it covers: not a
            # convolution, but an average that pointwise maps commute with.
            return self._spatial_average(x, nd, name)
        if ceil_mode:
            return LinearOp("refused", [x], reason="avg_pool with ceil_mode=True has windows that cross the "
                                                     "border unevenly", member=name)
        if not count_include_pad and (padding not in (0, (0,) * nd)):
            return LinearOp("refused", [x], reason="avg_pool with count_include_pad=False divides border "
                                                     "windows differently: not a convolution", member=name)
        shape = shape_of(x)
        if len(shape) != nd + 2:
            return None
        op = affine.avg_pool(shape[1], kernel_size, stride, padding, nd, divisor)
        return LinearOp("affine", [x], op=op, axis=1, member=name)

    def _pad_border(self, node) -> LinearOp | None:
        """`pad_border(x, [p]*4, v)` (passes/fill.py): zero padding whose border is then set to `v`."""
        if len(node.args) != 3 or node.kwargs or not _tensor_input(node.args[0]):
            return None
        x, pad, value = node.args
        shape, v = shape_of(x), self.const(value)
        if v is None or shape is None or len(shape) != 4:
            return None
        if v.numel() not in (1, shape[1]) or v.dim() > 4 or any(
                n != 1 for i, n in enumerate(v.shape) if i != v.dim() - 3):
            return None  # not one value per channel
        values = v.reshape(-1).expand(shape[1]).clone() if v.numel() == 1 else v.reshape(-1).clone()
        return LinearOp("pad_border", [x], op=affine.zero_pad(shape[1], (pad[0], pad[0]), 2), axis=1,
                        shift=values, member=node.name)

    def _spatial_average(self, x, nd: int, name: str) -> LinearOp | None:
        """Average pooling over the last `nd` axes whose windows average input elements only."""
        shape = shape_of(x)
        if not _tensor_input(x) or shape is None or len(shape) != nd + 2:
            return None  # unbatched input: the channel axis is not axis 1
        return LinearOp("average", [x], dims=tuple(range(2, nd + 2)), keepdim=True, member=name)

    def _mean(self, node) -> LinearOp | None:
        """`x.mean(dims, keepdim)` / `torch.mean`: an average over the given axes (never over all)."""
        a = bind(node, ("input", "dim", "keepdim"))
        x, dims, keepdim = a.get("input"), a.get("dim"), a.get("keepdim", False)
        shape = shape_of(x)
        if not _tensor_input(x) or shape is None or a.get("dtype") is not None or set(a) - {"input", "dim", "keepdim"}:
            return None
        if isinstance(dims, int):
            dims = (dims,)
        if not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims) \
                or not isinstance(keepdim, bool):
            return None
        dims = tuple(sorted({d % len(shape) for d in dims}))
        return LinearOp("average", [x], dims=dims, keepdim=keepdim, member=node.name)

    def _instance_norm(self, x, nd, mean, var, weight, bias, eps, name) -> LinearOp | None:
        """Instance norm that reads running statistics (eval, `track_running_stats=True`):
        the same per-channel map as a BatchNorm with those statistics."""
        shape = shape_of(x)
        if shape is None or len(shape) != nd + 2:
            return None  # unbatched input: the channel axis is axis 0
        op = affine.batch_norm(mean, var, weight, bias, eps, nd=0)
        return LinearOp("affine", [x], op=op, axis=1, member=name)

    def _functional_instance_norm(self, node) -> LinearOp | None:
        a = bind(node, _INSTANCE_NORM_ARGS)
        x = a.get("input")
        if not _tensor_input(x) or a.get("use_input_stats", True) is not False:
            return None  # statistics of each sample: not linear
        stats = [self.const(a.get(k)) for k in ("running_mean", "running_var")]
        affine_args = [a.get(k) for k in ("weight", "bias")]
        affine_vals = [None if v is None else self.const(v) for v in affine_args]
        if any(v is None for v in stats) or any(v is None and arg is not None
                                                 for v, arg in zip(affine_vals, affine_args)):
            return None
        shape = shape_of(x)
        if shape is None or len(shape) < 3:
            return None
        return self._instance_norm(x, len(shape) - 2, stats[0], stats[1], affine_vals[0], affine_vals[1],
                                   a.get("eps", 1e-5), member_name(node))

    def _leaky_relu(self, node) -> LinearOp | None:
        """`F.leaky_relu(x, 1.0)` is the identity (VanillaNet anneals its activations to a slope of 1)."""
        a = bind(node, ("input", "negative_slope", "inplace"))
        slope = a.get("negative_slope", 0.01)
        if not _tensor_input(a.get("input")) or isinstance(slope, bool) or not isinstance(slope, (int, float)):
            return None
        return LinearOp("identity", [a["input"]], member=node.name) if slope == 1 else None

    def _addcmul(self, node) -> LinearOp | None:
        """`torch.addcmul(b, t1, t2, value=v)` = b + v * t1 * t2 with one tensor operand: a shift
        (the tensor is `b`) or a per-channel `a * x + b` (timm's `Affine` in ResMLP)."""
        a = bind(node, _ADDCMUL_ARGS)
        if set(a) - {"input", "tensor1", "tensor2", "value"} or len(a) < 3:
            return None
        value = a.get("value", 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        operands = [a["input"], a["tensor1"], a["tensor2"]]
        tensors = [i for i, v in enumerate(operands) if _tensor_input(v)]
        if len(tensors) != 1:
            return None
        x = operands[tensors[0]]
        consts = [self.const(v) for i, v in enumerate(operands) if i != tensors[0]]
        shape = shape_of(x)
        if any(c is None for c in consts) or shape is None or shape_of(node) != shape or len(shape) < 2:
            return None  # the constants broadcast x to a larger shape: not a map on x
        if tensors[0] == 0:
            return LinearOp("shift", [x], shift=consts[0] * consts[1] * value, member=member_name(node))
        shift, scale = consts[0], consts[1] * value
        axes = {len(shape) - c.dim() + i for c in (shift, scale) for i, n in enumerate(c.shape) if n != 1}
        if len(axes) > 1 or any(c.dim() > len(shape) for c in (shift, scale)):
            return None  # varies along several axes: not per channel
        axis = axes.pop() if axes else 1
        vectors = []
        for c in (scale, shift):
            if c.numel() == 1:
                vectors.append(c.reshape(()).expand(shape[axis]).clone())
            elif c.numel() == shape[axis]:
                vectors.append(c.reshape(-1).clone())
            else:
                return None
        op = affine.per_channel(vectors[0], vectors[1], 0)
        return LinearOp("affine", [x], op=op, axis=axis, member=member_name(node))

    def _matmul(self, node, a, b) -> LinearOp | None:
        """`x @ W` with a constant matrix `W`: a Linear without bias on the last axis."""
        if not _tensor_input(a) or _tensor_input(b):
            return None
        w = self.const(b)
        shape = shape_of(a)
        if w is None or w.dim() != 2 or shape is None or len(shape) < 2 or shape[-1] != w.shape[0]:
            return None
        return LinearOp("affine", [a], op=affine.from_linear(w.t().contiguous(), None), axis=-1,
                        member=member_name(node))

    def _expanded_constant(self, value, node) -> torch.Tensor | None:
        """The constant `c` of `c.expand_as(y)` / `c.expand(*y.shape)` (`y * g[:, None, None].expand_as(y)`),
        which reads only `y`'s shape: in an elementwise `node` whose result has the shape of its
        other operand, the constant broadcasts to the same values unexpanded."""
        if not (isinstance(value, torch.fx.Node) and value.op == "call_method"
                and value.target in ("expand_as", "expand") and value.args and not value.kwargs):
            return None
        c = self.const(value.args[0])
        shape = shape_of(value)
        if c is None or shape is None or shape != shape_of(node) or c.dim() > len(shape):
            return None
        return c

    def _add(self, node, a, b, sign_b: float) -> LinearOp | None:
        for x, e in ((a, b), (b, a)):
            c = self._expanded_constant(e, node)
            if c is not None and _tensor_input(x) and shape_of(x) == shape_of(node):
                if e is b:
                    return LinearOp("shift", [x], shift=c * sign_b, member=member_name(node))
                return LinearOp("shift", [x], shift=c, sign=sign_b, member=member_name(node))
        ta, tb = _tensor_input(a), _tensor_input(b)
        if ta and tb and _zeros_like_result(a, node) and _zeros_like_result(b, node, zeros=False):
            # `zeros + y` (an accumulator started with zeros): y itself, or -y
            if sign_b == 1.0:
                return LinearOp("identity", [b], member=node.name)
            return LinearOp("scale", [b], scale=torch.tensor(sign_b, dtype=torch.float64), member=node.name)
        if ta and tb and _zeros_like_result(b, node) and _zeros_like_result(a, node, zeros=False):
            return LinearOp("identity", [a], member=node.name)  # y + 0, y - 0
        if ta and tb:
            if shape_of(a) != shape_of(node) or shape_of(b) != shape_of(node):
                return None  # broadcasting between tensors is not a sum of maps on one value
            return LinearOp("sum", [a, b], signs=[1.0, sign_b], member=node.name)
        if ta:
            c = self.const(b)
            return None if c is None else LinearOp("shift", [a], shift=c * sign_b, member=member_name(node))
        if tb:
            c = self.const(a)
            if c is None:
                return None
            return LinearOp("shift", [b], shift=c, sign=sign_b, member=member_name(node))
        return None

    def _mul(self, node, a, b) -> LinearOp | None:
        for x, e in ((a, b), (b, a)):
            c = self._expanded_constant(e, node)
            if c is not None and _tensor_input(x) and shape_of(x) == shape_of(node):
                return LinearOp("scale", [x], scale=c, member=member_name(node))
        if _tensor_input(a) and not _tensor_input(b):
            x, c = a, self.const(b)
        elif _tensor_input(b) and not _tensor_input(a):
            x, c = b, self.const(a)
        else:
            return None
        return None if c is None else LinearOp("scale", [x], scale=c, member=member_name(node))

    def _div(self, node, a, b) -> LinearOp | None:
        if not _tensor_input(a) or _tensor_input(b):
            return None
        c = self.const(b)
        if c is None or not bool((c != 0).all()):
            return None
        return LinearOp("scale", [a], scale=1.0 / c, member=member_name(node))


def _as_stored(weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int,
               padding_mode: str) -> affine.AffineConv:
    """An operator holding a layer's own floating-point weight and bias (not float64 copies): the
    same values, exactly. Whoever computes with it widens them first (`linear_forms.widened_op`)."""
    weight = weight.detach()
    b = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if bias is None else bias.detach()
    return affine.AffineConv(weight, b, stride, padding, dilation, groups, padding_mode)


def _zeros_like_result(value: torch.fx.Node, result: torch.fx.Node, zeros: bool = True) -> bool:
    """Has `value` the shape and dtype of `result` (and, when `zeros`, is it a tensor of zeros made
    from a shape)? Only then does adding it change nothing but the tensor's identity."""
    if shape_of(value) != shape_of(result) or dtype_of(value) != dtype_of(result):
        return False
    if not zeros:
        return True
    if value.op == "call_function" and value.target in _ZEROS_FUNCS:
        return not any(k in value.kwargs for k in ("out", "requires_grad"))
    return value.op == "call_method" and value.target in _ZEROS_METHODS


def _is_float(node: torch.fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and meta.dtype.is_floating_point
