"""Linear-form propagation: the one generic fusion pass.

Walking the graph in topological order, every linear node gets a *linear form*: "this value equals
`op(source)`", where `source` is a node that is not itself absorbed (a graph input, a
nonlinearity, a node needed in several places) and `op` is an `AffineConv`. A linear node extends
the forms of its inputs when the combination is exact and no more expensive than its parts;
otherwise its inputs become sources and the refusal is recorded with its reason.

Sums are decided once, at the root of each tree of additions: the branches (whatever the order
and nesting they were written in) are grouped by source, then partitioned by geometry into the
cheapest set of fused operators (`affine.partition_sum`). Channel-wise groups are judged by the
latency estimate of `affine.CostModel`, groups that mix channels by multiply-accumulates.

A composition refused for its cost alone (a 1x1 conv before an average pool costs more MACs as one
kxk conv than as its parts) may still be free where the value ends in a sum: beside a dense kxk
branch of the same geometry it adds nothing to the kernel it joins (DBB's 1x1 -> avg-pool branch).
The refused form keeps an `Alternative`, a recipe naming the two forms, not their product; the
sum root judges it by geometry alone (`affine.joins_for_free`) and computes the composed weights
only when it takes it, withdrawing the refusal. Elsewhere (a ConvFFN's depthwise 7x7 -> dense 1x1)
nothing is ever computed and the refusal stands.

Reads of metadata (`x.shape`, `x.ndim`, `x.size(1)`, `x.dtype`, `torch._assert(x.ndim == 4)`...)
are not uses: when a value disappears into a fused operator, its readers read a value with the
same metadata instead (the source, or the value that absorbs it), moved after that value if
needed; where no such value exists the value stays, and the refusal says so. Inside a chain of
layout steps (`b, n, c = y.shape; bn(y.reshape(b * n, c)).reshape(b, n, c)`) the reads take the
lowered chain's value at the read value's place (the fused operator's output, or a replayed
layout step), so sizes are always those of the actual input, never the example's.

Pointwise forms may also travel through layout operations (flatten, transpose, reshape...) that
keep the channel axis whole: the layout steps are replayed on the source when the form is lowered.
That is how a BatchNorm before `flatten(2).transpose(1, 2)` folds into the following Linear.
A form that is not pointwise (a kxk conv) does not travel; instead, a pointwise operation on the
channel axis after layout steps that work for any channel count (`permute(0, 2, 3, 1)`, then a
Linear or `@ W`: ConvNeXt-style channels-last MLPs) moves before the steps and composes into it,
when that costs no more (`LayoutChain`).

This module decides; `lower.py` rewrites the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from .. import affine
from ..affine import AffineConv
from ..trace import Constants, dtype_of, is_shape_query, shape_of
from .commute import follower_name, linear_follower, visit_average, visit_pad_border
from .ops import Classifier, LinearOp


def replace(obj, **changes):
    """`dataclasses.replace` for the frozen dataclasses this pass copies thousands of times (forms,
    operators, terms: none has `__post_init__` or fields outside `__init__`), without running
    `__init__`: a copy of the instance's fields with `changes` applied."""
    new = object.__new__(type(obj))
    fields = new.__dict__
    fields.update(obj.__dict__)
    fields.update(changes)
    return new


@dataclass(frozen=True)
class LayoutStep:
    """A layout node replayed on a new tensor; `agnostic`: valid whatever the channel count."""

    node: torch.fx.Node
    agnostic: bool
    # The channel axis after the step, where the operator before it changes the channel count
    # the original node had (a Linear composed into the conv before a permute): lowering corrects
    # the recorded shape there.
    axis: int | None = None


@dataclass(frozen=True, eq=False)
class LayoutChain:
    """Layout steps after a form that is not pointwise (a kxk conv, then `permute(0, 2, 3, 1)`),
    held back rather than absorbed: only a linear operation on the channel axis after them can
    take the form in (the Linear moves before the steps, into the conv); else everything stays as
    written. `form` is `base`'s form with the steps appended; `refusal` says why nothing moves,
    and is withdrawn when the operation after the steps composes."""

    base: torch.fx.Node
    form: Form
    refusal: RefusalRecord


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
    parts_cost: float = 0.0  # estimated latency of the original operations (affine.CostModel), ns
    parts_macs: int = 0  # their multiply-accumulates
    n_ops: int = 0  # original operations combined (identities and layout steps not counted)
    origin: torch.fx.Node | None = None  # set when the form is exactly one untouched original node
    # Layout steps of `after` that read the shape of an absorbed node whose metadata is that of
    # `op`'s output: (reader, node read). They forbid moving `op` behind the layout steps.
    shape_refs: tuple[tuple[torch.fx.Node, torch.fx.Node], ...] = ()
    # A composition with `source`'s own form refused for its cost alone, for a sum that may take it.
    alternative: Alternative | None = None

    @property
    def has_layout(self) -> bool:
        return bool(self.before or self.after)

    @property
    def combined(self) -> bool:
        """Does the form combine several original operations (a region worth reporting)?"""
        return self.n_ops > 1


@dataclass(frozen=True, eq=False)
class RefusalRecord:
    where: str
    reason: str


@dataclass(frozen=True, eq=False)
class Alternative:
    """A recipe, not weights: the form carrying it could instead be composed with the form of
    `inner` (its source), which `consumer` refused to absorb for cost alone (`refusal`).

    Only per-channel maps may follow `consumer` in the carrying form: they keep the geometry of
    the composition and its exactness."""

    inner: torch.fx.Node
    consumer: torch.fx.Node
    refusal: RefusalRecord


@dataclass(frozen=True)
class Term:
    """One branch of a sum: `sign * value(node)`, computed as `form` when `owned`."""

    node: torch.fx.Node
    sign: float
    form: Form
    owned: bool


@dataclass(frozen=True)
class SumPart:
    """One operand of a sum that stays a sum: a fused `form` or an original `node`, with a sign."""

    sign: float
    form: Form | None = None
    node: torch.fx.Node | None = None


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


METHODS_READING_METADATA = {"size", "dim", "numel", "ndimension", "get_device", "is_contiguous",
                            "is_floating_point", "is_complex", "element_size", "nelement"}
# Methods whose second argument contributes only its shape.
SHAPE_FROM_SECOND = {"reshape_as", "view_as", "expand_as"}


