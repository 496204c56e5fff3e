"""The operator algebra on its own, in float64, against torch.nn.functional.

Every combined operator is checked three ways: its own `apply`, the `nn.ConvNd`/`nn.Linear`
module the compiler lowers it to, and the original operations run through torch.nn.functional
(`conv_f`, `F.batch_norm`, `F.avg_pool2d`), never through `AffineConv.apply`. More cases against
the reference ops: test_affine_reference.py.
"""

import pytest
import torch
import torch.nn.functional as F

from reparam import affine
from reparam.passes.lower import to_module

D = torch.float64
_CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_f(x, op):
    """`op` evaluated by torch.nn.functional from its raw weight and geometry (not `op.apply`)."""
    if op.nd == 0:
        assert op.groups == 1
        return F.linear(x, op.weight, op.bias)
    if op.has_padding and op.padding_mode != "zeros":
        x = F.pad(x, [p for p in reversed(op.padding) for _ in (0, 1)], mode=op.padding_mode)
        return _CONV_F[op.nd](x, op.weight, op.bias, op.stride, 0, op.dilation, op.groups)
    return _CONV_F[op.nd](x, op.weight, op.bias, op.stride, op.padding, op.dilation, op.groups)


def lowered(op, x):
    """`op` as the module the compiler puts in the graph (channels at axis 1), applied to `x`."""
    with torch.no_grad():
        return to_module(op, 1, x.dim(), D, x.device)(x)


def check(op, x, expected, rel=1e-12):
    """`op`, by its own apply and as its lowered module, equals `expected` (computed elsewhere)."""
    close(op.apply(x), expected, rel)
    close(lowered(op, x), expected, rel)


