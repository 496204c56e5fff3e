"""Spatial crops: a convolution after a crop is the same convolution with less padding.

ACNet's "crop layer" (used where a branch's padding is smaller than half its kernel) and other
third-party code drop the same number of positions from both ends of a spatial axis:

    x[:, :, a:-a, :]      x[..., a:H - a, :] with H = x.shape[2]      x.narrow(2, a, x.size(2) - 2 * a)
    F.pad(x, [-a, -a, -b, -b])

Such a crop is an identity 1x1 convolution with negative padding (`affine.crop`), and

    conv(x[..., a:-a], padding=p) == conv(x, padding=p - a)        when p <= 0 on that axis

for every stride and dilation: output `i` reads input `i*s - p + a + j*d` either way, and reads no
zero padding either way. A convolution that pads the cropped tensor (p > 0) reads zeros where the
uncropped input has values: `affine.compose_refusal` says so. Negative padding is fine inside a sum
(ACNet's 3x1 and 1x3 branches on cropped inputs line up with the 3x3 branch at padding 0); a fused
operator left with negative padding is lowered as a slice and then the convolution.

    pattern   a slice, `narrow` or negative `F.pad` of the spatial axes of an [N, C, *spatial] tensor
    check     the batch and channel axes are whole, steps are 1, and each axis loses as many
              positions at its start as at its end, whatever the input size (a fixed stop index, or
              a different amount at each end, depends on the size or is not a symmetric padding)
    rewrite   the operation becomes `affine.crop`, which the linear-form pass composes

A crop that fails the check stays as written; the reason is reported when a linear operation reads
the crop or produces its input (elsewhere a slice is nothing to report).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import affine
from ..trace import shape_of

_NEIGHBOUR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                      nn.Linear)
_NEIGHBOUR_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, F.batch_norm}


class NotACrop(Exception):
    """The operation reads or drops something other than the two ends of spatial axes."""


def _size_of(value, x: torch.fx.Node, axis: int, ndim: int) -> bool:
    """Is `value` the size of `x` along `axis` (`x.shape[axis]`, `x.size(axis)`, `x.size()[axis]`)?"""
    if not isinstance(value, torch.fx.Node):
        return False
    if value.op == "call_method" and value.target == "size" and value.args and value.args[0] is x:
        dim = value.args[1] if len(value.args) > 1 else value.kwargs.get("dim")
        return isinstance(dim, int) and dim % ndim == axis
    if value.op == "call_function" and value.target is operator.getitem and len(value.args) == 2:
        whole, dim = value.args
        if not isinstance(dim, int) or not isinstance(whole, torch.fx.Node):
            return False
        if whole.op == "call_function" and whole.target is operator.getitem and len(whole.args) == 2 \
                and isinstance(whole.args[1], slice):  # `H, W = x.shape[-2:]`
            part = whole.args[1]
            if part.step not in (None, 1) or not isinstance(part.start, (int, type(None))) \
                    or part.stop is not None:
                return False
            start = part.start or 0
            dim = (start % ndim if start < 0 else start) + dim
            whole = whole.args[0]
        if dim % ndim != axis:
            return False
        if whole.op == "call_function" and whole.target is getattr and whole.args[0] is x:
            return whole.args[1] == "shape"
        if whole.op == "call_method" and whole.target == "size" and whole.args[0] is x and len(whole.args) == 1:
            return not whole.kwargs
    return False


def _from_end(value, x: torch.fx.Node, axis: int, ndim: int) -> int | None:
    """`k` when `value` is `size - k` (an index `k` positions before the end of the axis), else None."""
    if _size_of(value, x, axis, ndim):
        return 0
    if isinstance(value, torch.fx.Node) and value.op == "call_function" and value.target is operator.sub \
            and len(value.args) == 2 and isinstance(value.args[1], int) and _size_of(value.args[0], x, axis, ndim):
        return value.args[1]
    return None


def _normalized(key, ndim: int):
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is None for k in key) or sum(k is Ellipsis for k in key) > 1:
        raise NotACrop
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (ndim - len(key))
    if len(key) != ndim or not all(isinstance(k, slice) for k in key):
        raise NotACrop
    return key


def _slice_ends(s: slice, x, axis: int, ndim: int) -> tuple[int, int] | str:
    """(positions dropped at the start, at the end) of one axis, or why that depends on the size."""
    if s.step not in (None, 1):
        return "the slice has a step: it keeps every other position, not a crop"
    start, stop = s.start, s.stop
    if start is None:
        first = 0
    elif isinstance(start, int) and start >= 0:
        first = start
    else:
        return "the slice starts at a position counted from the end: how much it drops depends on the input size"
    if stop is None:
        return first, 0
    if isinstance(stop, int):
        if stop < 0:
            return first, -stop
        return "the slice ends at a fixed index: how much it drops depends on the input size"
    last = _from_end(stop, x, axis, ndim)
    if last is None:
        return "the slice ends at a computed index that is not the axis size minus a constant"
    return first, last


def crop_amounts(node: torch.fx.Node) -> tuple[torch.fx.Node, list[tuple[int, int]]] | str | None:
    """(input, [(start, end) dropped per spatial axis]) when `node` crops the spatial axes of its
    [N, C, *spatial] input; a reason when it does so in a way no padding expresses; None when it
    is not such a crop at all."""
    x = node.args[0] if node.args else None
    shape = shape_of(x)
    if shape is None or len(shape) < 3:
        return None
    ndim = len(shape)
    try:
        if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
            key = _normalized(node.args[1], ndim)
            if key[0] != slice(None) or key[1] != slice(None):
                return None  # batch or channel slices: a split, not a crop
            ends = [_slice_ends(s, x, axis, ndim) for axis, s in enumerate(key) if axis >= 2]
        elif (node.op == "call_method" and node.target == "narrow") or \
                (node.op == "call_function" and node.target is torch.narrow):
            bound = dict(zip(("input", "dim", "start", "length"), node.args), **node.kwargs)
            dim, start, length = bound.get("dim"), bound.get("start"), bound.get("length")
            if not isinstance(dim, int) or dim % ndim < 2 or not isinstance(start, int) or start < 0:
                return None
            axis = dim % ndim
            ends = [(0, 0)] * (ndim - 2)
            if isinstance(length, int):
                ends[axis - 2] = "narrow keeps a fixed length: how much it drops depends on the input size"
            else:
                # `x.size(d) - 2a` as length, with start a: drops a at both ends.
                last = _from_end(length, x, axis, ndim)
                ends[axis - 2] = ("narrow keeps a computed length that is not the axis size minus a constant"
                                  if last is None else (start, last - start))
        else:
            return None
    except NotACrop:
        return None
    for k, e in enumerate(ends):
        if isinstance(e, str):
            return f"{e} (axis {k + 2})"
    return x, ends


def crop_refusal(ends: list[tuple[int, int]]) -> str | None:
    """Why cropping `ends` is not a symmetric padding, or None."""
    for k, (a, b) in enumerate(ends):
        if a != b:
            return (f"drops {a} position(s) at the start of axis {k + 2} and {b} at its end: a convolution "
                    "pads both ends alike, so this crop is no padding of it")
        if a < 0:
            return f"drops a negative number of positions on axis {k + 2}"
    return None


def crop_border(x: torch.Tensor, amounts: list[int]) -> torch.Tensor:
    """`x` without `amounts[k]` positions at both ends of spatial axis `k` (of [N, C, *spatial]).

    The slice before a fused convolution left with negative padding: part of that operator, so it
    is a function of its own rather than a slice the compiler would read as a crop again."""
    return x[affine.crop_key(tuple(amounts))]


def classify_crop(node: torch.fx.Node):
    """(input, `affine.crop` operator) for a symmetric crop; (input, None) for a slice that keeps
    everything; (input, reason) for a crop no padding expresses next to a linear operation; None
    otherwise."""
    found = crop_amounts(node)
    if found is None:
        return None
    if isinstance(found, str):
        x = node.args[0]
        return (x, found) if _near_linear(node, x) else None
    x, ends = found
    reason = crop_refusal(ends)
    if reason is not None:
        return (x, reason) if _near_linear(node, x) else None
    if not any(a or b for a, b in ends):
        return x, None  # the whole tensor (`x[:, :, 0:H]`): an identity
    shape = shape_of(x)
    return x, affine.crop(shape[1], [a for a, _ in ends], len(shape) - 2)


def _near_linear(node: torch.fx.Node, x: torch.fx.Node) -> bool:
    """Does a convolution, norm or linear layer produce `x` or read `node`? (Recognised by type
    alone: the refusal only decides whether the report mentions the crop.)"""
    def linear(n) -> bool:
        if n.op == "call_module":
            return isinstance(n.graph.owning_module.get_submodule(n.target), _NEIGHBOUR_MODULES)
        return n.op == "call_function" and n.target in _NEIGHBOUR_FUNCTIONS

    return linear(x) or any(linear(u) for u in node.users)
