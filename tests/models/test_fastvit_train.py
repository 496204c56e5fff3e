"""The training-form models train: forward and backward work, BatchNorm statistics move."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

import reparam
import reparam.models as models
from reparam.models.fastvit import blocks

from fastvit_testlib import expected_fused_convs, train_briefly


def test_fastvit_t8_trains():
    torch.manual_seed(0)
    model = models.create("fastvit_t8", num_classes=10, drop_path_rate=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    gammas = [m.gamma for m in model.modules() if isinstance(m, blocks.LayerScale2d)]

    losses = train_briefly(model, steps=3, size=64)

    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the fixed batch is being fitted
    # every parameter received a gradient and moved
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert not torch.equal(p.detach(), before[name]), name
    # every BatchNorm (branches, skips, the attention-free norm branches) updated its statistics
    assert len(bns) == 70  # stem 6, 10 RepMixer blocks x 5, 3 patch embeddings x 4, final_conv 2
    for bn in bns:
        assert bn.num_batches_tracked.item() == 3
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert all(not torch.all(g == 1e-5) for g in gammas)  # layer scales are trained

    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.isfinite(a).all() and torch.equal(a, b)  # eval is deterministic


def test_attention_model_backward():
    torch.manual_seed(0)
    model = models.create("fastvit_sa12", num_classes=5, layers=(1, 1, 1, 1))
    losses = train_briefly(model, steps=2, size=64, num_classes=5)
    assert all(l == l for l in losses)
    attn = model.stages[3].blocks[0].token_mixer
    assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.abs().sum() > 0
    assert model.stages[3].pos_emb.pos_enc.weight.grad.abs().sum() > 0


def _spread_scales(model: nn.Module, seed: int) -> None:
    """Layer scales in [0.5, 1.5) and BatchNorm affine parameters away from (1, 0).

    Three training steps leave layer scales near their 1e-5 start and BatchNorm's gamma/beta near
    (1, 0): a branch folded wrongly would change the output by less than the tolerance. The running
    statistics keep their trained values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, blocks.LayerScale2d):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) + 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def test_trained_then_fused():
    torch.manual_seed(0)
    model = models.create("fastvit_t8", num_classes=10)
    train_briefly(model, steps=3, size=64)
    _spread_scales(model, seed=5)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(x)
    fused = reparam.fuse(model, x)

    # structure: no BatchNorm, no layer-scale multiply, one conv per reparameterizable structure
    called = [fused.get_submodule(n.target) for n in fused.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in called)
    assert not any(n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)
                   for n in fused.graph.nodes)
    params = {name for name, _ in fused.named_parameters()}
    assert not any(n.target in (operator.mul, torch.mul) and any(
        isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target in params for a in n.args)
        for n in fused.graph.nodes if n.op == "call_function")
    assert sum(isinstance(m, nn.Conv2d) for m in called) == expected_fused_convs(model)
    ffns = sum(isinstance(m, blocks.ConvMlp) for m in model.modules())
    assert len(fused.report.regions) >= 40
    # the only refusals: each ConvFFN's depthwise 7x7 stays apart from its fc1, and each patch
    # embedding's grouped 7x7 from the 1x1 block after it (both cheaper apart)
    embeds = len(model.stages) - 1
    assert len(fused.report.refusals) == ffns + embeds
    assert all("not cheaper" in r.reason for r in fused.report.refusals)
    assert sum(".mlp." in r.where for r in fused.report.refusals) == ffns

    # numbers: against the trained model itself, on the example and on another input
    scale = expected.abs().max().item()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-4 * scale)
        other = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(7))
        want = model(other)
        torch.testing.assert_close(fused(other), want, rtol=0, atol=1e-4 * want.abs().max().item())
