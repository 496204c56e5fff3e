"""FastViT architecture against the published key lists, traceability and interfaces."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

import reparam.models as models
from reparam.checkpoints import load_state
from reparam.models.fastvit import blocks
from reparam.models.fastvit.checkpoint_keys import APPLE, TIMM, detect_naming, to_our_naming

from fastvit_testlib import (
    ALL_VARIANTS,
    APPLE_VARIANTS,
    SMALL_VARIANTS,
    cached_model,
    marked_state_dict,
)
from reference_data import read_keys


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_state_dict_is_timm_naming_in_module_order(variant):
    model = cached_model(variant)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == read_keys(variant, "timm")


@pytest.mark.parametrize("variant", APPLE_VARIANTS)
def test_apple_naming_maps_onto_ours(variant):
    apple = read_keys(variant, "apple")
    timm = dict(read_keys(variant, "timm"))
    assert detect_naming(k for k, _ in apple) == APPLE
    mapped, naming = to_our_naming({k: s for k, s in apple})
    assert naming == APPLE
    assert len(mapped) == len(apple)  # the mapping is one-to-one
    assert mapped == timm


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_symbolic_trace(variant):
    model = cached_model(variant)
    torch.fx.symbolic_trace(model.train())  # as created: a training-mode module
    gm = torch.fx.symbolic_trace(model.eval())
    scales = sum(isinstance(m, blocks.LayerScale2d) for m in model.modules())
    gets = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("gamma")]
    assert len(gets) == scales > 0  # every layer scale is multiplied in the traced graph
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)]
    assert len(calls) == bns  # every BatchNorm branch is in the graph as a module call
    if variant in SMALL_VARIANTS:
        x = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_symbolic_trace_in_train_mode_with_regularization():
    model = models.create("fastvit_sa12", drop_path_rate=0.2, proj_drop_rate=0.1, drop_rate=0.1).train()
    gm = torch.fx.symbolic_trace(model)
    targets = {str(n.target) for n in gm.graph.nodes}
    assert any("dropout" in t for t in targets)  # dropout is traced in train mode
    assert any("rand_like" in t for t in targets)  # drop-path masks are traced
    # and in eval mode they leave no node at all
    gm_eval = torch.fx.symbolic_trace(model.eval())
    assert not any("dropout" in str(n.target) or "rand_like" in str(n.target) for n in gm_eval.graph.nodes)


def test_no_inference_only_machinery():
    for variant in ("fastvit_sa12", "fastvit_mci0"):
        for name, module in cached_model(variant).named_modules():
            for attr in ("reparameterize", "inference_mode", "deploy", "reparam_conv"):
                assert not hasattr(module, attr), f"{name}.{attr}"


@pytest.mark.parametrize("variant,init", [("fastvit_t8", 1e-5), ("fastvit_sa12", 1e-5),
                                          ("fastvit_sa36", 1e-6), ("fastvit_ma36", 1e-6),
                                          ("fastvit_mci0", 1e-5)])
def test_layer_scale_init(variant, init):
    scales = [m.gamma for m in cached_model(variant).modules() if isinstance(m, blocks.LayerScale2d)]
    assert scales and all(torch.all(s == torch.tensor(init)) for s in scales)


def test_attention_facts():
    model = cached_model("fastvit_ma36")
    attns = [m for m in model.modules() if isinstance(m, blocks.Attention)]
    assert len(attns) == 6
    for a in attns:
        assert a.head_dim == 32 and a.num_heads == 608 // 32
        assert a.qkv.bias is None and a.proj.bias is not None
        assert a.scale == pytest.approx(32 ** -0.5)
    assert isinstance(model.stages[3].pos_emb, blocks.RepCPE)
    assert all(not isinstance(model.stages[i].pos_emb, blocks.RepCPE) for i in range(3))


@pytest.mark.parametrize("variant,act,se_stages", [("fastvit_t8", False, ()), ("fastvit_sa12", False, ()),
                                                   ("fastvit_mci0", True, (2, 3)), ("fastvit_mci2", True, (2, 3))])
def test_patch_embedding_activation_and_se(variant, act, se_stages):
    model = cached_model(variant)
    for i in (1, 2, 3):
        lkc = model.stages[i].downsample.proj[0]
        assert isinstance(lkc, blocks.ReparamLargeKernelConv)
        assert isinstance(lkc.act, nn.GELU) == act
        assert isinstance(lkc.se, blocks.SqueezeExcite) == (i in se_stages)
        assert lkc.large_conv.conv.kernel_size == (7, 7) and lkc.large_conv.conv.stride == (2, 2)
        assert lkc.large_conv.conv.groups == model.cfg.embed_dims[i - 1]
        assert isinstance(model.stages[i].downsample.proj[1].act, nn.GELU)


def test_original_patch_embedding_has_no_activation():
    """The large-kernel conv of the original models feeds the 1x1 block unchanged: negative
    values survive (GELU would have damped them)."""
    model = cached_model("fastvit_t8").eval()
    lkc = model.stages[1].downsample.proj[0]
    x = torch.randn(1, 48, 16, 16)
    with torch.no_grad():
        out = lkc(x)
        linear = lkc.large_conv(x) + lkc.small_conv(x)
    assert (linear < -0.5).any()
    torch.testing.assert_close(out, linear, rtol=0, atol=0)


def test_interfaces_and_shapes():
    x = torch.randn(2, 3, 64, 64)
    model = cached_model("fastvit_sa12").eval()
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x)
        last = model.forward_features(x)
        pre = model.forward_head(last, pre_logits=True)
        # the last feature map comes after the attention blocks, not after RepCPE
        stage3 = model.stages[3]
        after_cpe = stage3.pos_emb(stage3.downsample(feats[2]))
    assert logits.shape == (2, 1000)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert tuple(last.shape) == (2, 1024, 2, 2) and tuple(pre.shape) == (2, 1024)
    torch.testing.assert_close(feats[3], stage3.blocks(after_cpe))
    assert not torch.allclose(feats[3], after_cpe)
    torch.testing.assert_close(model.head.fc(pre), logits)


def test_pooled_features_and_features_only():
    x = torch.randn(1, 3, 64, 64)
    pooled = models.create("fastvit_t8", num_classes=0).eval()
    assert not hasattr(pooled.head.fc, "weight")
    with torch.no_grad():
        assert tuple(pooled(x).shape) == (1, 768)
    backbone = models.create("fastvit_t8", features_only=True).eval()
    assert not any(k.startswith(("final_conv", "head")) for k in backbone.state_dict())
    with torch.no_grad():
        out = backbone(x)
        traced = torch.fx.symbolic_trace(backbone)(x)
    assert [tuple(f.shape) for f in out] == [(1, 48, 16, 16), (1, 96, 8, 8), (1, 192, 4, 4), (1, 384, 2, 2)]
    for a, b in zip(out, traced):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_drop_path_rates_and_behaviour():
    model = models.create("fastvit_t8", drop_path_rate=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, blocks.DropPath)]
    assert len(rates) == 10 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    plain = models.create("fastvit_t8")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)
        model.train()
        torch.manual_seed(1)
        a = model(x)
        b = model(x)
    assert not torch.allclose(a, b)  # stochastic depth acts in training


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_strict_load_fills_every_tensor(variant):
    """A state_dict built from each published key list (timm naming, and the original release's
    where it exists) loads strictly, uses every tensor and fills every parameter and buffer."""
    model = cached_model(variant, take=True)  # this test overwrites its weights
    entry = models.get_entry(variant)
    namings = ["timm", "apple"] if variant in APPLE_VARIANTS else ["timm"]
    for naming in namings:
        keys = read_keys(variant, naming)
        state = marked_state_dict(keys)
        result = load_state(model, state, convert=entry.convert_state_dict, family="fastvit",
                            model_name=variant)
        assert result.naming == (APPLE if naming == "apple" else TIMM)
        assert result.loaded == len(keys) and not result.skipped and not result.not_loaded
        assert not result.notes

        # Every tensor of the model came from the checkpoint: tensor i holds the value i + 1.
        mapped, _ = to_our_naming({k: i + 1 for i, (k, _) in enumerate(keys)})
        own = model.state_dict()
        assert set(own) == set(mapped)
        for key, tensor in own.items():
            marker = mapped[key]
            assert tensor.min().item() == marker and tensor.max().item() == marker, (naming, key)
    # ... and the model holds nothing outside its state_dict.
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert names == set(model.state_dict())
