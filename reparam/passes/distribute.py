"""Per-channel maps moved across concatenations, channel splits and channel shuffles; sums written
with `stack`.

Four rewrites of how third-party code writes linear structures, so that the linear-form pass
(`linear_forms.py`) sees maps next to the operations that can absorb them. Each is exact.

1. A per-channel map after a concatenation along its channel axis acts on each input separately
   (YOLOv5's `BottleneckCSP`: `bn(cat(cv3(...), cv2(x)))`):

       m(cat(x_1, ..., x_n)) = cat(m[c_1](x_1), ..., m[c_n](x_n))

   where `m[c_k]` is the map restricted to the channels of `x_k`.

       pattern   a per-channel map (BatchNorm, functional batch_norm, a per-channel scale or shift)
                 whose input is `torch.cat` along the axis the map's constants vary along, directly
                 or through identities (Dropout, nn.Identity, `contiguous`), which commute with it
       check     the concatenation has no other reader; every input is produced by a linear
                 operation along that axis (conv, Linear, BatchNorm, scale...) whose only reader is
                 the concatenation, so that each slice of the map folds into it
       rewrite   `x_k * scale[c_k] + shift[c_k]` on each input; the map's readers read the concatenation

   A chain of maps (a layer scale after the BatchNorm) moves one map at a time. The dual, a map on
   each input before the concatenation, needs no rewrite: each folds into its own input.

2. Per-channel maps on the pieces of a channel split combine into one map before the split (a
   gated block's `a, b = conv(x).chunk(2, 1); bn1(a) * sigmoid(bn2(b))`):

       split(y)[k] -> m_k(split(y)[k])   ==   split(m(y))[k]   with m = m_1 | m_2 | ... (identity elsewhere)

   Splits are `chunk`, `split` (one size or a list of sizes), `tensor_split` (sections or
   indices), `unbind`, functional or as methods, and channel slices `y[:, a:b]`. `unbind` removes the
   split axis from its pieces: only maps with scalar constants move (`q, k, v = y.unbind(1); q * s`).
   A slice along another axis than a map's (a spatial crop) commutes with it and is left to the
   linear-form pass.

       pattern   a value `y` read only by channel splits (metadata reads aside), with per-channel
                 maps along the split axis on some pieces
       check     `y` is produced by a linear operation along that axis; a piece whose map moves is
                 read by that map only; no other piece read overlaps its channels
       rewrite   `y * scale + shift` feeds the splits; each moved map's readers read its piece

3. A sum written with `stack` (`torch.stack([b(x) for b in branches]).sum(0)`) is a sum of
   branches; `mean` over the stacked axis is that sum divided by `n`:

       pattern   `stack(xs, d)` read only by `sum`/`mean` over `d`
       check     `keepdim` is False, no `dtype` is asked for, the stack has no other reader
       rewrite   `((x_1 + x_2) + ...)` (then `/ n` for a mean); the linear-form pass groups the branches

4. A per-channel map after a channel permutation (ShuffleNet's channel shuffle, written as
   `x.view(b, g, c // g, h, w).transpose(1, 2).contiguous().view(b, c, h, w)`, with `reshape`,
   `permute`, `torch.channel_shuffle` or `nn.ChannelShuffle`) acts on the permuted channels:

       m(P(y)) = P(m'(y))      with m' the map's constants permuted by P^-1

       pattern   a per-channel map along the channel axis after a chain of layout steps (view,
                 reshape, transpose, permute, contiguous, channel_shuffle) that starts and ends
                 with the shape of its input `y`
       check     every step keeps the batch axis and the spatial axes whole and in place (the
                 steps split, reorder and merge the channel axis only); replayed on the indices
                 of `y` the chain moves whole channels (P computed from the shapes); the chain and
                 the map are the only readers of each value; `y` is produced by a linear
                 operation that absorbs the moved map (or is a concatenation, for rewrite 1)
       rewrite   `y * scale[P^-1] + shift[P^-1]` feeds the chain; the map's readers read its end

5. Per-channel maps after an upsampling that copies pixels act on the copies (super-resolution and
   decoder heads: `bn(pixel_shuffle(conv(x)))`, `bn(upsample_nearest(conv1x1(x)))`):

       m(pixel_shuffle(y, r))   = pixel_shuffle(m'(y), r)  with m' each constant repeated r^2 times
       m(pixel_unshuffle(y, r)) = pixel_unshuffle(m'(y), r) with m' every r^2-th constant, when the
                                  map is constant over the r^2 channels that come from one channel
       p(nearest(y))            = nearest(p(y))            for any pointwise map p (a per-channel map,
                                  a 1x1 conv with stride 1 and no padding)

       pattern   a per-channel map (or, after nearest upsampling, a 1x1 conv) reading
                 `PixelShuffle`/`pixel_shuffle`, `PixelUnshuffle`/`pixel_unshuffle`, or nearest
                 `Upsample`/`interpolate`/`upsample_nearest`
       check     the upsampling has no other reader; its input is produced by a linear operation
                 along the channel axis with no other reader, which then absorbs the moved map
       rewrite   the map reads the upsampling's input and the upsampling reads the map (after
                 nearest upsampling the map node itself moves, fewer pixels to compute)

   The other way round, a per-channel map *before* a pixel (un)shuffle whose input no linear
   operation produces (a BatchNorm after an activation) moves after it, where the 1x1 conv reading
   the shuffle absorbs it (space-to-depth stems: `conv1x1(pixel_unshuffle(bn(x)))`); before a
   pixel shuffle only when constant over each r^2 channels that become one, else refused.

6. A per-channel map after a reshape that splits the channel axis of its input, the map's channels
   being the leading factor (RepMLPNet's fc3: a 1x1 conv over S*h*w channels, `reshape(-1, S, h, w)`,
   `BatchNorm2d(S)`): map channel s acts on input channels s*n .. s*n + n - 1 (row-major order):

       m(reshape(y)) = reshape(m'(y))   with m' each constant repeated n = C_in / C_map times

       pattern   a per-channel map along axis a of a reshape of `y`, where some axis k of `y` has
                 the elements before it that the axes before a have, and a multiple of their count
       check     the reshape has no other reader; `y` is produced by a linear operation along axis
                 k with no other reader
       rewrite   `y * scale' + shift'` feeds the reshape; the map's readers read the reshape

A failed check leaves the structure as written and returns the reason, which the report names,
when a linear operation stood next to it (a map between two nonlinearities is nothing to report).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..trace import Constants, dtype_of, shape_of
from .linear_forms import RefusalRecord, is_metadata_read
from .ops import _ADD, _DIV, _METHOD_ARITH, _MUL, _NEG, _SUB, Classifier, LinearOp, member_name, submodule

_CAT = {torch.cat, torch.concat, torch.concatenate}
_STACK = {torch.stack}
_CHUNK = {torch.chunk}
_SPLIT = {torch.split}
_REDUCE = {torch.sum: "sum", torch.mean: "mean"}
_MAP_KINDS = ("affine", "scale", "shift")
_NOT_LINEAR = LinearOp("none")


@dataclass(frozen=True)
class ChannelMap:
    """A per-channel map `y = x * scale + shift` along `axis`, as float64 vectors (or scalars)."""

    node: torch.fx.Node
    axis: int | None  # None: the constants are scalars, the same for every channel of any axis
    scale: torch.Tensor
    shift: torch.Tensor
    member: str

    def slice(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and shift for channels `lo:hi`."""
        return _part(self.scale, lo, hi), _part(self.shift, lo, hi)


