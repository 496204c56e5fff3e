"""`reparam bench` and the timing library `reparam.bench`, on toy models with tiny repeats.

Timing figures are not checked (they depend on the machine); what is checked is that every figure
is there, consistent, and that the caller's model and the global RNG are left as they were.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import toy_models
from cli_helpers import assert_clean_error

from reparam import bench

SHAPE = "1,3,32,32"
TINY = ("--repeats", "3", "--warmup", "1")


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """`reparam bench` run once in a subprocess: eager and ONNX Runtime, two batch sizes."""
    from cli_helpers import run_cli

    folder = tmp_path_factory.mktemp("bench")
    result = run_cli("bench", "toy_models:rep_net", "--input-shape", SHAPE, "--batch-size", "1",
                     "2", "--runtime", "eager,onnxruntime", "--threads", "1", *TINY,
                     "--onnx-profile", "--json", "out.json", cwd=folder)
    assert result.returncode == 0, result.output
    return json.loads((folder / "out.json").read_text()), result, folder


def _check_spread(s: dict) -> None:
    assert set(s) == {"median", "p10", "p90", "n"}
    assert s["n"] == 3
    assert 0 < s["p10"] <= s["median"] <= s["p90"]


def test_bench_json_fields(bench_json):
    data, _, folder = bench_json
    assert sorted(p.name for p in folder.iterdir()) == ["out.json"]  # no temporary files left
    for key in ("model", "input_shape", "device", "dtype", "threads", "channels_last", "repeats",
                "warmup", "fuse_seconds", "verified", "max_abs_diff", "regions", "refusals",
                "unfused", "fused", "onnx_nodes", "rows", "machine", "onnx_profile"):
        assert key in data, key
    assert data["model"] == "toy_models:rep_net"
    assert data["input_shape"] == [1, 3, 32, 32]
    assert (data["device"], data["dtype"], data["threads"]) == ("cpu", "float32", 1)
    assert data["verified"] is True and data["max_abs_diff"] < 1e-4
    assert data["regions"] >= 2 and data["fuse_seconds"] > 0
    # the toy model's two RepBlocks fuse to one conv each: fewer parameters, nodes and MACs
    for key in ("params", "macs", "nodes"):
        assert 0 < data["fused"][key] < data["unfused"][key], key
    assert 0 < data["onnx_nodes"]["fused"] < data["onnx_nodes"]["unfused"]
    assert [(r["runtime"], r["batch"]) for r in data["rows"]] == [
        ("eager", 1), ("eager", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
    for row in data["rows"]:
        assert row["error"] is None
        for key in ("unfused_ms", "fused_ms", "ratio"):
            _check_spread(row[key])
    for key in ("cpu", "cores_available", "torch", "onnxruntime", "date"):
        assert data["machine"][key], key
    profile = data["onnx_profile"]
    assert set(profile) == {"unfused", "fused"}
    assert profile["fused"]["Conv"]["nodes"] < profile["unfused"]["Conv"]["nodes"]


def test_bench_table_and_progress(bench_json):
    _, result, _ = bench_json
    out = result.stdout
    for fragment in ("parameters", "MACs", "graph nodes", "ONNX nodes", "fuse(): ", "verified",
                     "unfused ms (p10-p90)", "fused/unfused (p10-p90)", "eager", "onnxruntime",
                     "median of 3 interleaved rounds", "time per operator type", "wrote "):
        assert fragment in out, f"{fragment!r} not in:\n{out}"
    assert "[bench] fusing" in result.stderr and "[bench] timing eager, batch 2" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, fragments", [
    (["bench", "toy_models:rep_net", "--input-shape", SHAPE, "--runtime", "eager,tensorrt"],
     ["unknown runtime 'tensorrt'"]),
    (["bench", "no_such_model_anywhere"], ["unknown model"]),
    (["bench", "toy_models:rep_net", "--input-shape", SHAPE, "--json", "missing/out.json"],
     ["does not exist"]),
    (["bench", "toy_models:rep_net", "--input-shape", SHAPE, "--repeats", "0"],
     ["expected a positive number"]),
    (["bench", "toy_models:rep_net", "--input-shape", SHAPE, "--device", "cuda:7"] if not
     torch.cuda.is_available() else ["bench", "toy_models:rep_net", "--device", "tpu"],
     ["--device"]),
    (["bench", "toy_models:rep_net", "--input-shape", SHAPE, "--runtime", "eager",
      "--onnx-profile"], ["--onnx-profile needs"]),
    (["bench", "toy_models:flat_net", "--input-shape", "1,3,20,20"], ["rejects an input"]),
])
def test_bench_bad_input_exits_2(cli_inproc, args, fragments):
    assert_clean_error(cli_inproc(*args), 2, *fragments)


def test_benchmark_leaves_model_and_rng_alone():
    model = toy_models.rep_net().train()
    model.block.eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    result = bench.benchmark(model, toy_models.example(1), runtimes=("eager",), repeats=2,
                             warmup=0, batch_sizes=(1, 3), threads=1, channels_last=True)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.is_contiguous() for p in model.parameters())  # channels_last ran on a copy
    assert [(r.runtime, r.batch, r.ratio.n) for r in result.rows] == [("eager", 1, 2),
                                                                      ("eager", 3, 2)]
    assert result.channels_last and result.threads == 1
    assert result.fused["params"] < result.unfused["params"]


def test_compile_failure_becomes_a_row(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    result = bench.benchmark(toy_models.rep_net(), toy_models.example(1),
                             runtimes=("compile", "eager"), repeats=1, warmup=0)
    rows = {r.runtime: r for r in result.rows}
    assert rows["compile"].error == "torch.compile failed: no C++ compiler found"
    assert rows["compile"].ratio is None and rows["eager"].error is None
    assert "not measured: torch.compile failed" in result.table()


def test_time_paired_alternates_the_order_and_respects_the_budget():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    samples = bench.time_paired(candidates, repeats=4, warmup=1)
    assert calls == list("abc" "abc" "cba" "abc" "cba")  # warm-up round, then 4 timed rounds
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
    samples = bench.time_paired(candidates, repeats=1000, warmup=0, max_seconds=0.0,
                                min_rounds=3)
    assert len(samples["a"]) == 3


def test_paired_ratio_is_per_round():
    samples = {"fused": [1.0, 2.0, 3.0, 8.0], "unfused": [2.0, 4.0, 6.0, 8.0]}
    ratio = bench.paired_ratio(samples, "fused", "unfused")
    assert ratio.median == pytest.approx(0.5) and ratio.n == 4
    assert ratio.p90 == pytest.approx(0.85)  # the fourth round's 1.0 only shows in the spread
    assert bench.spread([3.0, 1.0, 2.0]).median == 2.0
    assert bench.geometric_mean([0.5, 2.0]) == pytest.approx(1.0)


def test_count_calls_sees_modules_and_functional_calls():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3).eval()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x = self.bn(self.conv(x))
            return F.batch_norm(x, self.bn.running_mean, self.bn.running_var)

    counts = bench.count_calls(Mixed(), torch.randn(1, 3, 4, 4),
                               functions={"bn": [F.batch_norm], "conv": [F.conv2d]})
    assert counts == {"bn": 2, "conv": 1}


def test_bench_timm_row_on_one_family():
    """benchmarks/bench_timm.py's comparison, on RepVGG-A0 with one timed round."""
    import sys
    from pathlib import Path

    from reparam.optional import MissingExtra, require

    try:
        require("timm", "this test")
    except MissingExtra as exc:
        pytest.skip(f"needs timm: {exc.install}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import bench_timm
    finally:
        sys.path.pop(0)
    rng = torch.get_rng_state()
    row = bench_timm.compare_family("repvgg", "repvgg_a0", repeats=1, warmup=0,
                                    max_seconds=1.0, size=64)
    assert torch.equal(torch.get_rng_state(), rng)
    assert row["ours_exact"] and row["ours_rel_diff"] < 1e-9 and row["timm_rel_diff"] < 1e-9
    assert row["bn_unfused"] > 0 and row["bn_ours"] == 0 and row["bn_timm"] == 0
    assert row["params_ours"] < row["params_unfused"] and row["params_timm"] < row["params_unfused"]
    assert row["fp32_rel_diff_ours_vs_timm"] < 1e-4
    assert row["eager_ratio"]["n"] == 1 and row["eager_ratio"]["median"] > 0
    table = bench_timm.format_rows([row, {"family": "x", "model": "y", "error": "boom"}], False)
    assert "repvgg_a0" in table and "error: boom" in table


def test_bench_executorch_rows(cli_inproc, tmp_path):
    """Both models lowered to XNNPACK per batch size, run by the ExecuTorch runtime, paired."""
    from reparam.optional import MissingExtra, require

    try:
        require("executorch.runtime", "this test")
    except MissingExtra as exc:
        pytest.skip(f"needs executorch: {exc.install}")
    result = cli_inproc("bench", "toy_models:rep_net", "--input-shape", SHAPE, "--batch-size",
                        "1", "2", "--runtime", "executorch", "--threads", "1", *TINY,
                        "--json", "out.json")
    assert result.returncode == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no programs left behind
    data = json.loads((tmp_path / "out.json").read_text())
    assert [(r["runtime"], r["batch"]) for r in data["rows"]] == [("executorch", 1),
                                                                 ("executorch", 2)]
    for row in data["rows"]:
        assert row["error"] is None
        for key in ("unfused_ms", "fused_ms", "ratio"):
            _check_spread(row[key])
    # the delegation summary of both programs: everything but the global mean runs in XNNPACK
    notes = [n for n in data["notes"] if n.startswith("executorch")]
    assert len(notes) == 2 and all("XNNPACK delegate" in n for n in notes), data["notes"]
    assert data["machine"]["executorch"]
    assert "executorch" in result.stdout and "Traceback" not in result.output


def test_bench_executorch_missing_names_the_extra(monkeypatch):
    import reparam.optional as optional

    real = optional.require

    def require(module, feature):
        if module.split(".")[0] == "executorch":
            raise optional.MissingExtra(module, feature, ModuleNotFoundError(module))
        return real(module, feature)

    monkeypatch.setattr(optional, "require", require)
    result = bench.benchmark(toy_models.rep_net(), toy_models.example(1),
                             runtimes=("executorch", "eager"), repeats=1, warmup=0,
                             batch_sizes=(1, 2))
    rows = [(r.runtime, r.batch, r.error) for r in result.rows if r.runtime == "executorch"]
    assert rows == [("executorch", b, 'ExecuTorch is not installed (pip install'
                     ' "reparam[executorch]")') for b in (1, 2)]
    assert all(r.error is None for r in result.rows if r.runtime == "eager")
    table = result.table()
    assert "not measured: ExecuTorch is not installed" in table and "reparam[executorch]" in table


def test_bench_executorch_lowering_failure_becomes_a_row(monkeypatch):
    from reparam.export import core
    from reparam.export import executorch as pte
    from reparam.optional import MissingExtra, require

    try:
        require("executorch.runtime", "this test")
    except MissingExtra as exc:
        pytest.skip(f"needs executorch: {exc.install}")

    def refuse(module, example, path, **options):
        raise core.ExportError("ExecuTorch cannot export the operator aten.foo.default\nmore")

    monkeypatch.setattr(pte, "write", refuse)
    result = bench.benchmark(toy_models.rep_net(), toy_models.example(1),
                             runtimes=("executorch",), repeats=1, warmup=0)
    [row] = result.rows
    assert row.ratio is None
    assert row.error == ("ExecuTorch lowering of the unfused model failed: ExecuTorch cannot"
                         " export the operator aten.foo.default")