def is_metadata_read(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    """Does `user` read only the shape, dtype or device of `value`, never its numbers?"""
    if is_shape_query(user):
        return True
    if user.op == "call_method" and user.args and user.args[0] is value:
        return user.target in METHODS_READING_METADATA
    if user.op == "call_method" and user.target in SHAPE_FROM_SECOND and len(user.args) == 2:
        return user.args[1] is value and user.args[0] is not value
    return False


def _narrowed(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 when that holds it exactly (a weight copied from a float32 model), else `t`."""
    if t.dtype != torch.float64:
        return t
    source = affine.float32_source(t)  # a lifted parameter: its own float32 tensor, no check needed
    if source is not None:
        return source
    head = t.reshape(-1)[:64]  # a combined weight is rarely exact in float32: most often, the
    if not torch.equal(head.to(torch.float32).double(), head):  # first values already say so
        return t
    narrow = t.to(torch.float32)
    return narrow if torch.equal(narrow.double(), t) else t


SMALL_OP = 4096  # weights and bias elements up to which an operator is kept in float64 throughout


def is_small(op: AffineConv) -> bool:
    return op.weight.numel() + op.bias.numel() <= SMALL_OP


def widened_op(op: AffineConv) -> AffineConv:
    """`op` with float64 weights. The classifier gives convolutions and Linear layers with the
    layer's own weights (`ops.Classifier(stored_weights=True)`): a layer whose form is lowered as it
    is never needs a float64 copy, so the copy is made here, where the algebra computes with it."""
    if op.weight.dtype == torch.float64 and op.bias.dtype == torch.float64:
        return op
    return replace(op, weight=op.weight.double(), bias=op.bias.double())


class _FormStore(dict):
    """Forms by node. A form's float64 weights are stored in float32 when that is exact (most
    forms are single operations of a float32 model, not yet combined) and read back in float64:
    the algebra sees the same values, and the pass holds no float64 copy of the whole model.

    The pass reads one form several times in a row (is it absorbable, its axis, its weights), reads
    a form soon after storing it (a BatchNorm right after its conv), and often stores a form back
    unchanged under another node: the float64 copies of the last few forms stored or read are kept
    (`_RECENT`), so that reading them again, or storing their weights again, converts nothing.
    `stored(node)` gives the form as stored, for readers that do not need float64 (lowering casts
    anyway).

    Small operators (`SMALL_OP` elements or fewer: norms, scales, small depthwise kernels) are stored
    in float64 as they are: converting them back and forth would cost more than the memory saved."""

    _RECENT = 4

    def __init__(self):
        super().__init__()
        self._recent: list[tuple[Form, Form]] = []  # (form as stored, the same in float64), newest last

    def _remember(self, stored: Form, wide: Form) -> None:
        recent = self._recent
        recent.append((stored, wide))
        if len(recent) > self._RECENT:
            del recent[0]

    def __setitem__(self, node, form: Form) -> None:
        op = form.op
        if is_small(op):
            if op.weight.dtype != torch.float64 or op.bias.dtype != torch.float64:
                form = replace(form, op=widened_op(op))
            super().__setitem__(node, form)
            return
        weight, bias = self._narrow(op.weight, 0), self._narrow(op.bias, 1)
        if weight is not op.weight or bias is not op.bias:
            stored = replace(form, op=replace(op, weight=weight, bias=bias))
            if op.weight.dtype == torch.float64 and op.bias.dtype == torch.float64:
                self._remember(stored, form)  # the same values: read back without converting
            form = stored
        super().__setitem__(node, form)

    def _narrow(self, t: torch.Tensor, which: int) -> torch.Tensor:
        for stored, wide in reversed(self._recent):
            if t is (wide.op.weight, wide.op.bias)[which]:
                return (stored.op.weight, stored.op.bias)[which]
        return _narrowed(t)

    def __getitem__(self, node) -> Form:
        form = super().__getitem__(node)
        op = form.op
        if op.weight.dtype == torch.float64 and op.bias.dtype == torch.float64:
            return form
        for stored, wide in reversed(self._recent):
            if stored is form:
                return wide
        wide = replace(form, op=replace(op, weight=op.weight.double(), bias=op.bias.double()))
        self._remember(form, wide)
        return wide

    def stored(self, node, default=None):
        return super().get(node, default)

    def get(self, node, default=None):
        return self[node] if node in self else default

    def pop(self, node, *default):
        form = super().get(node)
        if form is not None:  # its float64 copy is not needed any more
            self._recent = [pair for pair in self._recent if pair[0] is not form]
        return super().pop(node, *default)


class LinearFormPass:
    """Computes forms for every node; the result drives `lower.lower_forms`."""

    def __init__(self, gm: torch.fx.GraphModule, consts: Constants, cost: affine.CostModel = affine.DEFAULT_COST):
        self.gm = gm
        self.cost = cost
        self._classifier = Classifier(gm, consts, stored_weights=True)
        self._rules: dict[torch.fx.Node, LinearOp | None] = {}
        self.forms: dict[torch.fx.Node, Form] = _FormStore()
        self.absorbed: set[torch.fx.Node] = set()
        self.rewire: dict[torch.fx.Node, torch.fx.Node] = {}  # metadata read -> node it now reads
        # Metadata reads of absorbed nodes that a later (materialized) node of equal shape serves.
        self.carried_reads: dict[torch.fx.Node, list[tuple[torch.fx.Node, torch.fx.Node]]] = {}
        self.refusals: list[RefusalRecord] = []
        # Sources named by an `Alternative`: their forms keep float64 weights (see `_final`).
        self.alternative_sources: set[torch.fx.Node] = set()
        # Partial sums that feed a sum: their branches and the names of the additions so far.
        self.sum_terms: dict[torch.fx.Node, tuple[list[Term], tuple[str, ...]]] = {}
        # Values whose shape is read beyond the layout steps after them: the operator before those
        # steps must stay there (`_move_after_before`), so that its output keeps their shape.
        self.pinned: set[torch.fx.Node] = set()
        # Metadata reads of values absorbed into a layout chain, served at lowering by the value
        # computed at a point of the chain with the same metadata: the operator's output (keyed by
        # the node the first layout step reads) or a replayed layout step (keyed by its node).
        self.chain_reads: dict[torch.fx.Node, list[tuple[torch.fx.Node, torch.fx.Node]]] = {}
        self.sum_parts: dict[torch.fx.Node, list[SumPart]] = {}  # sums computed as several parts
        self._index = {n: i for i, n in enumerate(gm.graph.nodes)}
        # Per-channel maps with several readers: why they cannot fold into all of them (None: they
        # can), and how many readers have yet to take theirs in.
        self._shared: dict[torch.fx.Node, str | None] = {}
        self._shared_pending: dict[torch.fx.Node, int] = {}
        self._shared_reported: set[torch.fx.Node] = set()
        self._identities: dict[tuple[int, int], AffineConv] = {}
        self._layout_chains: dict[torch.fx.Node, LayoutChain] = {}  # layout node -> the chain it ends
        self._visitors = {
            "affine": self._visit_affine,
            "refused": self._visit_refused,
            "identity": self._visit_identity,
            "scale": self._visit_scale,
            "shift": self._visit_shift,
            "sum": self._visit_sum,
            "concat": self._visit_concat,
            "layout": self._visit_layout,
            "average": self._visit_average,
            "pad_border": self._visit_pad_border,
        }

    def classify(self, node: torch.fx.Node) -> LinearOp | None:
        if node not in self._rules:
            self._rules[node] = self._classifier(node)
        return self._rules[node]

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> "LinearFormPass":
        unvisited: dict[torch.fx.Node, int] = {}  # users of a node not visited yet
        for node in self.gm.graph.nodes:
            rule = self.classify(node)
            if rule is not None:
                form = self._visitors[rule.kind](node, rule)
                if form is not None:
                    self.forms[node] = form
            # Nothing reads a visited node's rule again, nor the form of an input it absorbed:
            # dropping them keeps only the float64 weights still needed (not the whole model's).
            self._rules.pop(node, None)
            for x in node.all_input_nodes:
                if x in self.absorbed:
                    pending = self._shared_pending.get(x, 1) - 1
                    if pending <= 0:  # a shared map's form stays until its last reader took it in
                        self.forms.pop(x, None)
                    else:
                        self._shared_pending[x] = pending
                    continue
                left = unvisited.get(x, len(x.users)) - 1
                unvisited[x] = left
                if left == 0:
                    self._final(x)
        return self

    def _final(self, node: torch.fx.Node) -> None:
        """`node`'s form will be lowered as it is: keep its weights in the dtype of the module it
        becomes (the cast lowering makes anyway) instead of float64.

        Only when every user is visited and none absorbed (a consumer further on may look through
        an absorbed user at this form), and when the cast changes nothing lowering decides."""
        form = dict.get(self.forms, node)
        dtype = dtype_of(node)
        if (form is None or dtype is None or not dtype.is_floating_point or dtype == torch.float64
                or is_small(form.op) or node in self.alternative_sources
                or any(u in self.absorbed for u in node.users)):
            return
        op = form.op  # as stored: float64, or float32 where that is exact (the same values)
        weight, bias = op.weight.to(dtype), op.bias.to(dtype)
        if weight.dtype == op.weight.dtype and bias.dtype == op.bias.dtype:
            return
        cast = replace(op, weight=weight, bias=bias)
        if op.is_identity or cast.is_identity or bool(op.bias.any()) != bool(bias.any()):
            return
        dict.__setitem__(self.forms, node, replace(form, op=cast))

    def refuse(self, where: str, reason: str) -> RefusalRecord:
        record = RefusalRecord(where, reason)
        self.refusals.append(record)
        return record

    # -- costs -------------------------------------------------------------------------------
    def op_cost(self, op: AffineConv, source: torch.fx.Node, out_shape, axis: int) -> float:
        in_elements = math.prod(shape_of(source) or (0,))
        return self.cost.conv(op, in_elements, positions(out_shape, axis), _itemsize(source))

    def join_cost(self, node: torch.fx.Node) -> float:
        return self.cost.elementwise(math.prod(shape_of(node)), 2, _itemsize(node))

    # -- inputs ------------------------------------------------------------------------------
    def _real_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for u in node.users if not is_metadata_read(u, node)]

    def _reads(self, node: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
        """Metadata reads that must be served when `node` disappears: (reader, node read)."""
        own = [(u, node) for u in node.users if is_metadata_read(u, node)]
        return own + self.carried_reads.get(node, [])

    def _same_metadata(self, a: torch.fx.Node, b: torch.fx.Node) -> bool:
        return shape_of(a) == shape_of(b) and dtype_of(a) == dtype_of(b)

    def _carrier_problem(self, node: torch.fx.Node, consumer: torch.fx.Node | None) -> str | None:
        """Why `node`'s metadata reads could not be served if `consumer` absorbed it, or None."""
        reads = self._reads(node)
        if not reads:
            return None
        form = self.forms[node]
        if not form.has_layout and self._same_metadata(form.source, node):
            return None  # served by the source, which is computed earlier
        if consumer is None:
            return "its shape is read and no fused value has the same shape"
        if self._same_metadata(consumer, node):
            later = [r for r, _ in reads if self._is_ancestor(r, consumer)]
            if not later:
                return None
            return f"{later[0].name} reads its shape and is needed to compute {consumer.name}"
        rule = self.classify(consumer)
        if rule is not None and rule.kind == "layout" and self._chain_point(node) is not None:
            return None  # served by the lowered chain's value at `node`'s place (`absorb`)
        return (f"{reads[0][0].name} reads its shape, and {consumer.name}, which would absorb it, has "
                "a different shape")

    def _chain_point(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """The point of `node`'s form whose lowered value has `node`'s metadata, for a layout step
        absorbing `node`: the operator's output (`node` itself, when no layout step follows the
        operator yet: `b, n, c = linear(x).shape`), or the last layout step (per-channel maps
        after it keep its shape: `m, c = bn(y.reshape(b * n, c)).shape`). None if there is none."""
        form = self.forms[node]
        if not form.after:
            return node
        last = form.after[-1].node
        return last if self._same_metadata(last, node) else None

    def _is_ancestor(self, a: torch.fx.Node, b: torch.fx.Node) -> bool:
        """Is `b` computed from `a`? (Searches forward from `a`, no further than `b`.)"""
        limit = self._index.get(b, math.inf)
        seen, stack = set(), [a]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u is b:
                    return True
                if u not in seen and self._index.get(u, math.inf) < limit:
                    seen.add(u)
                    stack.append(u)
        return False

    def absorbable(self, node: torch.fx.Node, consumer: torch.fx.Node | None = None) -> bool:
        """Can `consumer` fold `node`'s form into its own? For a single consumer, or for a
        per-channel map that every one of its readers folds in (`shared_fold_problem`)."""
        form = self.forms.get(node)
        if form is None:
            return False
        readers = len(self._real_users(node))
        if readers > 1:
            return self.shared_fold_problem(node) is None
        return readers == 1 and self._carrier_problem(node, consumer) is None

    def shared_fold_problem(self, node: torch.fx.Node) -> str | None:
        """Why `node`'s form cannot be folded into each of its several readers, or None.

        Rule: a per-channel map read by several linear operations, `a(m(x))`, `b(m(x))`, becomes
        `(a.m)(x)`, `(b.m)(x)`: each reader takes a copy of the map, which costs it nothing (the
        geometry of a composition with a per-channel map is the reader's own), and the map is no
        longer computed. Only when every reader takes it: otherwise nothing is saved."""
        if node in self._shared:
            return self._shared[node]
        form = self.forms[node]
        problem = None
        moved = self._move_after_before(form) if form.after else form
        if not form.op.is_per_channel or form.alternative is not None:
            problem = "it is not a per-channel map: each reader would compute it again"
        elif moved is None:
            problem = "a layout change between it and its readers cannot be moved before it"
        else:
            problem = self._carrier_problem(node, None)
        shape = shape_of(node)
        for reader in self._real_users(node) if problem is None else ():
            rule = self.classify(reader)
            if (rule is None or rule.kind != "affine" or len(rule.inputs) != 1 or rule.inputs[0] is not node
                    or shape is None):
                problem = f"{reader.name} reads it and cannot take a per-channel map in"
                break
            axis = rule.axis % len(shape)
            op = at_layout(rule.op, len(shape), axis)
            if op is None or axis != form.axis:
                problem = f"{reader.name} reads it along another axis"
                break
            reason = affine.compose_refusal(op, moved.op)
            if reason:
                problem = f"{reader.name} cannot take it in: {reason}"
                break
        self._shared[node] = problem
        if problem is None:
            self._shared_pending[node] = len(self._real_users(node))
        return problem

    def absorb(self, node: torch.fx.Node, consumer: torch.fx.Node) -> None:
        """Fold `node` into `consumer`; its metadata reads go to the source or travel on."""
        self.absorbed.add(node)
        reads = self._reads(node)
        if not reads:
            return
        form = self.forms[node]
        if not form.has_layout and self._same_metadata(form.source, node):
            for reader, value in reads:
                self.rewire[reader] = (value, form.source)  # reader -> (node it read, node it reads now)
        elif self._same_metadata(consumer, node):
            self.carried_reads.setdefault(consumer, []).extend(reads)
        else:
            # A layout step absorbs `node` (`b, n, c = y.shape; bn(y.reshape(b * n, c))`, or
            # `y.reshape_as(node)` further down): the reads take the chain's value at `node`'s
            # place when it is lowered, so the operator must stay before the layout steps.
            self.pinned.add(form.after[0].node.args[0] if form.after else node)
            rule = self.classify(consumer)
            point = self._chain_point(node) if rule is not None and rule.kind == "layout" else None
            if point is not None:
                self.chain_reads.setdefault(point, []).extend(reads)

    def identity_form(self, node: torch.fx.Node, axis: int) -> Form | None:
        shape = shape_of(node)
        if shape is None or len(shape) < 2:
            return None
        axis %= len(shape)
        key = (shape[axis], spatial_dims(len(shape), axis))
        op = self._identities.get(key)
        if op is None:  # one per size: operators are values, never updated in place
            op = self._identities[key] = affine.identity(*key)
        return Form(node, op, axis, axis, len(shape))

    def input_form(self, node: torch.fx.Node, axis: int | None, consumer: torch.fx.Node) -> tuple[Form | None, bool]:
        """The form to extend for input `node`, and whether it comes from `node`'s own form."""
        shape = shape_of(node)
        if shape is None or len(shape) < 2:
            return None, False
        if self.absorbable(node, consumer):
            form = self.forms[node]
            if axis is None or form.axis == axis % len(shape):
                return form, True
            if form.op.is_identity and not form.has_layout:
                # An identity (Dropout, nn.Identity before a Linear on the last axis) is one along
                # every axis: restate it along the consumer's.
                along = self.identity_form(form.source, axis)
                if along is not None:
                    return replace(form, op=along.op, axis=along.axis, op_axis=along.op_axis,
                                   op_ndim=along.op_ndim), True
        return self.identity_form(node, 1 if axis is None else axis), False

    def _own_axis(self, node, consumer) -> int | None:
        if node in self._layout_chains:
            return self._layout_chains[node].form.axis
        return self.forms[node].axis if self.absorbable(node, consumer) else None

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
        form, owned = self.input_form(x, None, node)
        if form is None:
            return None
        if node.op == "call_method" and node.target == "contiguous" and owned and form.after and not node.kwargs \
                and len(node.args) == 1:
            # After layout steps (a window reverse: view, permute, contiguous, view) the copy is
            # one more step, replayed after the fused operator in its place.
            self.absorb(x, node)
            return replace(form, after=form.after + (LayoutStep(node, True),), members=form.members + (rule.member,),
                           origin=None, alternative=None)
        if node.op == "call_method" and node.target == "contiguous" and (not owned or form.after):
            # `contiguous()` copies a strided view (a transpose) into a dense tensor, which a `view`
            # after it may need: it is an identity only on the fresh output of a fused operator.
            if owned and self._reaches_linear(node):
                self.refuse(", ".join(form.members + (rule.member,)),
                            "kept apart: contiguous() after layout steps copies their strided result, and "
                            "the linear operation after it is not moved across the copy")
            return None
        if owned:
            self.absorb(x, node)
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
            # Say why the linear neighbours (before it, or the one reading it) stay apart.
            before = self.forms[x].members if x in self.forms and len(self._real_users(x)) == 1 else ()
            reader = self._single_user(node)
            reader_rule = self.classify(reader) if reader is not None else None
            after = (reader_rule.member,) if reader_rule is not None and reader_rule.kind in (
                "affine", "scale", "shift") else ()
            if before or after:
                self.refuse(", ".join(before + (rule.member,) + after),
                            "the constant varies along several axes: not a per-channel map")
            return None
        if axes:
            axis = axes.pop()
        else:
            own = self._own_axis(x, node)
            axis = 1 if own is None else own
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
        own_cost = self.op_cost(op, x, out_shape, axis)
        own_macs = op.cost * positions(out_shape, axis)
        if x in self._layout_chains:
            through = self._through_layout_chain(node, x, axis, op, member, own_cost, own_macs)
            if through is not None:
                return through
        form, owned = self.input_form(x, axis, node)
        if form is None:
            return None
        if owned and op.is_per_channel and form.op.is_crop and not form.has_layout:
            follower = linear_follower(self, node)
            if follower is not None and follower not in self._real_users(node):
                # Composed with the crop, the map would stay with it (a crop is no pointwise map);
                # alone it moves through the pooling or layout change after it into `follower`.
                self.refuse(", ".join(form.members + (member,)),
                            f"kept apart: the crop stays, and the map moves on to {follower_name(self, follower)}")
                owned, form = False, self.identity_form(x, axis)
        alternative = None
        if owned:
            combined, reason, cost_only = self._compose(op, form, node, own_cost, own_macs)
            if combined is not None:
                self.absorb(x, node)
                # A per-channel map after the refused step changes neither its geometry nor exactness.
                keep = form.alternative if op.is_per_channel and not combined.has_layout else None
                return replace(combined, members=form.members + (member,), parts_cost=form.parts_cost + own_cost,
                               parts_macs=form.parts_macs + own_macs, origin=None, n_ops=form.n_ops + 1,
                               alternative=keep)
            refusal = self.refuse(", ".join(form.members + (member,)), reason)
            if cost_only and not form.has_layout and self._may_end_in_sum(node):
                alternative = Alternative(x, node, refusal)
                self.alternative_sources.add(x)
        elif x in self.forms and len(self._real_users(x)) == 1:
            problem = self._carrier_problem(x, node)
            before = self.forms[x]
            if problem:
                self.refuse(", ".join(before.members + (member,)), f"kept apart: {problem}")
            elif before.axis != axis and not before.op.is_identity:
                # ResMLP: an Affine over channels, `.transpose(1, 2)`, a Linear over the tokens.
                self.refuse(", ".join(before.members + (member,)),
                            f"kept apart: {_kind_of(op)} along another axis than the {_kind_of(before.op)}'s "
                            f"(axis {axis} against {before.axis}): no one operator on a single axis computes both")
        elif (x in self.forms and x not in self._shared_reported and self.forms[x].op.is_per_channel
              and not self.forms[x].op.is_identity):
            self._shared_reported.add(x)
            readers = self._real_users(x)
            self.refuse(", ".join(self.forms[x].members + tuple(r.name for r in readers)),
                        f"kept: read by {len(readers)} operations, and {self.shared_fold_problem(x)}")
        return Form(x, op, axis, axis, len(out_shape), members=(member,), parts_cost=own_cost, parts_macs=own_macs,
                    origin=node, n_ops=1, alternative=alternative)

    def _may_end_in_sum(self, node: torch.fx.Node) -> bool:
        """Does `node`'s value reach a sum through per-channel maps only (a BatchNorm, a scale)?
        Only there may an `Alternative` be taken; elsewhere (a ConvFFN's 1x1 before its GELU)
        none is kept. A look ahead at the graph: the sum root decides."""
        for _ in range(PER_CHANNEL_LOOKAHEAD):
            user = self._single_user(node)
            rule = self.classify(user) if user is not None else None
            if rule is None:
                return False
            if rule.kind == "sum":
                return True
            if not (rule.kind in ("identity", "scale", "shift")
                    or (rule.kind == "affine" and rule.op.is_per_channel)):
                return False
            node = user
        return False

    def _compose(self, op: AffineConv, form: Form, node, own_cost: float,
                 own_macs: int) -> tuple[Form | None, str, bool]:
        """`op` after `form`: (composed form, "", False), or (None, why, cost_only), where
        `cost_only` says the composition is exact and was refused for its cost alone. The composed
        weights are computed only when accepted: costs are judged on a geometry stub."""
        if form.after:
            if op.is_per_channel:
                # A per-channel map commutes with layout steps that keep the channel axis whole.
                inner = at_layout(op, form.op_ndim, form.op_axis)
                reason = affine.compose_refusal(inner, form.op)
                if reason:
                    return None, reason, False
                return replace(form, op=affine.compose(widened_op(inner), form.op)), "", False
            moved = self._move_after_before(form)
            if moved is None:
                if form.after[0].node.args[0] in self.pinned:
                    return None, ("the layout change between the two operators reads the shape of the first "
                                  "one's output, which would no longer be computed"), False
                return None, "a layout change between the two operators cannot be moved before the first", False
            form = moved
        reason = affine.compose_refusal(op, form.op)
        if reason:
            return None, reason, False
        shape = shape_of(node)
        axis = form.axis
        npos = positions(shape, axis)
        fused = _geometry_stub(op, form.op)
        fused_cost = self.op_cost(fused, form.source, shape, axis)
        fused_macs = fused.cost * npos
        parts, parts_macs = form.parts_cost + own_cost, form.parts_macs + own_macs
        def figures() -> str:  # formatted only for a refusal
            return (f"{_ns(fused_cost)} and {fused_macs:,} MACs against {_ns(parts)} and {parts_macs:,} MACs "
                    "for the parts")

        if _memory_bound([op, form.op]):
            if fused_cost > parts:
                return None, f"not cheaper: one {fused.describe()} would take {figures()} (estimated latency)", True
        elif fused_macs > parts_macs:
            return None, f"not cheaper: one {fused.describe()} would need {figures()}", True
        return replace(form, op=affine.compose(widened_op(op), form.op), op_axis=axis, op_ndim=len(shape)), "", False

    def _move_after_before(self, form: Form) -> Form | None:
        """Apply `op` after the layout steps instead of before them (pointwise ops only)."""
        if not form.op.is_pointwise or form.shape_refs or form.after[0].node.args[0] in self.pinned:
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

    # -- sums --------------------------------------------------------------------------------
    def _visit_sum(self, node, rule: LinearOp) -> Form | None:
        """Collect the branches of a sum tree; decide once, at its root, how to group them."""
        axis = next((self.forms[x].axis for x in rule.inputs
                     if x not in self.sum_terms and self.absorbable(x, node)), None)
        terms: list[Term] = []
        members: tuple[str, ...] = ()  # every operation of the tree, in the order written
        for x, sign in zip(rule.inputs, rule.signs):
            if x in self.sum_terms and self._single_user(x) is node:
                inner, inner_members = self.sum_terms.pop(x)
                terms += [replace(t, sign=t.sign * sign) for t in inner]
                members += inner_members
                self.absorbed.add(x)
                self.carried_reads.setdefault(node, []).extend(self._reads(x))
            else:
                form, owned = self.input_form(x, axis, node)
                terms.append(Term(x, sign, form if form is not None else Form(x, None, 0, 0, 0), owned))
                members += terms[-1].form.members
        members += (rule.member,)
        if self._feeds_a_sum(node):
            self.sum_terms[node] = (terms, members)
            return None
        return self._settle_sum(node, terms, members)

    def _reaches_linear(self, node) -> bool:
        """Does `node` feed a linear operation through identities and layout steps only?"""
        for _ in range(PER_CHANNEL_LOOKAHEAD):
            node = self._single_user(node)
            rule = self.classify(node) if node is not None else None
            if rule is None or rule.kind not in ("identity", "layout"):
                return rule is not None and rule.kind in ("affine", "scale", "shift")
        return False

    def _reaches_per_channel(self, node) -> bool:
        """Does `node` feed a per-channel map (a norm, a scale) through identities and layout
        steps only?"""
        for _ in range(PER_CHANNEL_LOOKAHEAD):
            node = self._single_user(node)
            rule = self.classify(node) if node is not None else None
            if rule is None or rule.kind not in ("identity", "layout"):
                return rule is not None and (rule.kind in ("scale", "shift")
                                             or (rule.kind == "affine" and rule.op.is_per_channel))
        return False

    def _single_user(self, node):
        users = self._real_users(node)
        return users[0] if len(users) == 1 else None

    def _feeds_a_sum(self, node) -> bool:
        user = self._single_user(node)
        if user is None or len(user.users) == 0:
            return False
        rule = self.classify(user)
        return rule is not None and rule.kind == "sum" and self._carrier_problem_sum(node, user) is None

    def _carrier_problem_sum(self, node, user) -> str | None:
        reads = [(u, node) for u in node.users if is_metadata_read(u, node)] + self.carried_reads.get(node, [])
        if not reads:
            return None
        return None if self._same_metadata(user, node) and not any(
            self._is_ancestor(r, user) for r, _ in reads) else "metadata read"

    def _settle_sum(self, node, terms: list[Term], members: tuple[str, ...]) -> Form | None:
        """Group the branches of a complete sum into the cheapest set of fused operators."""
        out_shape = shape_of(node)
        joins = self.join_cost(node)
        terms, members = self._take_free_alternatives(terms, members)
        groups: dict[tuple, list[Term]] = {}
        for t in terms:
            groups.setdefault(_space_key(t.form), []).append(t)
        parts: list[SumPart] = []
        for key, group in groups.items():
            if key is None or len(group) == 1:
                parts += [self._as_part(t) for t in group]
                continue
            ops = [t.form.op if t.sign == 1.0 else affine.scaled(t.form.op, t.sign) for t in group]
            axis = group[0].form.axis
            source = group[0].form.source

            npos = positions(out_shape, axis)
            if _memory_bound(ops):
                def cost_of(op, source=source, axis=axis):
                    return self.op_cost(op, source, out_shape, axis)
                join = joins
            else:  # compute-bound: multiply-accumulates decide, an add counts one per element
                def cost_of(op, npos=npos):
                    return op.cost * npos
                join = math.prod(out_shape)

            blocks, best = affine.partition_sum(ops, cost_of, join)
            where = ", ".join(members)
            if len(blocks) > 1:
                self.refuse(where, self._partition_reason(ops, blocks, cost_of, join, out_shape, axis))
            for block in blocks:
                chosen = [group[i] for i in block]
                if len(chosen) == 1:
                    parts.append(self._as_part(chosen[0]))
                    continue
                for t in chosen:
                    if t.owned:
                        self.absorb(t.node, node)
                fused = affine.add([ops[i] for i in block])
                parts_cost = sum(t.form.parts_cost for t in chosen) + joins * (len(chosen) - 1)
                form = replace(chosen[0].form, op=fused, origin=None, parts_cost=parts_cost,
                               parts_macs=sum(t.form.parts_macs for t in chosen),
                               n_ops=sum(t.form.n_ops for t in chosen) + len(chosen) - 1,
                               members=tuple(m for t in chosen for m in t.form.members), alternative=None)
                parts.append(SumPart(1.0, form=form))
        if len(parts) == 1 and parts[0].form is not None:
            return self._through_shared_source(node, terms, replace(parts[0].form, members=members))
        if any(p.form is not None for p in parts):
            self.sum_parts[node] = parts
        return None

    def _take_free_alternatives(self, terms: list[Term],
                                members: tuple[str, ...]) -> tuple[list[Term], tuple[str, ...]]:
        """Branches whose composition with their source was refused for cost alone take it after
        all when the composed operator joins branches of its own geometry at no extra cost (a 1x1
        -> avg-pool branch beside a dense kxk: DBB). Judged on geometry stubs; the composed weights
        are computed only for a branch that takes it, and its refusal is withdrawn. Returns the
        terms and `members` with the operations a taken branch now adds before its own."""
        taken = list(terms)
        for i, t in enumerate(terms):
            alt = t.form.alternative
            if alt is None or not t.owned:
                continue
            inner = self._alternative_inner(t.form)
            if inner is None:
                continue  # the refusal stands
            stub = _geometry_stub(t.form.op, inner.op)
            space = (inner.source,) + _space_key(t.form)[1:]
            geometry = affine.geometry_key(stub)
            peers = [u.form.op for j, u in enumerate(taken)
                     if j != i and u.form.op is not None and _space_key(u.form) == space
                     and affine.geometry_key(u.form.op) == geometry]
            if not affine.joins_for_free(peers, stub):
                continue  # the refusal stands
            self.absorb(alt.inner, alt.consumer)
            self.refusals[:] = [r for r in self.refusals if r is not alt.refusal]
            self.alternative_sources.discard(alt.inner)
            composed = replace(t.form, source=inner.source, op=affine.compose(t.form.op, inner.op),
                               members=inner.members + t.form.members, origin=None, alternative=None,
                               parts_cost=inner.parts_cost + t.form.parts_cost,
                               parts_macs=inner.parts_macs + t.form.parts_macs, n_ops=inner.n_ops + t.form.n_ops)
            taken[i] = replace(t, form=composed)
            own = [m for m in t.form.members if m in members]
            at = members.index(own[0]) if own else len(members)
            members = members[:at] + inner.members + members[at:]
        return taken, members

    def _alternative_inner(self, form: Form) -> Form | None:
        """The form that `form.alternative` composes `form` with, if that is still exact and
        `form.source` can still disappear into it; else None."""
        alt = form.alternative
        source = alt.inner
        if source is not form.source or source in self.absorbed or form.has_layout:
            return None
        inner = self.forms.get(source)
        if (inner is None or inner.has_layout or len(self._real_users(source)) != 1
                or self._carrier_problem(source, None) is not None):
            return None
        if (form.op_axis, form.op_ndim) != (inner.axis, len(shape_of(source))):
            return None
        if affine.compose_refusal(form.op, inner.op):
            return None
        return inner

    def _through_shared_source(self, node, terms: list[Term], form: Form) -> Form:
        """Branches that all read one linear value `s` (`a(s) + b(s)`, RepGhost's `cheap(s) +
        bn(s)`) merged into one operator: `s` now has that one consumer, so compose with it too."""
        source = form.source
        inner = self.forms.get(source)
        if inner is None or form.has_layout or inner.after or source in self.absorbed:
            return form
        ends = {t.node for t in terms if t.owned and t.form.source is source} | {node}
        for reader in self._real_users(source):
            while reader not in ends and reader in self.absorbed:  # absorbed nodes have one consumer
                reader = self._single_user(reader)
            if reader not in ends:
                return form  # `source` is read elsewhere too
        problem = self._carrier_problem(source, node)
        if problem is not None:
            self.refuse(", ".join(inner.members + form.members), f"kept apart: {problem}")
            return form
        shape = shape_of(node)
        own_cost = self.op_cost(form.op, source, shape, form.axis)
        own_macs = form.op.cost * positions(shape, form.axis)
        combined, reason, _ = self._compose(form.op, inner, node, own_cost, own_macs)
        if combined is None:
            self.refuse(", ".join(inner.members + form.members), reason)
            return form
        self.absorb(source, node)
        return replace(combined, members=inner.members + form.members, parts_cost=inner.parts_cost + form.parts_cost,
                       parts_macs=inner.parts_macs + form.parts_macs, origin=None, n_ops=inner.n_ops + form.n_ops,
                       alternative=None)

    def _as_part(self, t: Term) -> SumPart:
        return SumPart(t.sign, node=t.node)

    def _partition_reason(self, ops, blocks, cost_of, join, shape, axis) -> str:
        merged = [affine.add([ops[i] for i in b]) if len(b) > 1 else ops[b[0]] for b in blocks]
        kept = " + ".join(op.describe() for op in merged)
        reason = affine.sum_refusal(ops)
        if reason:
            return f"kept as {len(blocks)} operators ({kept}): {reason}"
        whole = affine.add(ops)
        npos = positions(shape, axis)
        best = sum(cost_of(op) for op in merged) + join * (len(merged) - 1)
        unit = _ns if _memory_bound(ops) else (lambda c: f"{c:,.0f} MACs")
        return (f"not cheaper as one: {whole.describe()} would cost {unit(cost_of(whole))} against {unit(best)} for "
                f"{kept} ({whole.cost * npos:,} MACs against {sum(op.cost for op in merged) * npos:,})")

    # -- concatenations ----------------------------------------------------------------------
    def _visit_concat(self, node, rule: LinearOp) -> Form | None:
        shape = shape_of(node)
        axis = rule.axis % len(shape)
        found = [self.input_form(x, axis, node) for x in rule.inputs]
        forms = [f for f, _ in found]
        if any(f is None for f in forms) or len(set(rule.inputs)) != len(rule.inputs):
            return None
        if not all(_same_space(forms[0], f) for f in forms[1:]) or forms[0].has_layout:
            return None
        ops = [f.op for f in forms]
        where = ", ".join([m for f in forms for m in f.members] + [rule.member])
        reason = affine.concat_refusal(ops)
        parts = sum(f.parts_cost for f in forms) + self.cost.elementwise(math.prod(shape), len(forms),
                                                                         _itemsize(node))
        parts_macs = sum(f.parts_macs for f in forms)
        if reason is None:
            fused = affine.concat(ops)
            fused_macs = fused.cost * positions(shape, axis)
            if fused_macs > parts_macs:
                reason = (f"not cheaper: one {fused.describe()} would need {fused_macs:,} MACs against "
                          f"{parts_macs:,} for the branches")
        if reason:
            self.refuse(where, reason)
            return None
        for x, (_, owned) in zip(rule.inputs, found):
            if owned:
                self.absorb(x, node)
        return Form(forms[0].source, fused, axis, axis, len(shape),
                    members=tuple(m for f in forms for m in f.members) + (rule.member,), parts_cost=parts,
                    parts_macs=parts_macs, n_ops=sum(f.n_ops for f in forms) + 1)

    # -- averages (passes/commute.py) -------------------------------------------------------
    def _visit_average(self, node, rule: LinearOp) -> Form | None:
        return visit_average(self, node, rule)

    def _visit_pad_border(self, node, rule: LinearOp) -> Form | None:
        return visit_pad_border(self, node, rule)

    # -- layout ------------------------------------------------------------------------------
    def _visit_layout(self, node, rule: LinearOp) -> Form | None:
        x = rule.inputs[0]
        if x in self._layout_chains:
            chain = self._layout_chains[x]
            self._hold_layout(node, rule, chain.base, chain.form, chain.refusal)
            return None
        if not self.absorbable(x, node):
            if x in self.forms and len(self._real_users(x)) == 1 and self._reaches_linear(node):
                problem = self._carrier_problem(x, node)  # say why, when a linear op waits beyond
                if problem:
                    self.refuse(", ".join(self.forms[x].members + (rule.member,)), f"kept apart: {problem}")
            return None
        form = self.forms[x]
        # A per-channel map further on commutes back through the layout steps onto any operator
        # (`B, C, H, W = y.shape; bn1d(conv(x).view(B, C, -1))`); only a pointwise operator moves
        # across them to a linear operation.
        if not form.op.is_pointwise and not self._reaches_per_channel(node):
            if self._reaches_linear(node):
                refusal = self.refuse(", ".join(form.members + (rule.member,)),
                                      f"kept apart: {form.op.describe()} is not pointwise, so it cannot move "
                                      "across the layout change to the linear operation after it")
                self._hold_layout(node, rule, x, form, refusal)
            return None
        refs = form.shape_refs
        if rule.shape_of is not None:
            # `x.reshape_as(y)`: served by `op`'s output when `y` is the value the layout steps
            # began from (its metadata is that of `op`'s output).
            first = form.after[0].node.args[0] if form.after else None
            if rule.shape_of is not first or not self._same_metadata(first, rule.shape_of):
                return None
            refs = refs + ((node, rule.shape_of),)
        new_axis = channel_axis_after(node, rule.layout, shape_of(x), form.axis)
        if new_axis is None:
            if self._reaches_linear(node):
                self.refuse(", ".join(form.members + (rule.member,)),
                            "kept apart: the layout change splits or merges the channel axis")
            return None
        self.absorb(x, node)
        step = LayoutStep(node, rule.layout in ("flatten", "transpose", "permute", "movedim", "unsqueeze"))
        return replace(form, axis=new_axis, after=form.after + (step,), members=form.members + (rule.member,),
                       origin=None, shape_refs=refs, alternative=None)

    # -- a linear operation after layout steps after a conv -------------------------------------
    _AGNOSTIC_LAYOUTS = ("flatten", "transpose", "permute", "movedim", "unsqueeze")

    def _hold_layout(self, node, rule: LinearOp, base: torch.fx.Node, form: Form, refusal: RefusalRecord) -> None:
        """Remember `node` as one more layout step after `base`'s form (see `LayoutChain`), when the
        step is valid whatever the channel count, keeps the channel axis whole, and leads to a
        linear operation; nothing is absorbed yet."""
        x = rule.inputs[0]
        if (rule.layout not in self._AGNOSTIC_LAYOUTS or rule.shape_of is not None or form.shape_refs
                or len(self._real_users(x)) != 1 or (x is not base and self._reads(x))
                or not self._reaches_linear(node)):
            return
        new_axis = channel_axis_after(node, rule.layout, shape_of(x), form.axis)
        if new_axis is None:
            return
        step = LayoutStep(node, True, new_axis)
        chained = replace(form, axis=new_axis, after=form.after + (step,), members=form.members + (rule.member,),
                          origin=None, alternative=None)
        self._layout_chains[node] = LayoutChain(base, chained, refusal)

    def _through_layout_chain(self, node, x, axis: int, op: AffineConv, member: str, own_cost: float,
                              own_macs: int) -> Form | None:
        """`op` (pointwise on the channel axis: a Linear after `permute(0, 2, 3, 1)`) moved before the
        layout steps held at `x` and composed into the operator before them, when exact and not
        more expensive; else None, with the refusal saying why."""
        chain = self._layout_chains[x]
        form, base = chain.form, chain.base
        if axis != form.axis or not op.is_pointwise or self._reads(x):
            return None
        if self._carrier_problem(base, node) is not None:
            return None
        moved = at_layout(op, form.op_ndim, form.op_axis)
        where = ", ".join(form.members + (member,))
        if moved is None:
            return None
        reason = affine.compose_refusal(moved, form.op)
        if reason:
            self._replace_refusal(chain.refusal, where, reason)
            return None
        shape = shape_of(node)
        fused = _geometry_stub(moved, form.op)
        parts, parts_macs = form.parts_cost + own_cost, form.parts_macs + own_macs
        fused_cost = self.op_cost(fused, form.source, shape, axis)
        fused_macs = fused.cost * positions(shape, axis)
        memory_bound = _memory_bound([moved, form.op])
        if (fused_cost > parts) if memory_bound else (fused_macs > parts_macs):
            measure = "estimated latency" if memory_bound else "multiply-accumulates"
            self._replace_refusal(chain.refusal, where, (
                f"not cheaper: {member} on the channel axis after the layout change, moved before it into "
                f"{form.op.describe()}, would make one {fused.describe()} of {_ns(fused_cost)} and "
                f"{fused_macs:,} MACs against {_ns(parts)} and {parts_macs:,} MACs for the parts ({measure})"))
            return None
        self.refusals[:] = [r for r in self.refusals if r is not chain.refusal]
        self.absorb(base, node)
        for step in form.after:
            if step.axis is not None:  # the chain's own steps (a composed form's are absorbed already)
                self.absorbed.add(step.node)
        return replace(form, op=affine.compose(widened_op(moved), form.op), axis=axis,
                       members=form.members + (member,), parts_cost=parts, parts_macs=parts_macs,
                       n_ops=form.n_ops + 1, origin=None, alternative=None)

    def _replace_refusal(self, old: RefusalRecord, where: str, reason: str) -> None:
        self.refusals[:] = [r for r in self.refusals if r is not old]
        self.refuse(where, reason)


PER_CHANNEL_LOOKAHEAD = 4  # per-channel maps looked through for a sum after a refused composition


def _geometry_stub(after: AffineConv, before: AffineConv) -> AffineConv:
    """An operator with the geometry of `after(before(x))` (zero weights, no memory of their own:
    an expanded scalar), for costing and comparing it."""
    stride, padding, dilation, kernel, groups = affine.composed_geometry(after, before)
    if after.is_per_channel:
        return before
    w = torch.zeros(1, dtype=torch.float64).expand(after.out_channels, before.in_channels // groups, *kernel)
    mode = before.padding_mode if before.has_padding else after.padding_mode
    return AffineConv(w, torch.zeros(1, dtype=torch.float64).expand(after.out_channels), stride, padding,
                      dilation, groups, mode)


def _kind_of(op: AffineConv) -> str:
    """How a refusal names an operator by what it does: "per-channel map", "Linear", or its description."""
    if op.is_per_channel:
        return "per-channel map"
    return "Linear" if op.nd == 0 else op.describe()


def _memory_bound(ops) -> bool:
    """Channel-wise operators only (depthwise convs, norms, scales): latency decides, not MACs.

    Such operators move as many bytes as they compute, so fewer, larger kernels win on a CPU
    (a depthwise 1xk + kx1 pair with its norms and add against one kxk). Anything that mixes
    channels is compute-bound and judged by multiply-accumulates.
    """
    return all(op.groups == op.in_channels == op.out_channels for op in ops)


def _ns(cost: float) -> str:
    return f"{cost / 1000:,.1f} us" if cost >= 1000 else f"{cost:,.0f} ns"


def _itemsize(node) -> int:
    dtype = dtype_of(node)
    return dtype.itemsize if dtype is not None else 4


def _space_key(form: Form):
    if form.op is None:
        return None
    return (form.source, form.axis, form.op_axis, form.op_ndim, tuple(s.node for s in form.before),
            tuple(s.node for s in form.after))


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
            if all(in_shape[d] == 1 for d in range(start, end + 1) if d != axis):
                return start  # merged only with size-1 axes (after global pooling): still whole
            return None
        if layout in ("reshape", "squeeze", "unsqueeze"):
            if layout == "squeeze" and (not args and "dim" not in kw):
                return None  # squeeze() of every size-1 axis may drop the channels for other inputs
            return _whole_axis_after_reshape(in_shape, out_shape, axis)
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    return None


def _whole_axis_after_reshape(in_shape, out_shape, axis: int) -> int | None:
    """Where channel axis `axis` lands through a row-major reshape, if it stays whole.

    It stays whole when some output axis has its size and the axes before it hold exactly the
    elements of the input axes before it (`[B*N, C] -> [B, N, C]`, `[B, C, H, W] -> [B, C, HW]`).
    The first such axis is taken, so size-1 axes inserted before the channels move it along.
    """
    before = math.prod(in_shape[:axis])
    c = in_shape[axis]
    product = 1
    for j, size in enumerate(out_shape):
        if product == before and size == c and (c != 1 or j == axis):
            return j
        product *= size
        if product > before and before:
            return None
    return None


def _movedim_perm(n: int, src: list[int], dst: list[int]) -> list[int]:
    """`perm` such that output axis i is input axis perm[i]."""
    perm = [None] * n
    for s, d in zip(src, dst):
        perm[d] = s
    rest = iter(i for i in range(n) if i not in src)
    return [p if p is not None else next(rest) for p in perm]
