"""The training-form models train: forward and backward work, BatchNorm statistics move."""

from __future__ import annotations

import torch
from torch import nn

import reparam.models as models
from reparam.models.fastvit import blocks

from fastvit_testlib import train_briefly


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
