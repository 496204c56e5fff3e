"""timm's reparameterizable families: `reparam.fuse` leaves no BatchNorm and no more parameters
than timm's own `reparameterize_model` (within 0.5%), exactly, and explains whatever it keeps.

Only the first stages of the smallest variant of each family are fused, to keep the suite fast.
Skips when timm is missing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reparam
from reparam.measure import unaccounted_linear_ops
from reparam.optional import MissingExtra, install_command, require


def _timm():
    try:
        return require("timm", "the timm family tests")
    except MissingExtra:
        pytest.skip(f"timm is not installed: {install_command('timm')}")


class Tokens(nn.Module):
    """LeViT's stem, then its stages on tokens [B, N, C]."""

    def __init__(self, stem, stage):
        super().__init__()
        self.stem, self.stage = stem, stage

    def forward(self, x):
        return self.stage(self.stem(x).flatten(2).transpose(1, 2))


def _part(m, name):
    if name.startswith("levit"):
        return Tokens(m.stem, m.stages[0]), (1, 3, 224, 224)
    if name.startswith(("mobileone", "repvgg")):
        return nn.Sequential(m.stem, m.stages[0], m.stages[1][:1]), (1, 3, 64, 64)
    if name.startswith(("ghostnet", "repghost")):
        return nn.Sequential(m.conv_stem, m.bn1, m.act1, *m.blocks[:3]), (1, 3, 64, 64)
    return nn.Sequential(m.stem, m.stages[0]), (1, 3, 64, 64)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
            c = bn.num_features
            with torch.no_grad():
                bn.running_mean.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)
                bn.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                if bn.affine:
                    bn.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                    bn.bias.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)


def _count_bns(model) -> int:
    if isinstance(model, torch.fx.GraphModule):
        return sum(n.op == "call_module" and isinstance(model.get_submodule(n.target),
                                                        nn.modules.batchnorm._BatchNorm)
                   for n in model.graph.nodes) + sum(
            n.op == "call_function" and n.target is nn.functional.batch_norm for n in model.graph.nodes)
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


FAMILIES = ["mobileone_s0", "repvgg_a0", "fastvit_t8", "repghostnet_050", "ghostnetv3_050", "repvit_m0_9",
            "levit_128s"]


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_family_fuses_at_least_as_far_as_timm(name):
    timm = _timm()
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    _randomize(model)
    part, shape = _part(model.eval(), name)
    part = part.double().eval()
    theirs = reparameterize_model(copy.deepcopy(part))
    x = torch.randn(*shape, dtype=torch.float64)
    fused = reparam.fuse(part, x)
    ours_params = sum(p.numel() for p in fused.parameters())
    their_params = sum(p.numel() for p in theirs.parameters())
    assert _count_bns(fused) == 0
    assert ours_params <= their_params * 1.005, (ours_params, their_params)
    assert unaccounted_linear_ops(fused) == []
    with torch.no_grad():
        ref, out = part(x), fused(x)
    assert float((ref - out).abs().max()) <= 1e-9 * float(ref.abs().max())


# Blocks of other timm families whose fused graphs once left linear operations unexplained.
BLOCKS = [
    # Grid attention: proj -> grid reverse (view, permute, contiguous, view) -> layer scale, folded.
    ("maxxvitv2_nano_rw_256", lambda m: m.stages[0].blocks[0].attn_grid, (1, 16, 16, 96), None),
    # Fourier positional encoding: arithmetic on `arange`, not on the input.
    ("edgenext_xx_small", lambda m: m.stages[1].blocks[1], (1, 48, 8, 8), None),
]


@pytest.mark.parametrize("name,part,shape,refusal", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_timm_blocks_leave_nothing_unexplained(name, part, shape, refusal):
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    _randomize(model)
    block = part(model).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    fused = reparam.fuse(block, x)
    assert unaccounted_linear_ops(fused) == []
    if refusal is not None:
        assert any(refusal in r.reason for r in fused.report.refusals)
    with torch.no_grad():
        ref, out = block(x), fused(x)
    assert float((ref - out).abs().max()) <= 1e-9 * float(ref.abs().max())
