"""reparam.models: registry, create() and its options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam.models as models
from reparam.errors import InputError

from fastvit_testlib import ALL_VARIANTS


def test_list_models():
    names = models.list_models()
    assert names == sorted(names)
    assert set(ALL_VARIANTS) <= set(names)
    assert models.list_models("fastvit") == sorted(ALL_VARIANTS + ["fastvit_mci3", "fastvit_mci4"])
    assert models.list_models("no-such-family") == []


def test_entries():
    for name in ALL_VARIANTS:
        entry = models.get_entry(name)
        assert entry.name == name and entry.family == "fastvit"
        assert entry.input_size == (3, 256, 256)
        assert entry.num_classes == (512 if "mci" in name else 1000)
        assert entry.convert_state_dict is not None


@pytest.mark.parametrize("typo,suggestion", [("fastvit_t9", "fastvit_t8"), ("fastvit-sa12", "fastvit_sa12"),
                                             ("FastViT_ma36", "fastvit_ma36")])
def test_unknown_name_suggests_close_names(typo, suggestion):
    with pytest.raises(InputError, match="unknown model") as info:
        models.create(typo)
    assert suggestion in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(InputError):
        models.get_entry(typo)


def test_num_params_is_computed():
    model = models.create("fastvit_t8")
    assert models.num_params("fastvit_t8") == sum(p.numel() for p in model.parameters()) == 4_026_232
    assert models.num_params("fastvit_t8", num_classes=10) == 4_026_232 - 990 * 769


def test_default_classifier_widths():
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert models.create("fastvit_t8").eval()(x).shape == (1, 1000)
        assert models.create("fastvit_t8", num_classes=7).eval()(x).shape == (1, 7)
        assert models.create("fastvit_mci0").eval()(x).shape == (1, 512)


def test_overrides_reach_the_config():
    model = models.create("fastvit_t8", drop_path_rate=0.1, layers=[1, 1, 1, 1])
    assert model.cfg.drop_path_rate == 0.1 and model.cfg.layers == (1, 1, 1, 1)
    assert sum(len(s.blocks) for s in model.stages) == 4
    assert model.training  # a new module, like any other


@pytest.mark.parametrize("overrides,message", [
    (dict(dropout=0.1), "no option 'dropout'"),
    (dict(layers=(1, 1)), "one entry per stage"),
    (dict(token_mixers=("repmixer", "conv", "repmixer", "repmixer")), "unknown token mixer"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(InputError, match=message):
        models.create("fastvit_t8", **overrides)


def test_register_another_family():
    class Tiny(nn.Module):
        def __init__(self, num_classes=3, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    entry = models.ModelEntry("tiny_test_net", "tiny", Tiny, input_size=(3, 8, 8), num_classes=3)
    models.register(entry)
    try:
        with pytest.raises(ValueError, match="already registered"):
            models.register(entry)
        assert models.list_models("tiny") == ["tiny_test_net"]
        assert models.create("tiny_test_net", num_classes=5, width=2).fc.out_features == 5
        assert models.num_params("tiny_test_net") == 3 * 4 * 9 + 4 + 4 * 3 + 3
        with pytest.raises(InputError, match="cannot build"):
            models.create("tiny_test_net", depth=3)
    finally:
        models._REGISTRY.pop("tiny_test_net")
