"""Unfused FastViT against the reference outputs, weight for weight."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import reparam.models as models
from reparam.checkpoints import load_checkpoint
from reparam.models.fastvit.checkpoint_keys import APPLE, TIMM

from fastvit_testlib import load_reference

ATOL = 1e-5  # the fixtures' README expects ~1e-6 on logits of scale 0.1-0.5


@pytest.mark.parametrize("variant", ["fastvit_t8", "fastvit_sa12"])
def test_reference_logits(fastvit_fixtures, variant):
    model, x, data = load_reference(fastvit_fixtures, variant)
    assert tuple(x.shape) == (2, 3, 256, 256)
    with torch.no_grad():
        logits = model(x)
    expected = data["logits"]
    assert logits.shape == expected.shape == (2, 1000)
    assert expected.abs().max() > 0.05  # the reference is not degenerate
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)
    # the reference's own hand-written fusion agrees with our unfused model too
    torch.testing.assert_close(logits, data["logits_timm_fused"], rtol=0, atol=ATOL)


def test_reference_logits_through_fx(fastvit_fixtures):
    """The traced graph (what the compiler starts from) computes the same logits."""
    model, x, data = load_reference(fastvit_fixtures, "fastvit_sa12")
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), data["logits"], rtol=0, atol=ATOL)


def test_original_release_checkpoint(fastvit_fixtures):
    path = fastvit_fixtures / "fastvit_t8.apple.pth.tar"
    model = models.create("fastvit_t8", weights=path).eval()
    _, x, data = load_reference(fastvit_fixtures, "fastvit_t8")
    with torch.no_grad():
        torch.testing.assert_close(model(x), data["logits"], rtol=0, atol=ATOL)
    result = load_checkpoint(models.create("fastvit_t8"), path,
                             convert=models.get_entry("fastvit_t8").convert_state_dict)
    assert result.naming == APPLE and result.loaded == 462 and not result.notes


def test_timm_safetensors_checkpoint(fastvit_fixtures, tmp_path):
    """The reference weights saved as a plain timm-named .safetensors load through create()."""
    from safetensors.torch import save_file

    reference, x, data = load_reference(fastvit_fixtures, "fastvit_t8")
    path = tmp_path / "fastvit_t8.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()},
              str(path))
    model = models.create("fastvit_t8", weights=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), data["logits"], rtol=0, atol=ATOL)
    result = load_checkpoint(model, path, convert=models.get_entry("fastvit_t8").convert_state_dict)
    assert result.naming == TIMM
