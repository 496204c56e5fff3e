"""Property-based tests of the compiler (hypothesis), in float64.

Networks come from `strategies.py`: random reparameterizable blocks (conv branches k = 1..7, kx1/1xk,
groups from dense to depthwise, stride 1/2, dilation 1/2, with and without BN, BN/identity skips,
layer scales, differences, avg-pool branches; Conv1d/2d/3d; randomized BatchNorm statistics), and
nonlinearities between blocks. For every example:

* `reparam.fuse(model, x)` equals the original to a relative 1e-9 (float64);
* blocks built to be exactly fusible collapse to exactly one conv each, with no BatchNorm, pooling
  or arithmetic left and nothing refused;
* deliberately defective structures are left in place and reported with a reason.

The algebra (`reparam.affine`) is checked alone against torch.nn.functional.

Profiles (tests/conftest.py): `ci` by default, `--hypothesis-profile thorough` for 5000 examples.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st

import reparam
from reparam.modules import ChannelAffine
from reparam import affine

from . import strategies as S

ARITH = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
         torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.addcmul,
         "add", "sub", "mul", "div", "neg", "add_", "sub_", "mul_", "div_"}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def assert_close(ref: torch.Tensor, out: torch.Tensor, rel: float = 1e-9, what: str = "") -> None:
    assert ref.shape == out.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert ref.dtype == out.dtype == torch.float64
    diff = float((ref - out).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    assert diff <= rel * scale + 1e-12, f"{what}: max|diff| {diff:.3g} > {rel:g} * max|ref| {scale:.3g} + 1e-12"


def fuse_and_compare(spec: S.NetSpec):
    model, x = S.build_net(spec)
    with torch.no_grad():
        ref = model(x)
    fused = reparam.fuse(model, x, verify=False)
    note(str(fused.report))
    with torch.no_grad():
        out = fused(x)
    assert_close(ref, out, what="fused vs original")
    # the caller's model is untouched
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    return fused


def called_modules(gm) -> list[tuple[str, torch.nn.Module]]:
    return [(n.target, gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


FCONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


def count(gm, types) -> int:
    """Calls of modules of `types`; for convolutions, `F.convNd` calls too (a functional conv that
    nothing was folded into is kept as written)."""
    n = sum(isinstance(m, types) for _, m in called_modules(gm))
    if types is S.CONV_TYPES:
        n += sum(node.op == "call_function" and node.target in FCONVS for node in gm.graph.nodes)
        # A per-channel map is lowered as a channel affine (a depthwise 1x1 conv, written x * a + b).
        n += sum(isinstance(m, ChannelAffine) for _, m in called_modules(gm))
    return n


def conv_geometries(gm) -> list[tuple]:
    """(in, out, kernel, stride, dilation, groups) of every conv call, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, S.CONV_TYPES):
                out.append((m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                            tuple(m.dilation), m.groups))
            elif isinstance(m, ChannelAffine):
                c, ones = m.scale.numel(), (1,) * (m.scale.dim() - 2)
                out.append((c, c, ones, ones, ones, c))
        elif node.op == "call_function" and node.target in FCONVS:
            w = node.args[1]
            shape = tuple(gm.get_parameter(w.target).shape) if w.op == "get_attr" else None
            a = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), node.args))
            a.update(node.kwargs)
            nd = len(shape) - 2
            groups = a.get("groups", 1)
            out.append((shape[1] * groups, shape[0], shape[2:], _tuple(a.get("stride", 1), nd),
                        _tuple(a.get("dilation", 1), nd), groups))
    return out


def _tuple(v, nd):
    return (v,) * nd if isinstance(v, int) else tuple(v)


def arithmetic_nodes(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target in ARITH]


def apply_affine(op: affine.AffineConv, x: torch.Tensor) -> torch.Tensor:
    """An AffineConv evaluated with torch.nn.functional (not `AffineConv.apply`)."""
    conv = S.FCONV[op.weight.dim() - 2]
    if op.padding_mode != "zeros" and any(op.padding):
        pad = [p for p in reversed(op.padding) for _ in range(2)]
        return conv(F.pad(x, pad, mode=op.padding_mode), op.weight, op.bias, op.stride, 0, op.dilation, op.groups)
    return conv(x, op.weight, op.bias, op.stride, op.padding, op.dilation, op.groups)


