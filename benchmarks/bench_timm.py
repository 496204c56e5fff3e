"""reparam.fuse against timm's own hand-written reparameterizations, family by family.

    python benchmarks/bench_timm.py                          # every family, eager CPU
    python benchmarks/bench_timm.py --families fastvit repvgg --repeats 50 --onnx
    python benchmarks/bench_timm.py --families fastvit --model fastvit=fastvit_t12 --onnx --onnx-profile
    python benchmarks/bench_timm.py --json timm.json

timm ships a `reparameterize()` / `fuse()` / `switch_to_deploy()` method in the blocks of several
architecture families, and `timm.utils.model.reparameterize_model` calls them. For each family this
script builds the smallest variant in its training form (random initialisation, seeded) with
randomized BatchNorm statistics and affine parameters, and compares:

- exact (f64): `reparam.fuse` of a float64 copy, verified against the float64 original with
  float64 tolerances (relative difference printed); the same figure for timm's reparameterization;
- parameters and BatchNorms left (BatchNorm calls that still run in one forward pass, module or
  functional), ours vs timm's; convolutions that still run, ours vs timm's;
- fuse() seconds (verification excluded) and timm's reparameterize_model seconds;
- eager CPU latency (batch 1, the variant's default input size) as a paired ratio ours / timm:
  both forms timed interleaved in one process, the ratio taken per round, median and p10-p90;
- with --onnx: both forms exported to ONNX (reparam's exporter, fixed batch 1), node counts and the
  paired ONNX Runtime latency ratio ours / timm; --onnx-profile adds ONNX Runtime's time per
  operator type for both files.

The geometric mean of the eager ratios closes the table (below 1: the fused model is faster than
timm's own deploy form). Requires timm: pip install "reparam[timm]".
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reparam  # noqa: E402
from reparam import bench  # noqa: E402
from reparam.errors import VerificationError, first_line  # noqa: E402
from reparam.optional import require  # noqa: E402

# family -> the smallest timm variant with a hand-written reparameterization
FAMILIES = {
    "mobileone": "mobileone_s0",
    "repvgg": "repvgg_a0",
    "fastvit": "fastvit_t8",
    "ghostnetv3": "ghostnetv3_050",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m0_9",
    "levit": "levit_128s",
    "efficientvit_msra": "efficientvit_m0",
    "tiny_vit": "tiny_vit_5m_224",
    "shvit": "shvit_s1",
    "lcnetv2": "lcnetv2_small",
    "iformer": "iformer_t",
    "nextvit": "nextvit_small",
    "efficientvim": "efficientvim_m1",
}
SEED = 0
BATCH_NORM_FUNCTIONS = {"batch_norm": [F.batch_norm, torch.batch_norm],
                        "conv": [F.conv1d, F.conv2d, F.conv3d]}


def timm_module():
    return require("timm", "benchmarks/bench_timm.py")


def randomize_norms(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, from a local generator.

    Scales stay near 1 and shifts small, so that deep networks keep their activations bounded.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=g))
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def build_timm(name: str, seed: int = SEED) -> tuple[nn.Module, tuple[int, ...]]:
    """The timm model `name` in training form, seeded, BatchNorms randomized, in eval mode."""
    timm = timm_module()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
    randomize_norms(model, seed)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    return model.eval(), size


def timm_reparameterize(model: nn.Module) -> tuple[nn.Module, float]:
    """timm's own reparameterization of a copy of `model`, and the seconds it took.

    (The new modules it builds draw their initial weights from the global RNG before being
    overwritten; the RNG's state is restored.)
    """
    timm_module()
    from timm.utils.model import reparameterize_model

    start = time.perf_counter()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        deployed = reparameterize_model(model, inplace=False)
    return deployed.eval(), time.perf_counter() - start


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


def exact_in_float64(model: nn.Module, x: torch.Tensor) -> dict:
    """Fuse a float64 copy with verification; also check timm's reparameterization in float64."""
    m64 = copy.deepcopy(model).double().eval()
    x64 = x.double()
    out: dict = {}
    with torch.no_grad():
        reference = m64(x64)
        try:
            fused = reparam.fuse(m64, x64, verify=True)
            out["ours_exact"] = True
            out["ours_rel_diff"] = _relative_difference(fused(x64), reference)
        except VerificationError as exc:
            out["ours_exact"] = False
            out["ours_rel_diff"] = exc.max_abs_diff / max(float(reference.abs().max()), 1e-300)
        try:  # some of timm's fuse() methods build float32 modules: bring them to float64
            deployed, _ = timm_reparameterize(m64)
            out["timm_rel_diff"] = _relative_difference(deployed.double()(x64), reference)
        except Exception as exc:
            out["timm_rel_diff"] = None
            out["timm_f64_error"] = f"{type(exc).__name__}: {first_line(exc)[:160]}"
    return out


def compare_family(family: str, name: str, *, repeats: int, warmup: int, max_seconds: float,
                   onnx: bool = False, onnx_profile: bool = False, seed: int = SEED,
                   size: int | None = None, log=print) -> dict:
    """Every figure of one family's row; raises on failure (the caller records the reason)."""
    model, input_size = build_timm(name, seed)
    if size is not None:
        input_size = tuple(input_size[:-2]) + (size, size)
    x = bench.random_input((1,) + input_size)
    row: dict = {"family": family, "model": name, "input_size": list(input_size)}
    row.update(exact_in_float64(model, x))

    with bench.quiet():
        fused = reparam.fuse(model, x, verify=False)
    row["fuse_s"] = float(fused.report.fuse_seconds or 0.0)
    deployed, row["timm_reparam_s"] = timm_reparameterize(model)
    with torch.no_grad():
        row["fp32_rel_diff_ours_vs_timm"] = _relative_difference(fused(x), deployed(x))
    row["params_unfused"] = sum(p.numel() for p in model.parameters())
    row["params_ours"] = sum(p.numel() for p in fused.parameters())
    row["params_timm"] = sum(p.numel() for p in deployed.parameters())
    calls = {label: bench.count_calls(m, x, functions=BATCH_NORM_FUNCTIONS)
             for label, m in (("unfused", model), ("ours", fused), ("timm", deployed))}
    for label, c in calls.items():
        row[f"bn_{label}"], row[f"conv_{label}"] = c["batch_norm"], c["conv"]
    row["refusals"] = len(fused.report.refusals)

    runners = {label: _eager(m, x) for label, m in (("ours", fused), ("timm", deployed))}
    samples = bench.time_paired(runners, repeats=repeats, warmup=warmup, max_seconds=max_seconds)
    row["eager_ms_ours"] = asdict(bench.spread(samples["ours"]))
    row["eager_ms_timm"] = asdict(bench.spread(samples["timm"]))
    row["eager_ratio"] = asdict(bench.paired_ratio(samples, "ours", "timm"))

    if onnx:
        row.update(compare_onnx({"ours": fused, "timm": deployed}, x, repeats=repeats,
                                warmup=warmup, max_seconds=max_seconds, profile=onnx_profile,
                                log=log))
    return row


def compare_onnx(modules: dict, x: torch.Tensor, *, repeats: int, warmup: int,
                 max_seconds: float, profile: bool = False, threads: int | None = None,
                 log=print) -> dict:
    """Export each module (fixed batch), count nodes, time them paired in ONNX Runtime.

    The first two modules are compared: ratio first/second, per round.
    """
    threads = threads or torch.get_num_threads()
    out: dict = {}
    labels = list(modules)
    with tempfile.TemporaryDirectory(prefix="reparam-bench-timm-") as folder:
        paths = {label: Path(folder) / f"{label}.onnx" for label in labels}
        for label, module in modules.items():
            ops = bench.export_onnx(module, x, paths[label], dynamic_batch=False)
            out[f"onnx_nodes_{label}"] = sum(ops.values())
            out[f"onnx_ops_{label}"] = ops
        sessions = {label: bench.onnx_session(paths[label], threads) for label in labels}
        feed = x.numpy()
        runners = {label: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed}))
                   for label, s in sessions.items()}
        samples = bench.time_paired(runners, repeats=repeats, warmup=warmup,
                                    max_seconds=max_seconds)
        for label in labels:
            out[f"ort_ms_{label}"] = asdict(bench.spread(samples[label]))
        out["ort_ratio"] = asdict(bench.paired_ratio(samples, labels[0], labels[1]))
        if profile:
            profiles = {label: bench.onnx_op_profile(paths[label], x, threads=threads,
                                                     runs=max(5, min(repeats, 50)))
                        for label in labels}
            out["onnx_profile"] = profiles
            log(f"ONNX Runtime time per operator type (ms per inference, batch {x.shape[0]}):")
            log(bench.format_op_profile(profiles))
    return out


