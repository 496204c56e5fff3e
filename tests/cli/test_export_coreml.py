"""`reparam export --format coreml`: Core ML packages (.mlpackage folders), written atomically,
checked structurally everywhere and numerically where Core ML can run (macOS)."""

from __future__ import annotations

import sys

import pytest
import torch
import toy_models
from cli_helpers import assert_clean_error

from reparam import export as ex
from reparam.optional import MissingExtra, install_command, require

try:
    from reparam.export.core import quiet

    with quiet():
        require("coremltools", "the Core ML tests")
except MissingExtra:
    pytest.skip(f"coremltools is not installed: {install_command('coremltools')}",
                allow_module_level=True)

SHAPE = ("--input-shape", "1,3,16,16")


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _operations(path):
    """The op histogram of a package, read independently of the exporter's own code."""
    import collections

    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    counts = collections.Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            counts.update(op.type for op in block.operations if op.type != "const")
    return counts, spec


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coreml")
    result = ex.export_model(toy_models.rep_net(), toy_models.example(1, 16),
                             folder / "rep_net.mlpackage")
    return folder, result


def test_package_is_a_complete_folder_and_nothing_else(toy_package):
    folder, result = toy_package
    assert _files(folder) == ["rep_net.mlpackage"]
    package = folder / "rep_net.mlpackage"
    assert (package / "Manifest.json").is_file()
    assert result.size_bytes == sum(f.stat().st_size for f in package.rglob("*") if f.is_file())


def test_package_holds_the_fused_structure(toy_package, tmp_path):
    folder, result = toy_package
    ops, spec = _operations(folder / "rep_net.mlpackage")
    assert "batch_norm" not in ops
    assert ops["conv"] == 2  # one conv per fused RepBlock (3x3 + 1x1 + BN skip)
    # the unfused model converted directly keeps its four branch convolutions
    ex.coreml.write(toy_models.rep_net(), toy_models.example(1, 16), tmp_path / "unfused.mlpackage")
    unfused, _ = _operations(tmp_path / "unfused.mlpackage")
    assert unfused["conv"] == 4
    assert [tuple(i.type.multiArrayType.shape) for i in spec.description.input] == [(1, 3, 16, 16)]
    assert [tuple(o.type.multiArrayType.shape) for o in spec.description.output] == [(1, 10)]
    assert result.op_counts == dict(ops)


def test_checks_and_the_macos_note(toy_package):
    _, result = toy_package
    text = result.summary()
    assert "Core ML operations: " in text and "conv: 2" in text
    assert "compute precision float16" in text
    structural = [c for c in result.checks if c.structural]
    assert [c.against for c in structural] == [
        "the package loads and holds an ML program", "no batch norm in the program",
        "convolutions as in the fused model", "input and output shapes"]
    assert all(c.ok for c in result.checks)
    assert "convolutions as in the fused model (2, expected 2): ok" in text
    if sys.platform == "darwin":
        assert [c.against for c in result.checks if not c.structural] == [
            "fused PyTorch model", "original (unfused) model"]
    else:
        assert "numerical verification of Core ML packages needs macOS" in text
        assert not [c for c in result.checks if not c.structural]


def test_cli_precision_and_deployment_target(cli_inproc, tmp_path):
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--format", "coreml",
                        "--precision", "float32", "--deployment-target", "iOS17")
    assert result.returncode == 0, result.output
    assert "compute precision float32, minimum deployment target iOS17" in result.stdout
    assert "needs macOS" in result.stdout or sys.platform == "darwin"
    assert _files(tmp_path) == ["rep_net.mlpackage"]
    ops, spec = _operations(tmp_path / "rep_net.mlpackage")
    assert "cast" not in ops  # float16 programs cast their input and output
    assert spec.specificationVersion == 8  # iOS17


