"""The scripts in examples/ run, and do what they say: each is run as a user would, with small
settings, and its result is checked."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reparam.optional import MissingExtra, require

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_custom_block(capsys):
    model, fused = load_example("custom_block").main(["--size", "32"])
    out = capsys.readouterr().out
    assert "reparam report for Net" in out and "0 refusals" in out and "convolutions: 13 -> 5" in out
    # the stem and each of the four blocks (three conv+BN branches, a layer scale and the input)
    # are one convolution each; nothing was refused
    assert count(fused, nn.BatchNorm2d) == 0 and count(fused, nn.Conv2d) == 5
    assert len(fused.report.regions) == 5 and not fused.report.refusals
    for i in range(4):
        region = next(r for r in fused.report.regions if f"blocks.{i}.branches.0.0" in r.members)
        assert region.op.startswith("Conv2d 3x3 32->32")
        assert {f"blocks.{i}.branches.{b}.{k}" for b in range(3) for k in range(2)} <= set(region.members)
        assert any(f"blocks.{i}.scale" in m for m in region.members)  # the layer scale too
    x = torch.randn(2, 3, 40, 48)  # another shape than the one it was fused on
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_segmentation(capsys):
    model, fused = load_example("segmentation").main(["--size", "64", "--classes", "5"])
    out = capsys.readouterr().out
    assert "reparam report for FPNSegmenter" in out and "BatchNorms: 75 -> 0" in out
    assert count(fused, nn.BatchNorm2d) == 0
    # FastViT-T8 up to its last stage fuses to 49 convolutions (one per reparameterized block,
    # large-kernel conv and RepCPE, three per ConvFFN); the decoder keeps its six: four laterals,
    # the smoothing conv (each with its BatchNorm folded in) and the classifier
    assert count(fused, nn.Conv2d) == 49 + 6
    decoder = [r.members for r in fused.report.regions if r.members[0].startswith(("lateral", "smooth"))]
    assert sorted(decoder) == sorted([(f"lateral.{i}.0", f"lateral.{i}.1") for i in range(4)]
                                     + [("smooth.0", "smooth.1")])
    assert all(r.reason.startswith("not cheaper") for r in fused.report.refusals)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        expected = model(x)
        got = fused(x)
    assert got.shape == (1, 5, 96, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_train_then_deploy(tmp_path):
    """Run as a script, in a fresh folder: it trains, exports and compares the ONNX file."""
    try:
        for module in ("onnx", "onnxruntime", "onnxscript"):
            require(module, "the train-then-deploy example")
    except MissingExtra as exc:
        pytest.skip(str(exc))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(EXAMPLES.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_then_deploy.py"), "--steps", "5",
                             "--output", "tiny.onnx"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]
    out = result.stdout
    assert "step   5" in out and "fused regions: 4, refusals: 0" in out
    assert "Conv: 4," in out and "BatchNormalization" not in out
    line = next(line for line in out.splitlines() if line.startswith("ONNX Runtime vs the trained model"))
    diff = float(line.split("max |diff| = ")[1].split()[0])
    assert diff < 1e-4
