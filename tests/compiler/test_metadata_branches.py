"""Python branches on tensor metadata are decided from the example input, under a guard.

Detection libraries write their convolution and frozen-norm layers with plain `if`s on metadata:
an empty-batch check before the convolution, a `requires_grad` test choosing how a frozen
BatchNorm computes. Such a branch takes the way the example input does; the graph keeps a check
that fails, naming the line, for an input that would take the other way. Branches on tensor
values still make the module an untraceable leaf.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.concrete import metadata_sources

from .helpers import assert_same, n_convs

torch.manual_seed(0)


class FrozenBatchNorm2d(nn.Module):
    """A BatchNorm whose statistics and affine parameters are buffers (detection backbones):
    computed by hand while gradients flow, else by `F.batch_norm` in inference mode."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.rand(c) * 2 - 1)
        self.register_buffer("running_mean", torch.rand(c) * 2 - 1)
        self.register_buffer("running_var", torch.rand(c) * 1.5 + 0.25)

    def forward(self, x):
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Conv2d(nn.Conv2d):
    """A convolution carrying its own norm and activation, with an empty-batch check first."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        if not torch.jit.is_scripting():
            with warnings.catch_warnings(record=True):
                if x.numel() == 0 and self.training:
                    assert not isinstance(self.norm, nn.SyncBatchNorm), "SyncBatchNorm needs a non-empty batch"
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class Bottleneck(nn.Module):
    def __init__(self, ci, co, mid, stride=1):
        super().__init__()
        self.shortcut = (Conv2d(ci, co, 1, stride=stride, bias=False, norm=FrozenBatchNorm2d(co))
                         if ci != co else None)
        self.conv1 = Conv2d(ci, mid, 1, bias=False, norm=FrozenBatchNorm2d(mid))
        self.conv2 = Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False, norm=FrozenBatchNorm2d(mid))
        self.conv3 = Conv2d(mid, co, 1, bias=False, norm=FrozenBatchNorm2d(co))

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out += shortcut
        return F.relu_(out)


def frozen_norms(module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]


def batch_norm_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm)


@pytest.mark.parametrize("ci, co, stride", [(8, 8, 1), (6, 12, 2)])
def test_detection_bottleneck_folds_every_frozen_norm(ci, co, stride):
    model = Bottleneck(ci, co, 4, stride).double().eval()
    x = torch.randn(2, ci, 9, 9, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert not fused.report.leaves and not fused.report.refusals
    expected = 3 + (ci != co)
    assert len(fused.report.regions) == expected
    assert n_convs(fused) == expected and batch_norm_calls(fused) == 0
    assert not frozen_norms(fused)
    assert_same(model, fused, x)
    other_size = torch.randn(1, ci, 5, 7, dtype=torch.float64)  # another size takes the same branches
    assert_same(model, fused, other_size)


def test_guard_fails_for_an_input_taking_the_other_branch():
    model = Bottleneck(8, 8, 4).double().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    # `x.numel() == 0 and self.training` is False in eval mode whatever the batch: no guard.
    assert "numel" not in fused.code
    with torch.no_grad():  # an empty batch
        torch.testing.assert_close(fused(x[:0]), model(x[:0]))
    with torch.no_grad():  # an input needing gradients: the norms still see values that need none
        torch.testing.assert_close(fused(x.clone().requires_grad_()), model(x))
    # Outside no_grad the fused weights make every value need gradients, as the original's would.
    with pytest.raises(AssertionError, match=r"call the fused model under torch\.no_grad\(\)"):
        fused(x)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)


def test_example_input_requiring_grad_traces_the_other_branch():
    model = nn.Sequential(Conv2d(4, 4, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(4))).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x.clone().requires_grad_(), verify=False)
    # reparam runs the model without gradients: the intermediate value needs none, so the
    # branch is that of inference and the norm is folded.
    assert n_convs(fused) == 1 and not frozen_norms(fused) and batch_norm_calls(fused) == 0
    assert_same(model, fused, x)


def test_requires_grad_guard_on_a_graph_input():
    model = nn.Sequential(FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1)).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and not frozen_norms(fused) and batch_norm_calls(fused) == 0
    assert_same(model, fused, x)
    with torch.no_grad(), pytest.raises(AssertionError, match=r"`input_1\.requires_grad` is False.*`if x\.requires_grad:`"):
        fused(x.clone().requires_grad_())  # the norm would compute by hand


class EmptyBatch(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = Conv2d(c, c, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(c))

    def forward(self, x):
        if x.numel() == 0:
            return x.new_zeros(x.shape)
        return self.conv(x)


def test_empty_batch_guard_names_the_line():
    model = EmptyBatch(4).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and not frozen_norms(fused) and not fused.report.leaves
    assert_same(model, fused, x)
    with torch.no_grad(), pytest.raises(AssertionError, match=r"`\(x\.numel\(\) == 0\)` is False .*`if x\.numel\(\) == 0:`"):
        fused(x[:0])


class ByValue(nn.Module):
    """A branch on the values of a tensor: cannot be decided from metadata."""

    def __init__(self, c):
        super().__init__()
        self.conv = Conv2d(c, c, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(c))

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


class MixedCondition(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = Conv2d(c, c, 1, bias=False, norm=FrozenBatchNorm2d(c))

    def forward(self, x):
        if x.shape[0] > x.abs().sum():  # a size compared with a value: a value read
            return self.conv(x)
        return self.conv(x) * 2


@pytest.mark.parametrize("wrapper", [ByValue, MixedCondition])
def test_branches_on_values_stay_untraceable(wrapper):
    model = nn.Sequential(wrapper(4), Conv2d(4, 4, 1, bias=False, norm=FrozenBatchNorm2d(4))).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert [leaf.module for leaf in fused.report.leaves] == ["0"]
    assert "symbolically traced variables cannot be used as inputs to control flow" in fused.report.leaves[0].reason
    assert not frozen_norms(fused)  # each conv still absorbs its norm, inside and outside the leaf
    assert_same(model, fused, x)


class ShapeDispatch(nn.Module):
    """Branches on rank, dtype and the device, the way layers that accept several layouts do."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = FrozenBatchNorm2d(c)

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dtype != torch.float64 or x.device.type != "cpu":
            raise TypeError("float64 on the CPU only")
        return self.bn(self.conv(x))


