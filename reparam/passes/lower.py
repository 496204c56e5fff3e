"""Lowering: every materialized linear form becomes one fresh module applied to its source.

Nodes whose forms were folded into a consumer lose their last user and are removed; modules and
constants nobody reads any more are dropped from the GraphModule.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from .. import affine
from ..affine import AffineConv
from ..module_table import module_table
from ..modules import AxisLinear, ChannelAffine
from ..report import FusedRegion
from .cleanup import remove_dead_nodes
from .crop import crop_border
from .linear_forms import Form, LinearFormPass, SumPart

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def to_module(op: AffineConv, axis: int, ndim: int, dtype: torch.dtype, device) -> nn.Module:
    """A module computing `op` on a rank-`ndim` tensor whose channels are at `axis`.

    The float64 weights are cast once, straight to `dtype`.
    """
    keep_bias = bool(op.bias.any())
    weight, bias = op.weight, op.bias
    if op.is_per_channel:
        # A per-channel map as `x * scale + shift`: a depthwise 1x1 convolution computes the same,
        # several times slower on CPUs.
        m = ChannelAffine(torch.empty(op.out_channels, device="meta"), torch.empty(op.out_channels, device="meta"),
                          axis, ndim)
        weight, keep_bias = op.weight.reshape(-1), True
    elif op.nd >= 1:
        m = _uninitialized(_CONV[op.nd], op.in_channels, op.out_channels, op.kernel_size, op.stride, op.padding,
                           op.dilation, op.groups, bias=keep_bias,
                           padding_mode=op.padding_mode if op.has_padding else "zeros", device="meta")
    else:
        dense = affine.regrouped(op, 1)
        weight = dense.weight
        if axis == ndim - 1:
            m = _uninitialized(nn.Linear, op.in_channels, op.out_channels, bias=keep_bias, device="meta")
        else:
            m = AxisLinear(op.in_channels, op.out_channels, axis, bias=keep_bias, device="meta")
    params = [("weight" if not isinstance(m, ChannelAffine) else "scale", weight)]
    if keep_bias:
        params.append(("bias" if not isinstance(m, ChannelAffine) else "shift", bias))
    for name, value in params:
        shape = getattr(m, name).shape
        setattr(m, name, nn.Parameter(value.reshape(shape).to(device=device, dtype=dtype)))
    return m


def _noop() -> None:
    pass


def _uninitialized(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """`cls(*args, **kwargs)` without its random initialization (its parameters are replaced at
    once): on the meta device that initialization still costs a large share of lowering."""
    module = cls.__new__(cls)
    object.__setattr__(module, "reset_parameters", _noop)  # found before the class's own method
    try:
        module.__init__(*args, **kwargs)
    finally:
        object.__delattr__(module, "reset_parameters")
    return module


def _replay(step_node: torch.fx.Node, value: torch.fx.Node, graph: torch.fx.Graph, current) -> torch.fx.Node:
    """A copy of a layout node reading `value` instead of its tensor input."""
    args = (value,) + torch.fx.node.map_arg(tuple(step_node.args[1:]), current)
    kwargs = torch.fx.node.map_arg(dict(step_node.kwargs), current)
    return graph.create_node(step_node.op, step_node.target, args, kwargs)


def _copy_meta(value: torch.fx.Node, like: torch.fx.Node) -> None:
    value.meta.update({k: like.meta[k] for k in ("reparam_shape", "tensor_meta") if k in like.meta})


def _crop_meta(cropped: torch.fx.Node, value: torch.fx.Node, amounts) -> None:
    """Shape and dtype of `value` cropped by `amounts` (when `value`'s are known)."""
    meta = value.meta.get("tensor_meta")
    if meta is None:
        return
    shape = tuple(meta.shape[:2]) + tuple(n - 2 * a for n, a in zip(meta.shape[2:], amounts))
    cropped.meta["tensor_meta"] = meta._replace(shape=shape)
    cropped.meta["reparam_shape"] = shape


def _set_channels(value: torch.fx.Node, axis: int, channels: int) -> None:
    """Record `channels` at `axis` in `value`'s shape, where a fused operator changed the channel
    count of the node whose shape was copied (a Linear composed into the conv before a permute)."""
    meta = value.meta.get("tensor_meta")
    shape = value.meta.get("reparam_shape")
    if shape is None or axis >= len(shape) or shape[axis] == channels:
        return
    shape = shape[:axis] + (channels,) + shape[axis + 1:]
    value.meta["reparam_shape"] = shape
    if meta is not None:
        value.meta["tensor_meta"] = meta._replace(shape=torch.Size(shape))


class _Lowering:
    def __init__(self, gm: torch.fx.GraphModule, forms: LinearFormPass, dtype_of, device):
        self.gm, self.forms, self.dtype_of, self.device = gm, forms, dtype_of, device
        self.graph = gm.graph
        self.regions: list[FusedRegion] = []
        self.counter = 0
        self.replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # original node -> the value standing for it
        self.owned = {t.data_ptr() for m in module_table(gm).values() for store in (m._parameters, m._buffers)
                      for t in store.values() if t is not None and t.numel()}

    def current(self, n: torch.fx.Node) -> torch.fx.Node:
        return self.replaced.get(n, n)

    def emit(self, form: Form, node: torch.fx.Node) -> torch.fx.Node:
        """Nodes computing `form` (inserted at the current point); returns the value node."""
        graph = self.graph
        value = self.current(form.source)
        for step in form.before:
            value = _replay(step.node, value, graph, self.current)
        if not form.op.is_identity:
            name = f"fused_{self.counter}"
            self.counter += 1
            op = form.op
            if any(p < 0 for p in op.padding):  # a crop folded in (passes/crop.py): slice, then convolve
                amounts, op = affine.split_crop(op)
                cropped = graph.call_function(crop_border, (value, list(amounts)))
                _crop_meta(cropped, value, amounts)
                value = cropped
            module = to_module(op, form.op_axis, form.op_ndim, self.dtype_of(node), self.device)
            for param in module.parameters():
                # An operation lowered unchanged may hold its original parameter: no two modules
                # of the result share memory.
                if param.data_ptr() in self.owned:
                    param.data = param.data.clone()
            self.gm.add_submodule(name, module)
            value = graph.call_module(name, (value,))
            value.meta["reparam_members"] = tuple(dict.fromkeys(form.members))  # for the report's checks
            op_out = form.after[0].node.args[0] if form.after else node
            _copy_meta(value, op_out)
            _set_channels(value, form.op_axis, form.op.out_channels)
            if form.after:
                self.replaced[op_out] = value  # `reshape_as(op_out)` below reads its shape from here
            if form.combined:
                members = tuple(dict.fromkeys(form.members))  # `x + x` lists x's members once
                self.regions.append(FusedRegion(name, form.op.describe(), members, self.current(form.source).name))
        if form.after:
            self._serve_chain_reads(form.after[0].node.args[0], value)
        for step in form.after:
            value = _replay(step.node, value, graph, self.current)
            value.meta.update(step.node.meta)
            if step.axis is not None:
                _set_channels(value, step.axis, form.op.out_channels)
            self._serve_chain_reads(step.node, value)
        return value

    def _serve_chain_reads(self, point: torch.fx.Node, value: torch.fx.Node) -> None:
        """Metadata reads of values folded into a layout chain at `point` now read `value`, its
        lowered value there (same metadata), and are moved after it with whatever they feed: the
        sizes `b, n, c = y.shape` that the chain's later layout steps (replayed next) use."""
        reads = self.forms.chain_reads.pop(point, None)
        if not reads:
            return
        for reader, old in reads:
            reader.replace_input_with(old, value)
        _move_after([reader for reader, _ in reads], value)

    def emit_sum(self, parts: list[SumPart], node: torch.fx.Node) -> torch.fx.Node:
        """`sum(sign * part)` for a sum kept as several operators."""
        values = []
        for part in parts:
            v = self.emit(part.form, node) if part.form is not None else self.current(part.node)
            values.append((v, part.sign))
        values.sort(key=lambda vs: vs[1] < 0)  # start from a positive term where there is one
        total, sign = values[0]
        if sign != 1.0:
            total = self.graph.call_function(operator.mul, (total, sign))
            _copy_meta(total, node)
        for v, s in values[1:]:
            if s in (1.0, -1.0):
                total = self.graph.call_function(operator.add if s == 1.0 else operator.sub, (total, v))
            else:
                scaled = self.graph.call_function(operator.mul, (v, s))
                _copy_meta(scaled, node)
                total = self.graph.call_function(operator.add, (total, scaled))
            _copy_meta(total, node)
        return total

    def run(self) -> list[FusedRegion]:
        forms = self.forms
        for reader, (old, new) in forms.rewire.items():
            reader.replace_input_with(old, new)
        for node in list(self.graph.nodes):
            parts = forms.sum_parts.get(node)
            # As stored (float32 where that is exact): the module casts its weights to the
            # model's dtype anyway, and the values are the same as in float64.
            form: Form | None = forms.forms.stored(node)
            if node in forms.absorbed or not node.users or (form is None and parts is None):
                continue
            if parts is not None:
                with self.graph.inserting_before(node):
                    value = self.emit_sum(parts, node)
            elif form.op.is_identity and not form.has_layout:
                value = self.current(form.source)
            elif form.origin is node:
                value = node  # exactly the original operation: keep it as written
            else:
                with self.graph.inserting_before(node):
                    value = self.emit(form, node)
            # The float64 form is not read again: free it now its module holds the cast weights.
            forms.forms.pop(node, None)
            forms.sum_parts.pop(node, None)
            self.replaced[node] = value
            self._serve_reads(node, value)
            if value is not node:
                node.replace_all_uses_with(value)
        # Reads of the shape of absorbed values that a lowered value of equal shape now serves.
        for node in forms.absorbed:
            for reader in list(node.users):
                if node in self.replaced and reader.graph is self.graph:
                    reader.replace_input_with(node, self.replaced[node])
        remove_dead_nodes(self.gm)
        return self.regions

    def _serve_reads(self, node: torch.fx.Node, value: torch.fx.Node) -> None:
        """Metadata reads of nodes folded into `node` now read `value` (same shape), after it."""
        reads = self.forms.carried_reads.get(node)
        if not reads:
            return
        movers = []
        for reader, old in reads:
            reader.replace_input_with(old, value)
            movers.append(reader)
        _move_after(movers, value)


def _move_after(readers: list[torch.fx.Node], anchor: torch.fx.Node) -> None:
    """Move `readers`, and whatever depends on them, after `anchor`, keeping their order."""
    readers = [r for r in readers if r._sort_key < anchor._sort_key]
    if not readers:
        return
    marked = set(readers)
    to_move = []
    node = min(readers, key=lambda n: n._sort_key)
    while node is not anchor and node.op != "root":
        if node in marked or any(a in marked for a in node.all_input_nodes):
            marked.add(node)
            to_move.append(node)
        node = node.next
    point = anchor
    for n in to_move:
        point.append(n)
        point = n


def lower_forms(gm: torch.fx.GraphModule, forms: LinearFormPass, dtype_of, device) -> list[FusedRegion]:
    """Rewrite `gm` in place; returns the regions that became new modules."""
    return _Lowering(gm, forms, dtype_of, device).run()
