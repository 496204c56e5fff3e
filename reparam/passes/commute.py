"""Pointwise maps move through averages that keep constants.

Rule: a pointwise affine map `y = W x + b` (a BatchNorm, a channel affine, a 1x1 convolution: one
output position reads one input position) commutes with an average that treats every channel
alike and whose weights sum to one at each output position:

    avg(W x + b) = W avg(x) + b

Such averages are global average pooling (`AdaptiveAvgPoolNd`, any output size, and
`x.mean(spatial axes)`, with or without `keepdim`), and `avg_pool` whose windows are divided by
the number of input elements they cover (no padding, or `count_include_pad=False`; `ceil_mode`
either way). They are *not* convolutions (border windows have other weights), so the map cannot be
composed with the pool; but it can move to the pool's other side and fold into a linear operation
that follows (a `Linear` head, a 1x1 convolution): timm's BatchNorm after a residual sum, before
`global_pool` and the classifier, becomes part of the classifier.

`avg_pool` with zero padding counted (`count_include_pad=True`) is a depthwise convolution in the
algebra instead: there a per-channel shift does not commute (the border averages zeros in), and
the composition rules say so.

    pattern   a node `average` whose input has a linear form
    check     the form is pointwise, the average is its only reader, the channel axis is not
              averaged, and a linear operation follows (through identities and layout steps)
    rewrite   the average becomes a layout step of the form, replayed on the source when the form
              is lowered; a following linear operation moves the map after it (linear_forms)

A failed check leaves the map where it is and returns the reason, which the report names
(`unaccounted_linear_ops` looks through averages, so such a map is never left unexplained).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.fx

from .. import affine
from ..trace import dtype_of, shape_of
from .ops import LinearOp

if TYPE_CHECKING:
    from .linear_forms import Form, LinearFormPass

# Rule kinds a value passes through unchanged in meaning (channel axis whole, one reader).
_PASS_THROUGH = ("identity", "layout", "average")
_LINEAR = ("affine", "scale", "shift")


def channel_axis_after_average(rule: LinearOp, axis: int) -> int | None:
    """The channel axis after averaging over `rule.dims`, or None when the channels are averaged."""
    if axis in rule.dims:
        return None
    return axis if rule.keepdim else axis - sum(d < axis for d in rule.dims)


def linear_follower(forms: "LinearFormPass", node: torch.fx.Node) -> torch.fx.Node | None:
    """The linear operation reading `node`'s value through identities, layout steps and averages,
    each the only reader of the one before (or the first of several linear readers at the end);
    None when something else reads it first."""
    current = node
    while True:
        users = forms._real_users(current)
        if len(users) > 1:
            # Several readers (a classifier and a distillation head): each must be linear, and
            # takes its own copy of the map (`LinearFormPass.shared_fold_problem`).
            if all((rule := forms.classify(u)) is not None and rule.kind in _LINEAR and rule.inputs
                   and rule.inputs[0] is current for u in users):
                return users[0]
            return None
        if len(users) != 1:
            return None
        user = users[0]
        rule = forms.classify(user)
        if rule is None or not rule.inputs or rule.inputs[0] is not current:
            return None
        if rule.kind in _LINEAR:
            return user
        if rule.kind not in _PASS_THROUGH:
            return None
        current = user


def through_average_refusal(forms: "LinearFormPass", node: torch.fx.Node, x: torch.fx.Node, form: "Form",
                            follower: torch.fx.Node | None, new_axis: int | None) -> tuple[str | None, bool]:
    """Why `form` (the value of `x`) cannot move through the average `node` (None when it can), and
    whether the report must name it: when it stays beside a linear operation that could have
    absorbed it, or when it is a per-channel map left alone before the pool."""
    if new_axis is None:
        return "the average runs over the channel axis: not a per-channel average", follower is not None
    readers = forms._real_users(x)
    if len(readers) != 1:
        others = ", ".join(u.name for u in readers if u is not node)
        return (f"kept before the average pooling: its value is also read by {others}, so it cannot move "
                "after the pool"), follower is not None and form.op.is_pointwise
    if not form.op.is_pointwise:
        return (f"{form.op.describe()} mixes neighbouring positions: it does not commute with the average "
                "pooling after it, so it cannot fold into the linear operation after the pool"), follower is not None
    if follower is None:
        return ("kept before the average pooling: nothing linear reads the average (through identities and "
                "layout steps) to fold it into"), form.op.is_per_channel
    if not forms.absorbable(x, node):
        return f"kept before the average pooling: {forms._carrier_problem(x, node)}", True
    return None, False


def visit_average(forms: "LinearFormPass", node: torch.fx.Node, rule: LinearOp) -> "Form | None":
    """The form of `node = average(x)`: `x`'s pointwise form with the average as a layout step."""
    x = rule.inputs[0]
    form = forms.forms.get(x)
    if form is None:
        return None  # a plain value averaged: nothing to carry
    shape = shape_of(x)
    follower = linear_follower(forms, node)
    new_axis = channel_axis_after_average(rule, form.axis) if shape is not None else None
    reason, name_it = through_average_refusal(forms, node, x, form, follower, new_axis)
    if reason is not None:
        if name_it:
            where = form.members + (rule.member,) + ((follower_name(forms, follower),) if follower else ())
            forms.refuse(", ".join(where), reason)
        return None
    from .linear_forms import LayoutStep

    forms.absorb(x, node)
    return replace(form, axis=new_axis, after=form.after + (LayoutStep(node, True),),
                   members=form.members + (rule.member,), origin=None)


