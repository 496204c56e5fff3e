"""reparam.nn: every block, in its fusible form, fuses to exactly one convolution (plus its
nonlinearity), exactly, over a seeded grid of random configurations."""

from __future__ import annotations

import operator
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
import reparam.nn as rnn

_ADD = {operator.add, operator.iadd, torch.add}
_BATCH_NORM = {F.batch_norm, torch.batch_norm}


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """float64, eval mode, random BatchNorm statistics and affine parameters and layer scales."""
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.3)
                m.weight.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.5)
            elif isinstance(m, rnn.LayerScale):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g, dtype=torch.float64) + 0.5)
    return module.eval()


def _nonlinear_parts(name: str) -> bool:
    """Submodules that are not branches (squeeze-excitation keeps its own convs)."""
    return name.split(".")[0] in ("se", "attn")


def assert_one_conv(fused: torch.fx.GraphModule) -> None:
    convs = [n for n in fused.graph.nodes if n.op == "call_module"
             and isinstance(fused.get_submodule(n.target), nn.Conv2d) and not _nonlinear_parts(n.target)]
    assert len(convs) == 1, f"{len(convs)} convolutions left: {[c.target for c in convs]}\n{fused.code}"
    bns = [n for n, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not bns, f"BatchNorm left: {bns}"
    calls = [n for n in fused.graph.nodes if n.op == "call_function" and n.target in _BATCH_NORM | _ADD]
    assert not calls, f"branch sums or batch norms left: {[n.name for n in calls]}"
    pools = [n for n, m in fused.named_modules() if isinstance(m, nn.AvgPool2d)]
    assert not pools, f"average pools left: {pools}"


def check(block: nn.Module, in_chs: int, seed: int, hw=(11, 9)) -> torch.fx.GraphModule:
    block = randomized(block, seed)
    x = torch.randn(2, in_chs, *hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fused = reparam.fuse(block, x)
    with torch.no_grad():
        expected = block(x)
        torch.testing.assert_close(fused(x), expected, rtol=1e-10, atol=1e-10)
        x2 = torch.randn(1, in_chs, 16, 7, dtype=torch.float64)  # another shape, odd and even sizes
        torch.testing.assert_close(fused(x2), block(x2), rtol=1e-10, atol=1e-10)
    return fused


def grid(n: int, seed: int):
    """n random (in_chs, out_chs, kernel, stride, groups) with groups dividing both widths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        groups = rng.choice([1, 1, 2, 4])
        in_chs = groups * rng.randint(1, 4)
        out_chs = groups * rng.randint(1, 4)
        out.append((in_chs, out_chs, rng.choice([1, 3, 5]), rng.choice([1, 2]), groups, seed * 100 + i))
    return out


def square_grid(n: int, seed: int):
    """Configurations with in == out channels and stride 1 half the time, so skips exist."""
    out = []
    for in_chs, out_chs, k, stride, groups, s in grid(n, seed):
        if s % 2 == 0:
            out_chs, stride = in_chs, 1
        out.append((in_chs, out_chs, k, stride, groups, s))
    return out


@pytest.mark.parametrize("in_chs,out_chs,k,stride,groups,seed", grid(6, 1))
def test_conv_bn(in_chs, out_chs, k, stride, groups, seed):
    check(rnn.ConvBN(in_chs, out_chs, k, stride=stride, groups=groups), in_chs, seed)


@pytest.mark.parametrize("in_chs,out_chs,k,stride,groups,seed", square_grid(8, 2))
def test_repvgg_block(in_chs, out_chs, k, stride, groups, seed):
    block = rnn.RepVGGBlock(in_chs, out_chs, k, stride=stride, groups=groups, act_layer=None)
    assert (block.identity is not None) == (in_chs == out_chs and stride == 1)
    assert_one_conv(check(block, in_chs, seed))


@pytest.mark.parametrize("in_chs,out_chs,k,stride,groups,seed", square_grid(8, 3))
def test_mobileone_block(in_chs, out_chs, k, stride, groups, seed):
    branches = 1 + seed % 4
    block = rnn.MobileOneBlock(in_chs, out_chs, k, stride=stride, groups=groups, act_layer=None,
                               num_conv_branches=branches, use_scale_branch=seed % 3 != 0)
    assert len(block.conv_kxk) == branches
    assert_one_conv(check(block, in_chs, seed))


def test_blocks_keep_activation_and_squeeze_excitation():
    """One conv, then the block's nonlinear tail (squeeze-excitation, activation), unchanged."""
    for block, act in ((rnn.MobileOneBlock(8, 8, 3, use_se=True, num_conv_branches=2), nn.ReLU),
                       (rnn.RepVGGBlock(8, 8, use_se=True), nn.ReLU),
                       (rnn.LargeKernelReparam(8, 8, 7, groups=8, use_se=True, act_layer=nn.GELU), nn.GELU)):
        fused = check(block, 8, seed=5)
        assert_one_conv(fused)
        se_convs = [n.target for n in fused.graph.nodes if n.op == "call_module" and _nonlinear_parts(n.target)]
        assert len(se_convs) == 2, se_convs  # reduce and expand
        assert any(n.target is torch.sigmoid for n in fused.graph.nodes)
        acts = [n for n in fused.graph.nodes if n.op == "call_module" and isinstance(fused.get_submodule(n.target), act)]
        assert len(acts) == 1


@pytest.mark.parametrize("in_chs,out_chs,k,stride,groups,seed", [c for c in grid(8, 4) if c[2] > 1])
def test_ac_block(in_chs, out_chs, k, stride, groups, seed):
    assert_one_conv(check(rnn.ACBlock(in_chs, out_chs, k, stride=stride, groups=groups), in_chs, seed))


@pytest.mark.parametrize("in_chs,out_chs,k,stride,groups,seed", [c for c in grid(8, 5) if c[2] > 1])
def test_large_kernel(in_chs, out_chs, k, stride, groups, seed):
    block = rnn.LargeKernelReparam(in_chs, out_chs, k + 2, stride=stride, groups=groups, small_kernel=k)
    assert_one_conv(check(block, in_chs, seed))


@pytest.mark.parametrize("dim,k,seed", [(4, 3, 1), (6, 5, 2), (1, 3, 3)])
def test_repmixer(dim, k, seed):
    assert_one_conv(check(rnn.RepMixer(dim, k, layer_scale_init=0.3), dim, seed))


@pytest.mark.parametrize("dim,k,seed", [(4, 7, 1), (3, 3, 2)])
def test_repcpe(dim, k, seed):
    assert_one_conv(check(rnn.RepCPE(dim, k), dim, seed))


@pytest.mark.parametrize("seed", [1, 2])
def test_layer_scale_folds_into_the_conv_before_it(seed):
    block = nn.Sequential(rnn.ConvBN(4, 6, 3), rnn.LayerScale(6, 0.7))
    assert_one_conv(check(block, 4, seed))


@pytest.mark.parametrize("in_chs,out_chs,k,stride,groups,seed", [c for c in grid(8, 6) if c[2] > 1][:4])
def test_diverse_branch_block_is_exact(in_chs, out_chs, k, stride, groups, seed):
    check(rnn.DiverseBranchBlock(in_chs, out_chs, k, stride=stride, groups=groups), in_chs, seed)


def test_diverse_branch_block_fuses_to_one_conv():
    fused = check(rnn.DiverseBranchBlock(8, 8, 3), 8, seed=7)
    assert_one_conv(fused)
    assert not fused.report.refusals, fused.report.refusals


@pytest.mark.parametrize("in_chs,out_chs,k,stride,groups,seed", [c for c in grid(8, 6) if c[2] > 1][:4])
def test_diverse_branch_block_configurations_fuse_to_one_conv(in_chs, out_chs, k, stride, groups, seed):
    assert_one_conv(check(rnn.DiverseBranchBlock(in_chs, out_chs, k, stride=stride, groups=groups), in_chs, seed))


def test_diverse_branch_block_with_inner_batchnorm_is_refused_with_the_reason():
    """The paper's BatchNorm between the 1x1 conv and the padded kxk op shifts what the padded
    border should see: not a convolution, so left as it was, and the report says why."""
    block = randomized(rnn.DiverseBranchBlock(8, 8, 3, inner_bn=True), seed=3)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    fused = reparam.fuse(block, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-10, atol=1e-10)
    reasons = " ".join(str(r) for r in fused.report.refusals)
    assert "padded" in reasons and "shift" in reasons
    convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    assert convs > 1


def test_public_api():
    assert set(rnn.__all__) >= {"ConvBN", "RepVGGBlock", "MobileOneBlock", "ACBlock", "DiverseBranchBlock",
                                "LargeKernelReparam", "RepMixer", "RepCPE", "LayerScale"}
    for name in rnn.__all__:
        obj = getattr(rnn, name)
        assert obj.__doc__ and len(obj.__doc__) > 40, name
        for attr in ("reparameterize", "inference_mode", "deploy"):
            assert not hasattr(obj, attr), f"{name}.{attr}"


def test_training_form_trains():
    """Blocks are ordinary modules: gradients reach every branch."""
    block = nn.Sequential(rnn.MobileOneBlock(3, 8, 3, num_conv_branches=2), rnn.RepVGGBlock(8, 8),
                          rnn.ACBlock(8, 8), rnn.DiverseBranchBlock(8, 8), rnn.RepMixer(8))
    block(torch.randn(2, 3, 8, 8)).square().mean().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
