"""Regenerate docs/benchmarks.md and its plots: every figure measured on this machine, now.

    python benchmarks/make_docs.py                 # full run (over an hour on 2 idle cores)
    python benchmarks/make_docs.py --quick         # smoke test: tiny repeats, few models (minutes)
    python benchmarks/make_docs.py --models fastvit_t12 mobileone_s0   # a subset of the registered models
    python benchmarks/make_docs.py --threads 4 --gpu-json gpu_t12.json gpu_s0.json

Sections of the page:
1. the machine (CPU model, cores and threads used, torch / ONNX Runtime / timm versions, date)
   and the exact commands;
2. every registered model: parameters and MACs unfused vs fused, fuse() seconds, eager latency
   ratio fused/unfused at batch 1 and 8, ONNX Runtime ratio at batch 1, ONNX node counts;
3. timm side by side (when timm is installed): FastViT t8/t12/sa12 (reparam's own FastViT loaded
   with the timm model's weights, fused, against timm's `reparameterize_model` of that model) and
   every timm family of `bench_timm.py`, eager and ONNX Runtime, paired ratios;
4. the ONNX target: fastvit_t12 in ONNX Runtime, reparam's export vs timm's reparameterized
   export: ratio, node counts and ONNX Runtime's time per operator type;
5. a plot of eager latency against input resolution (224 to 512) for fastvit_t12 unfused, fused
   and timm-reparameterized;
6. a plot of fuse() time against graph size (the model builders of bench_fuse_scaling.py);
7. peak memory of fuse() (resident set size, sampled) for fastvit_ma36 and fastvit_mci4 against
   the bound 2 x the model's float32 size + the float64 copy of the largest fused kernel;
8. GPU tables from `reparam bench --device cuda --json` files given with --gpu-json.

Every latency comparison is paired: the forms compared run interleaved in one process on the same
input, and the ratio is taken per round (median, p10-p90). Needs matplotlib for the plots
(pip install "reparam[bench]") and timm for the side-by-side sections (pip install "reparam[timm]").
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import reparam  # noqa: E402
from reparam import bench  # noqa: E402
from reparam.errors import first_line  # noqa: E402
from reparam.optional import MissingExtra, require  # noqa: E402

SEED = 0
TIMM_FASTVIT = ["fastvit_t8", "fastvit_t12", "fastvit_sa12"]
ONNX_TARGET = ("fastvit_t12", 0.90)  # reparam's ONNX / timm's reparameterized ONNX, at most
MEMORY_MODELS = ["fastvit_ma36", "fastvit_mci4"]
RESOLUTIONS = [224, 256, 320, 384, 448, 512]
SCALING_BLOCKS = [10, 30, 100, 300, 600]


class Settings:
    def __init__(self, quick: bool):
        self.quick = quick
        self.repeats = 3 if quick else 20
        self.warmup = 1 if quick else 3
        self.max_seconds = 2.0 if quick else 6.0
        self.batch_sizes = (1, 8)
        self.models = None  # None: every registered model
        self.timm_fastvit = ["fastvit_t8"] if quick else TIMM_FASTVIT
        self.timm_families = ["repvgg"] if quick else None  # None: every family
        self.onnx_target = "fastvit_t8" if quick else ONNX_TARGET[0]
        self.resolution_model = "fastvit_t8" if quick else "fastvit_t12"
        self.resolutions = [224, 256] if quick else RESOLUTIONS
        self.scaling_blocks = [5, 20, 50] if quick else SCALING_BLOCKS
        self.memory_models = ["fastvit_t8"] if quick else MEMORY_MODELS
        if quick:
            self.models = ["fastvit_t8"]
        self.cache: dict = {}  # fastvit_vs_timm rows, shared by the timm and ONNX sections


# --------------------------------------------------------------------------------------------
# Markdown helpers
# --------------------------------------------------------------------------------------------


def md_table(header: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_spread(s) -> str:
    if s is None:
        return "-"
    if isinstance(s, dict):
        s = bench.Spread(**s)
    return s.format(3)


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def giga(n: int) -> str:
    return f"{n / 1e9:.3f}G"


def log(message: str) -> None:
    print(f"[make_docs {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def registered_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A registered model, seeded random weights, randomized BatchNorms, eval; its input."""
    import bench_timm
    import reparam.models as models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = models.create(name)
    bench_timm.randomize_norms(model, SEED)
    size = models.get_entry(name).input_size
    return model.eval(), bench.random_input((1,) + tuple(size))