def visit_pad_border(forms: "LinearFormPass", node: torch.fx.Node, rule: LinearOp) -> "Form | None":
    """`pad_border(op(x), p, v)` (passes/fill.py) is `op` applied to `x` padded with zeros when `v`
    is what `op` gives for a zero input: its bias, for a pointwise `op` (DBB's BNAndPad fills
    the border with the BatchNorm's shift). `v` is compared to the bias within the rounding of
    the model's dtype, since the model computes it in that dtype."""
    x = rule.inputs[0]
    form = forms.forms.get(x)
    if form is None:
        return None  # a plain value padded: stays as written
    where = ", ".join(form.members + (rule.member,))
    if not form.op.is_pointwise or form.has_layout or form.axis != 1:
        forms.refuse(where, f"the border is set to constants after padding {form.op.describe()}, which is not "
                            "a pointwise map on this layout: not a padded convolution")
        return None
    if len(forms._real_users(x)) != 1:
        others = ", ".join(u.name for u in forms._real_users(x) if u is not node)
        forms.refuse(where, f"kept apart: its value is also read by {others}")
        return None
    if not forms.absorbable(x, node):
        forms.refuse(where, f"kept apart: {forms._carrier_problem(x, node)}")
        return None
    bias = form.op.bias
    dtype = dtype_of(node) or torch.float64
    tolerance = 64 * torch.finfo(dtype).eps * max(1.0, float(bias.abs().max()), float(rule.shift.abs().max()))
    if bias.shape != rule.shift.shape or float((bias - rule.shift).abs().max()) > tolerance:
        forms.refuse(where, f"the border is set to values other than what {', '.join(form.members)} gives for "
                            "a zero input (its shift): not the same as padding its input with zeros")
        return None
    forms.absorb(x, node)
    # The zero padding moves to the map's input, whose channel count may differ from its output's
    # (DBB's 1x1 that widens before BNAndPad, ECBSR's conv1x1-conv3x3 with a depth multiplier).
    padding = affine.zero_pad(form.op.in_channels, rule.op.padding, rule.op.nd, device=bias.device)
    return replace(form, op=affine.compose(form.op, padding), members=form.members + (rule.member,),
                   origin=None, n_ops=form.n_ops + 1)


def follower_name(forms: "LinearFormPass", node: torch.fx.Node) -> str:
    rule = forms.classify(node)
    return rule.member if rule is not None and rule.member else node.name