def _eager(module: nn.Module, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            return module(x)

    return run


def _fmt_spread(d: dict | None) -> str:
    return bench.Spread(**d).format(3) if d else "-"


def _fmt_float(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def _delta(ours: int, timm: int) -> str:
    return f"{100.0 * (ours - timm) / timm:+.1f}%" if timm else "-"


def format_rows(rows: list[dict], onnx: bool) -> str:
    from reparam.report import format_table

    header = ["family", "model", "exact f64 (rel diff)", "timm f64 rel diff", "params ours",
              "params timm", "diff", "BN ours", "BN timm", "conv ours", "conv timm", "fuse() s",
              "eager ours/timm (p10-p90)"]
    if onnx:
        header += ["ONNX nodes ours", "ONNX nodes timm", "ORT ours/timm (p10-p90)"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["family"], r["model"], f"error: {r['error']}"] + [""] * (len(header) - 3))
            continue
        exact = f"{'yes' if r['ours_exact'] else 'NO'} ({r['ours_rel_diff']:.1e})"
        line = [r["family"], r["model"], exact, _fmt_float(r.get("timm_rel_diff")),
                f"{r['params_ours']:,}", f"{r['params_timm']:,}",
                _delta(r["params_ours"], r["params_timm"]), r["bn_ours"], r["bn_timm"],
                r["conv_ours"], r["conv_timm"], f"{r['fuse_s']:.2f}",
                _fmt_spread(r.get("eager_ratio"))]
        if onnx:
            line += [r.get("onnx_nodes_ours", "-"), r.get("onnx_nodes_timm", "-"),
                     _fmt_spread(r.get("ort_ratio"))]
        body.append(line)
    # the error column is the last one only when it is long; keep the table readable
    return format_table(header, body, wrap=200)


def summary(rows: list[dict], onnx: bool) -> list[str]:
    good = [r for r in rows if not r.get("error")]
    lines = []
    eager = [r["eager_ratio"]["median"] for r in good]
    if eager:
        lines.append(f"geometric mean of eager ours/timm over {_families(len(eager))}:"
                     f" {bench.geometric_mean(eager):.3f}")
    if onnx:
        ort = [r["ort_ratio"]["median"] for r in good if r.get("ort_ratio")]
        if ort:
            lines.append(f"geometric mean of ONNX Runtime ours/timm over {_families(len(ort))}:"
                         f" {bench.geometric_mean(ort):.3f}")
    misses = [f"{r['family']} ({_miss_reason(r)})" for r in good if _miss_reason(r)]
    if misses:
        lines.append("misses: " + "; ".join(misses))
    failed = [f"{r['family']}: {r['error']}" for r in rows if r.get("error")]
    if failed:
        lines.append("failed: " + "; ".join(failed))
    return lines


def _families(n: int) -> str:
    return f"{n} {'family' if n == 1 else 'families'}"


def _miss_reason(r: dict) -> str:
    reasons = []
    if not r["ours_exact"]:
        reasons.append("not exact in float64")
    if r["params_timm"] and r["params_ours"] > r["params_timm"] * 1.005:
        reasons.append(f"{_delta(r['params_ours'], r['params_timm'])} parameters")
    if r["bn_ours"] > r["bn_timm"]:
        reasons.append(f"{r['bn_ours'] - r['bn_timm']} more BatchNorms")
    if r["eager_ratio"]["median"] > 1.0:
        reasons.append(f"eager ratio {r['eager_ratio']['median']:.3f}")
    return ", ".join(reasons)


def run(families: dict, *, repeats: int, warmup: int, max_seconds: float, onnx: bool,
        onnx_profile: bool, seed: int = SEED, size: int | None = None, log=print,
        progress=None) -> list[dict]:
    rows = []
    for family, name in families.items():
        if progress:
            progress(f"{family} ({name})")
        start = time.perf_counter()
        try:
            row = compare_family(family, name, repeats=repeats, warmup=warmup,
                                 max_seconds=max_seconds, onnx=onnx, onnx_profile=onnx_profile,
                                 seed=seed, size=size, log=log)
        except Exception as exc:  # one family's failure is a row, not the end of the run
            row = {"family": family, "model": name,
                   "error": f"{type(exc).__name__}: {first_line(exc)[:160]}"}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if progress:
            outcome = (f"failed: {row['error']}" if row.get("error") else
                       f"exact {'yes' if row['ours_exact'] else 'NO'}, params"
                       f" {_delta(row['params_ours'], row['params_timm'])} vs timm, BatchNorms"
                       f" {row['bn_ours']} vs {row['bn_timm']}, eager ours/timm"
                       f" {row['eager_ratio']['median']:.3f}")
            progress(f"{family}: {outcome} ({row['seconds']:.0f} s)")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="families: " + ", ".join(
                                         f"{f} ({n})" for f, n in FAMILIES.items()))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), metavar="FAMILY",
                        help="families to compare (default: all)")
    parser.add_argument("--model", action="append", default=[], metavar="FAMILY=NAME",
                        help="use another timm variant for a family, e.g. fastvit=fastvit_t12")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--max-seconds", type=float, default=10.0,
                        help="time budget per comparison (default 10; at least 5 rounds)")
    parser.add_argument("--threads", type=int, default=None, help="torch/ORT intra-op threads")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input size instead of each variant's default")
    parser.add_argument("--onnx", action="store_true",
                        help="also export both forms to ONNX: node counts and ONNX Runtime ratio")
    parser.add_argument("--onnx-profile", action="store_true",
                        help="with --onnx: print ONNX Runtime's time per operator type")
    parser.add_argument("--json", metavar="OUT", help="write the rows as JSON to OUT")
    args = parser.parse_args(argv)

    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    families = {f: FAMILIES[f] for f in args.families}
    for spec in args.model:
        family, _, name = spec.partition("=")
        if family not in FAMILIES or not name:
            parser.error(f"--model {spec!r}: expected FAMILY=timm_name with a family from"
                         f" {', '.join(FAMILIES)}")
        families[family] = name
    try:
        timm = timm_module()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with bench.num_threads(args.threads) as threads:
        print(f"reparam.fuse vs timm {timm.__version__} reparameterize_model; torch"
              f" {torch.__version__}, {threads} threads, batch 1, seed {SEED}", flush=True)
        rows = run(families, repeats=args.repeats, warmup=args.warmup,
                   max_seconds=args.max_seconds, onnx=args.onnx or args.onnx_profile,
                   onnx_profile=args.onnx_profile, size=args.image_size,
                   progress=lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    onnx = args.onnx or args.onnx_profile
    print(format_rows(rows, onnx))
    print("BN/conv: calls that still run in one forward pass; ratios: median of per-round"
          " ratios, interleaved; exact f64: reparam.fuse verified in float64")
    for line in summary(rows, onnx):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": bench.machine_info(threads),
                                               "timm": timm.__version__, "rows": rows},
                                              indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(not r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
