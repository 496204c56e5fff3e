"""FastViT MobileCLIP2 towers (mci3, mci4) and MobileCLIP checkpoints as released with the CLIP
model (image tower beside a text tower)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
import reparam.models as models
from reparam.checkpoints import CheckpointWarning, load_state
from reparam.models.fastvit import blocks
from reparam.models.fastvit.checkpoint_keys import to_our_naming

from keylists import key_list, marked_state_dict, meta_state_shapes, randomize_batchnorms

MCI2 = ["fastvit_mci3", "fastvit_mci4"]


@pytest.mark.parametrize("variant", MCI2)
def test_state_dict_is_timm_naming_in_module_order(variant):
    keys = key_list("fastvit", variant, "timm")
    assert list(meta_state_shapes(variant).items()) == keys


@pytest.mark.parametrize("variant", MCI2)
def test_structure(variant):
    entry = models.get_entry(variant)
    assert entry.input_size == (3, 256, 256) and entry.num_classes == 768
    with torch.device("meta"):
        model = models.create(variant)
    assert len(model.stages) == 5
    assert all(b.conv_scale is None for b in model.stem)  # no scale branch in the stem
    assert model.stem[2].identity is not None
    for i, stage in enumerate(model.stages):
        attention = i >= 3
        assert isinstance(stage.pos_emb, blocks.RepCPE) == attention
        kinds = {type(b) for b in stage.blocks}
        assert kinds == {blocks.AttentionBlock if attention else blocks.RepMixerBlock}
        if attention:
            assert all(isinstance(b.norm, blocks.LayerNorm2d) and b.norm.eps == 1e-5 for b in stage.blocks)
        if i > 0:
            lkc = stage.downsample.proj[0]
            assert isinstance(lkc.act, nn.GELU) and isinstance(lkc.se, blocks.Identity)
    assert model.head.fc.out_features == 768
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32, 64]


def test_small_tower_fuses():
    """An mci3 with one block per stage and narrow widths: every BatchNorm goes, LayerNorm stays."""
    model = models.create("fastvit_mci3", layers=(1, 1, 1, 1, 1), embed_dims=(16, 32, 32, 64, 64),
                          num_classes=8)
    model = randomize_batchnorms(model, seed=2).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, blocks.LayerScale):
                m.gamma.uniform_(0.1, 0.5)
    x = torch.randn(1, 3, 64, 64)
    fused = reparam.fuse(model, x)
    assert not [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    layer_norms = [n for n in fused.graph.nodes if n.op == "call_function" and "layer_norm" in str(n.target)]
    assert len(layer_norms) == 2  # before each attention: not affine, so kept
    with torch.no_grad():
        x2 = torch.randn(2, 3, 64, 96)
        torch.testing.assert_close(fused(x2), model(x2), rtol=1e-4, atol=1e-5)


def _text_tower() -> dict[str, torch.Tensor]:
    return {"text_encoder.embedding_layer.weight": torch.randn(10, 4),
            "text_encoder.projection_layer": torch.randn(4, 512), "logit_scale": torch.tensor(4.6)}


def test_mobileclip_release_loads_the_image_tower(tmp_path):
    """ml-mobileclip's layout: the image model in the original FastViT naming under
    `image_encoder.model.`, its projection `head.proj` applied as `x @ proj`, text tower alongside."""
    keys = [(k, s) for k, s in key_list("fastvit", "fastvit_t8", "apple") if not k.startswith("head.")]
    tower = marked_state_dict(keys)
    proj = torch.randn(768, 512)
    state = {f"image_encoder.model.{k}": v for k, v in tower.items()}
    state["image_encoder.model.head.proj"] = proj
    state.update(_text_tower())
    path = tmp_path / "mobileclip_t8.pt"
    torch.save(state, path)
    with pytest.warns(CheckpointWarning, match=r"image tower .*'image_encoder\.model\.'.*ignored the 3 other"):
        model = models.create("fastvit_t8", weights=path)
    assert model.head.fc.out_features == 512  # the width comes from the projection
    assert torch.equal(model.head.fc.weight, proj.t()) and not model.head.fc.bias.any()
    pooled = torch.randn(3, 768)
    with torch.no_grad():
        torch.testing.assert_close(model.head.fc(pooled), pooled @ proj, rtol=1e-4, atol=1e-4)  # the same map


def test_open_clip_trunk_loads(tmp_path):
    """open_clip's layout (MobileCLIP2): the timm-named trunk under `visual.trunk.`."""
    keys = key_list("fastvit", "fastvit_mci0", "timm")
    state = {f"visual.trunk.{k}": v for k, v in marked_state_dict(keys).items()}
    state.update(_text_tower())
    model = models.create("fastvit_mci0")
    with pytest.warns(CheckpointWarning, match="visual.trunk"):
        result = load_state(model, state, source="open_clip.bin", convert=to_our_naming)
    assert result.loaded == len(keys) and len(result.notes) == 1
    assert torch.equal(model.state_dict()[keys[0][0]], torch.full(keys[0][1], 1.0))