def test_rank_dtype_and_device_branches_are_guarded():
    model = ShapeDispatch(4).double().eval()
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert not fused.report.leaves and n_convs(fused) == 1 and not frozen_norms(fused)
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(1, 4, 3, 7, dtype=torch.float64))
    with pytest.raises(AssertionError, match=r"x\.dim\(\) == 3"):
        fused(x[0])


class PadToEven(ShapeDispatch):
    """Window attention's padding: a branch on a size, which differs from input to input."""

    def forward(self, x):
        if x.shape[-1] % 2 == 1:
            x = F.pad(x, (0, 1))
        return self.bn(self.conv(x))


def test_branches_on_sizes_keep_the_module_whole_for_every_size():
    model = nn.Sequential(PadToEven(4)).double().eval()
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    # Guarding the example's width would refuse every other width: the block stays an
    # untraceable leaf (its conv and norm, children it combines in Python, stay apart) and takes both.
    assert [leaf.module for leaf in fused.report.leaves] == ["0"]
    assert "control flow" in fused.report.leaves[0].reason
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(2, 4, 6, 6, dtype=torch.float64))


def test_conditions_reading_metadata_are_told_apart_from_value_reads():
    def condition(fn):
        graph = torch.fx.Graph()
        x = torch.fx.Proxy(graph.placeholder("x"))
        return metadata_sources(fn(x).node)

    assert [n.name for n in condition(lambda x: x.numel() == 0)] == ["x"]
    assert [n.name for n in condition(lambda x: (x.shape[1] // 2) + x.size(0) > 3)] == ["x"]
    assert [n.name for n in condition(lambda x: x.device.type == "cpu")] == ["x"]
    assert condition(lambda x: x.sum() > 0) is None
    assert condition(lambda x: x.shape[0] > x.sum()) is None
    assert condition(lambda x: x + 1) is None
