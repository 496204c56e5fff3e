"""The operator algebra against the original operations, in float64.

The reference for every combined operator is the original structure run by torch itself: the
`nn.ConvNd`, `nn.BatchNorm`, `nn.AvgPool` and `nn.Linear` modules, or their `torch.nn.functional`
forms. The combined operator is checked both by its own `apply` and as the module the compiler
lowers it to (`passes.lower.to_module`), so neither can hide a mistake of the other.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reparam import affine
from reparam.passes.lower import to_module

D = torch.float64
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# -- building blocks: real torch modules with random parameters and statistics -----------------

def make_conv(ci, co, k, nd=2, stride=1, padding=0, dilation=1, groups=1, bias=True, seed=0,
              padding_mode="zeros") -> nn.Module:
    torch.manual_seed(seed)
    conv = CONV[nd](ci, co, k, stride, padding, dilation, groups, bias, padding_mode).double()
    with torch.no_grad():  # wider than the default init, biases included
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv.eval()


def make_bn(c, nd=2, seed=0) -> nn.Module:
    g = torch.Generator().manual_seed(1000 + seed)
    bn = BN[nd](c, eps=1e-3).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=D))
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=D) + 0.25)
        bn.weight.copy_(torch.randn(c, generator=g, dtype=D))
        bn.bias.copy_(torch.randn(c, generator=g, dtype=D))
    return bn.eval()


def op_of_conv(conv: nn.Module) -> affine.AffineConv:
    return affine.from_conv(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                            conv.padding_mode)


def op_of_bn(bn: nn.Module, nd: int) -> affine.AffineConv:
    return affine.batch_norm(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, nd)


def inputs(c, nd, size=9, batch=2, seed=1):
    return torch.randn(batch, c, *([size] * nd), dtype=D, generator=torch.Generator().manual_seed(seed))


def assert_matches(op: affine.AffineConv, x: torch.Tensor, reference: torch.Tensor, rel=1e-11):
    """`op`, by its own apply and as the lowered module, equals the reference output."""
    with torch.no_grad():
        module = to_module(op, 1, x.dim(), D, x.device)
        for name, got in (("apply", op.apply(x)), (type(module).__name__, module(x))):
            assert got.shape == reference.shape, (name, got.shape, reference.shape)
            err = float((got - reference).abs().max())
            assert err <= rel * float(reference.abs().max()) + 1e-12, f"{name}: max error {err}"


# -- conv + BatchNorm -------------------------------------------------------------------------

@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("geometry", [
    dict(k=3, padding=1), dict(k=3, stride=2, padding=1, groups=4), dict(k=5, padding=4, dilation=2),
    dict(k=1, groups=8), dict(k=3, padding=0, stride=2),
])
def test_conv_then_batchnorm(nd, bias, geometry):
    conv = make_conv(8, 8, nd=nd, bias=bias, **geometry)
    bn = make_bn(8, nd)
    x = inputs(8, nd, size=9 if nd < 3 else 7)
    with torch.no_grad():
        reference = bn(conv(x))
    fused = affine.compose(op_of_bn(bn, nd), op_of_conv(conv))
    assert fused.kernel_size == conv.kernel_size and fused.groups == conv.groups
    assert fused.padding == conv.padding and fused.stride == conv.stride
    assert_matches(fused, x, reference)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padded_conv_of_any_mode_then_batchnorm(mode):
    conv = make_conv(4, 6, 3, padding=1, padding_mode=mode)
    bn = make_bn(6)
    x = inputs(4, 2)
    with torch.no_grad():
        reference = bn(conv(x))
    fused = affine.compose(op_of_bn(bn, 2), op_of_conv(conv))
    assert fused.padding_mode == mode
    assert_matches(fused, x, reference)


# -- sums of branches -------------------------------------------------------------------------

BRANCH_SETS = {
    "3x3+1x1": [dict(k=3, padding=1), dict(k=1)],
    "acnet": [dict(k=(3, 3), padding=1), dict(k=(1, 3), padding=(0, 1)), dict(k=(3, 1), padding=(1, 0))],
    "off-axis only": [dict(k=(1, 3), padding=(0, 1)), dict(k=(3, 1), padding=(1, 0))],
    "large kernel": [dict(k=7, padding=3), dict(k=3, padding=1), dict(k=1)],
    "dilated": [dict(k=3, padding=2, dilation=2), dict(k=5, padding=2), dict(k=1)],
    "unpadded": [dict(k=5, padding=0), dict(k=3, padding=0, dilation=2)],
}


@pytest.mark.parametrize("case", sorted(BRANCH_SETS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 4])
def test_sum_of_conv_bn_branches(case, stride, groups):
    branches = [nn.Sequential(make_conv(8, 8, stride=stride, groups=groups, bias=False, seed=i, **spec),
                              make_bn(8, seed=i)) for i, spec in enumerate(BRANCH_SETS[case])]
    x = inputs(8, 2, size=11)
    with torch.no_grad():
        reference = sum(b(x) for b in branches)
    ops = [affine.compose(op_of_bn(b[1], 2), op_of_conv(b[0])) for b in branches]
    assert affine.sum_refusal(ops) is None
    fused = affine.add(ops)
    assert fused.stride == (stride, stride) and fused.groups == groups
    assert_matches(fused, x, reference)


def test_sum_with_identity_batchnorm_skip_and_avg_pool():
    """RepVGG/DBB: 3x3 conv+BN, 1x1 conv+BN, a BatchNorm skip, an identity and an avg-pool branch."""
    k3 = nn.Sequential(make_conv(8, 8, 3, padding=1, bias=False), make_bn(8, seed=1))
    k1 = nn.Sequential(make_conv(8, 8, 1, bias=False, seed=2), make_bn(8, seed=2))
    skip = make_bn(8, seed=3)
    pool = nn.AvgPool2d(3, 1, 1, count_include_pad=True)
    x = inputs(8, 2)
    with torch.no_grad():
        reference = k3(x) + k1(x) + skip(x) + x + pool(x)
    ops = [affine.compose(op_of_bn(k3[1], 2), op_of_conv(k3[0])),
           affine.compose(op_of_bn(k1[1], 2), op_of_conv(k1[0])),
           op_of_bn(skip, 2), affine.identity(8, 2), affine.avg_pool(8, 3, 1, 1, 2)]
    fused = affine.add(ops)
    assert fused.kernel_size == (3, 3) and fused.padding == (1, 1) and fused.groups == 1
    assert_matches(fused, x, reference)


@pytest.mark.parametrize("nd", [1, 3])
def test_sum_in_other_dimensionalities(nd):
    a = make_conv(4, 4, 3, nd=nd, padding=1)
    b = make_conv(4, 4, 1, nd=nd, seed=1)
    x = inputs(4, nd, size=7)
    with torch.no_grad():
        reference = a(x) + b(x) + x
    fused = affine.add([op_of_conv(a), op_of_conv(b), affine.identity(4, nd)])
    assert_matches(fused, x, reference)


def test_scaled_difference_of_branches():
    """RepMixer: x + gamma * (mixer(x) - norm(x)) with per-channel gamma."""
    mixer = make_conv(8, 8, 3, padding=1, groups=8)
    norm = make_bn(8)
    gamma = torch.rand(8, dtype=D, generator=torch.Generator().manual_seed(5)) + 0.5
    x = inputs(8, 2)
    with torch.no_grad():
        reference = x + gamma.reshape(1, -1, 1, 1) * (mixer(x) - norm(x))
    inner = affine.add([op_of_conv(mixer), affine.scaled(op_of_bn(norm, 2), -1.0)])
    fused = affine.add([affine.identity(8, 2), affine.scaled(inner, gamma)])
    assert fused.groups == 8
    assert_matches(fused, x, reference)


# -- compositions -----------------------------------------------------------------------------

def test_pointwise_without_bias_before_a_padded_conv():
    pw = make_conv(4, 16, 1, bias=False)
    kxk = make_conv(16, 4, 3, padding=1, seed=1)
    x = inputs(4, 2)
    with torch.no_grad():
        reference = kxk(pw(x))
    fused = affine.compose(op_of_conv(kxk), op_of_conv(pw))
    assert fused.padding == (1, 1) and fused.kernel_size == (3, 3)
    assert_matches(fused, x, reference)


def test_scale_only_batchnorm_before_a_padded_conv():
    bn = make_bn(4)
    with torch.no_grad():  # no shift: zero padding stays zero after the BatchNorm
        bn.bias.copy_(bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
    conv = make_conv(4, 6, 3, padding=1, seed=1)
    x = inputs(4, 2)
    with torch.no_grad():
        reference = conv(bn(x))
    before = op_of_bn(bn, 2)
    assert float(before.bias.abs().max()) < 1e-12
    before = affine.per_channel(before.weight.reshape(-1), torch.zeros(4, dtype=D), 2)
    fused = affine.compose(op_of_conv(conv), before)
    assert fused.padding == (1, 1)
    assert_matches(fused, x, reference)


def test_batchnorm_with_shift_before_an_unpadded_conv():
    bn = make_bn(4)
    conv = make_conv(4, 6, 3, padding=0, stride=2, seed=1)
    x = inputs(4, 2, size=10)
    with torch.no_grad():
        reference = conv(bn(x))
    fused = affine.compose(op_of_conv(conv), op_of_bn(bn, 2))
    assert_matches(fused, x, reference)


def test_batchnorm_with_shift_before_a_padded_conv_is_refused():
    reason = affine.compose_refusal(op_of_conv(make_conv(4, 6, 3, padding=1)), op_of_bn(make_bn(4), 2))
    assert reason and "border" in reason


@pytest.mark.parametrize("first, second", [
    (dict(k=3, stride=2, padding=1, groups=8), dict(k=3, dilation=2, groups=2)),
    (dict(k=(5, 3), padding=(2, 1), dilation=(1, 2)), dict(k=1, groups=1)),
    (dict(k=3, padding=1, stride=2), dict(k=3, stride=2)),
])
def test_conv_then_unpadded_conv(first, second):
    a = make_conv(8, 8, **first)
    b = make_conv(8, 6, seed=1, **second)
    x = inputs(8, 2, size=15)
    with torch.no_grad():
        reference = b(a(x))
    fused = affine.compose(op_of_conv(b), op_of_conv(a))
    assert_matches(fused, x, reference)


def test_avg_pool_then_conv_bn():
    pool = nn.AvgPool2d(3, 2, 1, count_include_pad=True)
    conv = make_conv(8, 8, 1, bias=False)
    bn = make_bn(8)
    x = inputs(8, 2, size=10)
    with torch.no_grad():
        reference = bn(conv(pool(x)))
    fused = affine.compose(op_of_bn(bn, 2), affine.compose(op_of_conv(conv), affine.avg_pool(8, 3, 2, 1, 2)))
    assert_matches(fused, x, reference)


# -- concatenation ----------------------------------------------------------------------------

def test_concat_of_conv_bn_branches():
    branches = [nn.Sequential(make_conv(8, co, k, padding=k // 2, bias=False, seed=i), make_bn(co, seed=i))
                for i, (co, k) in enumerate([(4, 3), (6, 1), (2, 5)])]
    x = inputs(8, 2)
    with torch.no_grad():
        reference = torch.cat([b(x) for b in branches], 1)
    fused = affine.concat([affine.compose(op_of_bn(b[1], 2), op_of_conv(b[0])) for b in branches])
    assert fused.out_channels == 12 and fused.kernel_size == (5, 5)
    assert_matches(fused, x, reference)


# -- channel-axis operators (no spatial dimensions): Linear and BatchNorm1d ---------------------

def test_batchnorm1d_then_linear_and_back():
    g = torch.Generator().manual_seed(9)
    lin = nn.Linear(8, 5).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(5, 8, generator=g, dtype=D))
        lin.bias.copy_(torch.randn(5, generator=g, dtype=D))
    bn8, bn5 = make_bn(8, 1, seed=1), make_bn(5, 1, seed=2)
    x = torch.randn(6, 8, dtype=D, generator=g)
    with torch.no_grad():
        reference = bn5(lin(bn8(x)))
    fused = affine.compose(op_of_bn(bn5, 0), affine.compose(affine.from_linear(lin.weight, lin.bias),
                                                             op_of_bn(bn8, 0)))
    assert fused.nd == 0 and not fused.is_per_channel
    assert_matches(fused, x, reference)


def test_per_channel_operator_lowers_on_any_axis():
    bn = make_bn(6, nd=1, seed=4)
    x = torch.randn(2, 5, 6, dtype=D)  # channels last, as after flatten(2).transpose(1, 2)
    with torch.no_grad():
        reference = bn(x.transpose(1, 2)).transpose(1, 2)
        module = to_module(op_of_bn(bn, 0), 2, 3, D, x.device)
        got = module(x)
    assert float((got - reference).abs().max()) <= 1e-12 * float(reference.abs().max())
