"""FastViT before and after `reparam.fuse`: size, graph, fusion time and CPU latency.

    python benchmarks/bench_fastvit.py [--variants fastvit_t8 fastvit_t12 ...] [--repeats N]
                                       [--size 256] [--threads 2]

For each variant: parameters and MACs unfused and fused (from `fused.report`, parameters of the
unfused model also counted directly), graph nodes, the time `reparam.fuse(model, x, verify=False)`
takes (median of 3), and eager CPU latency at batch 1 for the unfused (eval) and fused models, measured in the
same run, interleaved (unfused, fused, unfused, ...), median of N, with their ratio.

Targets: fused/unfused latency <= 0.75 for fastvit_t12; fuse() < 1 s for t12 and < 3 s for ma36.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reparam  # noqa: E402
import reparam.models as models  # noqa: E402

DEFAULT_VARIANTS = ["fastvit_t8", "fastvit_t12", "fastvit_s12", "fastvit_sa12", "fastvit_sa24",
                    "fastvit_sa36", "fastvit_ma36"]


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, so both forms compute something realistic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _time_once(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def bench(name: str, repeats: int, size: int, warmup: int = 3) -> dict:
    torch.manual_seed(0)
    model = models.create(name)
    _randomize(model)
    model.eval()
    x = torch.randn(1, 3, size, size)

    with torch.inference_mode():
        model(x)  # first-call initialisation of the kernels is not fusion time
    fuse_times = []
    for _ in range(3):
        start = time.perf_counter()
        fused = reparam.fuse(model, x, verify=False)
        fuse_times.append(time.perf_counter() - start)
    fuse_s = statistics.median(fuse_times)
    report = fused.report

    with torch.inference_mode():
        diff = (fused(x) - model(x)).abs().max().item()
        for _ in range(warmup):
            model(x)
            fused(x)
        unfused_t, fused_t = [], []
        for _ in range(repeats):  # interleaved so both see the same machine state
            unfused_t.append(_time_once(model, x))
            fused_t.append(_time_once(fused, x))
    unfused_ms = statistics.median(unfused_t) * 1e3
    fused_ms = statistics.median(fused_t) * 1e3
    return dict(
        name=name,
        params_unfused=sum(p.numel() for p in model.parameters()),
        params_before=report.before.params, params_after=report.after.params,
        macs_before=report.before.macs, macs_after=report.after.macs,
        nodes_before=report.before.nodes, nodes_after=report.after.nodes,
        regions=len(report.regions), refusals=len(report.refusals),
        fuse_s=fuse_s, unfused_ms=unfused_ms, fused_ms=fused_ms, ratio=fused_ms / unfused_ms,
        max_abs_diff=diff,
    )


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _g(n: int) -> str:
    return f"{n / 1e9:.3f}G"


def print_table(rows: list[dict], size: int, repeats: int, threads: int) -> None:
    header = ["variant", "params", "params fused", "MACs", "MACs fused", "nodes", "nodes fused",
              "fuse() s", "unfused ms", "fused ms", "fused/unfused", "max |diff|"]
    body = [[r["name"], _m(r["params_unfused"]), _m(r["params_after"]), _g(r["macs_before"]),
             _g(r["macs_after"]), r["nodes_before"], r["nodes_after"], f"{r['fuse_s']:.2f}",
             f"{r['unfused_ms']:.1f}", f"{r['fused_ms']:.1f}", f"{r['ratio']:.3f}",
             f"{r['max_abs_diff']:.1e}"] for r in rows]
    cells = [header] + [[str(c) for c in row] for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"FastViT, batch 1, 3x{size}x{size}, float32 eager CPU, {threads} threads, "
          f"median of {repeats} interleaved runs; torch {torch.__version__}")
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        if r["params_before"] != r["params_unfused"]:
            print(f"note: {r['name']}: report.before.params {r['params_before']} != counted {r['params_unfused']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help=f"registered names (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per form (default 20)")
    parser.add_argument("--size", type=int, default=256, help="input height and width (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.variants:
        models.get_entry(name)  # fail early on a typo, with suggestions
    rows = []
    for name in args.variants:
        rows.append(bench(name, args.repeats, args.size))
        print(f"... {name} done", file=sys.stderr, flush=True)
    print_table(rows, args.size, args.repeats, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
