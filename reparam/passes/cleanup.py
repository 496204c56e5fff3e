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


# Pure functions of Python values: applied to the same arguments they give the same result.
_PURE_ON_METADATA = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                     operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
                     operator.truediv, operator.and_, operator.or_, operator.not_, operator.getitem,
                     len}
_ASSERTS = {torch._assert}
_RESHAPING_IN_PLACE = {"unsqueeze_", "squeeze_", "resize_", "resize_as_", "t_", "transpose_", "swapdims_",
                       "swapaxes_", "as_strided_", "set_"}


def deduplicate_metadata_checks(gm: torch.fx.GraphModule, is_metadata_read) -> int:
    """Merge repeated reads of a value's metadata and repeated asserts on them; return how many
    asserts were removed.

    Model libraries start every norm layer with a check such as `_assert(x.ndim == 4, ...)`. When
    a convolution absorbs several such norms (a branch sum over BatchNorm layers), their checks all
    read the fused value and repeat one another, hundreds of Python calls per forward pass. An fx
    graph has no control flow, so a later node computing the same pure function of the same
    arguments as an earlier one always sees the same value: it is replaced by the earlier one, and
    an assert of a condition already asserted is dropped. Checks on
    different values, or with different conditions, all stay.
    """
    if any(n.op == "call_method" and n.target in _RESHAPING_IN_PLACE for n in gm.graph.nodes):
        return 0  # a value's shape may change between two reads
    pure: set[torch.fx.Node] = set()
    seen: dict[tuple, torch.fx.Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if node.op in ("call_function", "call_method") and tensor_args and (
                is_metadata_read(node, node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node)
                else False):
            kind = "read"
        elif (node.op == "call_function" and node.target in _PURE_ON_METADATA and tensor_args
              and all(a in pure for a in tensor_args) and not node.kwargs):
            kind = "pure"
        elif node.op == "call_function" and node.target in _ASSERTS and tensor_args and tensor_args[0] in pure:
            kind = "assert"
        else:
            continue
        try:
            # An assert on a condition already asserted can never fail: its message does not matter
            # (traced messages differ anyway, they name the proxies they were formatted with).
            key = ((node.op, node.target, node.args[0]) if kind == "assert"
                   else (node.op, node.target, _key(node.args), _key(node.kwargs)))
        except TypeError:  # an unhashable argument: leave the node alone
            if kind != "assert":
                pure.add(node)
            continue
        earlier = seen.get(key)
        if earlier is None:
            seen[key] = node
            if kind != "assert":
                pure.add(node)
            continue
        if kind == "assert":
            gm.graph.erase_node(node)
            removed += 1
        else:
            node.replace_all_uses_with(earlier)
            gm.graph.erase_node(node)
    if removed:
        remove_dead_nodes(gm)
    return removed


def _key(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_key, value))
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    hash(value)
    return value
