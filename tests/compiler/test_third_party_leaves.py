"""Untraceable modules written the way model libraries write them keep working after fusion.

An untraceable module (Python control flow on shapes or values) is kept whole and its children
are fused separately. Its own `forward` still reads its children: plain attributes
(`self.attn.resolution`), buffers, caches, methods. Parameters folded into fused weights are gone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam

from .helpers import assert_same, conv_bn, n_bns, n_convs, rbn

torch.manual_seed(0)


class Attention(nn.Module):
    """Traceable; conv+BN branches around a softmax attention, with a cached bias table."""

    def __init__(self, c, resolution):
        super().__init__()
        self.resolution = resolution
        self.num_heads = 2
        self.qkv = conv_bn(c, 3 * c, 1)
        self.dw = conv_bn(c, c, 3, groups=c)
        self.dw_skip = rbn(c)
        self.proj = conv_bn(c, c, 1)
        self.bias_table = nn.Parameter(torch.randn(resolution * resolution))
        self.register_buffer("bias_idx", torch.arange(resolution * resolution).flip(0), persistent=False)
        self.bias_cache: dict[str, torch.Tensor] = {}
        self.unused_scale = nn.Parameter(torch.ones(1))  # never read by forward: must survive

    def window(self) -> int:
        return self.resolution

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q = self.dw(q) + self.dw_skip(q)
        attn = (q.flatten(2).transpose(1, 2) @ k.flatten(2)).softmax(-1)
        attn = attn + self.bias_table[self.bias_idx][None, None, :h * w]
        out = (v.flatten(2) @ attn.transpose(1, 2)).reshape(b, c, h, w)
        return self.proj(out)


class LocalWindowAttention(nn.Module):
    """Untraceable: branches on the input's shape, reads attributes and calls methods of its child."""

    def __init__(self, c, resolution):
        super().__init__()
        self.attn = Attention(c, resolution)

    def forward(self, x):
        b, c, h, w = x.shape
        ws = self.attn.resolution
        assert self.attn.num_heads == 2 and self.attn.window() == ws
        assert self.attn.bias_idx.numel() == ws * ws and isinstance(self.attn.bias_cache, dict)
        assert self.attn.unused_scale.shape == (1,)
        if h == ws and w == ws:
            return self.attn(x)
        pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.attn(x)[:, :, :h, :w]


class Net(nn.Module):
    def __init__(self, c=4, resolution=4):
        super().__init__()
        self.stem = conv_bn(3, c, 3)
        self.mixer = LocalWindowAttention(c, resolution)
        self.head = conv_bn(c, c, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mixer(torch.relu(self.stem(x)))))


def test_leaf_reads_attributes_buffers_caches_and_methods_of_its_fused_child():
    model = Net().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    leaves = fused.report.leaves
    assert [leaf.module for leaf in leaves] == ["mixer"] and leaves[0].fused_inside == 3
    attn = fused.get_submodule("mixer.attn")
    assert isinstance(attn, torch.fx.GraphModule) and isinstance(attn, Attention)
    assert attn.resolution == 4 and attn.num_heads == 2 and attn.window() == 4
    assert n_bns(fused) == 0 and n_bns(attn) == 0
    assert n_convs(attn) == 3  # qkv, dw + skip, proj
    assert_same(model, fused, x)
    assert_same(model, fused, torch.randn(1, 3, 3, 3, dtype=torch.float64))  # the other branch
    copied = copy.deepcopy(fused)  # a copy answers alike
    assert copied.mixer.attn.resolution == 4 and copied.mixer.attn.window() == 4
    assert "mixer.attn.unused_scale" in dict(copied.named_parameters())
    assert_same(model, copied, x)


def test_no_stale_weights_after_fusing_inside_a_leaf():
    model = Net().double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    names = {n for n, _ in fused.named_parameters()}
    assert "mixer.attn.unused_scale" in names
    assert not any(".qkv." in n or ".dw." in n or "dw_skip" in n for n in names), sorted(names)
    # 3 fused convs in the leaf, with bias; the bias table is folded into a buffer constant
    attn = fused.get_submodule("mixer.attn")
    expected = sum(p.numel() for p in attn.parameters())
    assert expected == 4 * 12 + 12 + 4 * 9 + 4 + 4 * 4 + 4 + 1
    assert fused.report.after.params == sum(p.numel() for p in fused.parameters())


class Gate(nn.Module):
    """Untraceable (control flow on a value); its child is called once per call of the gate."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c, 3), nn.ReLU())
        self.calls = 0

    def forward(self, x):
        if x.mean() > 100:
            return x
        return self.body(x)


def test_leaf_called_at_two_places_is_listed_once_and_fused_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate(4)

        def forward(self, x):
            return self.gate(self.gate(x))

    model = Twice().double().eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    leaves = fused.report.leaves
    assert len(leaves) == 1 and "called at 2 places" in leaves[0].reason
    assert leaves[0].fused_inside == 1 and len(fused.report.regions) == 1
    assert n_bns(fused.get_submodule("gate.body")) == 0
    assert_same(model, fused, x)


def test_leaf_that_fails_when_run_again_is_reported_not_swallowed():
    class Once(Gate):
        def forward(self, x):
            self.calls += 1
            if self.calls > 2:  # tracing tries it once, shape propagation runs it once
                raise RuntimeError("this module runs twice at most")
            return super().forward(x)

    model = nn.Sequential(conv_bn(4, 4, 1), Once(4)).double().eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    report = reparam.explain(model, x, verify=False)
    assert [leaf.module for leaf in report.leaves] == ["1"] and report.leaves[0].fused_inside == 0
    reasons = [r.reason for r in report.refusals if r.where == "1"]
    assert reasons and "runs twice at most" in reasons[0]


def test_child_called_with_keywords_is_reported():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Scaled()

        def forward(self, x):
            if x.mean() > 100:
                return x
            return self.inner(x, scale=2.0)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.cb = conv_bn(4, 4, 3)

        def forward(self, x, scale=1.0):
            return self.cb(x) * scale

    model = nn.Sequential(Keyword()).double().eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    # Traced with the value it is called with (guarded), and fused inside.
    assert not fused.report.refusals and len(fused.report.regions) == 1
    assert any("0.inner" in n and "scale=2.0" in n for n in fused.report.notes)
    assert n_bns(fused) == 0
    assert_same(model, fused, x)


@pytest.mark.parametrize("size", [3, 4])
def test_window_attention_leaf_in_float32_end_to_end(size):
    model = Net(resolution=4).eval()
    x = torch.randn(2, 3, size, size)
    fused = reparam.fuse(model, x)  # verifies in float32
    assert n_bns(fused) == 0
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), rtol=1e-4, atol=1e-5)
