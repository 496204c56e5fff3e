"""In-process tests of reparam.export (the library under the command line) and of cli.main."""

from __future__ import annotations

import os
import sys

import onnxruntime as ort
import pytest
import torch
import toy_models
from torch import nn

import reparam
import reparam.pipeline
from reparam import export as ex
from reparam.errors import InputError
from reparam.verify import compare


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# ---- parsing and models ---------------------------------------------------------------------

@pytest.mark.parametrize("text, shape", [
    ("1,3,224,224", (1, 3, 224, 224)),
    (" 2, 3, 8, 8 ", (2, 3, 8, 8)),
    ("1x3x64x64", (1, 3, 64, 64)),
    ("(4,10)", (4, 10)),
])
def test_parse_input_shape(text, shape):
    assert ex.parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,3,x", "1,0,4,4", "1.5,3", "3"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(InputError, match="--input-shape"):
        ex.parse_input_shape(text)


def test_import_factory_accepts_functions_classes_and_instances():
    name, model = ex.import_factory("toy_models:rep_net")
    assert name == "rep_net" and isinstance(model, toy_models.RepNet)
    assert isinstance(ex.import_factory("toy_models:RepNet")[1], toy_models.RepNet)
    assert isinstance(ex.import_factory("toy_models:module_instance")[1], toy_models.RepNet)


def test_resolve_model_shapes():
    loaded = ex.resolve_model("toy_models:rep_net", input_shape=(2, 3, 16, 16))
    assert loaded.input_shape == (2, 3, 16, 16) and not loaded.model.training
    assert loaded.weights is None and not loaded.registered
    sized = ex.resolve_model("toy_models:rep_net_sized", image_size=24, batch_size=3)
    assert sized.input_shape == (3, 3, 24, 24)
    assert ex.resolve_model("toy_models:rep_net_sized").input_shape == (1, 3, 32, 32)
    with pytest.raises(InputError, match="contradicts"):
        ex.resolve_model("toy_models:rep_net", input_shape=(1, 3, 8, 8), batch_size=2)
    with pytest.raises(InputError, match="not both"):
        ex.resolve_model("toy_models:rep_net_sized", input_shape=(1, 3, 8, 8), image_size=8)


def test_resolve_model_loads_weights(tmp_path):
    source = toy_models.rep_net()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth.tar")
    loaded = ex.resolve_model("toy_models:rep_net", weights=tmp_path / "w.pth.tar",
                              input_shape=(1, 3, 8, 8))
    assert loaded.weights.endswith("w.pth.tar")
    for a, b in zip(loaded.model.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)


def test_registered_input_size():
    assert ex.registered_input_size("toy_models:rep_net", toy_models.rep_net_sized()) == (3, 32, 32)
    assert ex.registered_input_size("toy_models:rep_net", toy_models.rep_net()) is None
    pytest.importorskip("reparam.models")
    assert ex.registered_input_size("fastvit_t8") == (3, 256, 256)


def test_check_input_accepted():
    model = toy_models.flat_net()
    assert ex.check_input_accepted(model, torch.randn(1, 3, 16, 16)).shape == (1, 5)
    with pytest.raises(InputError, match="rejects an input of shape 1,3,8,8"):
        ex.check_input_accepted(model, torch.randn(1, 3, 8, 8))


# ---- destinations ---------------------------------------------------------------------------

def test_check_output_path(tmp_path):
    assert ex.check_output_path(tmp_path / "a.onnx") == tmp_path / "a.onnx"
    (tmp_path / "a.onnx").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        ex.check_output_path(tmp_path / "a.onnx")
    assert ex.check_output_path(tmp_path / "a.onnx", force=True) == tmp_path / "a.onnx"
    with pytest.raises(InputError, match="does not exist"):
        ex.check_output_path(tmp_path / "missing" / "a.onnx")
    assert _files(tmp_path) == ["a.onnx"]  # the writability probe leaves nothing


def test_default_output_path(tmp_path):
    assert ex.default_output_path("fastvit_t12", "onnx", tmp_path) == tmp_path / "fastvit_t12.onnx"
    assert ex.default_output_path("a/b:c", "pt2", tmp_path) == tmp_path / "a_b_c.pt2"