def fastvit_pair(name: str, size: int | None = None):
    """timm's `name` (seeded, randomized BatchNorms) and reparam's FastViT with its weights.

    Returns (ours unfused, timm unfused, input, note).
    """
    import bench_timm
    import reparam.models as models
    from reparam.checkpoints import load_state

    timm_model, input_size = bench_timm.build_timm(name, SEED)
    if size is not None:
        input_size = tuple(input_size[:-2]) + (size, size)
    x = bench.random_input((1,) + tuple(input_size))
    entry = models.get_entry(name)
    ours = models.create(name)
    with bench.quiet():
        load_state(ours, timm_model.state_dict(), source=f"timm {name}",
                   convert=entry.convert_state_dict, family=entry.family, model_name=name)
    ours.eval()
    with torch.no_grad():
        a, b = ours(x), timm_model(x)
    diff = float((a - b).abs().max()) / float(b.abs().max())
    return ours, timm_model, x, f"same weights: max relative difference of the unfused models {diff:.1e}"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def section_models(st: Settings, threads: int) -> tuple[str, dict]:
    import reparam.models as models

    names = st.models or models.list_models()
    rows, data = [], {}
    for name in names:
        log(f"registered model {name}")
        try:
            model, x = registered_model(name)
            with bench.quiet():
                fused = reparam.fuse(model, x, verify=True)
            common = dict(repeats=st.repeats, warmup=st.warmup, max_seconds=st.max_seconds,
                          threads=threads, fused=fused, name=name)
            eager = bench.benchmark(model, x, batch_sizes=st.batch_sizes, runtimes=("eager",),
                                    **common)
            ort = bench.benchmark(model, x, batch_sizes=(1,), runtimes=("onnxruntime",), **common)
        except Exception as exc:
            rows.append([name, f"failed: {type(exc).__name__}: {first_line(exc)[:150]}"]
                        + [""] * 7)
            data[name] = {"error": first_line(exc)}
            continue
        by_batch = {r.batch: r for r in eager.rows}
        ort_row = ort.rows[0]
        rows.append([
            name, f"{millions(eager.unfused['params'])} → {millions(eager.fused['params'])}",
            f"{giga(eager.unfused['macs'])} → {giga(eager.fused['macs'])}",
            f"{eager.fuse_seconds:.2f}",
            fmt_spread(by_batch[1].ratio), fmt_spread(by_batch[st.batch_sizes[-1]].ratio),
            fmt_spread(ort_row.ratio) if ort_row.error is None else f"- ({ort_row.error})",
            f"{ort.onnx_nodes['unfused']} → {ort.onnx_nodes['fused']}" if ort.onnx_nodes else "-",
            f"{eager.max_abs_diff:.1e}" if eager.max_abs_diff is not None else "-"])
        data[name] = {"eager": eager.to_dict(), "onnxruntime": ort.to_dict()}
    b = st.batch_sizes[-1]
    text = md_table(["model", "params unfused → fused", "MACs unfused → fused (batch 1)",
                     "fuse() s", "eager fused/unfused, batch 1", f"eager fused/unfused, batch {b}",
                     "ONNX Runtime fused/unfused, batch 1", "ONNX nodes unfused → fused",
                     "max abs diff (verified)"], rows)
    text += ("\n\nRandom weights (seeded) with randomized BatchNorm statistics, each model's"
             " default input size; ratios are medians of per-round ratios with p10-p90 in"
             " parentheses (below 1: the fused model is faster). fuse() excludes verification."
             " The ONNX exporter and ONNX Runtime already fold a BatchNorm into the convolution"
             " before it, so the ONNX Runtime baseline is stronger than the eager one.")
    return text, data


