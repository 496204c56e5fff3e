"""Low-rank adapters (LoRA) written as adapter libraries write them merge into their base layer:
`base(x) + B(A(dropout(x))) * scaling` is one Linear (or one conv). `B.A` alone is refused as
dearer than the two thin layers, but beside `base`, which has its geometry, it joins for free."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops

from .helpers import assert_same, modules_of, n_convs

torch.manual_seed(0)


class LoraLinear(nn.Module):
    """An adapted Linear: a dict of adapters, each with its dropout, summed in place."""

    def __init__(self, i, o, r=4, adapters=("default",), in_place=True):
        super().__init__()
        self.base_layer = nn.Linear(i, o)
        self.lora_dropout = nn.ModuleDict({a: nn.Dropout(0.1) for a in adapters})
        self.lora_A = nn.ModuleDict({a: nn.Linear(i, r, bias=False) for a in adapters})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, o, bias=False) for a in adapters})
        self.scaling = {a: 2.0 / r for a in adapters}
        self.active_adapters = list(adapters)
        self.in_place = in_place
        for b in self.lora_B.values():
            nn.init.normal_(b.weight)  # adapters start at zero; trained ones are not

    def forward(self, x):
        result = self.base_layer(x)
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
            if self.in_place:
                result += delta
            else:
                result = result + delta
        return result


class AdaptedMLP(nn.Module):
    def __init__(self, dim=16, **kw):
        super().__init__()
        self.fc1, self.fc2 = LoraLinear(dim, 2 * dim, **kw), LoraLinear(2 * dim, dim, **kw)

    def forward(self, x):  # x: [batch, tokens, dim]
        return self.fc2(F.gelu(self.fc1(x)))


def test_lora_linear_merges_into_its_base_layer():
    for kw in ({}, {"in_place": False}, {"adapters": ("a", "b")}):
        model = AdaptedMLP(**kw).double().eval()
        x = torch.randn(2, 5, 16, dtype=torch.float64)
        fused = reparam.fuse(model, x)
        assert len(modules_of(fused, nn.Linear)) == 2, kw
        assert not fused.report.refusals and unaccounted_linear_ops(fused) == []
        assert_same(model, fused, x)


class LoraConv(nn.Module):
    def __init__(self, c=8, r=2):
        super().__init__()
        self.base_layer = nn.Conv2d(c, c, 3, padding=1)
        self.lora_A = nn.Conv2d(c, r, 3, padding=1, bias=False)
        self.lora_B = nn.Conv2d(r, c, 1, bias=False)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        return F.relu(self.base_layer(x) + self.lora_B(self.lora_A(x)) * 0.5)


def test_lora_conv_merges_into_its_base_conv():
    model = LoraConv().double().eval()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and not fused.report.refusals
    assert_same(model, fused, x)


class AdapterOnOtherInput(nn.Module):
    """The adapter reads another value than the base layer: nothing to join, the refusal stays."""

    def __init__(self, dim=16, r=4):
        super().__init__()
        self.base_layer, self.lora_A, self.lora_B = nn.Linear(dim, dim), nn.Linear(dim, r), nn.Linear(r, dim)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(torch.tanh(x)))


def test_adapter_on_another_input_stays_with_its_reason():
    model = AdapterOnOtherInput().double().eval()
    x = torch.randn(3, 16, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert len(modules_of(fused, nn.Linear)) == 3
    assert any("not cheaper" in r.reason and "lora_A" in r.where for r in fused.report.refusals)
    assert_same(model, fused, x)
