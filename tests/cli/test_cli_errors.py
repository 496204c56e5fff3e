"""Every error the command line reports: a clean `error: ...` line, the right exit code, no
traceback, and no file left behind. Exit code 2: usage errors; 1: failed checks/exports.

Tests taking `cli` run `python -m reparam.cli` in a subprocess; those taking `cli_inproc` call
`reparam.cli.main` in-process (same code, no interpreter start-up: ~3 s saved per case)."""

from __future__ import annotations

import os

import pytest
import torch
import toy_models
from cli_helpers import assert_clean_error, has_models

SHAPE = ("--input-shape", "1,3,32,32")
needs_models = pytest.mark.skipif(not has_models(), reason="reparam.models is not importable yet")


def _no_output(folder):
    leftovers = [p.name for p in folder.iterdir() if p.suffix in (".onnx", ".pt2", ".data")
                 or p.name.startswith(".")]
    assert leftovers == []


@needs_models
def test_unknown_model_suggests_close_names(cli, tmp_path):
    result = cli("export", "fastvit_t13")
    assert_clean_error(result, 2, "fastvit_t13", "fastvit_t12")
    _no_output(tmp_path)


def test_unknown_model_without_registry_or_colon(cli_inproc):
    result = cli_inproc("export", "no_such_model_anywhere", *SHAPE)
    assert_clean_error(result, 2, "no_such_model_anywhere")


def test_weights_file_missing(cli, tmp_path):
    result = cli("export", "toy_models:rep_net", *SHAPE, "--weights", "missing.pth")
    assert_clean_error(result, 2, "missing.pth", "not found")
    _no_output(tmp_path)


def test_weights_path_is_a_folder(cli_inproc, tmp_path):
    (tmp_path / "ckpt").mkdir()
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--weights", "ckpt")
    assert_clean_error(result, 2, "ckpt", "folder")


def test_weights_file_unreadable(cli_inproc, tmp_path, monkeypatch):
    # Permission bits do not stop root (tests often run as root in containers): the file system's
    # answer is simulated, so the check runs for every user.
    path = tmp_path / "locked.pth"
    torch.save(toy_models.rep_net().state_dict(), path)
    path.chmod(0)
    real_access = os.access

    def access(target, mode, *args, **kwargs):
        if os.path.abspath(target) == str(path) and mode & os.R_OK:
            return False
        return real_access(target, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--weights", "locked.pth")
    assert_clean_error(result, 2, "locked.pth", "not readable")
    _no_output(tmp_path)


def test_weights_file_is_not_a_checkpoint(cli, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint at all\n" * 10)
    result = cli("export", "toy_models:rep_net", *SHAPE, "--weights", "junk.pth")
    assert_clean_error(result, 2, "junk.pth", "not a PyTorch checkpoint")
    _no_output(tmp_path)


def test_weights_file_holds_no_state_dict(cli_inproc, tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--weights", "list.pth")
    assert_clean_error(result, 2, "list.pth", "not a state_dict")


def test_checkpoint_of_another_model_lists_mismatches(cli_inproc, tmp_path):
    torch.save({"state_dict": toy_models.rep_net_wide().state_dict()}, tmp_path / "wide.pth.tar")
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--weights", "wide.pth.tar")
    assert_clean_error(result, 2, "wide.pth.tar", "shape mismatches", "stem.k3.0.weight")
    _no_output(tmp_path)


@needs_models
def test_checkpoint_of_another_fastvit_variant_names_it(cli_inproc, tmp_path):
    import reparam.models

    with torch.device("meta"):
        shapes = reparam.models.create("fastvit_t8").state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in shapes.items()}, tmp_path / "t8.pth")
    result = cli_inproc("export", "fastvit_t12", "--weights", "t8.pth")
    assert_clean_error(result, 2, "t8.pth", "fastvit_t8")
    _no_output(tmp_path)


def test_output_folder_missing(cli, tmp_path):
    result = cli("export", "toy_models:rep_net", *SHAPE, "-o", "nowhere/net.onnx")
    assert_clean_error(result, 2, "nowhere", "does not exist")


def test_output_folder_is_a_file(cli_inproc, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "-o", "afile/net.onnx")
    assert_clean_error(result, 2, "afile", "not a folder")


def test_output_is_a_folder(cli_inproc, tmp_path):
    (tmp_path / "out").mkdir()
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "-o", "out")
    assert_clean_error(result, 2, "is a folder")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's sysfs")
