"""What `reparam.fuse` must achieve on every FastViT variant, with no help from the model."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
import reparam.models as models

from fastvit_testlib import (
    ALL_VARIANTS,
    REFERENCE_FUSED_PARAMS_M,
    SMALL_VARIANTS,
    expected_fused_convs,
    randomize_statistics,
)


_MUL = {operator.mul, operator.imul, torch.mul, torch.Tensor.mul}
_BATCH_NORM = {F.batch_norm, torch.batch_norm, torch.nn.functional.batch_norm}


def assert_fully_fused(fused: torch.fx.GraphModule, original: nn.Module) -> None:
    """No BatchNorm and no layer-scale multiply survive; convolutions are as few as expected."""
    bn_modules = [n for n, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not bn_modules, f"BatchNorm modules left: {bn_modules[:5]}"
    bn_calls = [n.name for n in fused.graph.nodes if n.op == "call_function" and n.target in _BATCH_NORM]
    assert not bn_calls, f"batch_norm calls left: {bn_calls[:5]}"

    params = {name for name, _ in fused.named_parameters()}
    scale_muls = []
    for node in fused.graph.nodes:
        is_mul = (node.op == "call_function" and node.target in _MUL) or (
            node.op == "call_method" and node.target in ("mul", "mul_"))
        if is_mul and any(isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target in params
                          for a in node.args):
            scale_muls.append(node.name)
    assert not scale_muls, f"multiplies by a parameter (unfolded layer scales) left: {scale_muls[:5]}"

    convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    assert convs <= expected_fused_convs(original) < sum(isinstance(m, nn.Conv2d) for m in original.modules())


def fused_params(fused: nn.Module) -> int:
    return sum(p.numel() for p in fused.parameters())


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_fused_variant(variant):
    torch.manual_seed(0)
    model = randomize_statistics(models.create(variant), seed=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    scale = expected.abs().max().item()
    assert scale > 0

    verify = variant in SMALL_VARIANTS  # the big ones are compared below only, to save time
    fused = reparam.fuse(model, x, verify=verify, atol=1e-4 * scale)

    assert isinstance(fused, torch.fx.GraphModule) and not fused.training
    assert_fully_fused(fused, model)
    with torch.no_grad():
        got = fused(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale)

    report = fused.report
    assert report.before.params == sum(p.numel() for p in model.parameters())
    assert report.after.params == fused_params(fused) < report.before.params
    assert report.after.nodes < report.before.nodes
    if verify:
        assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4 * scale
    if variant in REFERENCE_FUSED_PARAMS_M:
        reference = REFERENCE_FUSED_PARAMS_M[variant] * 1e6
        # the compiler also folds the BatchNorm before qkv and every layer scale, so it may end a
        # little below the hand-written reference, never above it
        assert 0.99 * reference <= fused_params(fused) <= reference

    # the caller's model is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["fastvit_t8", "fastvit_sa12"])
def test_fused_on_other_input_shapes(variant):
    torch.manual_seed(0)
    model = randomize_statistics(models.create(variant), seed=2).eval()
    fused = reparam.fuse(model, torch.randn(1, 3, 64, 64))
    for shape in [(2, 3, 96, 128), (1, 3, 32, 32)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-4 * expected.abs().max().item())




def test_fused_features_only_backbone():
    torch.manual_seed(0)
    model = randomize_statistics(models.create("fastvit_sa12", features_only=True), seed=4).eval()
    x = torch.randn(1, 3, 64, 64)
    fused = reparam.fuse(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        for got, expected in zip(fused(x), model(x), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
