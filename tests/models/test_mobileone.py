"""MobileOne s0-s4: architecture against the published key lists (timm and apple/ml-mobileone
naming), checkpoint loading, structure, and what `reparam.fuse` makes of it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
import reparam.models as models
from reparam.checkpoints import load_state
from reparam.errors import InputError
from reparam.models.mobileone.checkpoint_keys import APPLE, TIMM, to_our_naming
from reparam.nn import MobileOneBlock, SqueezeExcite

from keylists import key_list, marked_state_dict, meta_state_shapes, randomize_batchnorms

VARIANTS = ["mobileone_s0", "mobileone_s1", "mobileone_s2", "mobileone_s3", "mobileone_s4"]


def test_registered():
    assert models.list_models("mobileone") == VARIANTS
    for name in VARIANTS:
        entry = models.get_entry(name)
        assert entry.input_size == (3, 224, 224) and entry.num_classes == 1000


@pytest.mark.parametrize("naming", [TIMM, APPLE])
@pytest.mark.parametrize("variant", VARIANTS)
def test_published_naming_maps_onto_ours(variant, naming):
    keys = key_list("mobileone", variant, naming)
    mapped, detected = to_our_naming(dict(keys))
    assert detected == naming
    assert len(mapped) == len(keys)  # one-to-one
    ours = meta_state_shapes(variant)
    assert mapped == ours
    if variant != "mobileone_s4":  # s4's squeeze-excitation is registered first in our block
        assert list(mapped) == list(ours)


def test_apple_checkpoint_loads_every_tensor_where_it_belongs(tmp_path):
    keys = key_list("mobileone", "mobileone_s0", APPLE)
    state = marked_state_dict(keys)
    path = tmp_path / "mobileone_s0_unfused.pth.tar"
    torch.save({"state_dict": state}, path)
    model = models.create("mobileone_s0", weights=path)
    mapped, _ = to_our_naming({k: k for k, _ in keys})  # ours -> apple key
    own = model.state_dict()
    for apple_key, our_key in zip((k for k, _ in keys), mapped):
        assert torch.equal(own[our_key].float(), state[apple_key].float()), our_key


def test_wrong_variant_is_named_in_the_error():
    state = marked_state_dict(key_list("mobileone", "mobileone_s1", TIMM))
    with pytest.raises(InputError) as info:
        load_state(models.create("mobileone_s0"), state, source="s1.pth",
                   convert=to_our_naming, family="mobileone", model_name="mobileone_s0")
    message = str(info.value)
    assert "s1.pth (timm naming" in message and "does not fit mobileone_s0" in message
    assert "shape mismatches" in message and "fit 'mobileone_s1'" in message


def test_structure():
    with torch.device("meta"):
        s0, s4 = models.create("mobileone_s0"), models.create("mobileone_s4")
    blocks = [m for m in s0.modules() if isinstance(m, MobileOneBlock)]
    assert len(blocks) == 1 + 2 * sum(s0.cfg.num_blocks)
    assert len(s0.stem.conv_kxk) == 1 and all(len(b.conv_kxk) == 4 for b in blocks[1:])  # k = 4 in s0
    assert all(isinstance(b.act, nn.ReLU) for b in blocks)
    assert [s[0].conv_kxk[0].conv.stride for s in s0.stages] == [(2, 2)] * 4
    assert [s[-1].conv_kxk[0].conv.out_channels for s in s0.stages] == [48, 128, 256, 1024]
    assert s0.stem.conv_kxk[0].conv.out_channels == 48
    # s4: squeeze-excitation in the last 5 pairs of stage 2 and the pair of stage 3
    se = [name for name, m in s4.named_modules() if isinstance(m, SqueezeExcite)]
    assert se == [f"stages.2.{i}.se" for i in range(10, 20)] + ["stages.3.0.se", "stages.3.1.se"]


def test_interfaces_and_features():
    model = models.create("mobileone_s1", num_blocks=(1, 1, 1, 1), num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        feats = model.forward_intermediates(x)
        assert [tuple(f.shape[1:]) for f in feats] == [(96, 16, 16), (192, 8, 8), (512, 4, 4), (1280, 2, 2)]
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 1280)
    backbone = models.create("mobileone_s1", num_blocks=(1, 1, 1, 1), features_only=True).eval()
    with torch.no_grad():
        assert len(backbone(x)) == 4


@pytest.mark.parametrize("variant", ["mobileone_s0", "mobileone_s4"])
def test_fuses_to_one_conv_per_block(variant):
    """A shortened model (one pair per stage) so the test stays fast; every block is fused."""
    se = (0, 0, 1, 1) if variant == "mobileone_s4" else (0, 0, 0, 0)
    model = models.create(variant, num_blocks=(1, 1, 2, 1), se_blocks=se, num_classes=10)
    model = randomize_batchnorms(model, seed=3).eval()
    x = torch.randn(1, 3, 32, 32)
    fused = reparam.fuse(model, x)
    assert not [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    blocks = sum(isinstance(m, MobileOneBlock) for m in model.modules())
    se_convs = 2 * sum(isinstance(m, SqueezeExcite) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == blocks + se_convs
    assert not [n for n in fused.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    with torch.no_grad():
        x2 = torch.randn(2, 3, 64, 48)
        torch.testing.assert_close(fused(x2), model(x2), rtol=1e-4, atol=1e-4)
