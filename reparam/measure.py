"""Sizes of a traced model: graph nodes, parameters, multiply-accumulates for an input shape."""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .report import Counts
from .trace import shape_of

_MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.mm}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(gm: torch.fx.GraphModule) -> int:
    """Multiply-accumulates of convolutions, linear layers and matrix products.

    Uses the shapes stored by `trace.propagate_shapes`; other operations (normalization,
    activations, additions) are not counted, as is usual for MAC figures.
    """
    total = 0
    for node in gm.graph.nodes:
        out = shape_of(node)
        if out is None:
            continue
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                total += math.prod(out) * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            elif isinstance(m, nn.Linear):
                total += math.prod(out) * m.in_features
        elif node.op == "call_function":
            if node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear):
                w = shape_of(node.args[1]) if len(node.args) > 1 else None
                w = w or _attr_shape(gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
                if w:
                    total += math.prod(out) * math.prod(w[1:])
            elif node.target in _MATMUL and len(node.args) == 2:
                a = shape_of(node.args[0])
                if a:
                    total += math.prod(out) * a[-1]
        elif node.op == "call_method" and node.target in ("matmul", "bmm", "mm", "__matmul__"):
            a = shape_of(node.args[0])
            if a:
                total += math.prod(out) * a[-1]
    return total


def _attr_shape(gm, node):
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return tuple(obj.shape)
    return None


def counts(gm: torch.fx.GraphModule) -> Counts:
    return Counts(nodes=len(gm.graph.nodes), params=count_params(gm), macs=count_macs(gm))
