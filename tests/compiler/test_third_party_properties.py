"""Property tests: random fusible blocks (see strategies.py) written with in-place accumulation.

Each block of `S.fusible_nets()` is rewritten the way model libraries write sums: `out = first
branch`, then `out += y` / `out.add_(y)` / `out.sub_(y)` / `out.add_(y, alpha=-1)` per branch, the
layer scale as `out.mul_(gamma)` / `out *= gamma` / `out.div_(gamma)`, the shift as
`out.add_(beta)` / `out.neg_().add_(beta)`, the residual as `out.add_(x)`, and an in-place ReLU
between blocks. Every such update is invisible to other readers, so the network must fuse exactly
as its out-of-place spelling does: one conv per block, nothing in place, nothing refused.

A second property reads the first branch again after the updates (through a view): those updates
must stay in place and be reported, and the numbers must still match.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn

import reparam

from . import strategies as S
from .helpers import in_place_nodes
from .test_properties import arithmetic_nodes, assert_close, count

IN_PLACE_STYLES = ("iop", "method", "alpha")


class InPlaceBlock(S.Block):
    """`S.Block` with its sum, scale, shift and residual applied in place."""

    style = "method"
    leak = False  # read the first branch again after the updates, through a view

    def forward(self, x):
        ys = [x if isinstance(b, S.RawInput) else b(x) for b in self.branches]
        first, sign = ys[0], self.signs[0]
        if isinstance(self.branches[0], (S.RawInput, nn.Identity)):
            first = first.clone()  # never accumulate into the block's input itself
        out = first if sign > 0 else -first
        seen = out.view_as(out) if self.leak else None
        for y, sign in zip(ys[1:], self.signs[1:]):
            if self.style == "iop":
                if sign > 0:
                    out += y
                else:
                    out -= y
            elif self.style == "alpha":
                out.add_(y, alpha=sign)
            else:
                out.add_(y) if sign > 0 else out.sub_(y)
        if self.scale == "div":
            out.div_(self.gamma)
        elif self.scale == "const":
            out.mul_(0.75 if self.scale_left else -1.25)
        elif self.scale is not None:
            if self.style == "iop":
                out *= self.gamma
            else:
                out.mul_(self.gamma)
        if self.shift in ("add", "radd"):
            out.add_(self.beta)
        elif self.shift == "sub":
            out.sub_(self.beta)
        elif self.shift == "rsub":
            out.neg_().add_(self.beta)
        if self.residual:
            out.add_(x)
        if seen is not None:
            return out + seen.relu()
        return out


class InPlaceAct(nn.Module):
    def forward(self, x):
        return F.relu(x, inplace=True)


def in_place_net(spec: S.NetSpec, styles: list[str], leak: bool = False) -> tuple[nn.Module, torch.Tensor]:
    model, x = S.build_net(spec)
    blocks = [m for m in model.modules() if type(m) is S.Block]
    for block, style in zip(blocks, styles):
        block.__class__ = InPlaceBlock
        block.style, block.leak = style, leak
    model.act_relu = InPlaceAct()
    return model, x


def run(model, x):
    with torch.no_grad():
        return model(x.clone())


@given(S.fusible_nets(), st.lists(st.sampled_from(IN_PLACE_STYLES), min_size=12, max_size=12))
def test_in_place_accumulation_fuses_like_out_of_place(spec, styles):
    model, x = in_place_net(spec, styles)
    ref = run(model, x)
    fused = reparam.fuse(model, x, verify=False)
    note(str(fused.report))
    assert_close(ref, run(fused, x), what="fused vs original")
    assert torch.equal(run(model, x), ref), "the caller's model changed"
    assert not in_place_nodes(fused), f"in-place updates left: {in_place_nodes(fused)}"
    assert count(fused, S.CONV_TYPES) == len(spec.blocks)
    assert count(fused, S.BN_TYPES) == 0 and not arithmetic_nodes(fused)
    assert not fused.report.refusals, fused.report.refusals


@given(S.fusible_nets(), st.lists(st.sampled_from(IN_PLACE_STYLES), min_size=12, max_size=12))
def test_updates_seen_through_a_view_stay_and_are_reported(spec, styles):
    model, x = in_place_net(spec, styles, leak=True)
    ref = run(model, x)
    fused = reparam.fuse(model, x, verify=False)
    note(str(fused.report))
    assert_close(ref, run(fused, x), what="fused vs original")
    blocks = [m for m in model.modules() if isinstance(m, InPlaceBlock)]
    updates = sum(len(b.branches) - 1 + (b.scale is not None) + (b.shift is not None) + (b.shift == "rsub") + b.residual
                  for b in blocks)
    kept = [r for r in fused.report.refusals if "in place" in r.reason]
    # `out += y` is recorded out of place by torch.fx itself; every other update is kept
    assert len(kept) == len(in_place_nodes(fused)) <= updates
    assert all("read afterwards" in r.reason for r in kept)