def distribute_linear_maps(gm: torch.fx.GraphModule, consts: Constants) -> list[RefusalRecord]:
    """Apply the three rewrites of this module to `gm`; returns the refusals to report.

    Runs after constant folding (the maps' constants must be known) and before the linear-form
    pass. New constants are registered as buffers of `gm` and recorded in `consts`."""
    rewriter = _Rewriter(gm, consts)
    # Only the few nodes of the patterns are classified (classifying a conv reads its weights).
    for node in [n for n in gm.graph.nodes if _is_call(n, _STACK)]:
        rewriter.stack_sum(node)
    for node in [n for n in gm.graph.nodes if _is_permutation_step(gm, n)]:
        if node.users and not any(_is_permutation_step(gm, u) for u in _real_users(node)):
            rewriter.shuffle_maps(node)  # `node` ends a chain of layout steps
    split = {n.args[0]: None for n in gm.graph.nodes if _is_split_like(n)}
    for node in split:
        while node is not None and node.users:  # the maps' readers may be maps too: move them next
            node = rewriter.split_maps(node)
    for node in [n for n in gm.graph.nodes if _is_call(n, _CAT)]:
        if node.users:
            rewriter.cat_map(node)
    for node in [n for n in gm.graph.nodes if _step_kind(gm, n) == "reshape"]:
        while node.users and rewriter.split_axis_map(node):
            pass
    for node in [n for n in gm.graph.nodes if copying_upsample(gm, n) is not None]:
        while rewriter.upsample_map(node):  # a layer scale after the BatchNorm moves next
            pass
        while rewriter.map_before_shuffle(node):  # a BatchNorm before a layer scale moves next
            pass
    return rewriter.refusals


