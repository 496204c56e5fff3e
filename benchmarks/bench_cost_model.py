"""Measure the constants of reparam's cost model on this machine.

The fusion rules compare the cost of one fused convolution with the cost of the operations it
replaces. That cost (`reparam.affine.CostModel`) is a linear estimate of CPU latency:

    time(op) = overhead + mac * multiply-accumulates + mac_grouped * (MACs of grouped convs)
               + byte * (bytes read and written: input, output and weights)

This script times depthwise and dense convolutions of several kernel sizes, BatchNorm, average
pooling and elementwise additions on the CPU (float32, eager, no grad), fits the four constants by
non-negative least squares on the relative error, and prints the measurements beside the model's
prediction. Copy the fitted constants into `DEFAULT_COST` in `reparam/affine.py` (its docstring says
where they came from).

    python benchmarks/bench_cost_model.py                # full run (about a minute)
    python benchmarks/bench_cost_model.py --quick        # smoke run: tiny sizes, few repeats
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F


def _time(fn, repeats: int, inner: int) -> float:
    """Median seconds per call over `repeats` batches of `inner` calls."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def cases(quick: bool):
    """(name, features, callable) where features = (macs, grouped macs, bytes)."""
    sizes = [(16, 14)] if quick else [(32, 56), (64, 28), (128, 28), (256, 14)]
    kernels = [1, 3] if quick else [1, 3, 5, 7]
    for c, hw in sizes:
        x = torch.randn(1, c, hw, hw)
        n = x.numel()
        for k in kernels:
            for groups, label in ((c, "dw"), (1, "dense")):
                if label == "dense" and k > 3 and c > 64:
                    continue
                w = torch.randn(c, c // groups, k, k)
                macs = n * (c // groups) * k * k
                feats = (0.0 if groups > 1 else macs, macs if groups > 1 else 0.0, 4.0 * (2 * n + w.numel()))
                yield (f"{label} {k}x{k} C={c} {hw}x{hw}", feats,
                       lambda x=x, w=w, k=k, g=groups: F.conv2d(x, w, None, 1, k // 2, 1, g))
            if k > 1:
                w = torch.randn(c, 1, 1, k)
                macs = n * k
                yield (f"dw 1x{k} C={c} {hw}x{hw}", (0.0, macs, 4.0 * (2 * n + w.numel())),
                       lambda x=x, w=w, k=k, c=c: F.conv2d(x, w, None, 1, (0, k // 2), 1, c))
        mean, var = torch.randn(c), torch.rand(c) + 0.5
        yield (f"batch_norm C={c} {hw}x{hw}", (0.0, float(n), 4.0 * (2 * n + 4 * c)),
               lambda x=x, m=mean, v=var: F.batch_norm(x, m, v, None, None, False, 0.0, 1e-5))
        y = torch.randn_like(x)
        yield f"add C={c} {hw}x{hw}", (0.0, 0.0, 4.0 * 3 * n), lambda x=x, y=y: x + y
        yield (f"avg_pool 3x3 C={c} {hw}x{hw}", (0.0, 9.0 * n, 4.0 * 2 * n),
               lambda x=x: F.avg_pool2d(x, 3, 1, 1))


def fit(rows):
    """Non-negative least squares for (overhead, mac, mac_grouped, byte), relative error."""
    a = torch.tensor([[1.0, *f] for _, f, _ in rows], dtype=torch.float64)
    t = torch.tensor([s for _, _, s in rows], dtype=torch.float64)
    a_rel = a / t[:, None]  # minimise sum ((pred - t) / t)^2
    b = torch.ones_like(t)
    active = list(range(a.shape[1]))
    while True:
        sol = torch.linalg.lstsq(a_rel[:, active], b[:, None]).solution.reshape(-1)
        if (sol >= 0).all() or not active:
            break
        active.pop(int(sol.argmin()))
    coef = torch.zeros(a.shape[1], dtype=torch.float64)
    coef[active] = sol
    return coef, a @ coef


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, inner = (3, 2) if args.quick else (7, 10)
    rows = []
    with torch.no_grad():
        for name, feats, fn in cases(args.quick):
            rows.append((name, feats, _time(fn, repeats, inner)))
    coef, pred = fit(rows)
    print(f"{'operation':32s} {'measured us':>12s} {'model us':>10s}")
    for (name, _, t), p in zip(rows, pred.tolist()):
        print(f"{name:32s} {t * 1e6:12.1f} {p * 1e6:10.1f}")
    err = [abs(p - t) / t for (_, _, t), p in zip(rows, pred.tolist())]
    print(f"\nmedian relative error {statistics.median(err):.2f}, worst {max(err):.2f}")
    names = ("overhead", "mac", "mac_grouped", "byte")
    print("fitted constants (seconds): " + ", ".join(f"{n}={v:.3g}" for n, v in zip(names, coef.tolist())))
    ratio = {n: v / coef[1].item() if coef[1] > 0 else math.nan for n, v in zip(names, coef.tolist())}
    print("in MAC units:               " + ", ".join(f"{n}={v:.3g}" for n, v in ratio.items()))


if __name__ == "__main__":
    main()