def test_force_replaces_a_package_only_once_the_new_one_is_complete(cli_inproc, tmp_path,
                                                                    monkeypatch):
    old = tmp_path / "rep_net.mlpackage"
    old.mkdir()
    (old / "Manifest.json").write_text("{}")
    (old / "old-marker").write_text("old")

    refused = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--format", "coreml")
    assert_clean_error(refused, 2, "already exists", "--force")

    real = ex.coreml.write

    def half_written(fused, example, path, **kwargs):
        path.mkdir()
        (path / "Manifest.json").write_text("{}")
        raise ex.ExportError("the converter broke half way")

    monkeypatch.setattr(ex.coreml, "write", half_written)
    failed = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--format", "coreml", "--force")
    assert_clean_error(failed, 1, "half way")
    assert _files(tmp_path) == ["rep_net.mlpackage"]
    assert (old / "old-marker").read_text() == "old"

    monkeypatch.setattr(ex.coreml, "write", real)
    replaced = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--format", "coreml", "--force")
    assert replaced.returncode == 0, replaced.output
    assert _files(tmp_path) == ["rep_net.mlpackage"]
    assert not (old / "old-marker").exists() and _operations(old)[0]["conv"] == 2


def test_a_folder_that_is_not_a_package_is_never_replaced(cli_inproc, tmp_path):
    (tmp_path / "photos.mlpackage").mkdir()
    (tmp_path / "photos.mlpackage" / "holiday.jpg").write_bytes(b"jpeg")
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "-o", "photos.mlpackage", "--force")
    assert_clean_error(result, 2, "not a Core ML package")
    assert (tmp_path / "photos.mlpackage" / "holiday.jpg").read_bytes() == b"jpeg"


def test_an_operator_core_ml_lacks_is_named(cli_inproc, tmp_path):
    result = cli_inproc("export", "deploy_models:histogram_head", *SHAPE, "--format", "coreml")
    assert_clean_error(result, 1, "histc", "Core ML")
    assert _files(tmp_path) == []


@pytest.mark.parametrize("args, fragment", [
    (("--deployment-target", "iOS99"), "unknown Core ML deployment target 'iOS99'"),
    (("--deployment-target", "iOS13"), "need iOS15"),
])
def test_bad_core_ml_options(cli_inproc, tmp_path, args, fragment):
    result = cli_inproc("export", "toy_models:raising_factory", *SHAPE, "--format", "coreml", *args)
    assert_clean_error(result, 2, fragment)  # reported before the model is built
    assert _files(tmp_path) == []


def test_core_ml_options_are_refused_for_other_formats(cli_inproc):
    result = cli_inproc("export", "toy_models:rep_net", *SHAPE, "--precision", "float32")
    assert_clean_error(result, 2, "--precision only applies to --format coreml")


def test_missing_coremltools_names_the_extra(cli_inproc, tmp_path, monkeypatch):
    import reparam.optional

    real = reparam.optional.importlib.import_module

    def without_coremltools(name, *args, **kwargs):
        if name.split(".")[0] == "coremltools":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(reparam.optional.importlib, "import_module", without_coremltools)
    result = cli_inproc("export", "toy_models:raising_factory", *SHAPE, "--format", "coreml")
    assert_clean_error(result, 2, 'pip install "reparam[coreml]"')
    assert _files(tmp_path) == []


def test_fused_fastvit_converts(tmp_path):
    # guards against coremltools regressions with this torch (it was tested up to torch 2.7)
    import reparam

    model = reparam.models.create("fastvit_t8")
    result = ex.export_model(model, torch.randn(1, 3, 64, 64), tmp_path / "t8.mlpackage")
    assert all(c.ok for c in result.checks)
    ops, _ = _operations(tmp_path / "t8.mlpackage")
    assert "batch_norm" not in ops
    fused = reparam.fuse(model, torch.randn(1, 3, 64, 64), verify=False)
    convs = sum(1 for m in fused.modules() if isinstance(m, torch.nn.Conv2d))
    assert ops["conv"] == convs  # every fused conv is one Core ML conv, nothing else is


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs predictions on macOS only")
def test_prediction_matches_on_macos(tmp_path):
    result = ex.export_model(toy_models.rep_net(), toy_models.example(1, 16),
                             tmp_path / "net.mlpackage", precision="float32")
    numerical = [c for c in result.checks if not c.structural]
    assert len(numerical) == 2 and all(c.ok for c in numerical)
