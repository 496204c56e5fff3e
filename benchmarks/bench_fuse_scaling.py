"""How `reparam.fuse` scales with the size of the graph.

    python benchmarks/bench_fuse_scaling.py [--family repvgg|mobileone|repvgg-a0]
        [--blocks 10 30 100 300] [--repeats 3] [--profile] [--cpu-time]

Families (few channels and a small input, so that running the model costs next to nothing and the
time is the compiler's):

* `repvgg`: stacks of N RepVGG-like blocks (3x3 conv+BN, 1x1 conv+BN, BN skip, summed, then ReLU);
* `mobileone`: stacks of N MobileOne-S0-style blocks written the way model libraries write them:
  a BatchNormAct-style norm that reads its own parameters in `forward` (`F.batch_norm(x,
  self.running_mean, ..., self.weight, self.bias, ...)`, a shape assert, an Identity act), four
  kxk branches summed in place over a ModuleList (`out += conv(x)`), a 1x1 scale branch, a BN
  skip, a layer scale read in forward (`self.gamma * out`) and an in-place ReLU; depthwise 3x3
  and pointwise 1x1 blocks alternate. About 60 graph nodes a block: 50 blocks is ~3,000 nodes.
  torch.fx's default attribute look-up makes tracing such modules quadratic;
* `repvgg-a0`: RepVGG-A0's layout (stages of 1, 2, 4, 14, 1 blocks, the first of each strided),
  widths divided by `--width-divisor`; N is ignored (one size);
* any model of `reparam.models` (`--family fastvit_t12`, `fastvit_ma36`, ...): the model at its
  full width on a 1x3x224x224 input (`--size`); N is ignored (one size). Here running the model
  (the `shapes` column) is part of the time.

For each N it measures `reparam.fuse(model, x, verify=False)` (median wall time of `--repeats`
runs) and the graph size before fusion (`fused.report.before.nodes`), and prints:

    blocks | nodes | fuse seconds | microseconds per node | phases (trace, shapes, rewrite, fold, forms,
    lower, checks, copy, count; "other" is the rest: GraphModule construction, recompile, report)

where "rewrite" is the rewrites before the linear-form pass (`fill_borders`, `functionalize`,
`distribute_linear_maps`), "forms" the linear-form pass (its set-up included) and "checks" the
clean-up of metadata reads and rank checks after lowering (`deduplicate_metadata_checks`,
`drop_implied_rank_checks`).

then the ratio of the per-node time at the largest size to the smallest (1.0 = linear) and whether
the family's target is met (`TARGETS`: RepVGG-like 1,000 nodes in 0.5 s, MobileOne-style 3,000
nodes in 1 s, RepVGG-A0 in 0.3 s, fastvit_t12 in 0.2 s, fastvit_ma36 in 0.8 s; on an idle
machine). The phase breakdown times the pipeline's steps by wrapping the functions `reparam.fuse`
calls (in this process only). `--cpu-time` measures the CPU time of this process
(`time.process_time`) instead of wall time: comparable between runs on a busy machine, where wall
times are not (targets are for wall time on an idle machine). With `--profile` (or when the target is missed) it prints
cProfile's top 10 functions by cumulative time for the largest N.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import math
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reparam  # noqa: E402
import reparam.models  # noqa: E402

fuse_module = importlib.import_module("reparam.pipeline")

# (graph nodes, seconds) each family should fuse in on an idle machine; None: the one size measured
TARGETS = {"repvgg": (1000, 0.5), "mobileone": (3000, 1.0), "repvgg-a0": (None, 0.3),
           "fastvit_t12": (None, 0.2), "fastvit_ma36": (None, 0.8)}
TOY_FAMILIES = ["repvgg", "mobileone", "repvgg-a0"]


def registered(family: str) -> bool:
    """Is `family` a model of `reparam.models` (fused once, at `--image-size`, with 3 channels)?"""
    return family not in TOY_FAMILIES


class RepVGGBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.skip = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.skip(x))


class BatchNormAct(nn.BatchNorm2d):
    """A norm as model libraries write it: reads its own parameters in forward, asserts the rank."""

    def __init__(self, c: int):
        super().__init__(c)
        self.act = nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class ConvNorm(nn.Module):
    def __init__(self, ci: int, co: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(ci, co, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct(co)

    def forward(self, x):
        return self.bn(self.conv(x))


class MobileOneStyleBlock(nn.Module):
    def __init__(self, c: int, k: int, depthwise: bool, branches: int = 4):
        super().__init__()
        groups = c if depthwise else 1
        self.identity = BatchNormAct(c)
        self.conv_scale = ConvNorm(c, c, 1, groups=groups) if k > 1 else None
        self.conv_kxk = nn.ModuleList(ConvNorm(c, c, k, groups=groups) for _ in range(branches))
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.identity(x)
        if self.conv_scale is not None:
            out += self.conv_scale(x)
        for conv in self.conv_kxk:
            out += conv(x)
        return self.act(self.gamma * out)


class RepVGGA0Block(nn.Module):
    def __init__(self, ci: int, co: int, stride: int):
        super().__init__()
        self.kxk = ConvNorm(ci, co, 3, stride)
        self.pw = ConvNorm(ci, co, 1, stride)
        self.skip = nn.BatchNorm2d(co) if ci == co and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.kxk(x) + self.pw(x)
        if self.skip is not None:
            out = out + self.skip(x)
        return self.act(out)


def make_repvgg_a0(width_divisor: int) -> nn.Module:
    layers, widths = (1, 2, 4, 14, 1), (48, 48, 96, 192, 1280)
    blocks, ci = [], 3
    for n, w in zip(layers, widths):
        co = max(4, w // width_divisor)
        for i in range(n):
            blocks.append(RepVGGA0Block(ci, co, 2 if i == 0 else 1))
            ci = co
    return nn.Sequential(*blocks)


def make_model(blocks: int, channels: int, family: str = "repvgg", width_divisor: int = 8) -> nn.Module:
    if registered(family):
        torch.manual_seed(0)
        model = reparam.models.create(family)
    elif family == "mobileone":
        model = nn.Sequential(*[MobileOneStyleBlock(channels, 3 if i % 2 == 0 else 1, depthwise=i % 2 == 0)
                                for i in range(blocks)])
    elif family == "repvgg-a0":
        model = make_repvgg_a0(width_divisor)
    else:
        model = nn.Sequential(*[RepVGGBlock(channels) for _ in range(blocks)])
    g = torch.Generator().manual_seed(blocks)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics; weights keep activations bounded
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.fill_(0.4)
    return model.eval()


# -- phase timers ------------------------------------------------------------------------------

PHASES = {  # attribute of reparam.pipeline -> column name
    "_private_copy": "copy",
    "_run_reference": "reference",
    "trace": "trace",
    "propagate_shapes": "shapes",
    "fold_constants": "fold",
    "lower_forms": "lower",
    "counts": "count",
    "count_macs": "count",
    "count_params": "count",
    "fill_borders": "rewrite",
    "functionalize": "rewrite",
    "distribute_linear_maps": "rewrite",
    "deduplicate_metadata_checks": "checks",
    "drop_implied_rank_checks": "checks",
}


clock = time.perf_counter  # time.process_time with --cpu-time


class PhaseTimer:
    """Wraps the functions `reparam.fuse` calls and sums their time per phase."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._saved = {}

    def _wrap(self, fn, phase):
        def timed(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[phase] += clock() - start
        return timed

    def __enter__(self):
        for attr, phase in PHASES.items():
            fn = getattr(fuse_module, attr, None)
            if fn is not None:
                self._saved[attr] = fn
                setattr(fuse_module, attr, self._wrap(fn, phase))
        cls = fuse_module.LinearFormPass
        self._saved_run, self._saved_init = cls.run, cls.__init__
        cls.run = self._wrap(cls.run, "forms")
        cls.__init__ = self._wrap(cls.__init__, "forms")
        return self

    def __exit__(self, *exc):
        for attr, fn in self._saved.items():
            setattr(fuse_module, attr, fn)
        fuse_module.LinearFormPass.run = self._saved_run
        fuse_module.LinearFormPass.__init__ = self._saved_init


# -- measurement -------------------------------------------------------------------------------

def measure(blocks: int, channels: int, size: int, repeats: int, family: str = "repvgg", width_divisor: int = 8):
    model = make_model(blocks, channels, family, width_divisor)
    x = torch.randn(1, 3 if family == "repvgg-a0" or registered(family) else channels, size, size)
    times, phases = [], []
    fused = None
    for _ in range(repeats):
        with PhaseTimer() as timer:
            start = clock()
            fused = reparam.fuse(model, x, verify=False)
            times.append(clock() - start)
        phases.append(dict(timer.totals))
    median = statistics.median(times)
    mid = phases[times.index(sorted(times)[len(times) // 2])]
    with torch.no_grad():
        ref = model(x)
        diff = float((fused(x) - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)  # relative
    convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    expected = sum(isinstance(m, (RepVGGBlock, RepVGGA0Block, MobileOneStyleBlock)) for m in model.modules())
    if registered(family):
        expected = convs  # no count to check against: the numbers are checked
    return dict(blocks=blocks, expected=expected, nodes=fused.report.before.nodes, after=fused.report.after.nodes, seconds=median,
                phases=mid, convs=convs, diff=diff, model=model, x=x)


def profile_top(model, x, top: int = 10) -> str:
    prof = cProfile.Profile()
    prof.enable()
    reparam.fuse(model, x, verify=False)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="repvgg",
                        help=f"{', '.join(TOY_FAMILIES)}, or a model of reparam.models (fastvit_t12, ...)")
    parser.add_argument("--blocks", type=int, nargs="+", default=None,
                        help="sizes (default: 10 30 100 300; mobileone: 5 15 50)")
    parser.add_argument("--width-divisor", type=int, default=8, help="repvgg-a0: widths divided by this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=None, help="input size (default 32; registered models 224)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 10 for the largest size")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this process's CPU time instead of wall time (for a busy machine)")
    args = parser.parse_args(argv)
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    if registered(args.family):
        if args.family not in reparam.models.list_models():
            parser.error(f"--family {args.family!r}: not one of {', '.join(TOY_FAMILIES)} nor a registered model "
                         f"({', '.join(reparam.models.list_models())})")
    if args.size is None:
        args.size = 224 if registered(args.family) else 32
    if args.family == "repvgg-a0" or registered(args.family):
        args.blocks = [0]
    elif args.blocks is None:
        args.blocks = [5, 15, 50] if args.family == "mobileone" else [10, 30, 100, 300]
    torch.set_num_threads(1)

    reparam.fuse(make_model(2, args.channels), torch.randn(1, args.channels, 8, 8), verify=False)  # warm-up

    order = ["trace", "shapes", "rewrite", "fold", "forms", "lower", "checks", "copy", "count"]
    head = (f"{'blocks':>6} {'nodes':>6} {'after':>5} {'fuse s':>8} {'us/node':>8}  "
            + " ".join(f"{p:>9}" for p in order) + f" {'other':>7}  check")
    print(f"reparam.fuse scaling: {args.family} blocks, {args.channels} channels, input {args.size}x{args.size},"
          f" median of {args.repeats}, torch {torch.__version__}, 1 thread"
          + (", CPU time of this process" if args.cpu_time else ""))
    print("phase columns: seconds in each step of the pipeline (median run)")
    print(head)
    print("-" * len(head))
    rows = []
    for n in args.blocks:
        r = measure(n, args.channels, args.size, args.repeats, args.family, args.width_divisor)
        rows.append(r)
        per_node = r["seconds"] / r["nodes"] * 1e6
        other = r["seconds"] - sum(r["phases"].get(p, 0.0) for p in order)
        ok = "ok" if r["convs"] == r["expected"] and r["diff"] < 1e-4 else f"convs={r['convs']} rel.diff={r['diff']:.2g}"
        print(f"{n:>6} {r['nodes']:>6} {r['after']:>5} {r['seconds']:>8.3f} {per_node:>8.1f}  "
              + " ".join(f"{r['phases'].get(p, 0.0):>9.4f}" for p in order) + f" {other:>7.4f}  {ok}",
              flush=True)

    small, large = rows[0], rows[-1]
    ratio = (large["seconds"] / large["nodes"]) / (small["seconds"] / small["nodes"])
    print(f"\nper-node time, largest ({large['nodes']} nodes) / smallest ({small['nodes']} nodes): {ratio:.2f}"
          "  (1.0 = linear growth)")
    # time at ~1,000 nodes: least-squares line seconds = a + b * nodes through the measured sizes
    xs, ys = [r["nodes"] for r in rows], [r["seconds"] for r in rows]
    if len(rows) > 1:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
    else:
        a, b = 0.0, ys[0] / xs[0]
    target_nodes, target_seconds = TARGETS.get(args.family, (None, math.inf))
    target_nodes = target_nodes or large["nodes"]
    at_target = a + b * target_nodes if len(rows) > 1 else large["seconds"]
    verdict = "meets" if at_target < target_seconds else "MISSES"
    print(f"linear fit: {a * 1e3:.1f} ms + {b * 1e6:.1f} us/node -> {target_nodes:,} nodes: {at_target:.3f} s "
          f"-> {verdict} the {target_seconds} s target")
    if args.profile or at_target >= target_seconds or ratio > 2.0:
        print(f"\ncProfile, {large['blocks']} blocks ({large['nodes']} nodes), top 10 by cumulative time:")
        print(profile_top(large["model"], large["x"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
