"""After fusion, activations and residual sums run in place again where nothing else reads the value
they overwrite, as the authors' hand-written deploy forms do (`nn.ReLU(inplace=True)`, `x += y`);
and `y.flatten(0, 1).reshape_as(y)` left by a folded token BatchNorm disappears.

Each test checks what runs in place (or must not), float64 numbers with randomized BatchNorm
statistics, and that neither the caller's model nor the caller's input is modified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops

from .helpers import assert_same, call_targets, conv_bn, in_place_nodes, n_bns, n_convs, n_sums, rbn

torch.manual_seed(0)


class RepBlock(nn.Module):
    """RepVGG as model libraries write it: an in-place ReLU module after a three-branch sum."""

    def __init__(self, c=8):
        super().__init__()
        self.dense, self.one, self.skip = conv_bn(c, c, 3), conv_bn(c, c, 1), rbn(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.dense(x) + self.one(x) + self.skip(x))


class Residual(nn.Module):
    """A bottleneck whose output is summed with its input, then activated."""

    def __init__(self, c=8):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c, 3), nn.ReLU(), conv_bn(c, c, 1))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + x)


def fused64(model, x):
    model = model.double().eval()
    return model, reparam.fuse(model, x.double()), x.double()


def restored(gm) -> list[str]:
    return [n for n in in_place_nodes(gm, restored=True) if n not in in_place_nodes(gm)]


def test_activations_and_residual_sums_run_in_place():
    model = nn.Sequential(RepBlock(), RepBlock(), Residual())
    flags = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    model, fused, x = fused64(model, torch.randn(2, 8, 9, 9))
    assert n_convs(fused) == 4 and n_bns(fused) == 0 and not fused.report.refusals
    # 3 ReLU modules, the ReLU inside the bottleneck, and the residual sum written into the conv output
    assert len(restored(fused)) == 5 and "add_" in call_targets(fused) and n_sums(fused) == 1
    assert [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)] == flags  # the caller's model
    x_before = x.clone()
    assert_same(model, fused, x)
    assert torch.equal(x, x_before)  # the residual sum never writes into the caller's input
    assert unaccounted_linear_ops(fused) == []


class TwoReaders(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) * self.conv2(y)


class ReturnsItsInput(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.relu(y), F.relu(x)


class AfterSigmoid(nn.Module):
    """sigmoid's gradient reads its own result: writing into it would break backward."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(torch.sigmoid(self.conv(x)))


def test_values_read_elsewhere_inputs_outputs_and_saved_results_are_not_overwritten():
    for model in (TwoReaders(), ReturnsItsInput(), AfterSigmoid()):
        model, fused, x = fused64(model, torch.randn(2, 8, 7, 7))
        assert restored(fused) == [], type(model).__name__
        x_before = x.clone()
        with torch.no_grad():
            for got, want in zip(*(torch.utils._pytree.tree_leaves(f(x)) for f in (fused, model))):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(x, x_before)


class Broadcast(nn.Module):
    """SE-style: a per-image vector plus a feature map; only the feature map can hold the sum."""

    def __init__(self, c=8):
        super().__init__()
        self.squeeze, self.conv = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.squeeze(x.mean((2, 3), keepdim=True)) + self.conv(x)


def test_a_broadcast_sum_is_written_into_the_full_size_addend():
    model, fused, x = fused64(Broadcast(), torch.randn(2, 8, 7, 7))
    (node,) = [n for n in fused.graph.nodes if n.target == "add_"]
    assert node.args[0].target == "conv"  # not the [2, 8, 1, 1] vector
    assert_same(model, fused, x)


class SharedAct(nn.Module):
    """One activation module called on a fresh value and on the graph input."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.act = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x)) + self.act(x)


def test_a_shared_activation_module_runs_in_place_only_where_it_may():
    model, fused, x = fused64(SharedAct(), torch.randn(2, 8, 7, 7))
    assert fused.act.inplace is False  # its call on the input stays out of place
    (node,) = fused.graph.find_nodes(op="call_function", target=F.relu)
    assert node.kwargs == {"inplace": True} and node.args[0].target == "conv"
    x_before = x.clone()
    assert_same(model, fused, x)
    assert torch.equal(x, x_before)


def test_gradients_still_flow_through_the_in_place_updates():
    model = nn.Sequential(RepBlock(), Residual()).eval()
    fused = reparam.fuse(model, torch.randn(2, 8, 9, 9))
    assert restored(fused)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    fused(x).sum().backward()
    expected = x.detach().clone().requires_grad_(True)
    model(expected).sum().backward()
    torch.testing.assert_close(x.grad, expected.grad, rtol=1e-4, atol=1e-4)


class TokenLinearNorm(nn.Module):
    """LeViT-style Linear then BatchNorm1d over batch x tokens."""

    def __init__(self, c=8, d=12):
        super().__init__()
        self.linear, self.bn = nn.Linear(c, d, bias=False), rbn(d, nd=1)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TransposedNorm(nn.Module):
    """The same reshapes around a norm on a transposed (non-contiguous) value, with no Linear."""

    def __init__(self, c=8):
        super().__init__()
        self.bn = rbn(c, nd=1)

    def forward(self, x):
        t = x.transpose(1, 2)
        return self.bn(t.flatten(0, 1)).reshape_as(t)


def test_reshapes_back_to_a_linear_output_vanish_and_others_stay():
    model, fused, x = fused64(nn.Sequential(TokenLinearNorm(), TokenLinearNorm(12, 8)), torch.randn(2, 5, 8))
    assert n_bns(fused) == 0
    assert not {"flatten", "reshape_as"} & set(call_targets(fused))
    assert_same(model, fused, x)
    model, fused, x = fused64(TransposedNorm(), torch.randn(2, 8, 5))
    assert "reshape_as" in call_targets(fused)
    assert_same(model, fused, x)