def section_timm(st: Settings, threads: int) -> tuple[str, dict]:
    try:
        timm = require("timm", "the timm side-by-side section")
    except MissingExtra as exc:
        return f"timm is not installed here ({exc.install}); section skipped.", {}
    import bench_timm

    data: dict = {"timm": timm.__version__, "fastvit": {}, "families": []}
    rows = []
    for name in st.timm_fastvit:
        log(f"timm side by side: {name}")
        try:
            row = fastvit_vs_timm(name, st, threads, profile=name == st.onnx_target)
        except Exception as exc:
            rows.append([name, f"failed: {type(exc).__name__}: {first_line(exc)[:150]}"]
                        + [""] * 5)
            continue
        data["fastvit"][name] = row
        rows.append([name, fmt_spread(row["eager_fused_vs_timm"]),
                     fmt_spread(row["eager_fused_vs_unfused"]), fmt_spread(row.get("ort_ratio")),
                     f"{row.get('onnx_nodes_ours', '-')} vs {row.get('onnx_nodes_timm', '-')}",
                     f"{row['params_ours']:,} vs {row['params_timm']:,}"])
    text = ["### FastViT: reparam's model and fuse() against timm's reparameterize_model",
            "", md_table(["model", "eager reparam-fused / timm-reparameterized",
                          "eager reparam-fused / unfused", "ONNX Runtime reparam / timm",
                          "ONNX nodes reparam vs timm", "params reparam vs timm"], rows), "",
            "reparam's own FastViT (plain training form) loaded with the weights of the timm"
            " model, fused by `reparam.fuse`, against `timm.utils.model.reparameterize_model`"
            " of that timm model; batch 1, default input size (256).", ""]
    families = {f: bench_timm.FAMILIES[f] for f in (st.timm_families or bench_timm.FAMILIES)}
    log(f"timm families: {', '.join(families)}")
    frows = bench_timm.run(families, repeats=st.repeats, warmup=st.warmup,
                           max_seconds=min(st.max_seconds, 4.0), onnx=True, onnx_profile=False,
                           log=lambda m: None, progress=lambda m: log(f"timm family {m}"))
    data["families"] = frows
    text += ["### timm families: reparam.fuse of timm's own modules against their hand-written"
             " reparameterization", "",
             "Command: `python benchmarks/bench_timm.py --onnx` (same figures).", ""]
    text.append(families_table(frows))
    text += [""] + [f"- {line}" for line in bench_timm.summary(frows, onnx=True)]
    return "\n".join(text), data


def families_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["family"], r["model"], f"failed: {r['error']}"] + [""] * 6)
            continue
        body.append([r["family"], r["model"],
                     f"{'yes' if r['ours_exact'] else 'no'} ({r['ours_rel_diff']:.0e})",
                     f"{r['params_ours']:,} vs {r['params_timm']:,}",
                     f"{r['bn_ours']} vs {r['bn_timm']}", f"{r['fuse_s']:.2f}",
                     fmt_spread(r["eager_ratio"]), fmt_spread(r.get("ort_ratio")),
                     f"{r.get('onnx_nodes_ours', '-')} vs {r.get('onnx_nodes_timm', '-')}"])
    return md_table(["family", "timm variant", "exact in float64 (rel. diff)",
                     "params reparam vs timm", "BatchNorms left reparam vs timm", "fuse() s",
                     "eager reparam / timm", "ONNX Runtime reparam / timm",
                     "ONNX nodes reparam vs timm"], body)


