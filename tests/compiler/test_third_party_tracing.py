"""Tracing models as other people write them: untraceable top levels, parameters read in forward,
`torch.jit.is_scripting()` checks, shape asserts, weights computed in forward."""

from __future__ import annotations

import dis
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.errors import TraceFailure
from reparam.trace import _assertion_outcome, trace

from .asserting_blocks import AssertingBlock, OrAssert, truth_tests
from .helpers import assert_same, conv_bn, n_bns, n_convs, randomize_bn, rbn

torch.manual_seed(0)


class RepBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.kxk = conv_bn(c, c, 3)
        self.pw = conv_bn(c, c, 1)
        self.skip = rbn(c)
        self.tag = "rep"

    def forward(self, x):
        return torch.relu(self.kxk(x) + self.pw(x) + self.skip(x))


class Gated(nn.Module):
    """The model's own forward has control flow on a value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = RepBlock(4)
        self.blocks = nn.ModuleList(RepBlock(4) for _ in range(2))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > 0:
            for block in self.blocks:
                x = block(x)
        assert self.stem.tag == "rep"
        return self.head(x.mean((2, 3)))


def test_untraceable_top_level_is_fused_inside_its_children():
    model = Gated().double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert isinstance(fused, Gated) and not fused.training
    report = fused.report
    assert report.leaves[0].module == "Gated (the model itself)"
    assert "control flow" in report.leaves[0].reason and report.leaves[0].fused_inside == 3
    assert sorted(r.name for r in report.regions) == ["blocks.0.fused_0", "blocks.1.fused_0", "stem.fused_0"]
    for name in ("stem", "blocks.0", "blocks.1"):
        sub = fused.get_submodule(name)
        assert n_bns(sub) == 0 and n_convs(sub) == 1 and sub.tag == "rep"
    assert report.after.params == sum(p.numel() for p in fused.parameters())
    assert report.before.params == sum(p.numel() for p in model.parameters())
    assert report.max_abs_diff is not None
    assert_same(model, fused, x)
    assert_same(model, fused, -x - 5)  # the other branch
    assert isinstance(model.stem.kxk, nn.Sequential), "the caller's model is never modified"


def test_nothing_traceable_raises_a_clear_error():
    class Hopeless(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(1))
            self.act = nn.ReLU()

        def forward(self, x):
            if x.mean() > 0:
                return self.act(x) * self.gain
            return x

    with pytest.raises(TraceFailure, match="Hopeless.forward.*none of its submodules"):
        reparam.fuse(Hopeless(), torch.randn(1, 4, 4, 4))


class FunctionalBNAct(nn.Module):
    """BatchNormAct-style: reads its own parameters and buffers in forward, Identity activation."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)
        self.eps = 1e-3
        self.act = nn.Identity()

    def forward(self, x):
        if not torch.jit.is_scripting():
            torch._assert(x.dim() == 4, "expected NCHW")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class ScaledConv(nn.Module):
    """A conv whose weight is computed in forward (weight standardization style) + a layer scale."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3))
        self.gain = nn.Parameter(torch.rand(c, 1, 1, 1) + 0.5)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.bn = FunctionalBNAct(c)

    def forward(self, x):
        w = self.weight * self.gain
        return self.gamma * self.bn(F.conv2d(x, w, None, 1, 1))


def test_functional_bn_and_computed_weights_fuse():
    model = nn.Sequential(ScaledConv(4), nn.ReLU(), ScaledConv(4))
    x = torch.randn(2, 4, 6, 6)
    fused = reparam.fuse(model.double().eval(), x.double())
    assert n_convs(fused) == 2 and not fused.report.refusals
    assert not any(n.target is F.batch_norm for n in fused.graph.nodes)
    assert_same(model, fused, x.double())


def test_tracing_looks_up_parameters_once_per_model():
    """torch.fx's default look-up scans every named parameter per access (quadratic)."""
    model = nn.Sequential(*[ScaledConv(2) for _ in range(30)])
    calls = {"parameters": 0, "buffers": 0}
    named_parameters, named_buffers = model.named_parameters, model.named_buffers

    def counting_parameters(*args, **kwargs):
        calls["parameters"] += 1
        return named_parameters(*args, **kwargs)

    def counting_buffers(*args, **kwargs):
        calls["buffers"] += 1
        return named_buffers(*args, **kwargs)

    model.named_parameters, model.named_buffers = counting_parameters, counting_buffers
    gm, failed = trace(model)
    assert not failed
    assert calls["parameters"] <= 1 and calls["buffers"] <= 1, calls
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(targets) == 30 * 7 and len(set(targets)) == len(targets)
    assert "0.bn.running_mean" in targets and "29.gain" in targets


