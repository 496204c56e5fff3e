"""reparam.checkpoints: safe reading, naming detection, strict loading and its error messages."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

import reparam.models as models
from reparam.checkpoints import CheckpointWarning, load_checkpoint, load_state, read_state_dict
from reparam.errors import InputError

from fastvit_testlib import cached_model, randomize_statistics


@pytest.fixture(scope="module")
def t8_state():
    """A fastvit_t8 state_dict (timm naming) whose BatchNorm statistics are not the defaults."""
    torch.manual_seed(0)
    return randomize_statistics(models.create("fastvit_t8"), seed=3).state_dict()


@pytest.fixture(scope="module")
def t8_file(t8_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "fastvit_t8.pth.tar"
    torch.save({"epoch": 300, "arch": "fastvit_t8", "state_dict": t8_state}, path)
    return path


def assert_loaded(model, state, skip=()):
    own = model.state_dict()
    for key, value in state.items():
        if key not in skip:
            assert torch.equal(own[key], value.to(own[key].dtype)), key


# --- reading -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth.tar"
    with pytest.raises(InputError, match="does not exist") as info:
        models.create("fastvit_t8", weights=path)
    assert str(path) in str(info.value)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match="not a file"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("suffix", [".pth", ".pth.tar", ".pt", ".bin", ".safetensors", ".ckpt"])
@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n" * 10, os.urandom(4096)])
def test_garbage_files(tmp_path, suffix, content):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(content)
    with pytest.raises(InputError, match="cannot read") as info:
        models.create("fastvit_t8", weights=path)  # fails while reading, before building
    assert str(path) in str(info.value)


def test_pickle_with_code_is_refused(tmp_path):
    """torch.load runs with weights_only=True: a pickle that would call a function is refused
    and the function never runs."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(InputError, match="refused") as info:
        read_state_dict(path)
    assert "weights_only=True" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    # the file really is dangerous: an unsafe load runs the payload
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(InputError, match="holds a list"):
        read_state_dict(path)
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "arch": "fastvit_t8"}, path)
    with pytest.raises(InputError, match="holds no tensors"):
        read_state_dict(path)


def test_wrappers_and_module_prefix(tmp_path, t8_state):
    variants = {
        "model.pth": {"model": t8_state},
        "dp.pth.tar": {"state_dict": {f"module.{k}": v for k, v in t8_state.items()}},
        "plain.bin": {f"module.{k}": v for k, v in t8_state.items()},
    }
    for name, obj in variants.items():
        path = tmp_path / name
        torch.save(obj, path)
        state = read_state_dict(path)
        assert list(state) == list(t8_state), name
        model = models.create("fastvit_t8", weights=path)
        assert_loaded(model, t8_state)


def test_safetensors_needs_the_package(tmp_path, t8_state, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in t8_state.items()}, str(path))
    assert set(read_state_dict(path)) == set(t8_state)  # safetensors sorts its keys
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(InputError, match="pip install"):
        read_state_dict(path)


# --- loading ---------------------------------------------------------------------------------------

def test_original_naming_loads(t8_state, tmp_path):
    """Our weights renamed to the original release's naming, saved like its checkpoints."""
    from reparam.models.fastvit.checkpoint_keys import APPLE, apple_to_ours

    from reference_data import read_keys

    apple_keys = [k for k, _ in read_keys("fastvit_t8", "apple")]
    ours_of = apple_to_ours({k: k for k in apple_keys})  # ours -> apple, as values
    apple_state = {apple: t8_state[ours] for ours, apple in ours_of.items()}
    path = tmp_path / "fastvit_t8_original.pth.tar"
    torch.save({"epoch": 300, "arch": "fastvit_t8", "state_dict": apple_state}, path)
    model = models.create("fastvit_t8")
    result = load_checkpoint(model, path, convert=models.get_entry("fastvit_t8").convert_state_dict)
    assert result.naming == APPLE and result.loaded == len(t8_state)
    assert_loaded(model, t8_state)