def fastvit_vs_timm(name: str, st: Settings, threads: int, profile: bool = False) -> dict:
    import bench_timm

    cached = st.cache.get(name)
    if cached is not None and (cached.get("onnx_profile") or not profile):
        return cached

    ours, timm_model, x, note = fastvit_pair(name)
    with bench.quiet():
        fused = reparam.fuse(ours, x, verify=True)
    deployed, _ = bench_timm.timm_reparameterize(timm_model)
    runners = {label: _eager(m, x) for label, m in
               (("unfused", ours), ("fused", fused), ("timm", deployed))}
    samples = bench.time_paired(runners, repeats=st.repeats, warmup=st.warmup,
                                max_seconds=st.max_seconds * 1.5)
    row = {"note": note,
           "eager_fused_vs_timm": asdict(bench.paired_ratio(samples, "fused", "timm")),
           "eager_fused_vs_unfused": asdict(bench.paired_ratio(samples, "fused", "unfused")),
           "params_ours": sum(p.numel() for p in fused.parameters()),
           "params_timm": sum(p.numel() for p in deployed.parameters())}
    row.update(bench_timm.compare_onnx({"ours": fused, "timm": deployed}, x, repeats=st.repeats,
                                       warmup=st.warmup, max_seconds=st.max_seconds,
                                       profile=profile, threads=threads, log=lambda m: None))
    st.cache[name] = row
    return row


def section_onnx_target(st: Settings, threads: int) -> tuple[str, dict]:
    try:
        require("timm", "the ONNX target section")
    except MissingExtra as exc:
        return f"timm is not installed here ({exc.install}); section skipped.", {}
    name = st.onnx_target
    log(f"ONNX target: {name}, with ONNX Runtime profiles (measured with the timm section)")
    row = fastvit_vs_timm(name, st, threads, profile=True)
    ratio = row["ort_ratio"]["median"]
    target = ONNX_TARGET[1]
    nodes_ok = row["onnx_nodes_ours"] < row["onnx_nodes_timm"]
    verdict = ("meets" if ratio <= target and nodes_ok else "misses")
    text = [f"{name}, batch 1, 256x256, ONNX Runtime CPU ({threads} threads, all graph"
            " optimizations): reparam's export of the fused model against the export of timm's"
            " reparameterized model, same weights.", "",
            md_table(["", "reparam", "timm reparameterized"], [
                ["ONNX nodes", row["onnx_nodes_ours"], row["onnx_nodes_timm"]],
                ["latency ms (p10-p90)", fmt_spread(row["ort_ms_ours"]),
                 fmt_spread(row["ort_ms_timm"])]]), "",
            f"Paired ratio reparam / timm: **{fmt_spread(row['ort_ratio'])}**; target <="
            f" {target} with fewer nodes: {verdict}.", "",
            "ONNX Runtime's time per operator type (ms per inference, as executed after its graph"
            " optimizations; `nodes` counts executed kernels):", "",
            _profile_table(row["onnx_profile"]), "",
            "Operator counts in the files:", "",
            md_table(["op type", "reparam", "timm"], [
                [op, row["onnx_ops_ours"].get(op, 0), row["onnx_ops_timm"].get(op, 0)]
                for op in sorted(set(row["onnx_ops_ours"]) | set(row["onnx_ops_timm"]),
                                 key=lambda o: -(row["onnx_ops_ours"].get(o, 0)
                                                 + row["onnx_ops_timm"].get(o, 0)))])]
    return "\n".join(text), row


def _profile_table(profiles: dict) -> str:
    profiles = {{"ours": "reparam"}.get(k, k): v for k, v in profiles.items()}
    labels = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p},
                 key=lambda op: -max(p.get(op, {}).get("ms", 0.0) for p in profiles.values()))
    rows = []
    for op in ops:
        row = [op]
        for label in labels:
            e = profiles[label].get(op)
            row += [f"{e['ms']:.3f}", e["nodes"]] if e else ["-", "-"]
        rows.append(row)
    rows.append(["**total**"] + sum(([f"{sum(e['ms'] for e in profiles[lb].values()):.3f}",
                                      sum(e["nodes"] for e in profiles[lb].values())]
                                     for lb in labels), []))
    return md_table(["op type"] + sum(([f"{lb} ms", f"{lb} nodes"] for lb in labels), []), rows)