class _Rewriter:
    """The three rewrites on one graph, with the rules of the nodes they look at and their refusals."""

    def __init__(self, gm: torch.fx.GraphModule, consts: Constants):
        self.gm = gm
        self.consts = consts
        self._classifier: Classifier | None = None
        self._rules: dict[torch.fx.Node, LinearOp | None] = {}
        self.refusals: list[RefusalRecord] = []
        self._count = 0
        self._kept_maps: set[torch.fx.Node] = set()

    @property
    def classifier(self) -> Classifier:
        if self._classifier is None:  # built once a pattern is found (it scans the whole graph)
            self._classifier = Classifier(self.gm, self.consts)
        return self._classifier

    def refuse(self, where, reason: str) -> None:
        record = RefusalRecord(", ".join(where), reason)
        if not any((r.where, r.reason) == (record.where, record.reason) for r in self.refusals):
            self.refusals.append(record)

    def refuse_map(self, y: torch.fx.Node, m: ChannelMap, reason: str) -> None:
        """A map kept on its piece, named once (`split_maps` looks again after each move)."""
        if m.node not in self._kept_maps:
            self._kept_maps.add(m.node)
            self.refuse([member_name(y), m.member], reason)

    def classify(self, node) -> LinearOp | None:
        """The node's rule (ops.Classifier), computed once: forget it when its arguments change."""
        if not isinstance(node, torch.fx.Node):
            return None
        if node not in self._rules:
            self._rules[node] = self.classifier(node)
        return self._rules[node]

    # -- recognising maps and the operations that absorb them -------------------------------
    def channel_map(self, node: torch.fx.Node, x: torch.fx.Node) -> ChannelMap | None:
        """`node` as a per-channel map of its input `x`, or None."""
        if _mixes_channels(self.gm, node):
            return None  # not worth classifying (that would read its weights)
        rule = self.classify(node)
        if rule is None or rule.kind not in _MAP_KINDS or not rule.inputs or rule.inputs[0] is not x:
            return None
        shape = shape_of(x)
        if shape is None or len(shape) < 2 or shape_of(node) != shape:
            return None
        ndim = len(shape)
        if rule.kind == "affine":
            if not rule.op.is_per_channel or rule.axis is None or rule.op.in_channels != shape[rule.axis % ndim]:
                return None
            return ChannelMap(node, rule.axis % ndim, rule.op.weight.reshape(-1), rule.op.bias, rule.member)
        one = torch.tensor(1.0, dtype=torch.float64)
        if rule.kind == "scale":
            scale, shift = rule.scale, torch.tensor(0.0, dtype=torch.float64)
        else:
            scale, shift = torch.tensor(rule.sign, dtype=torch.float64), rule.shift
        axes = set()
        for c in (scale, shift):
            if c.dim() > ndim:
                return None
            axes |= {ndim - c.dim() + i for i, n in enumerate(c.shape) if n != 1}
        if len(axes) > 1:
            return None
        axis = axes.pop() if axes else None
        vectors = [c.reshape(-1) if c.numel() > 1 else c.reshape(()) for c in (scale * one, shift)]
        return ChannelMap(node, axis, vectors[0], vectors[1], rule.member)

    def is_linear(self, node) -> bool:
        rule = self.classify(node)
        return rule is not None and rule.kind in _MAP_KINDS

    def absorber_problem(self, producer, axis: int, readers) -> str | None:
        """Why `producer` would not absorb a per-channel map along `axis` placed before `readers`
        (which must be its only readers, metadata aside), or None when it would."""
        rule = self.classify(producer)
        name = _describe(self.gm, producer)
        if rule is None or rule.kind not in _MAP_KINDS:
            return f"it is produced by {name}, not a linear operation that could absorb its slice of the map"
        shape = shape_of(producer)
        if rule.kind == "affine":
            if rule.axis is None or rule.axis % len(shape) != axis:
                return f"it is produced by {name}, whose channels are not along axis {axis}"
        else:
            m = self.channel_map(producer, rule.inputs[0])
            if m is None or m.axis not in (None, axis):
                return f"it is produced by {name}, which is not a map along axis {axis}"
        others = [u for u in _real_users(producer) if u not in readers]
        if others:
            return f"{name} is also read by {', '.join(u.name for u in others)}"
        return None

    # -- building the maps ---------------------------------------------------------------------
    def insert_map(self, x: torch.fx.Node, axis: int, scale: torch.Tensor, shift: torch.Tensor,
                   name: str) -> torch.fx.Node:
        """`x * scale + shift` along `axis`, inserted right after `x`; the scale or shift is
        left out where it changes nothing."""
        value = x
        with self.gm.graph.inserting_before(x.next):  # each new node goes after the one before
            if not bool((scale == 1).all()):
                value = self._binary(operator.mul, value, scale, axis, f"{name}_scale", x)
            if bool(shift.any()):
                value = self._binary(operator.add, value, shift, axis, f"{name}_shift", x)
        return value

    def _binary(self, fn, value, vector, axis, name, like) -> torch.fx.Node:
        """`fn(value, constant)`, the constant a new buffer broadcast along `axis`."""
        ndim = len(shape_of(like))
        constant = vector.reshape(-1, *([1] * (ndim - 1 - axis))) if vector.dim() else vector
        constant = constant.to(self._device())  # where the model's weights are, for the algebra too
        attr = self._attr_name()
        self.gm.register_buffer(attr, constant.to(dtype=dtype_of(like) or torch.float32))
        attr_node = self.gm.graph.get_attr(attr)
        self.consts.values[attr_node] = constant.clone()
        return self._node(fn, (value, attr_node), like, name)

    def _attr_name(self) -> str:
        while hasattr(self.gm, f"_reparam_distributed_{self._count}"):
            self._count += 1
        name = f"_reparam_distributed_{self._count}"
        self._count += 1
        return name

    def _device(self) -> torch.device:
        first = next(iter(self.gm.parameters()), None)
        first = next(iter(self.gm.buffers()), None) if first is None else first
        return first.device if first is not None else torch.device("cpu")

    def erase(self, node: torch.fx.Node, replacement: torch.fx.Node) -> None:
        for user in node.users:
            self._rules.pop(user, None)
        node.replace_all_uses_with(replacement)
        self.gm.graph.erase_node(node)
        self._rules[node] = None

    # -- 1. a map after a concatenation --------------------------------------------------------
    def cat_map(self, cat: torch.fx.Node) -> None:
        """Every per-channel map reading the concatenation `cat`, moved onto its inputs."""
        rule = self.classify(cat)
        if rule is None or rule.kind != "concat":
            return
        moved = True
        while moved:  # after a map moves, its reader (a layer scale after a BatchNorm) may be next
            tail = self._identity_tail(cat)
            maps = [m for m in (self.channel_map(u, tail) for u in _real_users(tail)) if m is not None]
            moved = bool(maps) and self._cat_map(cat, self.classify(cat), maps[0], tail)

    def _identity_tail(self, node: torch.fx.Node) -> torch.fx.Node:
        """The last of the identities (Dropout, nn.Identity, `contiguous`) that read `node`, each
        the only reader of the one before; `node` itself when there are none. A per-channel map
        commutes with them: `bn(dropout(cat(...)))` is `dropout(bn(cat(...)))`."""
        while True:
            users = _real_users(node)
            if len(users) != 1 or _mixes_channels(self.gm, users[0]):
                return node
            rule = self.classify(users[0])
            if rule is None or rule.kind != "identity" or rule.inputs[0] is not node:
                return node
            node = users[0]

    def _cat_map(self, cat: torch.fx.Node, rule: LinearOp, m: ChannelMap, tail: torch.fx.Node | None = None) -> bool:
        """Move `m`, which reads `tail` (`cat` or identities after it), onto the inputs of `cat`;
        False (with the reason recorded) when it stays."""
        tail = cat if tail is None else tail
        shape = shape_of(cat)
        axis = rule.axis % len(shape)
        inputs = rule.inputs
        linear_inputs = [x for x in inputs if self.is_linear(x)]
        if not linear_inputs:
            return False  # nothing to fold into
        where = [member_name(x) for x in linear_inputs] + [cat.name, m.member]
        if m.axis not in (None, axis):
            self.refuse(where, f"kept after the concatenation: the map acts along axis {m.axis}, the "
                               f"concatenation is along axis {axis}, so no slice of it belongs to one input")
            return False
        others = [u for u in _real_users(tail) if u is not m.node]
        if others:
            self.refuse(where, f"kept after the concatenation: {tail.name} is also read by "
                               f"{', '.join(u.name for u in others)}, which needs it without the map")
            return False
        if len(set(inputs)) != len(inputs):
            self.refuse(where, "kept after the concatenation: one value is concatenated twice, and its two "
                               "slices of the map differ")
            return False
        for k, x in enumerate(inputs):
            problem = self.absorber_problem(x, axis, (cat,))
            if problem is not None:
                self.refuse(where, f"kept after the concatenation: input {k} of {cat.name}: {problem}")
                return False
        offset = 0
        new_inputs = []
        for x in inputs:
            c = shape_of(x)[axis]
            scale, shift = m.slice(offset, offset + c)
            new_inputs.append(self.insert_map(x, axis, _full(scale, c), _full(shift, c),
                                              f"{m.member}_{offset}_{offset + c}"))
            offset += c
        tensors = list(new_inputs)
        args = list(cat.args)
        if args:
            args[0] = tensors
            cat.args = tuple(args)
        else:
            cat.kwargs = {**cat.kwargs, "tensors": tensors}
        self._rules.pop(cat, None)
        self.erase(m.node, tail)
        return True

    # -- 2. maps on the pieces of a split -------------------------------------------------------
    def split_maps(self, y: torch.fx.Node) -> torch.fx.Node | None:
        """Move the maps on the pieces of `y` before the split; returns the value the split now
        reads, or None when nothing moved."""
        shape = shape_of(y)
        if shape is None or len(shape) < 2:
            return None
        readers = _real_users(y)
        splits = [_split_pieces(r, y) for r in readers]
        found = [s for s in splits if s is not None]
        if not found:
            return None
        pieces = [p for s in found for p in s[1]]
        axes = {s[0] for s in found}
        mapped = []  # (piece, map, lo, hi)
        for node, lo, hi in pieces:
            users = _real_users(node)
            m = next((mm for mm in (self.channel_map(u, node) for u in users) if mm is not None), None)
            if m is not None and m.axis not in (None, found[0][0]) and node.target is operator.getitem \
                    and node.args[0] is y:
                continue  # a slice along another axis than the map's (a crop): the two commute
            if m is not None:
                mapped.append((node, users, m, lo, hi))
        if not mapped:
            return None
        if len(axes) != 1 or not self.is_linear(y):
            return None  # split along several axes, or a nonlinearity split: no neighbour to fold into
        axis = axes.pop()
        where = [member_name(y)] + [m.member for _, _, m, _, _ in mapped]
        if len(found) != len(readers):
            others = [r.name for r, s in zip(readers, splits) if s is None]
            self.refuse(where, f"kept on the pieces: {y.name} is also read whole by {', '.join(others)}")
            return None
        problem = self.absorber_problem(y, axis, readers)
        if problem is not None:
            self.refuse(where, f"kept on the pieces: {problem}")
            return None
        moved = []
        for node, users, m, lo, hi in mapped:
            if _unbound_piece(node) and m.axis is not None:
                self.refuse_map(y, m, f"kept on its piece: unbind removes axis {axis}, and the map acts along "
                                      "another axis of the piece: before the split it would vary along two axes")
                continue
            if m.axis not in (None, axis):
                self.refuse_map(y, m, f"kept on its piece: it acts along axis {m.axis}, the split is along "
                                      f"axis {axis}")
                continue
            if len(users) != 1:
                others = ", ".join(u.name for u in users if u is not m.node)
                self.refuse_map(y, m, f"kept on its piece: channels {lo}:{hi} ({node.name}) are also read by "
                                      f"{others}, which needs them without the map")
                continue
            overlap = [(p, plo, phi) for p, plo, phi in pieces
                       if p is not node and _real_users(p) and plo < hi and lo < phi]
            if overlap:
                p, plo, phi = overlap[0]
                self.refuse_map(y, m, f"kept on its piece (channels {lo}:{hi}): {p.name} reads channels "
                                      f"{plo}:{phi} without the map")
                continue
            moved.append((node, m, lo, hi))
        if not moved:
            return None
        c = shape[axis]
        scale, shift = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        for _, m, lo, hi in moved:
            scale[lo:hi], shift[lo:hi] = m.scale, m.shift  # the piece's map covers its channels
        mapped_y = self.insert_map(y, axis, scale, shift, "_".join(m.member for _, m, _, _ in moved))
        for r in readers:
            r.replace_input_with(y, mapped_y)
            self._rules.pop(r, None)
        for node, m, _, _ in moved:
            self.erase(m.node, node)
        return mapped_y

    # -- 4. maps after a channel permutation ------------------------------------------------
    def shuffle_maps(self, end: torch.fx.Node) -> None:
        """Move the per-channel maps reading `end`, the last of a chain of layout steps that
        permutes channels, before the chain."""
        found = _permutation_chain(self.gm, end)
        if found is None:
            return
        _, steps = found
        moved = True
        while moved:  # after a map moves, its reader (a layer scale after a BatchNorm) may be next
            maps = [m for m in (self.channel_map(u, end) for u in _real_users(end)) if m is not None]
            moved = bool(maps) and self._shuffle_map(steps[0].args[0], steps, maps[0])

    def _shuffle_map(self, y: torch.fx.Node, steps: list[torch.fx.Node], m: ChannelMap) -> bool:
        end = steps[-1]
        rule = self.classify(y)
        is_cat = rule is not None and rule.kind == "concat"
        if not self.is_linear(y) and not is_cat:
            return False  # nothing before the chain could absorb the map: it stays, nothing to report
        if m.axis not in (None, 1):
            return False  # not a map of the channels (tokens, say): the linear-form pass looks at it
        where = [member_name(y)] + [s.name for s in steps] + [m.member]
        perm = _channel_permutation(self.gm, y, steps)
        if isinstance(perm, str):
            self.refuse(where, f"kept after the layout change: {perm}")
            return False
        others = [u for u in _real_users(end) if u is not m.node]
        others += [u for s in steps[:-1] for u in _real_users(s) if u not in steps]
        if others:
            self.refuse(where, f"kept after the channel permutation: {others[0].name} also reads the permuted "
                               "channels without the map")
            return False
        if is_cat:  # rewrite 1 moves the map on to the inputs: only worth it when each absorbs its slice
            if rule.axis % len(shape_of(y)) != 1:
                problem = f"{y.name} concatenates along axis {rule.axis}, not the channels"
            else:
                problem = next((f"input {k} of {y.name}: {p}" for k, x in enumerate(rule.inputs)
                                for p in [self.absorber_problem(x, 1, (y,))] if p is not None), None)
            if problem is not None and not any(self.is_linear(x) for x in rule.inputs):
                return False  # nothing linear on either side: nothing to report
        else:
            problem = self.absorber_problem(y, 1, (steps[0],))
        if problem is not None:
            self.refuse(where, f"kept after the channel permutation: {problem}")
            return False
        c = shape_of(y)[1]
        scale, shift = _full(m.scale, c), _full(m.shift, c)
        # Output channel k of the chain is input channel perm[k]: the map's k-th constants belong there.
        before_scale, before_shift = torch.empty_like(scale), torch.empty_like(shift)
        before_scale[perm], before_shift[perm] = scale, shift
        mapped_y = self.insert_map(y, 1, before_scale, before_shift, f"{m.member}_unshuffled")
        steps[0].replace_input_with(y, mapped_y)
        self._rules.pop(steps[0], None)
        self.erase(m.node, end)
        return True

    # -- 3. sums written with stack ------------------------------------------------------------
    def stack_sum(self, stack: torch.fx.Node) -> None:
        """`stack(xs, d).sum(d)` / `.mean(d)` as additions of the branches (times 1/n for a mean)."""
        tensors = stack.args[0] if stack.args else stack.kwargs.get("tensors")
        dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
        shape, dtype = shape_of(stack), dtype_of(stack)
        if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int) or shape is None \
                or dtype is None or not dtype.is_floating_point \
                or not all(isinstance(t, torch.fx.Node) and shape_of(t) is not None for t in tensors):
            return
        dim %= len(shape)
        users = list(stack.users)
        sums = [(u, r) for u, r in ((u, _reduction(u, stack)) for u in users) if r is not None]
        if not sums:
            return  # stacked for something else (attention heads, a max): not a sum
        linear = [t for t in tensors if self.is_linear(t) or (self.classify(t) or _NOT_LINEAR).kind == "sum"]
        if not linear:
            return  # no branch is linear: nothing to fuse
        if stack in self.classifier.mutated or any(t in self.classifier.mutated for t in tensors):
            return  # updated in place: the linear-form pass says so
        where = [member_name(t) for t in linear] + [stack.name]
        if len(users) != 1:
            others = ", ".join(u.name for u in users if u is not sums[0][0])
            self.refuse(where, f"kept as a stack: {stack.name} is also read by {others}")
            return
        reader, (how, dims, keepdim) = sums[0]
        where.append(reader.name)
        if dims != (dim,):
            self.refuse(where, f"kept as a stack: {how} over axis {', '.join(map(str, dims))}, not the stacked "
                               f"axis {dim}: not a sum of the branches")
            return
        if keepdim:
            self.refuse(where, f"kept as a stack: {how} with keepdim=True keeps the stacked axis, which a "
                               "sum of the branches does not have")
            return
        total = tensors[0]
        with self.gm.graph.inserting_before(reader):
            for k, t in enumerate(tensors[1:], 1):
                total = self._node(operator.add, (total, t), reader, f"{stack.name}_sum_{k}")
            if how == "mean" and len(tensors) > 1:
                total = self._node(operator.truediv, (total, len(tensors)), reader, f"{stack.name}_mean")
        self.erase(reader, total)
        self.gm.graph.erase_node(stack)
        self._rules[stack] = None

    def _node(self, fn, args, like, name) -> torch.fx.Node:
        node = self.gm.graph.create_node("call_function", fn, args, {}, name=_node_name(name))
        node.meta.update({k: like.meta[k] for k in ("reparam_shape", "tensor_meta") if k in like.meta})
        return node


    # -- 6. a map after a reshape that splits the channel axis ----------------------------------
    def split_axis_map(self, r: torch.fx.Node) -> bool:
        """Move the per-channel map reading the reshape `r` before it, where its channels are the
        leading factor of an axis of `r`'s input; False when none moves."""
        y = r.args[0]
        in_shape, out_shape = shape_of(y), shape_of(r)
        readers = _real_users(r)
        if (in_shape is None or out_shape is None or len(readers) != 1 or in_shape == out_shape
                or not _may_be_channel_map(self.gm, readers[0])):
            return False
        m = self.channel_map(readers[0], r)
        if m is None or m.axis is None:
            return False
        a = m.axis
        lead = math.prod(out_shape[:a])
        k = next((k for k in range(len(in_shape)) if math.prod(in_shape[:k]) == lead
                  and in_shape[k] > out_shape[a] and in_shape[k] % out_shape[a] == 0), None)
        if k is None or not self.is_linear(y):
            return False  # the channel axis stays whole (the linear-form pass's case), or nothing to fold into
        problem = self.absorber_problem(y, k, (r,))
        if problem is not None:
            self.refuse([member_name(y), r.name, m.member], f"kept after the reshape: {problem}")
            return False
        n = in_shape[k] // out_shape[a]
        scale, shift = (_full(v, out_shape[a]).repeat_interleave(n) for v in (m.scale, m.shift))
        mapped = self.insert_map(y, k, scale, shift, m.member)
        r.replace_input_with(y, mapped)
        self._rules.pop(r, None)
        self.erase(m.node, r)
        return True

    # -- 5. maps after an upsampling that copies pixels --------------------------------------
    def upsample_map(self, up: torch.fx.Node) -> bool:
        """Move the pointwise map reading the upsampling `up` before it; False when none moves."""
        kind, r = copying_upsample(self.gm, up)
        y = up.args[0]
        readers = _real_users(up)
        if len(readers) != 1 or shape_of(y) is None or len(shape_of(y)) != 4:
            return False
        reader = readers[0]
        m = self.channel_map(reader, up)
        pointwise = m is None and kind == "nearest" and self._pointwise_conv(reader, up)
        if (m is None or m.axis not in (None, 1)) and not pointwise:
            return False
        if not self.is_linear(y):
            return False  # nothing to fold into: left as written
        member = m.member if m is not None else member_name(reader)
        where = [member_name(y), up.name if up.op != "call_module" else str(up.target), member]
        problem = self.absorber_problem(y, 1, (up,))
        if problem is not None:
            self.refuse(where, f"kept after the upsampling: {problem}")
            return False
        if kind == "nearest":  # the map node moves as it is: nearest upsampling copies whole pixels
            if any(is_metadata_read(u, up) for u in up.users):
                return False  # they would read the map's output channels
            self._swap(up, reader)
            return True
        c = shape_of(y)[1]
        scale, shift = (_full(v, shape_of(up)[1]) for v in (m.scale, m.shift))
        if kind == "shuffle":
            scale, shift = scale.repeat_interleave(r * r), shift.repeat_interleave(r * r)
        else:
            blocks = [v.reshape(c, r * r) for v in (scale, shift)]
            if any(not bool((b == b[:, :1]).all()) for b in blocks):
                self.refuse(where, f"kept after the pixel unshuffle: its constants differ within the {r * r} "
                                   "channels that come from one input channel (it acts on pixel positions)")
                return False
            scale, shift = blocks[0][:, 0].clone(), blocks[1][:, 0].clone()
        mapped = self.insert_map(y, 1, scale, shift, m.member)
        up.replace_input_with(y, mapped)
        self._rules.pop(up, None)
        self.erase(m.node, up)
        return True

    def map_before_shuffle(self, up: torch.fx.Node) -> bool:
        """Move the per-channel map that a pixel (un)shuffle `up` reads after it, where the 1x1
        conv reading `up` absorbs it (`conv1x1(pixel_unshuffle(bn(x)))`: space-to-depth stems and
        downsamplers); False when none moves. (Before nearest upsampling the conv moves instead.)"""
        kind, r = copying_upsample(self.gm, up)
        node = up.args[0]
        if kind == "nearest" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        x = node.args[0]
        m = self.channel_map(node, x)
        readers = _real_users(up)
        if (m is None or m.axis != 1 or len(_real_users(node)) != 1 or self.is_linear(x) or len(readers) != 1
                or not self._pointwise_conv(readers[0], up) or any(is_metadata_read(u, up) for u in up.users)):
            return False  # no map, one its producer absorbs where it is, or no conv to take it
        c = shape_of(x)[1]
        scale, shift = (_full(v, c) for v in (m.scale, m.shift))
        if kind == "unshuffle":  # output channel c * r^2 + k comes from input channel c
            scale, shift = scale.repeat_interleave(r * r), shift.repeat_interleave(r * r)
        else:  # output channel c comes from input channels c * r^2 ... c * r^2 + r^2 - 1
            blocks = [v.reshape(c // (r * r), r * r) for v in (scale, shift)]
            if any(not bool((b == b[:, :1]).all()) for b in blocks):
                where = [m.member, up.name if up.op != "call_module" else str(up.target), member_name(readers[0])]
                self.refuse(where, f"kept before the pixel shuffle: its constants differ within the {r * r} "
                                   "channels that become one output channel (after it, it would act on pixel positions)")
                return False
            scale, shift = blocks[0][:, 0].clone(), blocks[1][:, 0].clone()
        users = list(up.users)
        mapped = self.insert_map(up, 1, scale, shift, m.member)
        for user in users:
            user.replace_input_with(up, mapped)
            self._rules.pop(user, None)
        self._rules.pop(up, None)
        self.erase(node, x)
        return True

    def _pointwise_conv(self, node: torch.fx.Node, x: torch.fx.Node) -> bool:
        if not _mixes_channels(self.gm, node):
            return False
        rule = self.classify(node)
        return (rule is not None and rule.kind == "affine" and rule.inputs == [x] and rule.axis is not None
                and rule.axis % 4 == 1 and rule.op.is_pointwise and rule.op.nd == 2
                and [n for n in node.all_input_nodes if n.op != "get_attr"] == [x])

    def _swap(self, up: torch.fx.Node, reader: torch.fx.Node) -> None:
        """`reader(up(y))` -> `up(reader(y))`, in place; shapes recorded accordingly."""
        y = up.args[0]
        users = list(reader.users)
        reader_meta = {k: reader.meta[k] for k in ("reparam_shape", "tensor_meta") if k in reader.meta}
        reader.replace_input_with(up, y)
        up.replace_input_with(y, reader)
        for user in users:
            user.replace_input_with(reader, up)
        reader.append(up)  # after the map (and whatever it reads), before the map's old readers
        channels = reader_meta["reparam_shape"][1]
        shape = (shape_of(y)[0], channels) + tuple(shape_of(y)[2:])
        reader.meta["reparam_shape"] = shape
        if "tensor_meta" in reader_meta:
            reader.meta["tensor_meta"] = reader_meta["tensor_meta"]._replace(shape=torch.Size(shape))
        up.meta.update(reader_meta)
        for n in (up, reader, *users):
            self._rules.pop(n, None)


# -- helpers -------------------------------------------------------------------------------------

_NEAREST = ("nearest", "nearest-exact")
_MAP_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_MAP_FUNCTIONS = {F.batch_norm, F.instance_norm, torch.addcmul} | _ADD | _SUB | _MUL | _DIV | _NEG


def _may_be_channel_map(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Could `node` be a per-channel map (a norm, `addcmul`, arithmetic)? Decided by its target
    alone: classifying it (`_Rewriter.channel_map`) scans the graph once, on first use."""
    if node.op == "call_module":
        return isinstance(submodule(gm, node.target), _MAP_MODULES)
    if node.op == "call_function":
        return node.target in _MAP_FUNCTIONS
    return node.op == "call_method" and node.target in _METHOD_ARITH


def copying_upsample(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, int] | None:
    """("shuffle", r), ("unshuffle", r) or ("nearest", 0) when `node` upsamples (or rearranges)
    a tensor by copying its pixels, else None."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node) or shape_of(node.args[0]) is None:
        return None
    if node.op == "call_module":
        m = submodule(gm, node.target)
        if type(m) is nn.PixelShuffle:
            return "shuffle", m.upscale_factor
        if type(m) is nn.PixelUnshuffle:
            return "unshuffle", m.downscale_factor
        if type(m) in (nn.Upsample, nn.UpsamplingNearest2d) and m.mode in _NEAREST:
            return "nearest", 0
        return None
    if node.op != "call_function":
        return None
    t = node.target
    if t in (F.pixel_shuffle, torch.pixel_shuffle, F.pixel_unshuffle, torch.pixel_unshuffle):
        r = node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values()), None)
        if type(r) is not int or len(node.args) + len(node.kwargs) != 2:
            return None
        return ("shuffle" if t in (F.pixel_shuffle, torch.pixel_shuffle) else "unshuffle"), r
    if t is F.upsample_nearest:
        return "nearest", 0
    if t in (F.interpolate, F.upsample):
        mode = node.args[3] if len(node.args) > 3 else node.kwargs.get("mode", "nearest")
        return ("nearest", 0) if mode in _NEAREST else None
    return None


def _real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if not is_metadata_read(u, node)]