def random_input(cin: int, size, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, cin, *size, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# 1-2. fusible blocks: exact, and exactly one conv per block
# ------------------------------------------------------------------------------------------------

@given(S.fusible_nets())
def test_fusible_blocks_collapse_to_one_conv_each(spec):
    fused = fuse_and_compare(spec)
    n_blocks = len(spec.blocks)
    convs = count(fused, S.CONV_TYPES)
    assert convs == n_blocks, f"{convs} convolutions for {n_blocks} fusible blocks"
    assert count(fused, S.BN_TYPES) == 0, "a BatchNorm survived in an all-fusible network"
    assert count(fused, S.POOL_TYPES) == 0, "an avg-pool branch survived"
    assert not arithmetic_nodes(fused), f"sums/scales left: {arithmetic_nodes(fused)}"
    assert not fused.report.refusals, f"refusals in an all-fusible network: {fused.report.refusals}"
    # the one conv of each block has the block's geometry: channels, stride, groups, the main
    # branch's kernel and dilation (every other branch lies on its tap grid)
    for block, (cin, cout, kernel, stride, dilation, groups) in zip(spec.blocks, conv_geometries(fused)):
        if isinstance(block, S.ConcatSpec):
            sub = block.blocks[0]
            main, expect_groups = sub.branches[sub.main], 1
        else:
            main = block.branches[block.main]
            expect_groups = main.groups
        assert (cin, cout, stride, groups) == (block.cin, block.cout, block.stride, expect_groups)
        assert kernel == main.kernel
        assert all(d == dm for k, d, dm in zip(kernel, dilation, main.dilation) if k > 1)


# ------------------------------------------------------------------------------------------------
# mixed groups, even kernels, off-centre (but common) centres: exact; at most one conv per branch
# ------------------------------------------------------------------------------------------------

@given(S.free_nets())
def test_mixed_blocks_exact_and_never_more_convs(spec):
    fused = fuse_and_compare(spec)
    # A block whose sum is refused keeps one conv per conv/pool branch at most, plus one for a
    # layer scale/shift that then has nothing to fold into (it becomes a depthwise 1x1 conv).
    bound = sum(len(b.branches) + (b.scale is not None or b.shift is not None) for b in spec.parts)
    convs = count(fused, S.CONV_TYPES)
    assert convs <= bound
    for r in fused.report.refusals:
        assert r.where and r.reason
    if not fused.report.refusals:
        # every sum was accepted: each block is one conv (fewer where a block without a
        # nonlinearity before it was composed into the previous one)
        if "none" in spec.acts:
            assert convs <= len(spec.blocks)
        else:
            assert convs == len(spec.blocks)
        assert count(fused, S.BN_TYPES) == 0 and not arithmetic_nodes(fused)


# ------------------------------------------------------------------------------------------------
# 3. refused structures stay, and the report says why
# ------------------------------------------------------------------------------------------------

@given(S.defect_nets())
def test_defects_are_refused_and_kept(spec):
    fused = fuse_and_compare(spec)
    (i, defect), = [(i, p) for i, p in enumerate(spec.parts) if isinstance(p, S.DefectSpec)]
    expect = S.defect_expectation(defect, f"part{i}")
    called = {name for name, _ in called_modules(fused)}
    for name in expect["kept"]:
        assert name in called, f"{name} was not kept ({sorted(called)})"
    refusals = fused.report.refusals
    hits = [r for r in refusals if set(expect["named"]) <= set(r.where.split(", "))]
    assert hits, f"no refusal names {expect['named']}: {refusals}"
    assert all(r.reason.strip() for r in hits)
    assert count(fused, S.CONV_TYPES) == len(spec.blocks) + expect["convs"]
    assert count(fused, S.BN_TYPES) == expect["bns"]


# ------------------------------------------------------------------------------------------------
# 4. the algebra alone
# ------------------------------------------------------------------------------------------------

def _same_geometry(ops) -> bool:
    nd = ops[0].nd
    return (all(o.stride == ops[0].stride for o in ops)
            and all(o.centre2(a) == ops[0].centre2(a) for o in ops for a in range(nd)))


def _modes(ops) -> set[str]:
    return {o.mode for o in ops if any(o.padding)}


@given(S.op_groups(), st.integers(0, 3))
def test_affine_add(specs, extra):
    ops = [S.to_affine(o) for o in specs]
    reason = affine.sum_refusal(ops)
    modes = _modes(specs)
    # Under reflect/replicate/circular padding the compiler only sums branches of one geometry
    # (kernel, padding, and dilation where the kernel has more than one tap).
    geometries = {(o.kernel, o.padding, tuple(d if k > 1 else 1 for k, d in zip(o.kernel, o.dilation)))
                  for o in specs}
    expect_ok = _same_geometry(specs) and len(modes) <= 1 and (modes <= {"zeros"} or len(geometries) == 1)
    assert (reason is None) == expect_ok, reason
    if reason is not None:
        assert reason.strip()
        with pytest.raises(ValueError):
            affine.add(ops)
        return
    total = affine.add(ops)
    assert total.cost == affine.sum_cost(ops)
    assert total.groups == math.gcd(*[o.groups for o in specs])
    x = random_input(specs[0].cin, S.common_input_size(specs, extra), specs[0].seed)
    ref = sum(S.ref_apply(o, x) for o in specs)
    assert_close(ref, apply_affine(total, x), what="add")
    # signed: A - B
    diff = affine.add([ops[0], affine.scaled(ops[1], -1.0)])
    assert_close(S.ref_apply(specs[0], x) - S.ref_apply(specs[1], x), apply_affine(diff, x), what="A - B")


@given(S.op_groups(concat=True), st.integers(0, 3))
def test_affine_concat(specs, extra):
    ops = [S.to_affine(o) for o in specs]
    reason = affine.concat_refusal(ops)
    expect_ok = _same_geometry(specs) and len(_modes(specs)) <= 1
    assert (reason is None) == expect_ok, reason
    if reason is not None:
        assert reason.strip()
        with pytest.raises(ValueError):
            affine.concat(ops)
        return
    cat = affine.concat(ops)
    assert cat.out_channels == sum(o.cout for o in specs)
    assert cat.cost <= affine.concat_cost(ops)
    x = random_input(specs[0].cin, S.common_input_size(specs, extra), specs[0].seed)
    ref = torch.cat([S.ref_apply(o, x) for o in specs], 1)
    assert_close(ref, apply_affine(cat, x), what="concat")


@st.composite
def compose_pairs(draw):
    nd = draw(st.integers(1, 3))
    cin, cmid, cout = (draw(st.integers(1, 6)) for _ in range(3))
    kind = draw(st.sampled_from(["pointwise", "per_channel", "any", "any"]))
    if kind == "per_channel":
        cmid = cin
        before = draw(S.op_specs(nd, cin, cmid, pointwise=True, groups=cin))
    else:
        before = draw(S.op_specs(nd, cin, cmid, pointwise=kind == "pointwise", max_k=4))
    after_kind = draw(st.sampled_from(["any", "pointwise", "unpadded"]))
    after = draw(S.op_specs(nd, cmid, cout, pointwise=after_kind == "pointwise", max_k=4))
    if after_kind == "unpadded":
        after = S.OpSpec(after.cin, after.cout, after.groups, after.kernel, after.stride, (0,) * nd,
                         after.dilation, after.mode, after.bias, after.seed)
    return before, after


def _compose_size(before: S.OpSpec, after: S.OpSpec, extra: int) -> tuple[int, ...]:
    size = []
    for a in range(before.nd):
        b1, a1 = S._axis(before, a), S._axis(after, a)
        n = 1
        while True:
            mid = S.op_valid_for(b1, (n,))
            if mid is not None and S.op_valid_for(a1, mid) is not None:
                break
            n += 1
        size.append(n + extra)
    return tuple(size)


@given(compose_pairs(), st.integers(0, 3))
def test_affine_compose(pair, extra):
    before_s, after_s = pair
    before, after = S.to_affine(before_s), S.to_affine(after_s)
    reason = affine.compose_refusal(after, before)
    after_pads, before_pads = any(after_s.padding), any(before_s.padding)
    # Zero padding commutes with a 1x1 stride-1 map without bias, padded or not: its border is zero.
    one_by_one = all(k == 1 for k in before_s.kernel) and all(s == 1 for s in before_s.stride)
    expect_refused = (
        (after_pads and (not one_by_one
                         or (before_pads and "zeros" != before_s.mode)
                         or (before_pads and "zeros" != after_s.mode)
                         or (before_s.bias and after_s.mode == "zeros")))
        or (before_pads and before_s.mode != "zeros" and not after_s.pointwise)
    )
    assert (reason is not None) == expect_refused, reason
    if reason is not None:
        assert reason.strip()
        with pytest.raises(ValueError):
            affine.compose(after, before)
        return
    both = affine.compose(after, before)
    assert both.cost == affine.composed_cost(after, before)
    x = random_input(before_s.cin, _compose_size(before_s, after_s, extra), before_s.seed)
    ref = S.ref_apply(after_s, S.ref_apply(before_s, x))
    assert_close(ref, apply_affine(both, x), what="compose")


@st.composite
def regroup_cases(draw):
    nd = draw(st.integers(1, 3))
    g = draw(st.integers(1, 4))
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    spec = draw(S.op_specs(nd, cin, cout, groups=g, mode="zeros", max_k=4))
    new_g = draw(st.sampled_from(S.divisors(g)))
    # a dilation that divides the op's dilation on every axis
    new_d = tuple(draw(st.sampled_from(S.divisors(d))) for d in spec.dilation)
    return spec, new_g, new_d


@given(regroup_cases(), st.integers(0, 2))
def test_affine_regrouped_and_dilated(case, extra):
    spec, new_g, new_d = case
    op = S.to_affine(spec)
    x = random_input(spec.cin, S.common_input_size([spec], extra), spec.seed)
    ref = S.ref_apply(spec, x)
    r = affine.regrouped(op, new_g)
    assert r.groups == new_g and r.weight.shape[1] == spec.cin // new_g
    assert_close(ref, apply_affine(r, x), what="regrouped")
    d = affine.dilated(op, new_d)
    assert d.dilation == new_d
    assert_close(ref, apply_affine(d, x), what="dilated")
    # back to the densest groups the block structure allows: at least the original groups
    assert affine.densest_groups(affine.regrouped(op, 1)).groups % spec.groups == 0
    bad_g = [h for h in range(1, spec.groups + 1) if spec.groups % h]
    if bad_g:
        with pytest.raises(ValueError):
            affine.regrouped(op, bad_g[0])
    if any(k > 1 and d > 1 for k, d in zip(spec.kernel, spec.dilation)):
        # a dilation that does not divide: d + 1 (when d > 1) on such an axis
        odd = tuple(d + 1 if k > 1 and d > 1 else d for k, d in zip(spec.kernel, spec.dilation))
        with pytest.raises(ValueError):
            affine.dilated(op, odd)