def section_resolution(st: Settings, threads: int, img: Path) -> tuple[str, dict]:
    plt = _pyplot()
    name = st.resolution_model
    have_timm = True
    try:
        require("timm", "the resolution plot")
    except MissingExtra:
        have_timm = False
    if have_timm:
        import bench_timm

        ours, timm_model, x, _ = fastvit_pair(name)
        deployed, _ = bench_timm.timm_reparameterize(timm_model)
    else:
        ours, x = registered_model(name)
        deployed = None
    with bench.quiet():
        fused = reparam.fuse(ours, x, verify=True)
    points = []
    for size in st.resolutions:
        log(f"resolution {size}")
        xs = bench.random_input((1, 3, size, size), size)
        forms = {"unfused": ours, "fused": fused}
        if deployed is not None:
            forms["timm reparameterized"] = deployed
        samples = bench.time_paired({k: _eager(m, xs) for k, m in forms.items()},
                                    repeats=st.repeats, warmup=st.warmup,
                                    max_seconds=st.max_seconds * 1.5)
        point = {"size": size, **{k: asdict(bench.spread(v)) for k, v in samples.items()},
                 "fused/unfused": asdict(bench.paired_ratio(samples, "fused", "unfused"))}
        if deployed is not None:
            point["fused/timm"] = asdict(bench.paired_ratio(samples, "fused",
                                                            "timm reparameterized"))
        points.append(point)
    forms = [k for k in ("unfused", "fused", "timm reparameterized") if k in points[0]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [p["size"] for p in points]
    for k in forms:
        med = [p[k]["median"] for p in points]
        err = [[p[k]["median"] - p[k]["p10"] for p in points],
               [p[k]["p90"] - p[k]["median"] for p in points]]
        ax.errorbar(sizes, med, yerr=err, marker="o", capsize=3, label=k)
    ax.set_xlabel("input resolution (square)")
    ax.set_ylabel("latency, ms (median, p10-p90)")
    ax.set_title(f"{name}, eager CPU, batch 1, {threads} threads")
    ax.legend()
    for key in ("fused/unfused", "fused/timm"):
        if key in points[0]:
            med = [p[key]["median"] for p in points]
            err = [[p[key]["median"] - p[key]["p10"] for p in points],
                   [p[key]["p90"] - p[key]["median"] for p in points]]
            bx.errorbar(sizes, med, yerr=err, marker="o", capsize=3, label=key)
    bx.axhline(1.0, color="grey", linewidth=0.8)
    bx.set_xlabel("input resolution (square)")
    bx.set_ylabel("paired latency ratio (median, p10-p90)")
    bx.set_title("ratios, per round")
    bx.legend()
    fig.tight_layout()
    path = img / "latency_vs_resolution.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    rows = [[p["size"]] + [fmt_spread(p[k]) for k in forms]
            + [fmt_spread(p.get("fused/unfused")), fmt_spread(p.get("fused/timm"))]
            for p in points]
    text = (f"![latency against resolution](img/{path.name})\n\n"
            + md_table(["resolution"] + [f"{k} ms" for k in forms]
                       + ["fused/unfused", "fused/timm"], rows)
            + f"\n\n{name} traced and fused once (at its default 256x256) and run at every"
              " resolution; the three forms run interleaved at each resolution.")
    return text, {"model": name, "points": points}


