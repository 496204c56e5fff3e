"""`reparam export` end to end on toy models: files written, their contents, --force, pt2."""

from __future__ import annotations

import shutil

import onnx
import onnxruntime as ort
import pytest
import torch
import toy_models
from cli_helpers import assert_clean_error, run_cli

from reparam.verify import compare

SHAPE = "1,3,32,32"


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory):
    """`reparam export toy_models:rep_net` run once, in a fresh folder, with the default name."""
    folder = tmp_path_factory.mktemp("toy_onnx")
    result = run_cli("export", "toy_models:rep_net", "--input-shape", SHAPE, cwd=folder)
    assert result.returncode == 0, result.output
    return folder, result


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_one_onnx_file_in_the_current_folder(toy_onnx):
    folder, result = toy_onnx
    assert sorted(p.name for p in folder.iterdir()) == ["rep_net.onnx"]  # no temp, no .data
    assert "Traceback" not in result.output


def test_export_summary(toy_onnx):
    _, result = toy_onnx
    out = result.stdout
    for fragment in ("parameters", "MACs", "graph nodes", "before fusion", "after fusion",
                     "ONNX operators (opset", "Conv: ", "dynamic batch axis",
                     "max |file - fused PyTorch model|", "max |file - original (unfused) model|",
                     "rep_net.onnx", " KB) in "):
        assert fragment in out, f"{fragment!r} not in:\n{out}"
    assert out.count(": ok") == 2


def test_export_without_weights_says_they_are_random(toy_onnx):
    _, result = toy_onnx
    assert "randomly initialised" in result.stderr
    assert "--weights" in result.stderr


def test_onnx_has_a_dynamic_batch_axis(toy_onnx):
    folder, _ = toy_onnx
    session = _ort(folder / "rep_net.onnx")
    assert session.get_inputs()[0].shape[0] == "batch"
    model = toy_models.rep_net()
    for batch in (1, 3):
        x = toy_models.example(batch)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (batch, 10)
        assert compare(want, got).ok


def test_onnx_weights_are_embedded(toy_onnx, tmp_path):
    folder, _ = toy_onnx
    onnx.checker.check_model(str(folder / "rep_net.onnx"), full_check=True)
    proto = onnx.load(str(folder / "rep_net.onnx"), load_external_data=False)
    assert proto.graph.initializer
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    alone = tmp_path / "moved.onnx"  # the file works on its own, away from its folder
    shutil.copy(folder / "rep_net.onnx", alone)
    _ort(alone).run(None, {"input": toy_models.example(1).numpy()})


def test_onnx_is_fused_no_batchnorm_fewer_convs(toy_onnx, tmp_path):
    from reparam.export import onnx_op_counts, write_onnx

    folder, _ = toy_onnx
    fused_ops = onnx_op_counts(folder / "rep_net.onnx")
    write_onnx(toy_models.rep_net(), toy_models.example(2), tmp_path / "unfused.onnx")
    unfused_ops = onnx_op_counts(tmp_path / "unfused.onnx")
    assert unfused_ops.get("BatchNormalization", 0) > 0  # the BN-only skip survives the exporter
    assert fused_ops.get("BatchNormalization", 0) == 0
    assert fused_ops["Conv"] < unfused_ops["Conv"]


def test_force_overwrites_only_when_asked_and_export_is_deterministic(toy_onnx, cli, tmp_path,
                                                                     monkeypatch, capsys):
    target = tmp_path / "rep_net.onnx"
    target.write_bytes(b"precious")
    refused = cli("export", "toy_models:rep_net", "--input-shape", SHAPE)
    assert_clean_error(refused, 2, "already exists", "--force")
    assert target.read_bytes() == b"precious"

    # the forced run in-process (same code path as the command, without another interpreter)
    from reparam.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export", "toy_models:rep_net", "--input-shape", SHAPE, "--force"]) == 0
    assert "rep_net.onnx" in capsys.readouterr().out
    folder, _ = toy_onnx
    assert target.read_bytes() == (folder / "rep_net.onnx").read_bytes()  # same bytes each time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep_net.onnx"]


def test_pt2_round_trip_with_dynamic_batch(cli, tmp_path):
    # rep_net_sized declares its input size (3, 32, 32), so --image-size applies; -v shows progress
    result = cli("export", "toy_models:rep_net_sized", "--image-size", "16", "--format", "pt2",
                 "-o", "net.pt2", "-v")
    assert result.returncode == 0, result.output
    assert "example input 1,3,16,16" in result.stdout
    assert "[reparam] fusing" in result.stderr
    assert "exporter: torch.export, dynamic batch axis" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2"]
    program = torch.export.load(str(tmp_path / "net.pt2"))
    model = toy_models.rep_net()
    with torch.no_grad():
        for batch in (1, 3):
            x = toy_models.example(batch, size=16)
            result = compare(model(x), program.module()(x))
            assert result.ok, result


def test_model_with_a_fixed_batch_needs_batch_size(cli, tmp_path):
    failed = cli("export", "toy_models:fixed_batch", "--input-shape", "2,3,8,8", "-o", "fb.onnx")
    assert_clean_error(failed, 1, "--batch-size")
    assert list(tmp_path.iterdir()) == []  # the fixed-batch export itself: test_cli_lib.py
