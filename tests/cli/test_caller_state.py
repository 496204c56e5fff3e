"""Exporting, explaining and resolving a model leave the caller's state as it was: the model's
`training` flags (even when fusing fails) and the global random generator."""

from __future__ import annotations

import pytest
import torch
import toy_models

import reparam
from reparam import export as ex
from reparam.errors import VerificationError
from reparam.resolve import resolve_model


def _modes(model):
    return [m.training for m in model.modules()]


@pytest.fixture
def training_model():
    model = toy_models.rep_net().train()
    model.block.eval()  # a mixed state must survive too
    return model


def test_export_keeps_the_callers_mode_and_rng(tmp_path, training_model):
    before_modes, before_rng = _modes(training_model), torch.get_rng_state()
    weights = {k: v.clone() for k, v in training_model.state_dict().items()}
    ex.export_model(training_model, toy_models.example(1, 16), tmp_path / "net.pt2")
    assert _modes(training_model) == before_modes and training_model.training
    assert torch.equal(torch.get_rng_state(), before_rng)
    for key, value in training_model.state_dict().items():  # running stats included
        assert torch.equal(value, weights[key]), key


def test_failed_fusion_keeps_the_callers_mode(tmp_path, training_model):
    def disagree(model, example, **kwargs):
        raise VerificationError("fused output differs by 0.5", 0.5, 1e-5)

    before = _modes(training_model)
    with pytest.raises(VerificationError):
        ex.export_model(training_model, toy_models.example(1, 16), tmp_path / "net.onnx",
                        fuse=disagree)
    assert _modes(training_model) == before and training_model.training
    assert list(tmp_path.iterdir()) == []


def test_explain_keeps_the_callers_mode_and_rng(training_model):
    before_modes, before_rng = _modes(training_model), torch.get_rng_state()
    reparam.explain(training_model, toy_models.example(1, 16))
    assert _modes(training_model) == before_modes
    assert torch.equal(torch.get_rng_state(), before_rng)


def test_resolving_a_model_keeps_the_global_rng():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = resolve_model("toy_models:RepNet", input_shape=(1, 3, 8, 8))  # initialised randomly
    assert torch.equal(torch.get_rng_state(), state)
    second = resolve_model("toy_models:RepNet", input_shape=(1, 3, 8, 8))
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)  # reproducible initialisation, from its own seed


@pytest.mark.parametrize("command", [
    ("export", "toy_models:RepNet", "--input-shape", "1,3,8,8", "--format", "pt2"),
    ("explain", "toy_models:RepNet", "--input-shape", "1,3,8,8"),
])
def test_commands_keep_the_global_rng(cli_inproc, command):
    torch.manual_seed(99)
    state = torch.get_rng_state()
    result = cli_inproc(*command)
    assert result.returncode == 0, result.output
    assert torch.equal(torch.get_rng_state(), state)


def test_models_are_reachable_after_import_reparam_and_the_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, reparam\n"
            "heavy = ['reparam.models', 'reparam.export', 'timm', 'torchvision', 'executorch',"
            " 'coremltools', 'onnx', 'onnxruntime']\n"
            "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
            "model = reparam.models.create('fastvit_t8')\n"
            "assert type(model).__name__ == 'FastViT'\n"
            "assert callable(reparam.export.export_model)\n"
            "assert not [m for m in ('timm', 'executorch', 'coremltools') if m in sys.modules]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