def section_scaling(st: Settings, img: Path) -> tuple[str, dict]:
    """fuse() time against graph size, on the model builders of bench_fuse_scaling.py."""
    import statistics

    import bench_fuse_scaling as scaling

    plt = _pyplot()
    builders = getattr(scaling, "BUILDERS", None) or {"RepVGG-like blocks": scaling.make_model}
    channels, size = 16, 32
    series: dict = {}
    for label, build in builders.items():
        points = []
        for blocks in st.scaling_blocks:
            log(f"fuse scaling: {label}, {blocks} blocks")
            model = build(blocks, channels)
            x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
            times, nodes = [], 0
            for _ in range(1 if st.quick else 3):
                start = time.perf_counter()
                fused = reparam.fuse(model, x, verify=False)
                times.append(time.perf_counter() - start)
                nodes = fused.report.before.nodes
            points.append({"blocks": blocks, "nodes": nodes, "seconds": statistics.median(times)})
        series[label] = points
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = []
    for label, points in series.items():
        xs = [p["nodes"] for p in points]
        ys = [p["seconds"] for p in points]
        ax.plot(xs, ys, marker="o", label=label)
        slope = ys[-1] / xs[-1] if xs[-1] else 0.0
        ax.plot([0, xs[-1]], [0, slope * xs[-1]], linestyle=":", color="grey")
        rows += [[label, p["blocks"], p["nodes"], f"{p['seconds']:.3f}",
                  f"{p['seconds'] / p['nodes'] * 1e6:.0f}"] for p in points]
    ax.set_xlabel("graph nodes before fusion")
    ax.set_ylabel("fuse() seconds (verify=False)")
    ax.set_title("fuse() time against graph size (dotted: linear through the largest)")
    ax.legend()
    fig.tight_layout()
    path = img / "fuse_scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    text = (f"![fuse() time against graph size](img/{path.name})\n\n"
            + md_table(["model", "blocks", "nodes", "fuse() s", "µs per node"], rows)
            + f"\n\nModels from `benchmarks/bench_fuse_scaling.py`, {channels} channels, input"
              f" 1x{channels}x{size}x{size}, wall time of `reparam.fuse(model, x, verify=False)`"
              " (median of 3). Constant microseconds per node = linear growth.")
    return text, series


def section_memory(st: Settings) -> tuple[str, dict]:
    import reparam.models as models

    rows, data = [], {}
    registered = set(models.list_models())
    skipped = [n for n in st.memory_models if n not in registered]
    for name in st.memory_models:
        if name not in registered:
            continue
        log(f"peak memory of fuse(): {name}")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-probe",
                               name], capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        try:
            r = json.loads(line)
        except ValueError:
            rows.append([name, f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"]
                        + [""] * 5)
            continue
        data[name] = r
        within = r["peak_bytes"] <= r["bound_bytes"]
        rows.append([name, f"{r['model_bytes'] / 2**20:.0f}", f"{r['largest_kernel_f64_bytes'] / 2**20:.1f}",
                     f"{r['peak_bytes'] / 2**20:.0f}", f"{r['bound_bytes'] / 2**20:.0f}",
                     f"{r['peak_bytes'] / r['bound_bytes']:.2f}", "yes" if within else "**no**"])
    text = md_table(["model", "model float32 MB", "largest fused kernel, float64 MB",
                     "peak extra RSS during fuse() MB", "bound MB", "peak / bound", "within"],
                    rows)
    text += ("\n\nPeak resident set size during `reparam.fuse(model, x, verify=False)` above the"
             " size just before it (the kernel's high-water mark, reset just before, where Linux has one;"
             " else sampled every millisecond; in a fresh process, after a"
             " warm-up fusion of a small model and one forward pass, and after returning freed"
             " memory to the system),"
             " against the bound 2 x the model's float32 size + the float64 copy of the largest"
             " fused kernel. The peak includes the activations of the shape-propagation pass on"
             " the example input (batch 1, default size).")
    if skipped:
        text += f" Not registered here, skipped: {', '.join(skipped)}."
    return text, data


def memory_probe(name: str) -> dict:
    """Run in a fresh process: peak RSS above the baseline while fusing a registered model."""
    model, x = registered_model(name)
    model_bytes = sum(t.numel() * 4 for t in list(model.parameters()) + list(model.buffers())
                      if t.is_floating_point())
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    # Code loaded and caches filled on first use are not fuse()'s memory: fuse a small model and
    # run the model once first (what they free is returned to the system below).
    warm = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    reparam.fuse(warm, torch.randn(1, 3, 8, 8), verify=False)
    with torch.no_grad():
        model(x)
    del warm
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = rss()
    peak = [baseline]
    # The kernel's own high-water mark sees every allocation (torch's included, which tracemalloc
    # misses) and no spike slips between samples: reset it here and read it after fuse().
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fused = reparam.fuse(model, x, verify=False)
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], rss())
    if hwm_reset:
        with open("/proc/self/status") as f:
            hwm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
        peak[0] = max(peak[0], hwm)
    largest = max((m.weight.numel() for m in fused.modules()
                   if isinstance(m, nn.modules.conv._ConvNd)), default=0) * 8
    return {"model": name, "model_bytes": model_bytes, "largest_kernel_f64_bytes": largest,
            "baseline_bytes": baseline, "peak_bytes": peak[0] - baseline,
            "bound_bytes": 2 * model_bytes + largest,
            "fuse_seconds": fused.report.fuse_seconds}


