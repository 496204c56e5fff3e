"""Padding whose border is filled afterwards: DBB's BNAndPad as its authors write it.

    out = bn(x)
    out = F.pad(out, [p, p, p, p])
    out[:, :, 0:p, :] = v;  out[:, :, -p:, :] = v;  out[:, :, :, 0:p] = v;  out[:, :, :, -p:] = v

with `v` (shape (1, C, 1, 1)) the BatchNorm's shift, computed from its parameters. Traced, this is
`F.pad` and four `operator.setitem` calls that update the padded tensor in place, which makes every
reader of it unfusible. `fill_borders` recognises the pattern (before functionalization) and
replaces it with one call `pad_border(x, padding, v)`, which computes exactly the same thing out of
place. The rule in `commute.visit_pad_border` then treats it as algebra: when `v` is what the
pointwise map before it gives for a zero input (its bias), `pad_border(op(x))` is `op` applied to
`x` padded with zeros, a composition that folds into the valid convolution that follows.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F

from ..trace import shape_of


def pad_border(x: torch.Tensor, padding: list[int], value: torch.Tensor) -> torch.Tensor:
    """`F.pad(x, padding)` (the same `p` on every side of the last two axes) with the border set
    to `value` (broadcast like a per-channel `(1, C, 1, 1)` tensor) instead of zeros."""
    p = padding[0]
    out = F.pad(x, [p] * 4)
    if p > 0:
        out[:, :, :p, :] = value
        out[:, :, -p:, :] = value
        out[:, :, :, :p] = value
        out[:, :, :, -p:] = value
    return out


def _normalized_key(key, ndim: int):
    """A setitem key as one slice per axis, or None when it uses anything else."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        if sum(k is Ellipsis for k in key) > 1:
            return None
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (ndim - len(key))
    if len(key) != ndim or not all(isinstance(k, slice) for k in key):
        return None
    return key


def _is_whole(s: slice, size: int) -> bool:
    return s.step in (None, 1) and s.start in (None, 0) and (s.stop is None or (isinstance(s.stop, int)
                                                                                   and s.stop >= size))


def _border_side(s: slice, size: int, p: int) -> str | None:
    """"first" for the first `p` rows, "last" for the last `p`, else None."""
    if s.step not in (None, 1):
        return None
    start, stop = s.start, s.stop
    if not all(v is None or isinstance(v, int) for v in (start, stop)):
        return None
    start = 0 if start is None else (start + size if start < 0 else start)
    stop = size if stop is None else (stop + size if stop < 0 else min(stop, size))
    if (start, stop) == (0, p):
        return "first"
    if (start, stop) == (size - p, size):
        return "last"
    return None


def _same_value(a, b) -> bool:
    """One value: the same node, the same attribute read twice, or equal numbers."""
    if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
        return a is b or (a.op == b.op == "get_attr" and a.target == b.target)
    return type(a) is type(b) and isinstance(a, (int, float)) and a == b


def _border_fill(pad: torch.fx.Node, p: int):
    """(setitem nodes, value) when `pad`'s first readers set exactly its four borders of width `p`
    to one value and nothing reads it in between, else None."""
    shape = shape_of(pad)
    users = list(pad.users)
    order = {n: i for i, n in enumerate(pad.graph.nodes)}
    fills = [u for u in users if u.op == "call_function" and u.target is operator.setitem and u.args[0] is pad]
    if len(fills) != 4 or any(len(f.args) != 3 or f.kwargs for f in fills):
        return None
    value = fills[0].args[2]
    if not all(_same_value(f.args[2], value) for f in fills):
        return None
    last = max(order[f] for f in fills)
    if any(order[u] < last for u in users if u not in fills):
        return None  # read before it is filled
    sides = set()
    for f in fills:
        key = _normalized_key(f.args[1], len(shape))
        if key is None or not _is_whole(key[0], shape[0]) or not _is_whole(key[1], shape[1]):
            return None
        h, w = key[2], key[3]
        if _is_whole(w, shape[3]) and _border_side(h, shape[2], p):
            sides.add(("h", _border_side(h, shape[2], p)))
        elif _is_whole(h, shape[2]) and _border_side(w, shape[3], p):
            sides.add(("w", _border_side(w, shape[3], p)))
        else:
            return None
    if len(sides) != 4:
        return None
    return fills, value


def fill_borders(gm: torch.fx.GraphModule) -> int:
    """Replace `F.pad(x, [p]*4)` + four border assignments by `pad_border`; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.pad:
            continue
        a = dict(zip(("input", "pad", "mode", "value"), node.args), **node.kwargs)
        if set(a) - {"input", "pad", "mode", "value"} or a.get("mode", "constant") != "constant" \
                or a.get("value") not in (None, 0, 0.0):
            continue
        x, pad = a.get("input"), a.get("pad")
        shape = shape_of(node)
        if shape is None or len(shape) != 4 or not isinstance(pad, (list, tuple)) or len(pad) != 4 \
                or not all(isinstance(v, int) and v == pad[0] and v > 0 for v in pad):
            continue
        found = _border_fill(node, pad[0])
        if found is None:
            continue
        fills, value = found
        last = max(fills, key=lambda f: list(gm.graph.nodes).index(f))
        with gm.graph.inserting_after(last):
            filled = gm.graph.call_function(pad_border, (x, list(pad), value))
        filled.meta.update({k: node.meta[k] for k in ("reparam_shape", "tensor_meta") if k in node.meta})
        for user in list(node.users):
            if user not in fills:
                user.replace_input_with(node, filled)
        for f in fills:
            gm.graph.erase_node(f)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count
