"""RepVGG a0-b3g4 and d2se: architecture against the published key lists (timm and
DingXiaoH/RepVGG naming), checkpoint loading, structure, and what `reparam.fuse` makes of it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
import reparam.models as models
from reparam.checkpoints import load_state
from reparam.errors import InputError
from reparam.models.repvgg.checkpoint_keys import ORIGINAL, TIMM, to_our_naming
from reparam.nn import RepVGGBlock, SqueezeExcite

from keylists import key_list, marked_state_dict, meta_state_shapes, randomize_batchnorms

ORIGINAL_VARIANTS = ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g4",
                     "repvgg_b2", "repvgg_b2g4", "repvgg_b3", "repvgg_b3g4"]
VARIANTS = ORIGINAL_VARIANTS + ["repvgg_d2se"]


def test_registered():
    assert models.list_models("repvgg") == sorted(VARIANTS)
    for name in VARIANTS:
        size = 320 if name == "repvgg_d2se" else 224
        assert models.get_entry(name).input_size == (3, size, size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_naming_is_ours_in_module_order(variant):
    keys = key_list("repvgg", variant, TIMM)
    mapped, naming = to_our_naming(dict(keys))
    assert naming == TIMM
    assert list(mapped.items()) == list(meta_state_shapes(variant).items())


@pytest.mark.parametrize("variant", ORIGINAL_VARIANTS)
def test_original_naming_maps_onto_ours(variant):
    keys = key_list("repvgg", variant, ORIGINAL)
    mapped, naming = to_our_naming(dict(keys))
    assert naming == ORIGINAL and len(mapped) == len(keys)
    assert mapped == meta_state_shapes(variant)


def test_original_checkpoint_loads_every_tensor_where_it_belongs(tmp_path):
    keys = key_list("repvgg", "repvgg_a0", ORIGINAL)
    state = marked_state_dict(keys)
    path = tmp_path / "RepVGG-A0-train.pth"
    torch.save(state, path)
    model = models.create("repvgg_a0", weights=path)
    mapped, _ = to_our_naming({k: k for k, _ in keys})
    own = model.state_dict()
    for original_key, our_key in zip((k for k, _ in keys), mapped):
        assert torch.equal(own[our_key].float(), state[original_key].float()), our_key


def test_wrong_variant_is_named_in_the_error():
    state = marked_state_dict(key_list("repvgg", "repvgg_a1", ORIGINAL))
    with pytest.raises(InputError) as info:
        load_state(models.create("repvgg_a0"), state, source="RepVGG-A1-train.pth",
                   convert=to_our_naming, family="repvgg", model_name="repvgg_a0")
    message = str(info.value)
    assert "(original naming" in message and "does not fit repvgg_a0" in message
    assert "fit 'repvgg_a1'" in message


def _groups(model) -> list[int]:
    return [m.conv_kxk.conv.groups for m in model.modules() if isinstance(m, RepVGGBlock)]


def test_g4_variants_group_the_papers_alternate_layers():
    with torch.device("meta"):
        b1, b1g4 = models.create("repvgg_b1"), models.create("repvgg_b1g4")
    assert _groups(b1) == [1] * 28
    # layer 0 is the stem; layers 2, 4, ..., 26 use groups=4, the last (27) does not
    assert _groups(b1g4) == [4 if i in range(2, 27, 2) else 1 for i in range(28)]
    assert all(m.conv_1x1.conv.groups == m.conv_kxk.conv.groups for m in b1g4.modules() if isinstance(m, RepVGGBlock))


def test_structure():
    with torch.device("meta"):
        a0, d2se = models.create("repvgg_a0"), models.create("repvgg_d2se")
    assert [len(s) for s in a0.stages] == [2, 4, 14, 1]
    assert [s[0].conv_kxk.conv.out_channels for s in a0.stages] == [48, 96, 192, 1280]
    assert [s[0].conv_kxk.conv.stride for s in a0.stages] == [(2, 2)] * 4
    assert all(isinstance(m.act, nn.ReLU) for m in a0.modules() if isinstance(m, RepVGGBlock))
    assert all((m.identity is None) == (m.conv_kxk.conv.stride == (2, 2)) for m in a0.modules()
               if isinstance(m, RepVGGBlock))
    blocks = [m for m in d2se.modules() if isinstance(m, RepVGGBlock)]
    assert len(blocks) == 1 + 8 + 14 + 24 + 1 and all(isinstance(m.attn, SqueezeExcite) for m in blocks)
    assert d2se.stem.attn.fc1.out_channels == 4  # reduction 1/16


@pytest.mark.parametrize("variant", ["repvgg_b1g4", "repvgg_d2se"])
def test_fuses_to_one_conv_per_block(variant):
    """A shortened model so the test stays fast; every block becomes one 3x3 conv."""
    model = models.create(variant, num_blocks=(2, 2, 2, 1), width_multipliers=(0.5, 0.5, 0.5, 0.5),
                          grouped_layers=(2, 4, 6), num_classes=10)
    model = randomize_batchnorms(model, seed=4).eval()
    x = torch.randn(1, 3, 32, 32)
    fused = reparam.fuse(model, x)
    assert not [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    blocks = sum(isinstance(m, RepVGGBlock) for m in model.modules())
    se_convs = 2 * sum(isinstance(m, SqueezeExcite) for m in model.modules())
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == blocks + se_convs
    assert sorted(c.groups for c in convs if c.kernel_size == (3, 3)) == sorted(_groups(model))
    assert not [n for n in fused.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    with torch.no_grad():
        x2 = torch.randn(2, 3, 64, 48)
        torch.testing.assert_close(fused(x2), model(x2), rtol=1e-4, atol=1e-4)