def test_wrong_variant_suggests_the_right_one(t8_file):
    with pytest.raises(InputError) as info:
        models.create("fastvit_t12", weights=t8_file)
    message = str(info.value)
    assert str(t8_file) in message and "does not fit fastvit_t12" in message
    assert "shape mismatches" in message and "more)" in message  # first few, then a count
    assert "missing keys" in message  # t12 has more blocks in stage 2
    assert "fit 'fastvit_t8'" in message and "create('fastvit_t8'" in message


def test_attention_checkpoint_into_repmixer_model():
    sa12 = cached_model("fastvit_sa12").state_dict()
    with pytest.raises(InputError) as info:
        load_state(models.create("fastvit_s12"), sa12, source="sa12-weights",
                   convert=models.get_entry("fastvit_s12").convert_state_dict, family="fastvit",
                   model_name="fastvit_s12")
    message = str(info.value)
    assert "unexpected keys" in message and "stages.3.pos_emb.pos_enc.weight" in message
    assert "missing keys" in message and "fit 'fastvit_sa12'" in message


def test_wrong_variant_with_other_classifier_still_suggests(tmp_path, t8_state):
    state = dict(t8_state)
    state["head.fc.weight"] = torch.zeros(10, 768)
    state["head.fc.bias"] = torch.zeros(10)
    path = tmp_path / "t8_10.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match="fit 'fastvit_t8'"):
        models.create("fastvit_s12", weights=path)


def test_unknown_naming(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(3), "classifier.weight": torch.zeros(2, 3)}, path)
    with pytest.raises(InputError, match="no naming") as info:
        models.create("fastvit_t8", weights=path)
    # the classifier is not counted as missing: it is the one tolerated difference
    assert "2 unexpected keys" in str(info.value) and "460 missing keys" in str(info.value)


@pytest.mark.parametrize("num_classes", [10, 0])
def test_other_num_classes_loads_all_but_the_classifier(t8_file, t8_state, num_classes):
    with pytest.warns(CheckpointWarning, match="classifier not loaded") as record:
        model = models.create("fastvit_t8", weights=t8_file, num_classes=num_classes)
    assert str(t8_file) in str(record[0].message)
    assert "[1000, 768]" in str(record[0].message)
    assert_loaded(model, t8_state, skip={"head.fc.weight", "head.fc.bias"})
    if num_classes:
        assert model.head.fc.weight.shape == (10, 768)
    else:
        assert "head.fc.weight" not in model.state_dict()
    with pytest.warns(CheckpointWarning):
        result = load_checkpoint(model, t8_file)
    assert result.skipped == ["head.fc.bias", "head.fc.weight"]
    assert result.not_loaded == (["head.fc.bias", "head.fc.weight"] if num_classes else [])
    assert result.loaded == len(t8_state) - 2 and len(result.notes) == 1


def test_same_classifier_loads_silently(t8_file, t8_state):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = models.create("fastvit_t8", weights=t8_file)
    assert_loaded(model, t8_state)


def test_features_only_model_ignores_the_head(t8_file, t8_state):
    with pytest.warns(CheckpointWarning):
        model = models.create("fastvit_t8", weights=t8_file, features_only=True)
    assert_loaded(model, {k: v for k, v in t8_state.items() if k.startswith(("stem", "stages"))})


def test_backbone_checkpoint_into_classifier_is_an_error(t8_state):
    backbone = {k: v for k, v in t8_state.items() if k.startswith(("stem", "stages"))}
    with pytest.raises(InputError, match="missing keys.*final_conv"):
        load_state(models.create("fastvit_t8"), backbone,
                   convert=models.get_entry("fastvit_t8").convert_state_dict)


def test_classifier_width_comes_from_the_checkpoint(tmp_path, t8_state):
    state = dict(t8_state)
    state["head.fc.weight"] = torch.randn(10, 768)
    state["head.fc.bias"] = torch.randn(10)
    path = tmp_path / "t8_10.pth"
    torch.save({"state_dict": state}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = models.create("fastvit_t8", weights=path)  # num_classes not given
    assert model.head.fc.out_features == 10 and model.cfg.num_classes == 10
    assert_loaded(model, state)
