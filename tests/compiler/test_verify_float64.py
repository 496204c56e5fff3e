"""Verification tells a bug in reparam from a model that amplifies float32 rounding.

`Cancel` subtracts two nearly equal convolutions: in float32 the original loses most digits of
its output, while the fused conv (weights differenced in float64) keeps them. An exact fusion must
then be reported as exact, with the model's own sensitivity, not as a bug; `verify="float64"`
checks the algebra alone. A deliberately broken fusion must still be called a bug.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reparam
import reparam.pipeline as pipeline
from reparam.errors import InputError, VerificationError

from .helpers import n_convs


class Cancel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight * (1 + 1e-6 * torch.rand(self.a.weight.shape, generator=g)))

    def forward(self, x):
        return torch.relu(self.a(x) - self.b(x))


def ill_conditioned():
    """The same model and input every time (seeded here, the global generator left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Cancel().eval()
    return model, torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(0)) * 1e4


def test_exact_fusion_of_an_ill_conditioned_model_is_not_called_a_bug():
    model, x = ill_conditioned()
    with pytest.raises(VerificationError) as info:
        reparam.fuse(model, x)
    message = str(info.value)
    assert "fusion is exact" in message and "bug" not in message
    assert "verify=\"float64\"" in message and "sensitive to rounding" in message
    # the figures it quotes: the original's own float32 error dominates the fused one's
    with torch.no_grad():
        ref64 = model.double()(x.double())
        model.float()
        own = float((model(x).double() - ref64).abs().max())
    assert f"{own:.3g}" in message


def test_verify_float64_checks_the_algebra_only():
    model, x = ill_conditioned()
    fused = reparam.fuse(model, x, verify="float64")
    assert n_convs(fused) == 1 and fused.report.regions
    assert next(fused.parameters()).dtype == torch.float32
    assert fused.report.tolerance < 1e-6 and fused.report.max_abs_diff <= fused.report.tolerance
    report = reparam.explain(model, x, verify="float64")
    assert report.max_abs_diff <= report.tolerance


def test_verify_false_skips_every_check():
    model, x = ill_conditioned()
    report = reparam.explain(model, x, verify=False)
    assert report.max_abs_diff is None and len(report.regions) == 1


@pytest.mark.parametrize("verify", [True, "float64"])
def test_a_wrong_fusion_is_still_a_bug(monkeypatch, verify):
    lower = pipeline.lower_forms

    def broken(gm, forms, *args, **kwargs):  # every fused conv's weight off by 1%
        regions = lower(gm, forms, *args, **kwargs)
        for region in regions:
            gm.get_submodule(region.name).weight.data.mul_(1.01)
        return regions

    monkeypatch.setattr(pipeline, "lower_forms", broken)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    with pytest.raises(VerificationError, match="bug in reparam"):
        reparam.fuse(model, torch.randn(1, 4, 6, 6), verify=verify)


def test_unknown_verify_value():
    model, x = ill_conditioned()
    with pytest.raises(InputError, match="verify"):
        reparam.fuse(model, x, verify="float16")


def test_model_that_updates_its_input_verifies_and_leaves_the_input_alone():
    class Doubles(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            x.mul_(2.0)
            return self.bn(self.conv(x))

    model = Doubles().eval()
    x = torch.randn(1, 4, 6, 6)
    kept = x.clone()
    for verify in (True, "float64"):
        fused = reparam.fuse(model, x, verify=verify)
        assert torch.equal(x, kept)
        assert fused.report.max_abs_diff <= fused.report.tolerance
