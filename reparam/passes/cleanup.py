"""Graph cleanup: removing nodes nobody reads, without dropping in-place updates."""

from __future__ import annotations

import operator

import torch.fx

_IN_PLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def is_in_place(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Does `node` overwrite its first argument?"""
    if not node.args:
        return False
    if node.op == "call_function":
        return node.target in _IN_PLACE_FUNCS or node.kwargs.get("inplace") is True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def remove_dead_nodes(gm: torch.fx.GraphModule) -> None:
    """Erase unused nodes, last first; in-place updates and impure calls stay."""
    for node in reversed(list(gm.graph.nodes)):
        if node.users or node.op in ("placeholder", "output"):
            continue
        if node.op != "get_attr" and (node.is_impure() or is_in_place(gm, node)):
            continue
        gm.graph.erase_node(node)
