"""Lowering: every materialized linear form becomes one fresh module applied to its source.

Nodes whose forms were folded into a consumer lose their last user and are removed; modules and
constants nobody reads any more are dropped from the GraphModule.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from .. import affine
from ..affine import AffineConv
from ..modules import AxisLinear, ChannelAffine
from ..report import FusedRegion
from .cleanup import remove_dead_nodes
from .linear_forms import Form, LinearFormPass

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def to_module(op: AffineConv, axis: int, ndim: int, dtype: torch.dtype, device) -> nn.Module:
    """A module computing `op` on a rank-`ndim` tensor whose channels are at `axis`.

    The float64 weights are cast once, straight to `dtype`.
    """
    keep_bias = bool(op.bias.any())
    weight, bias = op.weight, op.bias
    if op.nd >= 1:
        m = _CONV[op.nd](op.in_channels, op.out_channels, op.kernel_size, op.stride, op.padding, op.dilation,
                         op.groups, bias=keep_bias, padding_mode=op.padding_mode if op.has_padding else "zeros",
                         device="meta")
    elif op.is_per_channel:
        m = ChannelAffine(torch.empty(op.out_channels, device="meta"), torch.empty(op.out_channels, device="meta"),
                          axis, ndim)
        weight, keep_bias = op.weight.reshape(-1), True
    else:
        dense = affine.regrouped(op, 1)
        weight = dense.weight
        if axis == ndim - 1:
            m = nn.Linear(op.in_channels, op.out_channels, bias=keep_bias, device="meta")
        else:
            m = AxisLinear(op.in_channels, op.out_channels, axis, bias=keep_bias, device="meta")
    params = [("weight" if not isinstance(m, ChannelAffine) else "scale", weight)]
    if keep_bias:
        params.append(("bias" if not isinstance(m, ChannelAffine) else "shift", bias))
    for name, value in params:
        shape = getattr(m, name).shape
        setattr(m, name, nn.Parameter(value.reshape(shape).to(device=device, dtype=dtype)))
    return m


def _replay(step_node: torch.fx.Node, value: torch.fx.Node, graph: torch.fx.Graph, current) -> torch.fx.Node:
    """A copy of a layout node reading `value` instead of its tensor input."""
    args = (value,) + torch.fx.node.map_arg(tuple(step_node.args[1:]), current)
    kwargs = torch.fx.node.map_arg(dict(step_node.kwargs), current)
    return graph.create_node(step_node.op, step_node.target, args, kwargs)


def lower_forms(gm: torch.fx.GraphModule, forms: LinearFormPass, dtype_of, device,
                prefix: str = "") -> list[FusedRegion]:
    """Rewrite `gm` in place; returns the regions that became new modules."""
    graph = gm.graph
    for query, source in forms.rewire.items():
        query.replace_input_with(query.args[0], source)
    regions: list[FusedRegion] = []
    counter = 0
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # materialized node -> the value now standing for it

    def current(n: torch.fx.Node) -> torch.fx.Node:
        return replaced.get(n, n)

    for node in list(graph.nodes):
        form: Form | None = forms.forms.get(node)
        if form is None or node in forms.absorbed or not node.users:
            continue
        if form.op.is_identity and not form.has_layout:
            replaced[node] = current(form.source)
            node.replace_all_uses_with(replaced[node])
            continue
        if form.origin is node:
            continue  # exactly the original operation: keep it as written
        dtype = dtype_of(node)
        with graph.inserting_before(node):
            value = current(form.source)
            for step in form.before:
                value = _replay(step.node, value, graph, current)
            if not form.op.is_identity:
                name = f"{prefix}fused_{counter}"
                counter += 1
                gm.add_submodule(name, to_module(form.op, form.op_axis, form.op_ndim, dtype, device))
                value = graph.call_module(name, (value,))
                op_out = form.after[0].node.args[0] if form.after else node
                value.meta.update({k: op_out.meta[k] for k in ("reparam_shape", "tensor_meta") if k in op_out.meta})
                members = tuple(dict.fromkeys(form.members))  # `x + x` lists x's members once
                regions.append(FusedRegion(name, form.op.describe(), members, current(form.source).name))
            for step in form.after:
                value = _replay(step.node, value, graph, current)
                value.meta.update(step.node.meta)
        replaced[node] = value
        node.replace_all_uses_with(value)
    remove_dead_nodes(gm)
    return regions
