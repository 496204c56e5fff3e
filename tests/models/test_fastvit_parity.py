"""FastViT against the seeded references (tests/data/fastvit) through every way in: the traced
graph the compiler starts from, and checkpoints in the original release's and in timm's naming.
Plain parity, unfused and fused, for every seeded model is in test_seeded_parity.py."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import reparam.models as models
from reparam.checkpoints import load_checkpoint
from reparam.models.fastvit.checkpoint_keys import APPLE, TIMM, apple_to_ours

from reference_data import load_seeded, read_keys, seeded_state

RTOL = 1e-5  # of the logit scale (~0.75); measured: ~2e-7 of it


def assert_reference_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=RTOL * expected.abs().max().item())


@pytest.fixture(scope="module")
def t8():
    return load_seeded("fastvit_t8")


def test_reference_logits_through_fx():
    """The traced graph (what the compiler starts from) computes the reference logits."""
    ref = load_seeded("fastvit_sa12")
    gm = torch.fx.symbolic_trace(ref.model)
    with torch.no_grad():
        assert_reference_logits(gm(ref.x), ref.logits)


def test_original_release_checkpoint(t8, tmp_path):
    """The reference weights renamed to the original release's published key list and saved as
    its checkpoints are ({'epoch', 'arch', 'state_dict'}, .pth.tar) load and give its logits."""
    timm_state, _ = seeded_state("fastvit_t8")
    apple_keys = [key for key, _ in read_keys("fastvit_t8", "apple")]
    apple_of = apple_to_ours({key: key for key in apple_keys})  # ours -> original name
    assert len(apple_of) == len(apple_keys) == len(timm_state)
    apple_state = {apple_of[key]: value for key, value in timm_state.items()}
    path = tmp_path / "fastvit_t8.pth.tar"
    torch.save({"epoch": 300, "arch": "fastvit_t8", "state_dict": apple_state}, path)

    model = models.create("fastvit_t8", weights=path).eval()
    with torch.no_grad():
        assert_reference_logits(model(t8.x), t8.logits)
    result = load_checkpoint(models.create("fastvit_t8"), path,
                             convert=models.get_entry("fastvit_t8").convert_state_dict)
    assert result.naming == APPLE and result.loaded == len(apple_keys) == 462 and not result.notes


def test_timm_safetensors_checkpoint(t8, tmp_path):
    """The reference weights saved as a plain timm-named .safetensors load through create()."""
    from safetensors.torch import save_file

    path = tmp_path / "fastvit_t8.safetensors"
    save_file({k: v.contiguous() for k, v in t8.model.state_dict().items()}, str(path))
    model = models.create("fastvit_t8", weights=path).eval()
    with torch.no_grad():
        assert_reference_logits(model(t8.x), t8.logits)
    result = load_checkpoint(model, path, convert=models.get_entry("fastvit_t8").convert_state_dict)
    assert result.naming == TIMM
