"""Every registered model before and after `reparam.fuse`: size, fusion time and CPU latency.

    python benchmarks/bench_models.py [--models NAME|PATTERN ...] [--repeats 20] [--batch-size 1]
                                      [--threads 2] [--size S] [--json results.json]

For each model (default: all of `reparam.models.list_models()`; names or shell patterns such as
'repvgg_*'), at its registered input size:
- parameters and MACs unfused and fused (from `fused.report`; unfused parameters also counted
  directly), and the number of fused regions and refusals;
- `reparam.fuse(model, x, verify=False)` seconds, median of `--fuse-repeats` after a warm-up run
  of the model;
- eager float32 CPU latency of the unfused (eval) and the fused model, measured as pairs: each
  repeat times both, in alternating order, so that both see the same machine state; the ratio
  fused/unfused is computed per pair and reported as median and 10th-90th percentiles, next to
  the median milliseconds of each form;
- max |fused - unfused| on the benchmark input, as a sanity check.

Targets (2 threads): fused/unfused <= 0.75 for fastvit_t12; fuse() < 1 s for fastvit_t12 and
< 3 s for fastvit_ma36.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reparam  # noqa: E402
import reparam.models as models  # noqa: E402
from reparam.report import format_table  # noqa: E402


def select_models(patterns: list[str] | None) -> list[str]:
    """Registered names matching names or shell patterns, in the order given; unknown names fail
    with the registry's suggestions."""
    available = models.list_models()
    if not patterns:
        return available
    chosen: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = fnmatch.filter(available, pattern)
            if not matches:
                raise SystemExit(f"no registered model matches {pattern!r}")
        else:
            try:
                models.get_entry(pattern)
            except reparam.InputError as exc:  # names close matches
                raise SystemExit(str(exc)) from None
            matches = [pattern]
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def randomize_statistics(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, so both forms compute realistic values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _seconds(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    """(p10, median, p90)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], statistics.median(values), deciles[-1]


def bench(name: str, *, repeats: int, batch_size: int, size: int | None, fuse_repeats: int,
          warmup: int = 3) -> dict:
    entry = models.get_entry(name)
    shape = (batch_size,) + tuple(entry.input_size)
    if size is not None:
        shape = shape[:2] + (size,) * (len(shape) - 2)
    torch.manual_seed(0)
    model = models.create(name)
    randomize_statistics(model)
    model.eval()
    x = torch.randn(shape)

    with torch.inference_mode():
        model(x)  # first-call set-up of the kernels is not fusion time
    fuse_times = []
    for _ in range(max(1, fuse_repeats)):
        start = time.perf_counter()
        fused = reparam.fuse(model, x, verify=False)
        fuse_times.append(time.perf_counter() - start)
    report = fused.report

    with torch.inference_mode():
        expected = model(x)
        diff = (fused(x) - expected).abs().max().item()
        for _ in range(warmup):
            model(x)
            fused(x)
        unfused_s, fused_s, ratios = [], [], []
        for i in range(repeats):
            if i % 2 == 0:
                a, b = _seconds(model, x), _seconds(fused, x)
            else:
                b, a = _seconds(fused, x), _seconds(model, x)
            unfused_s.append(a)
            fused_s.append(b)
            ratios.append(b / a)
    p10, median, p90 = _percentiles(ratios)
    return dict(
        name=name, input_shape=list(shape),
        params_unfused=sum(p.numel() for p in model.parameters()),
        params_before=report.before.params, params_fused=report.after.params,
        macs_unfused=report.before.macs, macs_fused=report.after.macs,
        regions=len(report.regions), refusals=len(report.refusals),
        fuse_s=statistics.median(fuse_times),
        unfused_ms=statistics.median(unfused_s) * 1e3, fused_ms=statistics.median(fused_s) * 1e3,
        ratio_median=median, ratio_p10=p10, ratio_p90=p90,
        max_abs_diff=diff, max_abs_output=expected.abs().max().item(),
    )


def print_table(rows: list[dict], meta: dict) -> None:
    header = ["model", "input", "params", "fused", "GMACs", "fused", "fuse() s", "unfused ms",
              "fused ms", "fused/unfused", "p10-p90", "max |diff|"]
    body = [[r["name"], "x".join(map(str, r["input_shape"][1:])),
             f"{r['params_unfused'] / 1e6:.2f}M", f"{r['params_fused'] / 1e6:.2f}M",
             f"{r['macs_unfused'] / 1e9:.3f}", f"{r['macs_fused'] / 1e9:.3f}", f"{r['fuse_s']:.2f}",
             f"{r['unfused_ms']:.1f}", f"{r['fused_ms']:.1f}", f"{r['ratio_median']:.3f}",
             f"{r['ratio_p10']:.3f}-{r['ratio_p90']:.3f}", f"{r['max_abs_diff']:.1e}"] for r in rows]
    print(f"batch {meta['batch_size']}, float32 eager CPU, {meta['threads']} threads, "
          f"{meta['repeats']} interleaved pairs per model; torch {meta['torch']}")
    print(format_table(header, body, right_align=True))
    for r in rows:
        if r["params_before"] != r["params_unfused"]:
            print(f"note: {r['name']}: report.before.params {r['params_before']:,} != counted "
                  f"{r['params_unfused']:,}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="registered names or shell patterns (default: every registered model)")
    parser.add_argument("--repeats", type=int, default=20, help="timed pairs per model (default 20)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--size", type=int, default=None,
                        help="input height and width (default: each model's registered size)")
    parser.add_argument("--fuse-repeats", type=int, default=3,
                        help="fuse() runs per model, the median is reported (default 3)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--repeats, --batch-size and --threads must be at least 1")
    names = select_models(args.models)

    torch.set_num_threads(args.threads)
    meta = dict(torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), processor=platform.processor(), threads=args.threads,
                batch_size=args.batch_size, repeats=args.repeats, fuse_repeats=args.fuse_repeats)
    rows = []
    for name in names:
        rows.append(bench(name, repeats=args.repeats, batch_size=args.batch_size, size=args.size,
                          fuse_repeats=args.fuse_repeats))
        print(f"... {name} done", file=sys.stderr, flush=True)
        gc.collect()  # the largest models hold gigabytes; free one before building the next
    print_table(rows, meta)
    if args.json:
        args.json.write_text(json.dumps(dict(meta, models=rows), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