def test_checks_judge_each_output_against_its_own_scale():
    # the allowance of an output follows that output's magnitude, not the largest output's
    from reparam.verify import compare

    big, small = torch.tensor([1.0, -100.0]), torch.tensor([2e-3])
    assert compare((big, small), (big, small * 1.00001)).ok
    wrong = compare((big, small), (big, small * 5))
    assert not wrong.ok and wrong.where == "output 1"
    assert wrong.allowed == pytest.approx(ex.ATOL + ex.RTOL * 2e-3)


# ---- writing and checking -------------------------------------------------------------------

def test_export_model_onnx_and_its_checks(tmp_path):
    model = toy_models.two_outputs()
    result = ex.export_model(model, torch.randn(1, 3, 8, 8), tmp_path / "two.onnx")
    assert _files(tmp_path) == ["two.onnx"]
    assert result.format == "onnx" and result.dynamic_batch and result.verified
    assert [c.against for c in result.checks] == ["fused PyTorch model", "original (unfused) model"]
    assert all(c.ok and c.batch == ex.CHECK_BATCH for c in result.checks)
    assert result.op_counts["Conv"] >= 1 and result.opset >= 18
    assert result.size_bytes == (tmp_path / "two.onnx").stat().st_size
    text = result.summary()
    assert "ONNX operators" in text and "wrote" in text
    session = ort.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output0", "output1"]
    x = torch.randn(3, 3, 8, 8)
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x)
    result = compare(list(want), got)
    assert result.ok, result