def test_output_folder_not_writable(cli, tmp_path):
    # sysfs refuses new files even to root, where permission bits on a folder would not
    result = cli("export", "toy_models:rep_net", *SHAPE, "-o", "/sys/kernel/net.onnx")
    assert_clean_error(result, 2, "/sys/kernel", "not writable")
    _no_output(tmp_path)


def test_output_folder_not_writable_simulated(cli_inproc, tmp_path, monkeypatch):
    # root can write anywhere, so simulate the refusal of the file system on every platform
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "-o", "net.onnx")
    assert_clean_error(result, 2, "not writable", "Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_checked_before_the_model_is_built(cli_inproc, tmp_path):
    # a factory that would fail: the destination error comes first, so no work was done
    result = cli_inproc("export", "toy_models:raising_factory", *SHAPE, "-o", "nowhere/net.onnx")
    assert_clean_error(result, 2, "does not exist")


def test_input_shape_the_model_rejects(cli, tmp_path):
    result = cli("export", "toy_models:flat_net", "--input-shape", "1,3,32,32")
    assert_clean_error(result, 2, "rejects an input of shape 1,3,32,32", "--input-shape")
    _no_output(tmp_path)


@pytest.mark.parametrize("shape, fragment", [
    ("1,3,a,4", "not a comma-separated list of integers"),
    ("1,3,-4,4", "<= 0"),
    (",", "empty"),
    ("7", "batch axis first"),
])
def test_malformed_input_shape(cli, cli_inproc, shape, fragment):
    run = cli if shape == "1,3,a,4" else cli_inproc
    result = run("export", "toy_models:rep_net", f"--input-shape={shape}")
    assert_clean_error(result, 2, fragment)


def test_factory_model_needs_an_input_shape(cli_inproc):
    result = cli_inproc("export", "toy_models:rep_net")
    assert_clean_error(result, 2, "--input-shape")


def test_factory_that_does_not_return_a_module(cli_inproc):
    result = cli_inproc("export", "toy_models:not_a_module", *SHAPE)
    assert_clean_error(result, 2, "not_a_module", "not a torch.nn.Module")


def test_factory_that_raises(cli_inproc):
    result = cli_inproc("export", "toy_models:raising_factory", *SHAPE)
    assert_clean_error(result, 2, "raising_factory", "broken on purpose")


@pytest.mark.parametrize("spec, fragments", [
    ("no_such_module_xyz:build", ("no_such_module_xyz", "no module named")),
    ("broken_module:build", ("broken_module", "cannot be imported on purpose")),
    ("toy_models:rep_nett", ("rep_nett", "did you mean", "rep_net")),
    ("toy_models:", ("package.module:factory",)),
])
def test_factory_import_fails(cli, cli_inproc, spec, fragments):
    run = cli if spec.startswith("broken_module") else cli_inproc
    result = run("export", spec, *SHAPE)
    assert_clean_error(result, 2, *fragments)


def test_opset_with_pt2_is_a_usage_error(cli_inproc):
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--format", "pt2", "--opset", "17")
    assert_clean_error(result, 2, "--opset")


@pytest.mark.parametrize("args", [
    ("export",),  # no model
    ("export", "toy_models:rep_net", "--batch-size", "0"),
    ("export", "toy_models:rep_net", "--format", "tflite"),
    ("frobnicate",),
    (),
])
def test_argument_errors_exit_2(cli, cli_inproc, args):
    run = cli if args == ("export",) else cli_inproc
    result = run(*args)
    assert result.returncode == 2, result.output
    assert "Traceback" not in result.output
    assert "usage:" in result.stderr


def test_format_contradicting_the_output_name(cli_inproc):
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "-o", "a.onnx", "--format", "pt2")
    assert_clean_error(result, 2, "contradicts")


def test_errors_do_not_print_the_random_weights_notice(cli_inproc):
    result = cli_inproc("export", "toy_models:not_a_module", *SHAPE)
    assert "randomly initialised" not in result.output
