"""Linear-form propagation: the one generic fusion pass.

Walking the graph in topological order, every linear node gets a *linear form*: "this value equals
`op(source)`", where `source` is a node that is not itself absorbed (a graph input, a
nonlinearity, a node needed in several places) and `op` is an `AffineConv`. A linear node extends
the forms of its inputs when the combination is exact and no more expensive than its parts;
otherwise its inputs become sources and the refusal is recorded with its reason.

Pointwise forms may also travel through layout operations (flatten, transpose, reshape...) that
keep the channel axis whole: the layout steps are replayed on the source when the form is lowered.
That is how a BatchNorm before `flatten(2).transpose(1, 2)` folds into the following Linear.

This module decides; `lower.py` rewrites the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.fx

from .. import affine
from ..affine import AffineConv
from ..trace import Constants, is_shape_query, shape_of
from .ops import Classifier, LinearOp


@dataclass(frozen=True)
class LayoutStep:
    """A layout node replayed on a new tensor; `agnostic`: valid whatever the channel count."""

    node: torch.fx.Node
    agnostic: bool


@dataclass(frozen=True, eq=False)
class Form:
    """`value(node) == after(op(before(source)))` with the channel axis at `axis`."""

    source: torch.fx.Node
    op: AffineConv
    axis: int  # channel axis of the node's value
    op_axis: int  # channel axis where `op` applies (after `before`)
    op_ndim: int  # rank of the tensor `op` applies to
    before: tuple[LayoutStep, ...] = ()
    after: tuple[LayoutStep, ...] = ()
    members: tuple[str, ...] = ()
    parts_cost: int = 0  # multiply-accumulates of the original operations, for the example input
    origin: torch.fx.Node | None = None  # set when the form is exactly one untouched original node

    @property
    def has_layout(self) -> bool:
        return bool(self.before or self.after)


@dataclass(frozen=True)
class RefusalRecord:
    where: str
    reason: str


def spatial_dims(ndim: int, axis: int) -> int:
    """Spatial dimensions an operator has at channel axis `axis` of a rank-`ndim` tensor."""
    return ndim - 2 if axis == 1 and ndim >= 3 else 0


def positions(shape: tuple[int, ...], axis: int) -> int:
    return math.prod(shape) // shape[axis] if shape[axis] else 0


def at_layout(op: AffineConv, ndim: int, axis: int) -> AffineConv | None:
    """`op` written for a tensor of rank `ndim` with channels at `axis`, or None if impossible."""
    nd = spatial_dims(ndim, axis)
    if op.nd == nd:
        return op
    if not op.is_pointwise:
        return None
    return affine.with_spatial_dims(op, nd) if nd else affine.as_pointwise(op)


class LinearFormPass:
    """Computes forms for every node; the result drives `lower.lower_forms`."""

    def __init__(self, gm: torch.fx.GraphModule, consts: Constants):
        self.gm = gm
        self._classifier = Classifier(gm, consts)
        self._rules: dict[torch.fx.Node, LinearOp | None] = {}
        self.forms: dict[torch.fx.Node, Form] = {}
        self.absorbed: set[torch.fx.Node] = set()
        self.rewire: dict[torch.fx.Node, torch.fx.Node] = {}  # shape query -> node it now reads
        self.refusals: list[RefusalRecord] = []
        self.over_budget: dict[torch.fx.Node, str] = {}  # partial sums dearer than their parts
        self.absorbed_inputs: dict[torch.fx.Node, list[torch.fx.Node]] = {}

    def classify(self, node: torch.fx.Node) -> LinearOp | None:
        if node not in self._rules:
            self._rules[node] = self._classifier(node)
        return self._rules[node]

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> "LinearFormPass":
        for node in self.gm.graph.nodes:
            rule = self.classify(node)
            if rule is None:
                continue
            form = getattr(self, "_visit_" + rule.kind)(node, rule)
            if form is not None:
                self.forms[node] = form
        self._settle_partial_sums()
        return self

    def refuse(self, where: str, reason: str) -> None:
        self.refusals.append(RefusalRecord(where, reason))

    # -- inputs ------------------------------------------------------------------------------
    def _real_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for u in node.users if not is_shape_query(u)]

    def absorbable(self, node: torch.fx.Node) -> bool:
        """Can a consumer fold `node`'s form into its own? Only for a single consumer."""
        form = self.forms.get(node)
        if form is None or len(self._real_users(node)) != 1:
            return False
        if any(is_shape_query(u) for u in node.users):
            # Shape queries can read the source instead only if it has the same shape.
            return not form.has_layout and shape_of(form.source) == shape_of(node)
        return True

    def absorb(self, node: torch.fx.Node) -> None:
        self.absorbed.add(node)
        for user in node.users:
            if is_shape_query(user):
                self.rewire[user] = self.forms[node].source

    def identity_form(self, node: torch.fx.Node, axis: int) -> Form | None:
        shape = shape_of(node)
        if shape is None or len(shape) < 2:
            return None
        axis %= len(shape)
        op = affine.identity(shape[axis], spatial_dims(len(shape), axis))
        return Form(node, op, axis, axis, len(shape))

    def input_form(self, node: torch.fx.Node, axis: int | None) -> tuple[Form | None, bool]:
        """The form to extend for input `node`, and whether it comes from `node`'s own form."""
        shape = shape_of(node)
        if shape is None or len(shape) < 2:
            return None, False
        if self.absorbable(node):
            form = self.forms[node]
            if axis is None or form.axis == axis % len(shape):
                return form, True
        return self.identity_form(node, 1 if axis is None else axis), False

    # -- unary affine maps -------------------------------------------------------------------
    def _visit_affine(self, node, rule: LinearOp) -> Form | None:
        x = rule.inputs[0]
        shape = shape_of(x)
        if shape is None or len(shape) < 2:
            return None
        axis = rule.axis % len(shape)
        op = at_layout(rule.op, len(shape), axis)
        if op is None or op.in_channels != shape[axis]:
            return None
        return self.extend(node, x, axis, op, rule.member)

    def _visit_refused(self, node, rule: LinearOp):
        self.refuse(rule.member, rule.reason)
        return None

    def _visit_identity(self, node, rule: LinearOp) -> Form | None:
        x = rule.inputs[0]
        form, owned = self.input_form(x, None)
        if form is None:
            return None
        if owned:
            self.absorb(x)
            return replace(form, members=form.members + (rule.member,), origin=None)
        return replace(form, members=(rule.member,))

    def _visit_scale(self, node, rule: LinearOp) -> Form | None:
        return self._per_channel(node, rule, scale=rule.scale, shift=None)

    def _visit_shift(self, node, rule: LinearOp) -> Form | None:
        scale = None if rule.sign == 1.0 else torch.tensor(rule.sign, dtype=torch.float64)
        return self._per_channel(node, rule, scale=scale, shift=rule.shift)

    def _per_channel(self, node, rule, scale, shift) -> Form | None:
        """`x * scale + shift` with constants that broadcast along one channel axis."""
        x = rule.inputs[0]
        shape = shape_of(x)
        if shape is None or len(shape) < 2 or shape_of(node) != shape:
            return None
        consts = [c for c in (scale, shift) if c is not None]
        axes = {a for c in consts for a in _varying_axes(c, shape)}
        if any(c.dim() > len(shape) for c in consts) or len(axes) > 1:
            return None  # varies along several axes: not a per-channel map
        if axes:
            axis = axes.pop()
        elif self.absorbable(x):
            axis = self.forms[x].axis
        else:
            axis = 1
        c = shape[axis]
        s = torch.ones(c, dtype=torch.float64) if scale is None else _along(scale, shape, axis)
        b = torch.zeros(c, dtype=torch.float64) if shift is None else _along(shift, shape, axis)
        op = affine.per_channel(s, b, spatial_dims(len(shape), axis))
        return self.extend(node, x, axis, op, rule.member)

    def extend(self, node, x, axis: int, op: AffineConv, member: str) -> Form | None:
        """The form of `node = op(x)`, folding `x`'s form in when exact and affordable."""
        out_shape = shape_of(node)
        if out_shape is None or len(out_shape) != len(shape_of(x)):
            return None
        npos = positions(out_shape, axis)
        own_cost = op.cost * npos
        form, owned = self.input_form(x, axis)
        if form is None:
            return None
        if owned:
            combined, reason = self._compose(op, form, node, npos)
            if combined is not None:
                self.absorb(x)
                return replace(combined, members=form.members + (member,),
                               parts_cost=form.parts_cost + own_cost, origin=None)
            self.refuse(", ".join(form.members + (member,)), reason)
        return Form(x, op, axis, axis, len(out_shape), members=(member,), parts_cost=own_cost, origin=node)

    def _compose(self, op: AffineConv, form: Form, node, npos: int) -> tuple[Form | None, str]:
        if form.after:
            if op.is_per_channel:
                # A per-channel map commutes with layout steps that keep the channel axis whole.
                inner = at_layout(op, form.op_ndim, form.op_axis)
                reason = affine.compose_refusal(inner, form.op)
                if reason:
                    return None, reason
                return replace(form, op=affine.compose(inner, form.op)), ""
            moved = self._move_after_before(form)
            if moved is None:
                return None, "a layout change between the two operators cannot be moved before the first"
            form = moved
        reason = affine.compose_refusal(op, form.op)
        if reason:
            return None, reason
        fused_cost = affine.composed_cost(op, form.op) * npos
        if fused_cost > form.parts_cost + op.cost * npos:
            return None, (f"not cheaper: one {op.describe()} after {form.op.describe()} would cost "
                          f"{fused_cost:,} MACs against {form.parts_cost + op.cost * npos:,} for the parts")
        shape = shape_of(node)
        axis = form.axis
        return replace(form, op=affine.compose(op, form.op), op_axis=axis, op_ndim=len(shape)), ""

    def _move_after_before(self, form: Form) -> Form | None:
        """Apply `op` after the layout steps instead of before them (pointwise ops only)."""
        if not form.op.is_pointwise:
            return None
        same_channels = form.op.in_channels == form.op.out_channels
        if not all(step.agnostic or same_channels for step in form.after):
            return None
        ndim = len(shape_of(form.after[-1].node))
        op = at_layout(form.op, ndim, form.axis)
        if op is None:
            return None
        return replace(form, op=op, op_axis=form.axis, op_ndim=ndim,
                       before=form.before + form.after, after=())

    # -- sums and concatenations -------------------------------------------------------------
    def _visit_sum(self, node, rule: LinearOp) -> Form | None:
        a, b = rule.inputs
        axis = None
        for x in (a, b):
            if self.absorbable(x):
                axis = self.forms[x].axis
                break
        fa, own_a = self.input_form(a, axis)
        fb, own_b = self.input_form(b, axis)
        if fa is None or fb is None:
            return None
        if not _same_space(fa, fb):
            return None  # different sources: a join of two values, not one map
        ops = [fa.op, affine.scaled(fb.op, rule.signs[1]) if rule.signs[1] != 1.0 else fb.op]
        members = fa.members + fb.members + (rule.member,)
        reason = affine.sum_refusal(ops)
        if reason:
            self.refuse(", ".join(members), reason)
            return None
        fused = affine.add(ops)
        parts = fa.parts_cost + fb.parts_cost
        fused_cost = fused.cost * positions(shape_of(node), fa.axis)
        if fused_cost > parts:
            reason = (f"not cheaper: one {fused.describe()} would cost {fused_cost:,} MACs against {parts:,} "
                      "for the branches")
            if not self._feeds_a_sum(node):
                self.refuse(", ".join(members), reason)
                return None
            # A partial sum (3x1 + 1x3 before the 3x3 is added) may be dearer than its parts while
            # the whole sum is not: decide when the sum is complete (see `_settle_partial_sums`).
            self.over_budget[node] = reason
        owned = [x for x, own in ((a, own_a), (b, own_b)) if own]
        for x in owned:
            self.absorb(x)
        self.absorbed_inputs[node] = owned
        return replace(fa, op=fused, members=members, parts_cost=parts, origin=None)

    def _feeds_a_sum(self, node) -> bool:
        users = self._real_users(node)
        if len(users) != 1:
            return False
        rule = self.classify(users[0])
        return rule is not None and rule.kind == "sum"

    def _settle_partial_sums(self) -> None:
        """Undo over-budget sums that were not completed by a cheaper enclosing sum."""
        pending = [n for n in self.over_budget if n not in self.absorbed]
        while pending:
            node = pending.pop()
            reason = self.over_budget.pop(node, None)
            if reason is None or node in self.absorbed:
                continue
            form = self.forms.pop(node)
            self.refuse(", ".join(form.members), reason)
            for x in self.absorbed_inputs.get(node, []):
                self.absorbed.discard(x)
                for user in x.users:
                    self.rewire.pop(user, None)
                if x in self.over_budget:
                    pending.append(x)

    def _visit_concat(self, node, rule: LinearOp) -> Form | None:
        shape = shape_of(node)
        axis = rule.axis % len(shape)
        found = [self.input_form(x, axis) for x in rule.inputs]
        forms = [f for f, _ in found]
        if any(f is None for f in forms) or len(set(rule.inputs)) != len(rule.inputs):
            return None
        if not all(_same_space(forms[0], f) for f in forms[1:]) or forms[0].has_layout:
            return None
        ops = [f.op for f in forms]
        where = ", ".join([m for f in forms for m in f.members] + [rule.member])
        reason = affine.concat_refusal(ops)
        parts = sum(f.parts_cost for f in forms)
        if reason is None:
            fused = affine.concat(ops)
            fused_cost = fused.cost * positions(shape, axis)
            if fused_cost > parts:
                reason = (f"not cheaper: one {fused.describe()} would cost {fused_cost:,} MACs against "
                          f"{parts:,} for the branches")
        if reason:
            self.refuse(where, reason)
            return None
        for x, (_, owned) in zip(rule.inputs, found):
            if owned:
                self.absorb(x)
        return Form(forms[0].source, fused, axis, axis, len(shape),
                    members=tuple(m for f in forms for m in f.members) + (rule.member,), parts_cost=parts)

    # -- layout ------------------------------------------------------------------------------
    def _visit_layout(self, node, rule: LinearOp) -> Form | None:
        x = rule.inputs[0]
        if not self.absorbable(x):
            return None
        form = self.forms[x]
        if not form.op.is_pointwise:
            return None
        new_axis = channel_axis_after(node, rule.layout, shape_of(x), form.axis)
        if new_axis is None:
            return None
        self.absorb(x)
        step = LayoutStep(node, rule.layout in ("flatten", "transpose", "permute", "movedim", "unsqueeze"))
        return replace(form, axis=new_axis, after=form.after + (step,), members=form.members + (rule.member,),
                       origin=None)