_MIXING_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_MIXING_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d}


def _mixes_channels(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A conv or Linear (never a per-channel map), recognised without reading its weights."""
    if node.op == "call_module":
        return isinstance(submodule(gm, node.target), _MIXING_MODULES)
    return node.op == "call_function" and node.target in _MIXING_FUNCTIONS


def _is_call(node: torch.fx.Node, functions) -> bool:
    return node.op == "call_function" and node.target in functions


def _is_split_like(node: torch.fx.Node) -> bool:
    """`chunk`/`split` (functions or methods) or a slice `y[...]` of a tensor `y`."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node) or shape_of(node.args[0]) is None:
        return False
    if node.op == "call_method":
        return node.target in ("chunk", "split", "tensor_split", "unbind")
    return node.op == "call_function" and (node.target in _CHUNK or node.target in _SPLIT
                                           or node.target in (torch.tensor_split, torch.unbind)
                                           or (node.target is operator.getitem and len(node.args) == 2))


_PERMUTING_METHODS = {"view": "reshape", "reshape": "reshape", "flatten": "reshape", "unflatten": "reshape",
                      "transpose": "transpose", "swapaxes": "transpose", "permute": "permute",
                      "contiguous": "same", "clone": "same"}
_PERMUTING_FUNCTIONS = {torch.reshape: "reshape", torch.flatten: "reshape", torch.unflatten: "reshape",
                        torch.transpose: "transpose", torch.swapaxes: "transpose", torch.permute: "permute",
                        torch.channel_shuffle: "shuffle", torch.native_channel_shuffle: "shuffle"}


def _step_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """What a layout step does ("reshape", "transpose", "permute", "shuffle", "same"), else None."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node) or shape_of(node) is None:
        return None
    if node.op == "call_method":
        return _PERMUTING_METHODS.get(node.target)
    if node.op == "call_function":
        return _PERMUTING_FUNCTIONS.get(node.target)
    if node.op == "call_module":
        m = submodule(gm, node.target)
        if isinstance(m, nn.ChannelShuffle):
            return "shuffle"
        return "reshape" if isinstance(m, (nn.Flatten, nn.Unflatten)) else None
    return None


def _is_permutation_step(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return _step_kind(gm, node) is not None


def _permutation_chain(gm: torch.fx.GraphModule, end: torch.fx.Node):
    """(y, steps) when `end` ends a chain of layout steps, each the only reader of the one before,
    that starts from a value `y` of `end`'s shape (the shortest such chain), else None."""
    steps = [end]
    shape = shape_of(end)
    while True:
        x = steps[0].args[0]
        if shape_of(x) == shape:
            return (x, steps) if any(_step_kind(gm, s) != "same" for s in steps) else None
        if not _is_permutation_step(gm, x) or len(_real_users(x)) != 1:
            return None
        steps.insert(0, x)


def _dims(node: torch.fx.Node, ndim: int, kind: str) -> list[int] | None:
    args = [a for a in node.args[1:]]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    if kind == "transpose":
        args = [node.kwargs.get("dim0", args[0] if args else None), node.kwargs.get("dim1", args[1] if len(args) > 1 else None)]
    elif "dims" in node.kwargs:
        args = list(node.kwargs["dims"])
    if not args or not all(isinstance(a, int) for a in args):
        return None
    return [a % ndim for a in args]


def _channel_permutation(gm: torch.fx.GraphModule, y: torch.fx.Node, steps: list[torch.fx.Node]):
    """`perm` with `chain(y)[:, k] == y[:, perm[k]]`, or why the chain is not such a permutation.

    Replays the chain on the indices of `y` after checking that every step keeps the batch axis and
    the spatial axes whole and in place: the permutation then depends on the channel count alone."""
    shape = shape_of(y)
    n, c, spatial = shape[0], shape[1], tuple(shape[2:])
    index = torch.arange(math.prod(shape)).reshape(shape)
    for step in steps:
        kind = _step_kind(gm, step)
        out = shape_of(step)
        middle = len(out) - len(spatial)
        if out[0] != n or tuple(out[middle:]) != spatial or math.prod(out[1:middle]) != c or middle < 2:
            return f"{step.name} moves the batch or spatial axes, not only the channels"
        if kind == "reshape":
            index = index.reshape(out)
        elif kind in ("transpose", "permute"):
            dims = _dims(step, index.dim(), kind)
            if dims is None:
                return f"{step.name} reorders axes given by computed values"
            moved = [d for i, d in enumerate(dims) if d != i] if kind == "permute" else dims
            if any(not 1 <= d < middle for d in moved):
                return f"{step.name} moves the batch or spatial axes, not only the channels"
            index = index.transpose(*dims) if kind == "transpose" else index.permute(*dims)
        elif kind == "shuffle":
            groups = submodule(gm, step.target).groups if step.op == "call_module" else (
                step.args[1] if len(step.args) > 1 else step.kwargs.get("groups"))
            if not isinstance(groups, int) or groups <= 0 or c % groups:
                return f"{step.name} shuffles with a group count that is not a constant dividing {c}"
            index = index.reshape(n, groups, c // groups, *spatial).transpose(1, 2).reshape(shape)
        if tuple(index.shape) != tuple(out):
            return f"{step.name} gives another shape when replayed"
    inner = math.prod(spatial)
    perm = (index[0].reshape(c, -1)[:, 0] // inner) % c
    if not torch.equal(index, torch.arange(math.prod(shape)).reshape(shape)[:, perm]):
        return "it does not move whole channels"
    return perm


def _part(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return v if v.dim() == 0 else v[lo:hi]


def _full(v: torch.Tensor, c: int) -> torch.Tensor:
    return v.expand(c).clone() if v.dim() == 0 else v


def _node_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)


def _describe(gm: torch.fx.GraphModule, node) -> str:
    """How a refusal names the operation that produces `node`: its module class, or its function."""
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{type(submodule(gm, node.target)).__name__} ({node.target})"
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return name if node.name == name else f"{name} ({node.name})"
    if node.op == "placeholder":
        return f"the input {node.name}"
    return node.name


def _reduction(node: torch.fx.Node, x: torch.fx.Node) -> tuple[str, tuple[int, ...], bool] | None:
    """("sum" or "mean", the axes reduced, keepdim) when `node` is `x.sum(...)`/`torch.mean(x, ...)`
    over given axes with no dtype, else None."""
    if node.op == "call_method" and node.target in ("sum", "mean"):
        how = node.target
    elif node.op == "call_function" and node.target in _REDUCE:
        how = _REDUCE[node.target]
    else:
        return None
    bound = dict(zip(("input", "dim", "keepdim"), node.args))
    bound.update(node.kwargs)
    if bound.get("input") is not x or set(bound) - {"input", "dim", "keepdim", "dtype"} \
            or bound.get("dtype") is not None or len(node.args) > 3:
        return None
    dims, keepdim = bound.get("dim"), bound.get("keepdim", False)
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims) \
            or not isinstance(keepdim, bool):
        return None
    ndim = len(shape_of(x))
    return how, tuple(sorted({d % ndim for d in dims})), keepdim


def _split_pieces(node: torch.fx.Node, y: torch.fx.Node):
    """(axis, [(piece node, first channel, end channel)]) when `node` splits `y` along one axis
    into pieces (`chunk`, `split`, or a slice `y[:, a:b]`), else None."""
    shape = shape_of(y)
    ndim = len(shape)
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is y:
        found = _channel_slice(node.args[1], shape)
        return None if found is None else (found[0], [(node, found[1], found[2])])
    def called(functions, method) -> bool:
        return (node.op == "call_function" and node.target in functions) or (
            node.op == "call_method" and node.target == method)

    is_chunk, is_split = called(_CHUNK, "chunk"), called(_SPLIT, "split")
    is_tensor_split, is_unbind = called({torch.tensor_split}, "tensor_split"), called({torch.unbind}, "unbind")
    if not (is_chunk or is_split or is_tensor_split or is_unbind) or not node.args or node.args[0] is not y:
        return None
    if is_unbind:
        names = ("input", "dim")
    elif is_tensor_split:
        names = ("input", "indices_or_sections", "dim")
    else:
        names = ("tensor", "chunks" if is_chunk else "split_size_or_sections", "dim")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    if node.op == "call_method" and is_split and "split_size" in bound:
        bound[names[1]] = bound.pop("split_size")
    if is_tensor_split and ("sections" in bound or "indices" in bound):
        bound[names[1]] = bound.pop("sections", None) or bound.pop("indices")
    if set(bound) - set(names):
        return None
    how, dim = (1 if is_unbind else bound.get(names[1])), bound.get("dim", 0)
    if not isinstance(dim, int) or not (isinstance(how, int) or (isinstance(how, (list, tuple))
                                                                 and all(isinstance(v, int) for v in how))):
        return None
    dim %= ndim
    probe = torch.empty(shape[dim], device="meta")
    try:
        if is_chunk:
            parts = probe.chunk(how)
        elif is_tensor_split:
            parts = probe.tensor_split(how)
        else:
            parts = probe.split(how)  # unbind: pieces of one, without the axis (`SplitPieces.drops_axis`)
        sizes = [p.shape[0] for p in parts]
    except (RuntimeError, ValueError, TypeError):
        return None
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    pieces = []
    for u in node.users:
        if u.op != "call_function" or u.target is not operator.getitem or u.args[0] is not node \
                or not isinstance(u.args[1], int) or not -len(sizes) <= u.args[1] < len(sizes):
            return None  # the pieces are read as a whole (a list passed on): not tracked
        k = u.args[1] % len(sizes)
        pieces.append((u, starts[k], starts[k] + sizes[k]))
    return dim, pieces


def _unbound_piece(piece: torch.fx.Node) -> bool:
    """Is `piece` a piece of `unbind`? The split axis is gone from it, so only maps with scalar
    constants (the same along every axis) move before the split, as a map along the split axis."""
    split = piece.args[0] if piece.args else None
    return isinstance(split, torch.fx.Node) and (
        (split.op == "call_function" and split.target is torch.unbind)
        or (split.op == "call_method" and split.target == "unbind"))


def _channel_slice(key, shape) -> tuple[int, int, int] | None:
    """(axis, start, stop) when `key` slices one axis with step 1 and keeps the others whole."""
    if not isinstance(key, tuple):
        key = (key,)
    if sum(k is Ellipsis for k in key) > 1:
        return None
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (len(shape) - len(key))
    if len(key) != len(shape) or not all(isinstance(k, slice) for k in key):
        return None
    cut = [(i, k) for i, k in enumerate(key) if k != slice(None)]
    if len(cut) != 1:
        return None
    axis, s = cut[0]
    if s.step not in (None, 1) or not all(v is None or isinstance(v, int) for v in (s.start, s.stop)):
        return None
    start, stop, _ = s.indices(shape[axis])
    if axis == 0 or stop <= start:
        return None  # the batch axis, or an empty slice
    return axis, start, stop


__all__ = ["distribute_linear_maps"]
