"""BatchNorm and other per-channel maps after a transposed convolution (passes/transposed.py), in
blocks written as decoders, U-Nets and GAN generators write them.

Each test checks the structure (no BatchNorm left, one transposed conv per block), the numbers in
float64 with randomized BatchNorm statistics, and that nothing is left unexplained; structures that
must stay are named in the report."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops
from reparam.passes.transposed import scaled_transposed_conv

from .helpers import assert_close_float32, assert_same, fuse64, modules_of, n_bns, n_convs, rbn

TRANSPOSED_FOR = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
TRANSPOSED_TYPES = tuple(TRANSPOSED_FOR.values())


def n_transposed(gm) -> int:
    return len(modules_of(gm, TRANSPOSED_TYPES))


def refusals_naming(fused, name: str) -> list[str]:
    return [r.reason for r in fused.report.refusals if name in [w.strip() for w in r.where.split(",")]]


def randomized(conv: nn.Module) -> nn.Module:
    with torch.no_grad():
        conv.weight.normal_()
        if conv.bias is not None:
            conv.bias.uniform_(-1, 1)
    return conv


# -- the algebra -----------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2, 3])
def test_scaled_weight_is_the_map_after_the_conv(groups):
    torch.manual_seed(0)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)  # [C_in, C_out / groups, k, k]
    b = torch.randn(w.shape[1] * groups, dtype=torch.float64)
    s, t = torch.randn(w.shape[1] * groups, dtype=torch.float64), torch.randn(w.shape[1] * groups, dtype=torch.float64)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    kw = dict(stride=2, padding=1, output_padding=1, groups=groups, dilation=2)
    ref = F.conv_transpose2d(x, w, b, **kw) * s.reshape(1, -1, 1, 1) + t.reshape(1, -1, 1, 1)
    w2, b2 = scaled_transposed_conv(w, b, groups, s, t)
    torch.testing.assert_close(F.conv_transpose2d(x, w2, b2, **kw), ref, rtol=1e-13, atol=1e-13)
    w3, b3 = scaled_transposed_conv(w, None, groups, torch.tensor(2.0), torch.tensor(0.5))
    torch.testing.assert_close(F.conv_transpose2d(x, w3, b3, **kw), F.conv_transpose2d(x, w, None, **kw) * 2 + 0.5)


# -- decoder blocks: nn.Sequential upsampling --------------------------------------------------------

CASES = [  # nd, c_in, c_out, kernel, stride, padding, output_padding, groups, dilation, bias
    (1, 4, 6, 3, 2, 1, 1, 1, 1, True),
    (1, 4, 6, 4, 2, 1, 0, 2, 1, False),
    (2, 4, 6, 3, 2, 1, 1, 1, 1, False),
    (2, 6, 4, 4, 2, 1, 0, 2, 1, True),
    (2, 6, 6, 3, 1, 2, 1, 3, 2, True),
    (2, 4, 8, 2, 2, 0, 0, 4, 1, False),
    (3, 4, 6, 3, 2, 1, 1, 2, 1, True),
    (3, 2, 4, 2, 1, 0, 0, 1, 2, False),
]


@pytest.mark.parametrize("nd, ci, co, k, stride, padding, output_padding, groups, dilation, bias", CASES)
def test_sequential_upsample_block(nd, ci, co, k, stride, padding, output_padding, groups, dilation, bias):
    torch.manual_seed(nd * 100 + ci * 10 + co)
    conv = randomized(TRANSPOSED_FOR[nd](ci, co, k, stride, padding, output_padding, groups, bias, dilation))
    block = nn.Sequential(conv, rbn(co, nd), nn.ReLU())
    x = torch.randn(2, ci, *([5, 4, 3][:nd]), dtype=torch.float64)
    fused = fuse64(block, x)
    assert n_bns(fused) == 0 and n_transposed(fused) == 1
    assert fused.report.refusals == []


class Generator(nn.Module):
    """A DCGAN-style generator: latent -> transposed conv, BatchNorm, ReLU blocks -> image."""

    def __init__(self, nz=8, ngf=4, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), rbn(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), rbn(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.main(z)


def test_gan_generator():
    torch.manual_seed(1)
    model = Generator()
    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            randomized(m)
    fused = fuse64(model, torch.randn(2, 8, 1, 1, dtype=torch.float64))
    assert n_bns(fused) == 0 and n_transposed(fused) == 3


def test_gan_generator_float32_end_to_end():
    torch.manual_seed(2)
    model = Generator()
    fused = assert_close_float32(model, torch.randn(2, 8, 1, 1))
    assert n_bns(fused) == 0 and n_transposed(fused) == 3
    assert all(p.dtype == torch.float32 for p in fused.parameters())


# -- a U-Net up block: upsample, BatchNorm, concatenate with the skip, conv -------------------------

class Up(nn.Module):
    def __init__(self, ci, co, spell="module"):
        super().__init__()
        self.up = randomized(nn.ConvTranspose2d(ci, co, 2, stride=2))
        self.bn = rbn(co)
        self.conv = nn.Sequential(nn.Conv2d(2 * co, co, 3, padding=1, bias=False), rbn(co), nn.ReLU(inplace=True))
        self.spell = spell

    def forward(self, x, skip):
        if self.spell == "output_size":
            y = self.up(x, output_size=skip.shape)
        else:
            y = self.up(x)
        torch._assert(y.shape[1] == skip.shape[1], "channels differ")  # reads metadata only
        y = self.bn(y)
        return self.conv(torch.cat([y, skip], dim=1))


@pytest.mark.parametrize("spell", ["module", "output_size"])
def test_unet_up_block_with_cat(spell):
    torch.manual_seed(3)
    x, skip = torch.randn(2, 8, 4, 5, dtype=torch.float64), torch.randn(2, 4, 8, 10, dtype=torch.float64)
    fused = fuse64(Up(8, 4, spell), x, skip)
    assert n_bns(fused) == 0 and n_transposed(fused) == 1 and n_convs(fused) == 1


class FunctionalUp(nn.Module):
    """The functional spelling: `F.conv_transpose2d` with parameters, `F.batch_norm`, a layer scale."""

    def __init__(self, ci=4, co=6, groups=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(ci, co // groups, 3, 3))
        self.bias = nn.Parameter(torch.randn(co))
        self.groups = groups
        bn = rbn(co)
        self.register_buffer("mean", bn.running_mean.clone())
        self.register_buffer("var", bn.running_var.clone())
        self.gamma = nn.Parameter(bn.weight.detach().clone())
        self.beta = nn.Parameter(bn.bias.detach().clone())
        self.scale = nn.Parameter(torch.rand(1, co, 1, 1) + 0.5)

    def forward(self, x):
        y = F.conv_transpose2d(x, self.weight, self.bias, 2, 1, 1, self.groups, 1)
        y = F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        y = y * self.scale  # a layer scale after the norm: the chain folds one map at a time
        return F.silu(y - 0.25)


def test_functional_transposed_conv_chain():
    torch.manual_seed(4)
    fused = fuse64(FunctionalUp(), torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert n_transposed(fused) == 1
    targets = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert F.conv_transpose2d not in targets and F.batch_norm not in targets
    assert [t.__name__ for t in targets] == ["silu"]


def test_module_chain_bn_then_layer_scale():
    torch.manual_seed(5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = randomized(nn.ConvTranspose1d(4, 6, 4, 2, 1, bias=False))
            self.bn = rbn(6, 1)
            self.gamma = nn.Parameter(torch.rand(6, 1) + 0.5)

        def forward(self, x):
            return torch.relu(self.gamma * self.bn(self.up(x)))

    fused = fuse64(Block(), torch.randn(3, 4, 7, dtype=torch.float64))
    assert n_bns(fused) == 0 and n_transposed(fused) == 1
    assert [n.op for n in fused.graph.nodes] == ["placeholder", "call_module", "call_function", "output"]


# -- what must stay, with its reason ----------------------------------------------------------------

class ReadTwice(nn.Module):
    """The transposed conv's output is used without the norm as well (a residual around it)."""

    def __init__(self):
        super().__init__()
        self.up = randomized(nn.ConvTranspose2d(4, 4, 3, 1, 1))
        self.bn = rbn(4)

    def forward(self, x):
        y = self.up(x)
        return torch.relu(self.bn(y)) + y


