"""`reparam export` of a registered FastViT."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from cli_helpers import run_cli

from reparam.verify import compare

import reparam.models as models


@pytest.fixture(scope="module")
def t8_export(tmp_path_factory):
    """fastvit_t8 with a checkpoint (its own random weights, saved), exported with the defaults."""
    folder = tmp_path_factory.mktemp("fastvit")
    torch.manual_seed(1)
    model = models.create("fastvit_t8").eval()
    torch.save({"state_dict": model.state_dict()}, folder / "t8.pth.tar")
    result = run_cli("export", "fastvit_t8", "--weights", "t8.pth.tar", cwd=folder)
    return folder, model, result


def test_fastvit_export_succeeds(t8_export):
    folder, _, result = t8_export
    assert result.returncode == 0, result.output
    assert "Traceback" not in result.output
    assert "randomly initialised" not in result.output  # weights were given
    assert "example input 1,3,256,256" in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["fastvit_t8.onnx", "t8.pth.tar"]


def test_fastvit_onnx_matches_the_checkpoint_model(t8_export):
    folder, model, result = t8_export
    assert result.returncode == 0, result.output
    session = ort.InferenceSession(str(folder / "fastvit_t8.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert got.shape == (1, 1000)
    result = compare(want, got)
    assert result.ok, result


def test_fastvit_onnx_has_no_batchnorm(t8_export):
    folder, _, result = t8_export
    assert result.returncode == 0, result.output
    from reparam.export import onnx_op_counts

    ops = onnx_op_counts(folder / "fastvit_t8.onnx")
    assert ops.get("BatchNormalization", 0) == 0, ops
    assert "BatchNormalization" not in result.stdout