def _same_space(a: Form, b: Form) -> bool:
    return (a.source is b.source and a.axis == b.axis and a.op_axis == b.op_axis and a.op_ndim == b.op_ndim
            and tuple(s.node for s in a.before) == tuple(s.node for s in b.before)
            and tuple(s.node for s in a.after) == tuple(s.node for s in b.after))


def _varying_axes(c: torch.Tensor, shape: tuple[int, ...]) -> list[int]:
    """Axes of a rank-len(shape) tensor along which the broadcast constant `c` has size > 1."""
    offset = len(shape) - c.dim()
    return [offset + i for i, n in enumerate(c.shape) if n != 1]


def _along(c: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """The per-channel vector of a constant that varies only along `axis` (or nowhere)."""
    if c.numel() == 1:
        return c.reshape(()).expand(shape[axis]).clone()
    if c.shape[axis - (len(shape) - c.dim())] != shape[axis]:
        raise ValueError("constant does not match the channel count")
    return c.reshape(-1).clone()


def _int_args(node: torch.fx.Node) -> list:
    """Integer arguments after the tensor, flattened (`permute(0, 2, 1)` and `permute([0, 2, 1])`)."""
    out = []
    for a in node.args[1:]:
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def channel_axis_after(node: torch.fx.Node, layout: str, in_shape, axis: int) -> int | None:
    """Where the channel axis goes through a layout op, or None if it does not stay whole."""
    out_shape = shape_of(node)
    if out_shape is None:
        return None
    n_in, n_out = len(in_shape), len(out_shape)
    args = _int_args(node)
    kw = node.kwargs
    try:
        if layout == "transpose":
            d0 = kw.get("dim0", args[0] if args else None)
            d1 = kw.get("dim1", args[1] if len(args) > 1 else None)
            d0, d1 = d0 % n_in, d1 % n_in
            return d1 if axis == d0 else d0 if axis == d1 else axis
        if layout == "permute":
            dims = [d % n_in for d in (kw.get("dims") or args)]
            return dims.index(axis)
        if layout == "movedim":
            src = kw.get("source", args[0] if args else None)
            dst = kw.get("destination", args[1] if len(args) > 1 else None)
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            perm = _movedim_perm(n_in, [s % n_in for s in src], [d % n_in for d in dst])
            return perm.index(axis)
        if layout == "flatten":
            if node.op == "call_module":
                module = node.graph.owning_module.get_submodule(node.target)
                start, end = module.start_dim, module.end_dim
            else:
                start = kw.get("start_dim", args[0] if args else 0)
                end = kw.get("end_dim", args[1] if len(args) > 1 else -1)
            start, end = start % n_in, end % n_in
            if axis < start:
                return axis
            if axis > end:
                return axis - (end - start)
            return None
        if layout in ("reshape", "squeeze", "unsqueeze"):
            # Channels stay whole when every dimension before them is unchanged and their size too.
            if axis >= n_out or in_shape[:axis] != out_shape[:axis] or in_shape[axis] != out_shape[axis]:
                if layout == "unsqueeze":
                    d = kw.get("dim", args[0] if args else None) % n_out
                    if d <= axis and out_shape[axis + 1] == in_shape[axis]:
                        return axis + 1
                return None
            if layout == "squeeze" and (not args and "dim" not in kw):
                return None  # squeeze() of every size-1 axis may drop the channels for other inputs
            return axis
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    return None


def _movedim_perm(n: int, src: list[int], dst: list[int]) -> list[int]:
    """`perm` such that output axis i is input axis perm[i]."""
    perm = [None] * n
    for s, d in zip(src, dst):
        perm[d] = s
    rest = iter(i for i in range(n) if i not in src)
    return [p if p is not None else next(rest) for p in perm]