class ReadTwiceAfterAChain(nn.Module):
    """The BatchNorm folds; the layer scale after it stays, since the norm's output is read twice."""

    def __init__(self):
        super().__init__()
        self.up = randomized(nn.ConvTranspose1d(4, 4, 3, 2, 1, 1))
        self.bn = rbn(4, 1)
        self.gamma = nn.Parameter(torch.rand(4, 1) + 0.5)

    def forward(self, x):
        y = self.bn(self.up(x))
        return torch.relu(y * self.gamma) - y


def test_read_twice_after_a_chain_names_the_original_conv():
    torch.manual_seed(10)
    fused = fuse64(ReadTwiceAfterAChain(), torch.randn(2, 4, 6, dtype=torch.float64))
    assert n_bns(fused) == 0 and n_transposed(fused) == 1
    assert any(n.op == "call_function" and n.target.__name__ == "mul" for n in fused.graph.nodes)
    reasons = refusals_naming(fused, "up")
    assert len(reasons) == 1 and "the output of up is also read by" in reasons[0], fused.report.refusals


def test_output_read_twice_stays_and_is_named():
    torch.manual_seed(6)
    fused = fuse64(ReadTwice(), torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert n_bns(fused) == 1 and n_transposed(fused) == 1
    reasons = refusals_naming(fused, "bn")
    assert any("also read by" in r for r in reasons), fused.report.refusals


class AlongWidth(nn.Module):
    """A scale that varies along the width, not the channels: no slice of it belongs to a channel."""

    def __init__(self):
        super().__init__()
        self.up = randomized(nn.ConvTranspose2d(3, 4, 2, 2))
        self.w = nn.Parameter(torch.rand(10) + 0.5)

    def forward(self, x):
        return torch.tanh(self.up(x) * self.w)


def test_map_along_another_axis_stays_and_is_named():
    torch.manual_seed(7)
    fused = fuse64(AlongWidth(), torch.randn(2, 3, 4, 5, dtype=torch.float64))
    assert n_transposed(fused) == 1
    assert any(n.op == "call_function" and n.target.__name__ == "mul" for n in fused.graph.nodes)
    up = [r for r in fused.report.refusals if "up" in r.where]
    assert up and "varies along an axis other than the channel axis" in up[0].reason
    # Without that word in the report, the accounting check sees the pair.
    silent = dataclasses.replace(fused.report, refusals=[r for r in fused.report.refusals if r not in up])
    assert unaccounted_linear_ops(fused, silent) != []


class NormOverFlattenedOutput(nn.Module):
    """Upsampling a sequence: transposed conv, then BatchNorm1d over `y.flatten(2)`."""

    def __init__(self):
        super().__init__()
        self.up = randomized(nn.ConvTranspose2d(3, 4, 2, 2))
        self.bn = rbn(4, nd=1)

    def forward(self, x):
        return torch.relu(self.bn(self.up(x).flatten(2)))


def test_map_behind_a_layout_step_stays_and_is_named():
    torch.manual_seed(8)
    model = NormOverFlattenedOutput()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    fused = fuse64(model, x)
    assert n_transposed(fused) == 1
    reasons = refusals_naming(fused, "up")
    assert len(reasons) == 1 and "the layout change flatten stands between them" in reasons[0], fused.report.refusals
    assert unaccounted_linear_ops(fused) == []
    assert_same(model, fused, torch.randn(1, 3, 3, 2, dtype=torch.float64))


def test_batchnorm_with_batch_statistics_is_not_folded():
    torch.manual_seed(8)
    model = nn.Sequential(randomized(nn.ConvTranspose2d(3, 4, 2, 2)),
                          nn.BatchNorm2d(4, track_running_stats=False)).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_bns(fused) == 1 and n_transposed(fused) == 1
    assert_same(model, fused, x, rel=1e-12)


# -- property ---------------------------------------------------------------------------------------

@st.composite
def transposed_blocks(draw):
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    ci = groups * draw(st.integers(1, 3))
    co = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, dilation * (k - 1) // 2))  # every output size at least the input size
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    bias = draw(st.booleans())
    maps = draw(st.lists(st.sampled_from(["bn", "scale", "shift"]), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2 ** 16))
    return nd, ci, co, k, stride, padding, output_padding, groups, dilation, bias, maps, seed


class _Maps(nn.Module):
    def __init__(self, conv, maps, co, nd):
        super().__init__()
        self.conv = conv
        self.maps = maps
        self.bns = nn.ModuleList(rbn(co, nd) for m in maps if m == "bn")
        self.constants = nn.ParameterList(nn.Parameter(torch.randn(co, *([1] * nd))) for m in maps if m != "bn")

    def forward(self, x):
        y = self.conv(x)
        bns, constants = iter(self.bns), iter(self.constants)
        for m in self.maps:
            y = next(bns)(y) if m == "bn" else (y * next(constants) if m == "scale" else y + next(constants))
        return torch.relu(y)


@given(transposed_blocks())
def test_property_maps_fold_into_any_transposed_conv(block):
    nd, ci, co, k, stride, padding, output_padding, groups, dilation, bias, maps, seed = block
    note(str(block))
    torch.manual_seed(seed)
    conv = randomized(TRANSPOSED_FOR[nd](ci, co, k, stride, padding, output_padding, groups, bias, dilation))
    model = _Maps(conv, maps, co, nd)
    x = torch.randn(2, ci, *([4, 3][:nd]), dtype=torch.float64)
    fused = fuse64(model, x)
    assert n_bns(fused) == 0 and n_transposed(fused) == 1
    assert [n.op for n in fused.graph.nodes].count("call_module") == 1


def test_pass_lists_the_regions_it_creates():
    """`fold_maps_into_transposed_convs(..., regions)` names each new module and what it absorbed."""
    from reparam.passes.transposed import fold_maps_into_transposed_convs
    from reparam.trace import fold_constants, propagate_shapes, trace

    torch.manual_seed(9)
    model = nn.Sequential(randomized(nn.ConvTranspose2d(4, 6, 3, 2, 1, 1, groups=2)), rbn(6), nn.ReLU(),
                          randomized(nn.ConvTranspose2d(6, 3, 2, 2)), rbn(3)).double().eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    gm, failed = trace(model)
    propagate_shapes(gm, (x,), set(failed), values=False)
    regions = []
    assert fold_maps_into_transposed_convs(gm, fold_constants(gm), regions) == []
    assert [(r.name, r.members) for r in regions] == [("0_folded", ("0", "1")), ("3_folded", ("3", "4"))]
    assert regions[0].op == "ConvTranspose2d 3x3 4->6 groups=2 stride=2x2"
    assert_same(model, gm, x, rel=1e-12)