def test_export_model_fixed_batch(tmp_path):
    result = ex.export_model(toy_models.fixed_batch(), torch.randn(2, 3, 8, 8),
                             tmp_path / "fb.onnx", batch_size=2)
    assert not result.dynamic_batch and all(c.ok and c.batch == 2 for c in result.checks)
    session = ort.InferenceSession(str(tmp_path / "fb.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 8, 8]


def test_export_model_pt2(tmp_path):
    model = toy_models.rep_net()
    result = ex.export_model(model, toy_models.example(1, 16), tmp_path / "net.pt2")
    assert result.format == "pt2" and all(c.ok for c in result.checks)
    program = torch.export.load(str(tmp_path / "net.pt2"))
    x = toy_models.example(3, 16)
    with torch.no_grad():
        result = compare(model(x), program.module()(x))
        assert result.ok, result


def test_torchscript_exporter(tmp_path):
    result = ex.export_model(toy_models.rep_net(), toy_models.example(1, 16), tmp_path / "ts.onnx",
                             exporter="torchscript")
    assert result.exporter.startswith("torchscript") and all(c.ok for c in result.checks)
    session = ort.InferenceSession(str(tmp_path / "ts.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": toy_models.example(3, 16).numpy()})[0].shape == (3, 10)


def _perturbing_writer(monkeypatch):
    """Make write_onnx export a subtly wrong model (one weight changed), as a broken exporter would."""
    real = ex.write_onnx

    def wrong(fused, example, path, **kwargs):
        import copy

        bad = copy.deepcopy(fused)
        with torch.no_grad():
            next(bad.parameters()).add_(0.5)
        return real(bad, example, path, **kwargs)

    monkeypatch.setattr(ex.onnx, "write", wrong)


def test_disagreeing_export_leaves_no_file(tmp_path, monkeypatch):
    _perturbing_writer(monkeypatch)
    with pytest.raises(ex.CheckFailure, match="disagrees") as info:
        ex.export_model(toy_models.rep_net(), toy_models.example(1, 16), tmp_path / "bad.onnx")
    assert _files(tmp_path) == []  # neither the file nor the temporary folder
    assert len(info.value.checks) == 2 and not any(c.ok for c in info.value.checks)


def test_disagreeing_forced_export_keeps_the_old_file(tmp_path, monkeypatch, cli_inproc):
    _perturbing_writer(monkeypatch)
    (tmp_path / "rep_net.onnx").write_bytes(b"old")
    result = cli_inproc("export", "toy_models:rep_net", "--input-shape", "1,3,16,16", "--force")
    assert result.returncode == 1, result.output
    assert "disagrees" in result.stderr and "max |file - original (unfused) model|" in result.stderr
    assert "Traceback" not in result.output
    assert (tmp_path / "rep_net.onnx").read_bytes() == b"old"
    assert _files(tmp_path) == ["rep_net.onnx"]


def test_no_verify_skips_the_checks(tmp_path, monkeypatch):
    _perturbing_writer(monkeypatch)
    result = ex.export_model(toy_models.rep_net(), toy_models.example(1, 16), tmp_path / "nv.onnx",
                             verify=False)
    assert result.checks == [] and not result.verified and "checks skipped" in result.summary()


def test_exporter_failure_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        (args[2]).write_bytes(b"half written")
        raise ex.ExportError("the exporter broke")

    monkeypatch.setattr(ex.onnx, "write", boom)
    with pytest.raises(ex.ExportError):
        ex.export_model(toy_models.rep_net(), toy_models.example(1, 16), tmp_path / "x.onnx")
    assert _files(tmp_path) == []


def test_large_models_move_their_external_data_with_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ex.onnx, "_LARGE_MODEL_BYTES", 0)  # pretend the toy is over 2 GB
    result = ex.export_model(toy_models.rep_net(), toy_models.example(1, 16), tmp_path / "big.onnx")
    assert _files(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert [p.name for p in result.extra_files] == ["big.onnx.data"]
    session = ort.InferenceSession(str(tmp_path / "big.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": toy_models.example(2, 16).numpy()})[0].shape == (2, 10)


def test_quiet_swallows_output_at_the_file_descriptor_level(capfd):
    with ex.quiet() as captured:
        print("python chatter")
        os.write(1, b"c-level chatter\n")
        os.write(2, b"c-level warning\n")
    assert capfd.readouterr().out == ""
    assert "python chatter" in captured.getvalue() and "c-level warning" in captured.getvalue()


def test_onnx_op_counts(tmp_path):
    ex.write_onnx(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval(),
                  torch.randn(2, 3, 4, 4), tmp_path / "s.onnx")
    assert ex.onnx_op_counts(tmp_path / "s.onnx") == {"Conv": 2, "Relu": 1}


# ---- cli.main -------------------------------------------------------------------------------

def test_unexpected_errors_are_one_line_with_a_hint(cli_inproc, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("something nobody expected\nsecond line")

    monkeypatch.setattr(ex, "export_model", crash)
    result = cli_inproc("export", "toy_models:rep_net", "--input-shape", "1,3,8,8")
    assert result.returncode == 1
    assert "Traceback" not in result.output
    assert "error: unexpected RuntimeError: something nobody expected" in result.stderr
    assert "second line" not in result.stderr and "-v" in result.stderr

    verbose = cli_inproc("export", "toy_models:rep_net", "--input-shape", "1,3,8,8", "-v")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_verification_error_exits_1(cli_inproc, monkeypatch, tmp_path):
    from reparam.errors import VerificationError

    def disagree(model, example, **kwargs):
        raise VerificationError("fused output differs by 0.5", 0.5, 1e-5)

    monkeypatch.setattr(reparam.pipeline, "fuse", disagree)
    result = cli_inproc("export", "toy_models:rep_net", "--input-shape", "1,3,8,8")
    assert result.returncode == 1 and "Traceback" not in result.output
    assert "disagrees with the original" in result.stderr and "0.5" in result.stderr
    assert _files(tmp_path) == []


def test_cli_is_importable_without_side_effects():
    import reparam.cli as cli

    assert callable(cli.main) and "reparam.__main__" not in sys.modules


def test_data_dependent_control_flow_is_an_export_error_not_a_silent_guess(tmp_path):
    with pytest.raises(ex.ExportError, match="--exporter torchscript") as info:
        ex.export_model(toy_models.gated_net(), toy_models.example(1, 8), tmp_path / "g.onnx")
    assert _files(tmp_path) == []
    # the compiler keeps the gate whole and fuses around it; the export error names the gate
    model, x = toy_models.gated_net(), toy_models.example(1, 8)
    fused = reparam.fuse(model, x)
    report = fused.report
    assert [leaf.module for leaf in report.leaves] == ["gate"]
    assert [region.members for region in report.regions] == [("conv", "bn")]
    called = [type(fused.get_submodule(n.target)) for n in fused.graph.nodes if n.op == "call_module"]
    assert called == [nn.Conv2d, toy_models.Gate]  # conv+bn is one conv, the gate is untouched
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)
    assert "gate" in str(info.value)
    with pytest.raises(ex.ExportError):
        ex.export_model(toy_models.gated_net(), toy_models.example(1, 8), tmp_path / "g.pt2")
    assert _files(tmp_path) == []
