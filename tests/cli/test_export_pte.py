"""`reparam export --format pte`: ExecuTorch programs lowered to XNNPACK, run by the ExecuTorch
runtime and compared with the fused and the unfused model."""

from __future__ import annotations

import pytest
import torch
import toy_models
from cli_helpers import assert_clean_error
from deploy_models import SmallOutputWrong, four_stages, run_pte

from reparam import export as ex
from reparam.optional import MissingExtra, install_command, require
from reparam.verify import compare

try:
    require("executorch.runtime", "the ExecuTorch tests")
except MissingExtra:
    pytest.skip(f"ExecuTorch is not installed: {install_command('executorch')}",
                allow_module_level=True)

SHAPE = ("--input-shape", "1,3,16,16")


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def toy_pte(tmp_path_factory):
    """`reparam export toy_models:rep_net --format pte`, in-process, in a fresh folder."""
    from reparam.cli import main

    folder = tmp_path_factory.mktemp("pte")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(folder)
    try:
        code = main(["export", "toy_models:rep_net", *SHAPE, "--format", "pte"])
    finally:
        monkeypatch.undo()
    return folder, code


def test_pte_written_with_the_format_suffix(toy_pte):
    folder, code = toy_pte
    assert code == 0
    assert _files(folder) == ["rep_net.pte"]


def test_pte_runs_in_the_executorch_runtime_like_the_unfused_model(toy_pte):
    folder, _ = toy_pte
    model = toy_models.rep_net()
    x = toy_models.example(1, 16)  # the program has a fixed batch of one
    (got,) = run_pte(folder / "rep_net.pte", x)
    with torch.no_grad():
        want = model(x)
    result = compare(want, got)
    assert result.ok, result


def test_pte_summary_reports_delegation_and_checks(tmp_path, cli_inproc):
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "-o", "net.pte")
    assert result.returncode == 0, result.output
    out = result.stdout
    # the global mean feeding the classifier is the one operator XNNPACK leaves to ExecuTorch
    assert ("XNNPACK delegate: 2 subgraphs; operators outside XNNPACK (portable kernels):"
            " aten.mean.dim x1") in out
    assert "exporter: torch.export + executorch (XNNPACK), fixed batch size 1" in out
    assert "max |file - fused PyTorch model|" in out and "max |file - original (unfused) model|" in out
    assert out.count(": ok") == 2
    assert _files(tmp_path) == ["net.pte"]


def test_pte_fused_fastvit(tmp_path):
    # a small FastViT with every kind of block (stem, RepMixer, patch embeddings, RepCPE,
    # attention, head): the runtime's output matches the fused and the unfused model
    import reparam

    model = reparam.models.create("fastvit_sa12", layers=(1, 1, 1, 1),
                                  embed_dims=(16, 32, 64, 128), num_classes=10)
    result = ex.export_model(model, torch.randn(1, 3, 64, 64), tmp_path / "sa.pte")
    assert [c.ok for c in result.checks] == [True, True]
    assert result.checks[1].max_abs_diff < 1e-5
    (line,) = [d for d in result.details if d.startswith("XNNPACK delegate")]
    assert "aten.convolution" not in line  # every convolution runs in XNNPACK
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.eval()(x)
    (got,) = run_pte(tmp_path / "sa.pte", x)
    result = compare(want, got)
    assert result.ok, result


def test_pte_wrong_small_output_fails_the_check(tmp_path, monkeypatch):
    real = ex.executorch.write

    def wrong(fused, example, path, **kwargs):
        return real(SmallOutputWrong(fused), example, path, **kwargs)

    monkeypatch.setattr(ex.executorch, "write", wrong)
    with pytest.raises(ex.CheckFailure, match="at output 3"):
        ex.export_model(four_stages(), torch.randn(1, 3, 16, 16), tmp_path / "four.pte")
    assert _files(tmp_path) == []


def test_an_operator_executorch_lacks_is_named(cli_inproc, tmp_path):
    result = cli_inproc("export", "deploy_models:histogram_head", *SHAPE, "--format", "pte")
    assert_clean_error(result, 1, "aten.histc", "ExecuTorch")
    assert _files(tmp_path) == []


def test_missing_executorch_names_the_extra(cli_inproc, tmp_path, monkeypatch):
    import reparam.optional

    real = reparam.optional.importlib.import_module

    def without_executorch(name, *args, **kwargs):
        if name.split(".")[0] == "executorch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(reparam.optional.importlib, "import_module", without_executorch)
    result = cli_inproc("export", "toy_models:raising_factory", *SHAPE, "--format", "pte")
    # the missing package is reported before the model is built (the factory would fail)
    assert_clean_error(result, 2, 'pip install "reparam[executorch]"', "--format pte")
    assert _files(tmp_path) == []


def test_existing_pte_needs_force(cli_inproc, tmp_path):
    (tmp_path / "rep_net.pte").write_bytes(b"old")
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--format", "pte")
    assert_clean_error(result, 2, "already exists", "--force")
    assert (tmp_path / "rep_net.pte").read_bytes() == b"old"


def test_onnx_options_are_refused_for_pte(cli_inproc):
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--format", "pte", "--opset", "18")
    assert_clean_error(result, 2, "--opset only applies to --format onnx")