def rand_op(ci, co, k, stride=1, padding=0, dilation=1, groups=1, bias=True, seed=0, nd=2):
    g = torch.Generator().manual_seed(seed)
    k = (k,) * nd if isinstance(k, int) else tuple(k)
    w = torch.randn(co, ci // groups, *k, generator=g, dtype=D)
    b = torch.randn(co, generator=g, dtype=D) if bias else None
    return affine.from_conv(w, b, stride, padding, dilation, groups)


def close(a, b, rel=1e-12):
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-13


X2 = torch.randn(2, 8, 11, 10, dtype=D, generator=torch.Generator().manual_seed(1))


def test_batch_norm_is_per_channel_affine():
    g = torch.Generator().manual_seed(3)
    mean, var = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    op = affine.batch_norm(mean, var, w, b, 1e-3, nd=2)
    assert op.is_per_channel and not op.is_identity
    ref = F.batch_norm(X2, mean.double(), var.double(), w.double(), b.double(), False, 0.0, 1e-3)
    check(op, X2, ref)


def test_sum_of_centred_kernels_is_one_conv():
    ops = [rand_op(8, 8, (3, 3), padding=1), rand_op(8, 8, (1, 1), seed=1),
           rand_op(8, 8, (1, 3), padding=(0, 1), seed=2), rand_op(8, 8, (3, 1), padding=(1, 0), seed=3),
           affine.identity(8, 2)]
    assert affine.sum_refusal(ops) is None
    fused = affine.add(ops)
    assert fused.kernel_size == (3, 3) and fused.padding == (1, 1)
    check(fused, X2, sum(conv_f(X2, op) for op in ops[:-1]) + X2)


@pytest.mark.parametrize("stride", [1, 2])
def test_sum_across_groups_and_dilations(stride):
    ops = [rand_op(8, 8, 3, stride, 2, 2, groups=8), rand_op(8, 8, 5, stride, 2, 1, groups=2, seed=1),
           rand_op(8, 8, 1, stride, 0, 1, groups=4, seed=2)]
    fused = affine.add(ops)
    assert fused.groups == 2 and fused.kernel_size == (5, 5) and fused.stride == (stride, stride)
    check(fused, X2, sum(conv_f(X2, op) for op in ops))


def test_dilated_sum_keeps_dilation_when_it_can():
    ops = [rand_op(8, 8, 3, 1, 2, 2), rand_op(8, 8, 1, seed=1)]
    fused = affine.add(ops)
    assert fused.dilation == (2, 2) and fused.kernel_size == (3, 3)
    check(fused, X2, conv_f(X2, ops[0]) + conv_f(X2, ops[1]))


def test_sum_refuses_different_centres_and_strides():
    assert "centred" in affine.sum_refusal([rand_op(8, 8, 3, padding=1), rand_op(8, 8, 3, padding=0)])
    assert "stride" in affine.sum_refusal([rand_op(8, 8, 3, 2, 1), rand_op(8, 8, 3, 1, 1)])
    reflect = affine.from_conv(torch.randn(8, 8, 3, 3), None, 1, 1, 1, 1, "reflect")
    assert "padding" in affine.sum_refusal([reflect, rand_op(8, 8, 1)])


def test_compose_after_any_conv_and_pointwise_before_padded_conv():
    k = rand_op(8, 8, (5, 3), stride=2, padding=(2, 1), dilation=(1, 2), groups=4)
    g = torch.Generator().manual_seed(11)
    bn_args = (torch.randn(8, generator=g, dtype=D), torch.rand(8, generator=g, dtype=D) + 0.5,
               torch.randn(8, generator=g, dtype=D), torch.randn(8, generator=g, dtype=D))
    bn = affine.batch_norm(*bn_args, 1e-5, 2)
    fused = affine.compose(bn, k)
    mean, var, gamma, beta = bn_args
    check(fused, X2, F.batch_norm(conv_f(X2, k), mean, var, gamma, beta, False, 0.0, 1e-5))
    pw = rand_op(8, 16, 1, bias=False)
    kxk = rand_op(16, 8, 3, padding=1, groups=2, seed=4)
    assert affine.compose_refusal(kxk, pw) is None
    check(affine.compose(kxk, pw), X2, conv_f(conv_f(X2, pw), kxk))


def test_compose_unpadded_after_strided_dilated():
    a = rand_op(8, 8, 3, stride=2, padding=1, groups=8)
    b = rand_op(8, 6, 3, stride=1, padding=0, dilation=2, groups=2, seed=5)
    fused = affine.compose(b, a)
    assert fused.stride == (2, 2)
    check(fused, X2, conv_f(conv_f(X2, a), b))


def test_compose_refuses_shift_before_padding():
    bn = affine.batch_norm(torch.randn(8), torch.rand(8) + 0.5, torch.randn(8), torch.randn(8), 1e-5, 2)
    reason = affine.compose_refusal(rand_op(8, 8, 3, padding=1), bn)
    assert reason and "border" in reason
    scale_only = affine.per_channel(torch.rand(8) + 0.5, torch.zeros(8), 2)
    assert affine.compose_refusal(rand_op(8, 8, 3, padding=1), scale_only) is None
    assert "pointwise" in affine.compose_refusal(rand_op(8, 8, 3, padding=1), rand_op(8, 8, 3, padding=1))


def test_composed_cost_matches_the_result():
    a = rand_op(8, 8, 7, padding=3, groups=8)
    b = rand_op(8, 32, 1)
    assert affine.composed_cost(b, a) == affine.compose(b, a).cost == 32 * 8 * 49
    assert a.cost + b.cost < affine.composed_cost(b, a)


def test_concat_stacks_outputs():
    ops = [rand_op(8, 4, 3, padding=1), rand_op(8, 6, 1, seed=1), rand_op(8, 2, (1, 3), padding=(0, 1), seed=2)]
    fused = affine.concat(ops)
    assert fused.out_channels == 12 and fused.kernel_size == (3, 3)
    check(fused, X2, torch.cat([conv_f(X2, op) for op in ops], 1))


def test_concat_recovers_groups():
    ops = [rand_op(8, 8, 3, padding=1, groups=2), rand_op(8, 8, 3, padding=1, groups=2, seed=1)]
    fused = affine.concat(ops)
    check(fused, X2, torch.cat([conv_f(X2, op) for op in ops], 1))


def test_regrouped_and_densest_groups_round_trip():
    op = rand_op(8, 8, 3, padding=1, groups=4)
    dense = affine.regrouped(op, 1)
    assert dense.groups == 1
    check(dense, X2, conv_f(X2, op))
    assert affine.densest_groups(dense).groups == 4


def test_avg_pool_counts_padding():
    op = affine.avg_pool(8, 3, 2, 1, 2)
    check(op, X2, F.avg_pool2d(X2, 3, 2, 1, count_include_pad=True))


def test_linear_and_batchnorm1d_compose_both_ways():
    g = torch.Generator().manual_seed(7)
    lin = affine.from_linear(torch.randn(5, 8, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D))
    bn_draws = {c: (torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g),
                    torch.randn(c, generator=g)) for c in (8, 5)}
    bn8 = affine.batch_norm(*bn_draws[8], 1e-5, 0)
    bn5 = affine.batch_norm(*bn_draws[5], 1e-5, 0)
    z = torch.randn(4, 8, dtype=D)

    def bn_f(t, c):  # the BatchNorm of `c` channels above, through F.batch_norm
        return F.batch_norm(t, *(v.double() for v in bn_draws[c]), False, 0.0, 1e-5)

    check(affine.compose(lin, bn8), z, F.linear(bn_f(z, 8), lin.weight, lin.bias))
    check(affine.compose(bn5, lin), z, bn_f(F.linear(z, lin.weight, lin.bias), 5))


@pytest.mark.parametrize("nd", [1, 3])
def test_other_dimensionalities(nd):
    x = torch.randn(2, 4, *([7] * nd), dtype=D)
    ops = [rand_op(4, 4, (3,) * nd, padding=1, nd=nd), rand_op(4, 4, (1,) * nd, seed=1, nd=nd), affine.identity(4, nd)]
    fused = affine.add(ops)
    assert fused.kernel_size == (3,) * nd
    check(fused, x, conv_f(x, ops[0]) + conv_f(x, ops[1]) + x)
