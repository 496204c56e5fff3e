"""In-place updates as third-party code writes them: `out += conv(x)` over a ModuleList, `x.add_(y)`,
`x.mul_(gamma)`, `torch.add(a, b, alpha=...)`, `F.relu(x, inplace=True)`, `nn.ReLU(inplace=True)`.

Where rewriting an update out of place cannot change any result it is rewritten, and the structure
fuses as if written out of place. Where it can (the value is read again through a view, it is the
graph input or a parameter), it stays, the report says why, and the numbers still match.
All in float64 with randomized BatchNorm statistics.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.optional import MissingExtra, require

from .helpers import assert_same, conv_bn, in_place_nodes, n_bns, n_convs, rbn, randomize_bn

torch.manual_seed(0)

def call_targets_of(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def fused64(model, x, **kw):
    model = model.double().eval()
    x = x.double()
    return reparam.fuse(model, x, **kw), x


# -- blocks written the way model libraries write them ------------------------------------------

class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm that reads its own parameters in forward, with a shape assert and an Identity act."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4D input")
        if not torch.jit.is_scripting() and self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class ConvNorm(nn.Module):
    def __init__(self, ci, co, k, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(ci, co, k, padding=k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(co)

    def forward(self, x):
        return self.bn(self.conv(x))


class MobileOneLike(nn.Module):
    """The training form of a MobileOne block, spelled with in-place accumulation."""

    def __init__(self, c, branches=3, groups=1):
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv_scale = ConvNorm(c, c, 1, groups)
        self.conv_kxk = nn.ModuleList(ConvNorm(c, c, 3, groups) for _ in range(branches))
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        identity_out = self.identity(x)
        out = self.conv_scale(x)
        for ck in self.conv_kxk:
            out += ck(x)
        out = self.drop_path(out)
        out += identity_out
        return self.act(out)


def randomized(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    return model


def test_mobileone_style_loop_of_in_place_sums_is_one_conv_per_block():
    model = randomized(nn.Sequential(MobileOneLike(6), MobileOneLike(6, groups=6), MobileOneLike(6, 2)))
    fused, x = fused64(model, torch.randn(2, 6, 9, 9))
    assert n_convs(fused) == 3 and n_bns(fused) == 0
    assert not fused.report.refusals
    assert not in_place_nodes(fused)
    assert_same(model, fused, x)
    assert model[0].act.inplace, "the caller's model is never modified"


class LayerScaleInPlace(nn.Module):
    """conv+BN branches accumulated with `add_`, then a layer scale applied with `mul_`."""

    def __init__(self, c):
        super().__init__()
        self.a = conv_bn(c, c, 3)
        self.b = conv_bn(c, c, 1)
        self.skip = rbn(c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        out = self.a(x)
        out.add_(self.b(x))
        out.add_(self.skip(x))
        out.mul_(self.gamma)
        out = torch.add(x, out, alpha=0.5)
        return F.relu(out, inplace=True)


def test_add_mul_in_place_and_alpha_fuse_into_one_conv():
    model = LayerScaleInPlace(4)
    fused, x = fused64(model, torch.randn(2, 4, 7, 7))
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert not in_place_nodes(fused) and not fused.report.refusals
    assert len(fused.report.regions) == 1
    assert_same(model, fused, x)


class TimmBlock(nn.Module):
    """Conv + BatchNormAct (functional BN reading its parameters, shape assert, Identity act)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = BatchNormAct(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_in_place_activation_between_blocks_does_not_block_the_next_sum():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cb = conv_bn(4, 4, 3)
            self.left = conv_bn(4, 4, 3)
            self.right = conv_bn(4, 4, 1)

        def forward(self, x):
            y = F.relu(self.cb(x), inplace=True)
            z = self.left(y)
            z += self.right(y)
            z.add_(y)  # y is read before this update only
            return torch.relu_(z)

    model = Net()
    fused, x = fused64(model, torch.randn(1, 4, 6, 6))
    assert n_convs(fused) == 2 and n_bns(fused) == 0
    assert not in_place_nodes(fused)
    assert_same(model, fused, x)


def test_value_read_before_its_update_is_rewritten():
    class ReadBefore(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = rbn(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            z = y * 2.0  # reads y before the update: unaffected by the rewrite
            y.add_(1.0)
            return z + y

    model = ReadBefore()
    fused, x = fused64(model, torch.randn(1, 4, 6, 6))
    assert not in_place_nodes(fused) and not fused.report.refusals
    # `y*2 + (y+1)` = 3*bn(conv(x)) + 1: every reader of y merges into one sum, so one conv
    assert n_convs(fused) == 1 and n_bns(fused) == 0 and len(call_targets_of(fused)) == 0
    assert_same(model, fused, x)


# -- updates that must stay in place ------------------------------------------------------------

def test_update_seen_through_a_view_is_kept_and_reported():
    class ThroughView(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3)
            self.b = conv_bn(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            flat = y.flatten(1)  # shares y's memory
            y.add_(self.b(x))
            return flat.sum(1, keepdim=True) + y.mean((2, 3))

    model = ThroughView()
    fused, x = fused64(model, torch.randn(2, 4, 5, 5))
    assert len(in_place_nodes(fused)) == 1
    reasons = [r.reason for r in fused.report.refusals]
    assert any("in place" in r and "read afterwards" in r for r in reasons), reasons
    assert n_bns(fused) == 0  # each branch's own conv+BN still folds
    assert_same(model, fused, x)


def test_update_of_the_graph_input_is_kept_and_the_callers_tensor_untouched():
    class ScalesInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.cb = conv_bn(4, 4, 3)

        def forward(self, x):
            x.mul_(2.0)
            return self.cb(x)

    model = ScalesInput().double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    before = x.clone()
    fused = reparam.fuse(model, x)
    assert torch.equal(x, before), "fuse() changed the caller's example input"
    assert len(in_place_nodes(fused)) == 1
    assert any("graph input" in r.reason for r in fused.report.refusals)
    with torch.no_grad():
        ref, out = model(x.clone()), fused(x.clone())
    assert torch.allclose(ref, out, rtol=1e-9, atol=1e-12)


def test_update_of_a_parameter_is_kept_and_reported():
    class ScalesWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.cb = conv_bn(4, 4, 3)
            self.gamma = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

        def forward(self, x):
            g = self.gamma.view(1, 4, 1, 1)
            g.mul_(1.0)  # a no-op in value, but it writes the model's state
            return self.cb(x) * g

    model = ScalesWeight()
    fused, x = fused64(model, torch.randn(1, 4, 6, 6))
    assert len(in_place_nodes(fused)) == 1
    assert any("gamma" in r.reason and "state" in r.reason for r in fused.report.refusals)
    assert n_bns(fused) == 0
    assert_same(model, fused, x)


def test_in_place_update_with_a_wider_dtype_is_kept():
    class Promotes(nn.Module):
        def __init__(self):
            super().__init__()
            self.cb = conv_bn(4, 4, 3)
            self.register_buffer("scale", torch.rand(4, 1, 1, dtype=torch.float64) + 0.5)

        def forward(self, x):
            y = self.cb(x)
            y.mul_(self.scale)  # stays float32 in place; out of place it would become float64
            return y

    model = Promotes().eval()
    model.cb.float()
    x = torch.randn(1, 4, 6, 6)
    fused = reparam.fuse(model, x)
    assert fused(x).dtype == torch.float32
    assert any("promoted" in r.reason for r in fused.report.refusals)


def test_shared_in_place_activation_called_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3)
            self.b = conv_bn(4, 4, 3)
            self.c = conv_bn(4, 4, 1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.act(self.a(x))
            return self.act(self.b(y) + self.c(y))

    model = Shared()
    fused, x = fused64(model, torch.randn(1, 4, 6, 6))
    assert n_convs(fused) == 2 and n_bns(fused) == 0 and not in_place_nodes(fused)
    assert model.act.inplace
    assert_same(model, fused, x)


# -- timm's MobileOne ----------------------------------------------------------------------------

def small_timm_mobileone(timm) -> nn.Module:
    """timm's MobileOne-S0 blocks (ByobNet, MobileOneBlock: `out += ck(x)` over a ModuleList,
    BatchNormAct with a shape assert), three stages of two blocks, narrow: fast in float64."""
    import dataclasses

    from timm.models.byobnet import ByobNet, model_cfgs

    cfg = model_cfgs["mobileone_s0"]
    stages, prev = [], 16
    for i, stage in enumerate(cfg.blocks[:3]):  # each stage: depthwise kxk block, then 1x1 block
        width = 16 * (i + 1)
        stages.append([dataclasses.replace(stage[0], c=prev), dataclasses.replace(stage[1], c=width)])
        prev = width
    return ByobNet(dataclasses.replace(cfg, blocks=tuple(stages), stem_chs=16), num_classes=10)


def test_timm_mobileone_is_one_conv_per_block():
    try:
        timm = require("timm", "tests")
    except MissingExtra as exc:
        pytest.skip(f"timm is not installed: {exc}")
    model = small_timm_mobileone(timm).double().eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m, g)
    blocks = [m for m in model.modules() if type(m).__name__ == "MobileOneBlock"]
    assert len(blocks) == 7  # the stem and six
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert not in_place_nodes(fused)
    assert n_bns(fused) == 0
    assert n_convs(fused) == len(blocks)
    assert_same(model, fused, x)


class SizesShared(nn.Module):
    """RepMLPNet's block: two tensors reshaped with the same sizes taken from the input, then
    `y += ...`. A size is not memory: `y` does not alias the input through it."""

    def __init__(self, c=8):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 1)
        self.c2, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), rbn(c)

    def forward(self, x):
        w = x.shape[3] // 1
        v = x.reshape(-1, 4, x.shape[2], w)
        y = self.c1(v).reshape(-1, 8, x.shape[2], w)
        y += self.bn(self.c2(x))
        return y


def test_values_reshaped_with_the_same_sizes_do_not_alias():
    model = SizesShared().double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert not fused.report.refusals and n_bns(fused) == 0 and n_convs(fused) == 2
    assert not in_place_nodes(fused)
    assert_same(model, fused, x)