def test_shared_parameter_keeps_its_first_name():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 1)
            self.b = nn.Conv2d(2, 2, 1)
            self.b.weight = self.a.weight

        def forward(self, x):
            return F.conv2d(x, self.b.weight) + F.conv2d(x, self.a.weight)

    gm, _ = trace(Shared())
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["a.weight"]


@torch.fx.wrap
def float32_only(w: torch.Tensor) -> torch.Tensor:
    """Stands for a weight generator that cannot run in float64 (e.g. a custom kernel)."""
    if w.dtype != torch.float32:
        raise TypeError(f"float32_only got {w.dtype}")
    return w * 1.0


def test_failed_constant_fold_is_reported():
    class Generated(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
            self.bn = randomize_bn(nn.BatchNorm2d(4))

        def forward(self, x):
            return self.bn(F.conv2d(x, float32_only(self.weight), padding=1))

    model = Generated().eval()
    x = torch.randn(1, 4, 6, 6)
    fused = reparam.fuse(model, x)
    reasons = [r for r in fused.report.refusals if "evaluating it once failed" in r.reason]
    assert reasons and "float32_only got torch.float64" in reasons[0].reason
    assert any(n.op == "call_function" and n.target is float32_only for n in fused.graph.nodes)


def test_star_import_of_trace():
    namespace: dict = {}
    exec("from reparam.trace import *", namespace)
    assert "trace" in namespace and "fold_constants" in namespace


def test_python_asserts_are_traced_as_checks_and_keep_failing():
    model = AssertingBlock(4).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert isinstance(fused, torch.fx.GraphModule), "the model's own forward must be traced"
    assert not fused.report.leaves and not fused.report.refusals
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert_same(model, fused, x)
    checks = [n for n in fused.graph.nodes if n.target is torch._assert]
    assert 3 <= len(checks) <= 6
    # Every input the original rejects, the fused model rejects where the same statement stood.
    with pytest.raises(AssertionError, match=r"assert x\.dim\(\) == 4"):
        fused(torch.randn(4, 6, 6, dtype=torch.float64))
    with pytest.raises(AssertionError, match=r"assert C == self\.c"):
        fused(torch.randn(1, 3, 6, 6, dtype=torch.float64))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(AssertionError):
        model(bad)
    with pytest.raises(AssertionError, match="isfinite"):
        fused(bad)


def test_assert_spellings_decide_the_right_way():
    code = truth_tests.__code__
    outcomes = [_assertion_outcome(code, inst.offset) for inst in dis.get_instructions(code)
                if "JUMP" in inst.opname and "IF_" in inst.opname]
    # assert x / assert not x / both operands of `and` / `or`'s first operand (which does not decide
    # alone), its second one / a plain `if`.
    assert outcomes == [False, True, False, False, None, False, None]


def test_assert_that_does_not_decide_alone_is_decided_from_the_example_input():
    # `x.dim() == 4 or ...` alone does not decide the assertion, but it reads only metadata: the
    # trace takes the way the example input does, under a guard (see test_metadata_branches.py).
    model = OrAssert(RepBlock(4)).double().eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert isinstance(fused, torch.fx.GraphModule) and not fused.report.leaves
    assert [r.name for r in fused.report.regions] == ["fused_0"]
    assert_same(model, fused, x)
    with pytest.raises(AssertionError, match="x.dim\\(\\) == 4"):
        fused(x[0])


class SamePadConv(nn.Conv2d):
    """TensorFlow "same" padding computed from the input size (timm's `Conv2dSame`): Python
    arithmetic on sizes makes it untraceable, and its own `padding` attribute is 0."""

    def __init__(self, ci, co, k, stride):
        super().__init__(ci, co, k, stride, padding=0, bias=False)

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StandardizedConv(nn.Conv2d):
    """Weight standardization in forward (timm's `StdConv2d` style): traceable, folds as a constant."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NamedConv(nn.Conv2d):
    """A subclass that only adds a constructor: it computes what Conv2d computes."""

    def __init__(self, c):
        super().__init__(c, c, 3, padding=1, bias=False)


def test_subclasses_of_torch_layers_are_read_by_what_they_compute():
    torch.manual_seed(6)
    model = nn.Sequential(SamePadConv(4, 6, 3, 2), rbn(6), nn.ReLU(),
                          StandardizedConv(6, 6, 3, padding=1, bias=False), rbn(6), nn.ReLU(),
                          NamedConv(6), rbn(6)).double().eval()
    for size in (9, 10):
        x = torch.randn(1, 4, size, size, dtype=torch.float64)
        fused = reparam.fuse(model, x)
        assert_same(model, fused, x)
        # The same-padded conv is a leaf whose padding attribute says 0: it is not read as a plain
        # Conv2d (that lost the padding), so its BatchNorm stays; the report names the leaf.
        assert [leaf.module for leaf in fused.report.leaves] == ["0"]
        assert n_bns(fused) == 1 and n_convs(fused) == 3
        other = torch.randn(1, 4, size + 3, size + 3, dtype=torch.float64)
        assert_same(model, fused, other)


class SqueezeExcite(nn.Module):
    """RepVGG's SE block: a global pool whose window is read from the input's shape."""

    def __init__(self, c):
        super().__init__()
        self.down, self.up, self.c = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1), c

    def forward(self, inputs):
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = torch.sigmoid(self.up(F.relu(self.down(x))))
        return inputs * x.view(-1, self.c, 1, 1)


class RepVGGWithSE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.rbr_dense, self.rbr_1x1, self.rbr_identity = conv_bn(c, c, 3), conv_bn(c, c, 1), rbn(c)
        self.se = SqueezeExcite(c)

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return F.relu(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


def test_pool_window_read_from_the_input_shape_is_left_as_written():
    model = RepVGGWithSE(4).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)  # used to fail inside the classifier
    assert n_convs(fused) == 3 and n_bns(fused) == 0  # the block's branches, and the SE's two convs
    assert any(n.target is F.avg_pool2d for n in fused.graph.nodes)
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(2, 4, 9, 9, dtype=torch.float64))


class ShuffledConvs(nn.Module):
    """A channel shuffle (view, transpose, contiguous, view) between convolutions and norms."""

    def __init__(self, c, groups=2):
        super().__init__()
        self.groups = groups
        self.conv = nn.Conv2d(c, c, 1, groups=groups, bias=False)
        self.bn = rbn(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = rbn(c)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.size()
        x = x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        x = F.relu(self.bn(x))
        return self.bn2(self.conv2(x).contiguous())  # a fresh output made contiguous: an identity


def test_contiguous_after_a_transpose_stays_and_after_a_conv_folds():
    model = ShuffledConvs(8).double().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert_same(model, fused, x)
    # The shuffle's contiguous() stays (the view after it needs it); the one after conv2 goes.
    assert sum(n.target == "contiguous" for n in fused.graph.nodes) == 1
    assert n_convs(fused) == 2 and n_bns(fused) == 0  # bn after the shuffle moves before it, into conv


class LayerScaleSwitch(nn.Module):
    """FasterNet's MLPBlock: `forward` is chosen in __init__ and set on the instance."""

    def __init__(self, c=8, layer_scale=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), rbn(2 * c), nn.ReLU(),
                                 nn.Conv2d(2 * c, c, 1, bias=False))
        self.layer_scale = nn.Parameter(torch.rand(c) + 0.5)
        if layer_scale:
            self.forward = self.forward_layer_scale

    def forward(self, x):
        return x + self.mlp(x)

    def forward_layer_scale(self, x):
        return x + self.layer_scale.unsqueeze(-1).unsqueeze(-1) * self.mlp(x)


def test_a_forward_set_on_the_instance_is_the_one_fused():
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    model = LayerScaleSwitch().double().eval()
    # As the model itself: torch.fx would trace the class's forward; its children are fused instead.
    fused = reparam.fuse(model, x)
    assert "replaced on the instance" in fused.report.leaves[0].reason
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # folded into mlp's conv
    assert_same(model, fused, x)
    # Inside a model, the call runs the instance's forward, and the whole block fuses.
    outer = nn.Sequential(LayerScaleSwitch(), nn.ReLU()).double().eval()
    fused = reparam.fuse(outer, x)
    assert not fused.report.leaves and n_bns(fused) == 0 and n_convs(fused) == 2
    assert_same(outer, fused, x)