def section_gpu(files: list[str]) -> tuple[str, dict]:
    if not files:
        return ("No GPU table: no GPU was used for this page. On a machine with one, run for"
                " example\n\n```\nreparam bench fastvit_t12 --device cuda --dtype float16"
                " --channels-last --batch-size 1 64 --runtime eager,compile --json"
                " gpu_t12_fp16.json\n```\n\nand pass the JSON files with `--gpu-json`."), {}
    rows, data = [], {}
    for f in files:
        r = json.loads(Path(f).read_text())
        data[f] = r
        gpu = r.get("machine", {}).get("gpu", r.get("device"))
        for row in r["rows"]:
            rows.append([r["model"], gpu, r.get("machine", {}).get("date", "?"), r["dtype"],
                         "yes" if r["channels_last"] else "no", row["runtime"], row["batch"],
                         fmt_spread(row["unfused_ms"]), fmt_spread(row["fused_ms"]),
                         fmt_spread(row["ratio"]) if not row.get("error") else row["error"]])
    return md_table(["model", "device", "date", "dtype", "channels_last", "runtime", "batch",
                     "unfused ms", "fused ms", "fused/unfused"], rows), data


# --------------------------------------------------------------------------------------------


def _eager(module: nn.Module, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            return module(x)

    return run


def _pyplot():
    matplotlib = require("matplotlib", "benchmarks/make_docs.py (plots)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine_section(threads: int, command: str, st: Settings) -> str:
    info = bench.machine_info(threads)
    versions = [f"torch {info['torch']}"]
    if "onnxruntime" in info:
        versions.append(f"onnxruntime {info['onnxruntime']}")
    with contextlib.suppress(Exception):
        versions.append(f"timm {require('timm', 'versions').__version__}")
    rows = [["CPU", info["cpu"]],
            ["cores", f"{info['cores_available']} available to this process"
                      f" ({info['logical_cores']} logical on the machine);"
                      f" {threads} threads used by PyTorch and ONNX Runtime"],
            ["load average at start", ", ".join(str(v) for v in info.get("load_average", []))],
            ["software", f"Python {info['python']}, " + ", ".join(versions)],
            ["OS", info["os"]], ["date", info["date"]]]
    if info.get("gpu"):
        rows.append(["GPU", info["gpu"]])
    commands = [command,
                f"reparam bench fastvit_t12 --batch-size 1 8 --threads {threads}"
                "   # one model, from the command line",
                "python benchmarks/bench_timm.py --onnx   # the timm table alone"]
    return (md_table(["", ""], rows) + "\n\nCommands:\n\n```\n" + "\n".join(commands)
            + "\n```\n\nSettings: " + f"up to {st.repeats} timed rounds per comparison, fewer"
            f" when its {st.max_seconds:g} s budget runs out (but at least"
            f" {min(st.repeats, bench.MIN_ROUNDS)}), after {st.warmup} warm-up rounds.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny repeats, one model per section (figures are not"
                             " meaningful)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"),
                        help="the page to write (plots go to img/ beside it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: all cores available to the process)")
    parser.add_argument("--gpu-json", nargs="*", default=[], metavar="FILE",
                        help="`reparam bench --device cuda --json` outputs to tabulate")
    parser.add_argument("--json", metavar="OUT", help="also write every figure as JSON")
    parser.add_argument("--models", nargs="+", metavar="NAME", default=None,
                        help="registered models for the models section (default: every one; a full"
                             " run takes over an hour on 2 cores)")
    parser.add_argument("--memory-probe", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_probe:
        torch.set_num_threads(args.threads or 1)
        print(json.dumps(memory_probe(args.memory_probe)))
        return 0

    st = Settings(args.quick)
    from reparam import models
    if args.models:
        unknown = sorted(set(args.models) - set(models.list_models()))
        if unknown:
            parser.error(f"--models: not registered: {', '.join(unknown)} (see `reparam list`)")
        st.models = list(args.models)
    out = Path(args.out).resolve()
    img = out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    _pyplot()  # fail early when matplotlib is missing
    threads = args.threads or len(os.sched_getaffinity(0))
    command = "python benchmarks/make_docs.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    sections: list[tuple[str, str]] = []
    figures: dict = {}
    failed = []
    with bench.num_threads(threads):
        sections.append(("Machine and commands", machine_section(threads, command, st)))
        plan = [
            ("Registered models: unfused against fused", "models",
             lambda: section_models(st, threads)),
            ("timm side by side", "timm", lambda: section_timm(st, threads)),
            ("ONNX target: reparam's export against timm's reparameterized export", "onnx_target",
             lambda: section_onnx_target(st, threads)),
            ("Latency against input resolution", "resolution",
             lambda: section_resolution(st, threads, img)),
            ("fuse() time against graph size", "scaling", lambda: section_scaling(st, img)),
            ("Peak memory of fuse()", "memory", lambda: section_memory(st)),
            ("GPU", "gpu", lambda: section_gpu(args.gpu_json)),
        ]
        for title, key, make in plan:
            t0 = time.perf_counter()
            try:
                text, data = make()
            except Exception as exc:
                traceback.print_exc()
                failed.append(title)
                text, data = f"Not generated: {type(exc).__name__}: {first_line(exc)[:200]}", {}
            seconds = time.perf_counter() - t0
            figures[key] = data
            sections.append((title, text + f"\n\n<sub>section generated in {seconds:.0f} s</sub>"))
            log(f"{title}: {seconds:.0f} s")
    total = time.perf_counter() - started
    head = ["# Benchmarks", "",
            f"Generated by `{command}` in {total / 60:.1f} minutes; do not edit by hand, run the"
            " command again. Every comparison is a paired ratio: the forms compared run"
            " interleaved in one process on the same input, the ratio is taken per round, and the"
            " table gives its median with the 10th-90th percentiles in parentheses.", ""]
    if st.quick:
        head += ["> **Quick mode (smoke test).** Tiny repeats, one model per section, on a machine"
                 " that may be busy: these figures show the page's layout, not reparam's"
                 " performance. Run `python benchmarks/make_docs.py` on an idle machine for"
                 " real figures.", ""]
    if args.models:
        head += [f"> **Subset.** The models section covers {len(st.models)} of the"
                 f" {len(models.list_models())} registered models; run without `--models` for all"
                 " of them.", ""]
    body = head + sum(([f"## {title}", "", text, ""] for title, text in sections), [])
    out.write_text("\n".join(body).rstrip() + "\n", encoding="utf-8")
    log(f"wrote {out} in {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    if failed:
        log(f"sections that failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
