"""Paired latency benchmarks: a model before and after `reparam.fuse`, timed in one process.

    from reparam.bench import benchmark
    result = benchmark(model, example_input, batch_sizes=(1, 8), runtimes=("eager", "onnxruntime"))
    print(result.table())            # or result.to_dict() for JSON

The command line is `reparam bench MODEL ...` (`reparam bench -h`).

Method. Machines are noisy (other processes, frequency scaling, thermal state), so a latency
measured in one run and compared with one measured in another says little. Every comparison here
is *paired*: the candidates (unfused and fused, or any set of callables given to `time_paired`)
run in the same process, on the same input, in rounds; each round runs every candidate once, and
the order alternates from round to round, so that a slow spell of the machine hits all of them
alike. After warm-up rounds (not recorded), each candidate's latency is the median of its rounds,
with the 10th and 90th percentiles as its spread, and each comparison is the ratio of the two
latencies *within each round*, summarised the same way (median, p10-p90). A ratio below 1 means
the fused model is faster.

Runtimes:
- `eager`: the PyTorch modules, under `torch.inference_mode()`.
- `onnxruntime`: both models exported to ONNX in a temporary folder (torch.export + torch.onnx,
  dynamic batch axis), run by ONNX Runtime's CPU provider with every graph optimization on,
  `threads` intra-op threads, sequential execution. The exporter and ONNX Runtime already fold a
  BatchNorm into the convolution right before it, so the unfused baseline is not a straw man.
- `compile`: `torch.compile` of each model (default inductor backend). Where it does not work on
  the machine (no C++ compiler, an unsupported operator), the row carries the reason instead.
- `executorch`: both models lowered to ExecuTorch programs with the XNNPACK backend (the writer
  of `reparam export --format pte`) in a temporary folder, one pair of programs per batch size
  (ExecuTorch plans memory for fixed shapes), run by the ExecuTorch runtime with its thread pool
  set to `threads`. CPU and float32 only. Without executorch installed the rows name the extra
  to install (`pip install "reparam[executorch]"`); where lowering fails, the row gives the reason.

Nothing here changes the caller's model (its `training` flags are restored; channels-last runs use
copies) or the global random number generator (inputs come from a local `torch.Generator`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import InputError, first_line

__all__ = [
    "RUNTIMES",
    "Spread",
    "Row",
    "BenchResult",
    "benchmark",
    "time_paired",
    "paired_ratio",
    "spread",
    "machine_info",
    "onnx_session",
    "onnx_op_profile",
    "format_op_profile",
    "count_calls",
    "export_onnx",
    "quiet",
    "add_bench_parser",
    "run_bench_command",
]

RUNTIMES = ("eager", "onnxruntime", "compile", "executorch")
DEFAULT_RUNTIMES = ("eager", "onnxruntime")
DEFAULT_BATCH_SIZES = (1,)
DEFAULT_REPEATS = 50  # timed rounds per (runtime, batch), unless max_seconds ends them sooner
DEFAULT_WARMUP = 5
DEFAULT_MAX_SECONDS = 20.0  # time budget of the timed rounds of one (runtime, batch) cell
MIN_ROUNDS = 5  # a time budget never cuts a cell below this many rounds
INPUT_SEED = 20240301


# --------------------------------------------------------------------------------------------
# The one place that uses the model-loading and ONNX-writing code of reparam.export
# --------------------------------------------------------------------------------------------


def _export_api() -> argparse.Namespace:
    """Model resolution (registered name or package.module:factory) and the ONNX writer."""
    from . import resolve
    from .export import core, onnx

    return argparse.Namespace(
        INIT_SEED=resolve.INIT_SEED,
        check_input_accepted=resolve.check_input_accepted,
        onnx_op_counts=onnx.op_counts,
        parse_input_shape=resolve.parse_input_shape,
        quiet=core.quiet,
        resolve_model=resolve.resolve_model,
        write_onnx=onnx.write,
    )


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                dynamic_batch: bool = False) -> dict[str, int]:
    """Write `module` as ONNX (reparam's exporter, quietly); returns its operator counts.

    With `dynamic_batch`, `example` must have a batch of at least two (a batch of one would be
    specialised by torch.export).
    """
    api = _export_api()
    api.write_onnx(module, example, path, dynamic_batch=dynamic_batch)
    return api.onnx_op_counts(path)


def quiet(enabled: bool = True):
    """Silence exporter and compiler chatter for a block (`reparam.export.quiet`)."""
    return _export_api().quiet(enabled)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """A median with its 10th-90th percentile range, over `n` samples."""

    median: float
    p10: float
    p90: float
    n: int

    def __str__(self) -> str:
        return self.format()

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """'0.712 (0.70-0.73)', figures rounded to `digits` significant digits."""
        m, lo, hi = self.median * scale, self.p10 * scale, self.p90 * scale
        return f"{_sig(m, digits)} ({_sig(lo, digits)}-{_sig(hi, digits)})"


def _sig(value: float, digits: int) -> str:
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile, q in [0, 1]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    k = (len(ordered) - 1) * q
    lo = int(math.floor(k))
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def spread(values: Sequence[float]) -> Spread:
    return Spread(statistics.median(values), percentile(values, 0.1), percentile(values, 0.9),
                  len(values))


def paired_ratio(samples: Mapping[str, Sequence[float]], numerator: str,
                 denominator: str) -> Spread:
    """The per-round ratio numerator/denominator of `time_paired` samples, as a Spread."""
    ratios = [a / b for a, b in zip(samples[numerator], samples[denominator]) if b > 0]
    return spread(ratios)


def geometric_mean(values: Sequence[float]) -> float:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_paired(candidates: Mapping[str, Callable[[], Any]], *, repeats: int = DEFAULT_REPEATS,
                warmup: int = DEFAULT_WARMUP, max_seconds: float | None = None,
                min_rounds: int = MIN_ROUNDS, sync: Callable[[], None] | None = None,
                progress: Callable[[int, int], None] | None = None) -> dict[str, list[float]]:
    """Time several callables interleaved; returns each one's latencies in milliseconds.

    Each round calls every candidate once, the order alternating (reversed every other round).
    `warmup` rounds are run first and not recorded. `max_seconds` ends the timed rounds early
    once that much time has passed (never before `min_rounds` rounds), and the warm-up likewise
    (never before one round). `sync` is called before
    and after each timed call (e.g. `torch.cuda.synchronize`). `progress(done, total)` is called
    after each round.
    """
    if not candidates:
        raise ValueError("time_paired needs at least one candidate")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(candidates)
    wait = sync or (lambda: None)
    start = time.perf_counter()
    for r in range(max(0, warmup)):
        for name in (names if r % 2 == 0 else names[::-1]):
            candidates[name]()
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break  # on a very slow machine the warm-up shares the budget (one round at least)
    wait()
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = candidates[name]
            wait()
            t0 = time.perf_counter()
            fn()
            wait()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if progress is not None:
            progress(r + 1, repeats)
        if (max_seconds is not None and r + 1 >= min_rounds
                and time.perf_counter() - start > max_seconds):
            break
    return samples


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One (runtime, batch) cell: unfused and fused latency in ms, and their per-round ratio."""

    runtime: str
    batch: int
    unfused_ms: Spread | None = None
    fused_ms: Spread | None = None
    ratio: Spread | None = None  # fused / unfused, per round
    error: str | None = None  # why this cell has no figures (e.g. torch.compile failed)


@dataclass
class BenchResult:
    """Everything `benchmark` measured."""

    model: str
    input_shape: tuple[int, ...]  # batch axis included, as given to fuse()
    device: str
    dtype: str
    threads: int
    channels_last: bool
    repeats: int
    warmup: int
    fuse_seconds: float  # reparam.fuse, verification excluded
    verified: bool
    max_abs_diff: float | None
    regions: int
    refusals: int
    unfused: dict[str, int]  # params, macs, nodes
    fused: dict[str, int]
    onnx_nodes: dict[str, int] | None = None  # {"unfused": n, "fused": n} when ORT ran
    onnx_profile: dict | None = None  # {"unfused"/"fused": onnx_op_profile(...)} if asked for
    rows: list[Row] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    def table(self) -> str:
        from .report import format_table

        shape = "x".join(str(d) for d in self.input_shape[1:])
        lines = [f"model: {self.model}, input {shape}, {self.dtype} on {self.device},"
                 f" {self.threads} threads" + (", channels_last" if self.channels_last else "")
                 + f", weights: {self.weights or 'random initialisation'}"]
        counts = [[label, f"{self.unfused[key]:,}", f"{self.fused[key]:,}",
                   _ratio_text(self.fused[key], self.unfused[key])]
                  for label, key in (("parameters", "params"), ("MACs (batch 1)", "macs"),
                                     ("graph nodes", "nodes"))]
        if self.onnx_nodes:
            counts.append(["ONNX nodes", f"{self.onnx_nodes['unfused']:,}",
                           f"{self.onnx_nodes['fused']:,}",
                           _ratio_text(self.onnx_nodes["fused"], self.onnx_nodes["unfused"])])
        lines.append(format_table(["", "unfused", "fused", "fused/unfused"], counts,
                                  right_align=True))
        check = (f"verified, max |fused - original| = {self.max_abs_diff:.2g}"
                 if self.verified and self.max_abs_diff is not None else "not verified")
        lines.append(f"fuse(): {self.fuse_seconds:.2f} s ({check}); {self.regions} fused regions,"
                     f" {self.refusals} refusals")
        lines.append("")
        body = []
        for row in self.rows:
            if row.error is not None:
                body.append([row.runtime, row.batch, "-", "-", f"not measured: {row.error}"])
            else:
                body.append([row.runtime, row.batch, row.unfused_ms.format(3),
                             row.fused_ms.format(3), row.ratio.format(3)])
        lines.append(format_table(["runtime", "batch", "unfused ms (p10-p90)",
                                   "fused ms (p10-p90)", "fused/unfused (p10-p90)"], body,
                                  wrap=70))
        rounds = sorted({r.ratio.n for r in self.rows if r.ratio is not None})
        if rounds:
            count = str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"
            lines.append(f"median of {count} interleaved rounds after {self.warmup} warm-up"
                         " rounds; the ratio is taken per round (below 1: fused is faster)")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.onnx_profile:
            lines.append(f"\nONNX Runtime time per operator type (ms per inference, batch"
                         f" {self.onnx_profile_batch}):")
            lines.append(format_op_profile(self.onnx_profile))
        return "\n".join(lines)

    @property
    def onnx_profile_batch(self) -> int:
        return next((r.batch for r in self.rows if r.runtime == "onnxruntime"), 1)


def _ratio_text(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


# --------------------------------------------------------------------------------------------
# Helpers that leave the caller's state alone
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block; restore every submodule's `training` flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """torch.set_num_threads for the block, restored after; yields the number in effect."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)


def random_input(shape: Sequence[int], seed: int = INPUT_SEED, *, dtype=torch.float32,
                 device="cpu") -> torch.Tensor:
    """A standard-normal tensor from a local generator (the global RNG is not touched)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator).to(device=device, dtype=dtype)


def count_calls(module: nn.Module, *inputs, functions: Mapping[str, Sequence[Callable]]) -> dict:
    """How often each group of torch functions runs in one forward pass of `module`.

    E.g. `count_calls(m, x, functions={"batch_norm": [F.batch_norm], "conv": [F.conv2d]})`.
    Counts functional calls and module calls alike (nn.BatchNorm2d calls F.batch_norm), whatever
    module class or graph spelling they come from.
    """
    from torch.overrides import TorchFunctionMode

    lookup = {fn: group for group, fns in functions.items() for fn in fns}
    counts = {group: 0 for group in functions}

    class _Counter(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            group = lookup.get(func)
            if group is not None:
                counts[group] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), _Counter():
        module(*inputs)
    return counts


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, cores, library versions and the date: what a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "cores_available": available,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    with contextlib.suppress(Exception):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["executorch"] = version("executorch")
    with contextlib.suppress(Exception):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------


def onnx_session(path: str | os.PathLike, threads: int, *, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session: every graph optimization, `threads` intra-op threads."""
    from .optional import require

    ort = require("onnxruntime", "ONNX Runtime timing")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Timed sessions run interleaved: a session's worker threads spinning after a run would
    # take the cores from the other session's run (p10-p90 spreads of 0.5-2x otherwise).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_runner(session, x: torch.Tensor) -> Callable[[], Any]:
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return lambda: session.run(None, feed)


def onnx_op_profile(path: str | os.PathLike, x: torch.Tensor, *, threads: int = 1,
                    runs: int = 20, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Time per ONNX operator type: {op_type: {"ms": mean ms per inference, "nodes": n}}.

    Runs the file `runs` times under ONNX Runtime's profiler (after `warmup` runs that are not
    counted) and sums the kernel times of each operator type, as ONNX Runtime executes them
    (after its graph optimizations, so fused kernels such as `FusedConv` appear as such).
    """
    warmup = max(1, warmup)  # the first run of a session includes one-off work
    with tempfile.TemporaryDirectory(prefix="reparam-ort-profile-") as folder:
        session = onnx_session(path, threads, profile_prefix=str(Path(folder) / "profile"))
        run = _onnx_runner(session, x)
        for _ in range(warmup + runs):
            run()
        with open(session.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    per_run: dict[str, list[float]] = {}
    nodes: dict[str, set] = {}
    model_runs = sorted((e for e in events
                         if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    warm = model_runs[warmup - 1] if len(model_runs) >= warmup else None
    warm_end = warm["ts"] + warm["dur"] if warm else -1
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        if event.get("ts", 0) <= warm_end:
            continue
        op = event.get("args", {}).get("op_name", "?")
        per_run.setdefault(op, []).append(event.get("dur", 0) / 1e3)
        nodes.setdefault(op, set()).add(event.get("name"))
    return {op: {"ms": sum(times) / max(runs, 1), "nodes": len(nodes[op])}
            for op, times in sorted(per_run.items(), key=lambda kv: -sum(kv[1]))}


def format_op_profile(profiles: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A table of `onnx_op_profile` results side by side: op type, then ms and nodes per file."""
    from .report import format_table

    names = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p},
                 key=lambda op: -max(p.get(op, {}).get("ms", 0.0) for p in profiles.values()))
    rows = []
    for op in ops:
        row = [op]
        for name in names:
            entry = profiles[name].get(op)
            row += [f"{entry['ms']:.3f}", str(entry["nodes"])] if entry else ["-", "-"]
        rows.append(row)
    rows.append(["total"] + sum(([f"{sum(e['ms'] for e in profiles[n].values()):.3f}",
                                  str(sum(e['nodes'] for e in profiles[n].values()))]
                                 for n in names), []))
    header = ["op type"] + sum(([f"{n} ms", f"{n} nodes"] for n in names), [])
    return format_table(header, rows, right_align=True)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def benchmark(model: nn.Module, example_input: torch.Tensor, *, name: str | None = None,
              batch_sizes: Sequence[int] | None = None,
              runtimes: Sequence[str] = DEFAULT_RUNTIMES, threads: int | None = None,
              channels_last: bool = False, repeats: int = DEFAULT_REPEATS,
              warmup: int = DEFAULT_WARMUP, max_seconds: float | None = DEFAULT_MAX_SECONDS,
              verify: bool = True, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None, fused: nn.Module | None = None,
              weights: str | None = None, onnx_profile: bool = False,
              progress: Callable[[str], None] | None = None) -> BenchResult:
    """Fuse `model` (verified) and time it unfused and fused, interleaved, per runtime and batch.

    example_input: one tensor, batch axis first; `batch_sizes` replace its batch axis (default:
    its own batch size). runtimes: any of "eager", "onnxruntime", "compile", "executorch".
    device/dtype: where and in which precision to run (default: the model's); ONNX Runtime and
    ExecuTorch rows run on CPU in float32 only. fused: an already fused model to time instead of fusing here. onnx_profile:
    with the onnxruntime runtime, also profile both files (`onnx_op_profile`, first batch size).
    Returns a BenchResult; cells that could not be measured carry the reason in `Row.error`.
    """
    say = progress or (lambda message: None)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise InputError(f"unknown runtime {unknown[0]!r}; choose from {', '.join(RUNTIMES)}")
    if not isinstance(example_input, torch.Tensor):
        raise InputError("benchmark needs one example input tensor (batch axis first)")
    if repeats < 1 or warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    batch_sizes = tuple(batch_sizes or (int(example_input.shape[0]),))
    if any(int(b) < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be positive, got {list(batch_sizes)}")
    name = name or type(model).__name__
    first_param = next(iter(model.parameters()), None)
    device = torch.device(device) if device is not None else (
        first_param.device if first_param is not None else torch.device("cpu"))
    dtype = dtype or (first_param.dtype if first_param is not None else torch.float32)
    rest = tuple(example_input.shape[1:])
    channels_last = bool(channels_last)
    if channels_last and len(rest) != 3:
        raise InputError(f"--channels-last needs 4-d image inputs, got input shape"
                         f" {tuple(example_input.shape)}")
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    # fork_rng: nothing below should draw from the global RNG, and this guarantees it
    with num_threads(threads) as used_threads, eval_mode(model), \
            torch.random.fork_rng(devices=[]):
        # The unfused model as timed: the caller's module unless a device, dtype or memory
        # format change needs a copy (the caller's module is never moved or converted).
        needs_copy = channels_last or any(
            t.device != device or t.dtype != dtype
            for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())
        unfused = copy.deepcopy(model).to(device=device, dtype=dtype) if needs_copy else model
        example = example_input.to(device=device, dtype=dtype)
        if fused is not None and channels_last:
            fused = copy.deepcopy(fused)  # converted below; the caller's stays as it is
        if fused is None:
            say("fusing" + (" and verifying" if verify else ""))
            import reparam

            fused = reparam.fuse(unfused, example, verify=verify)
        fused.eval()
        report = getattr(fused, "report", None)
        if channels_last:
            unfused = unfused.to(memory_format=torch.channels_last)
            fused = fused.to(memory_format=torch.channels_last)
        result = BenchResult(
            model=name, input_shape=tuple(int(d) for d in example_input.shape),
            device=str(device), dtype=str(dtype).replace("torch.", ""), threads=used_threads,
            channels_last=channels_last, repeats=repeats, warmup=warmup,
            fuse_seconds=float(getattr(report, "fuse_seconds", None) or 0.0),
            verified=bool(verify and getattr(report, "max_abs_diff", None) is not None),
            max_abs_diff=getattr(report, "max_abs_diff", None),
            regions=len(getattr(report, "regions", []) or []),
            refusals=len(getattr(report, "refusals", []) or []),
            unfused=_counts(getattr(report, "before", None), unfused),
            fused=_counts(getattr(report, "after", None), fused),
            machine=machine_info(used_threads), weights=weights)

        def batch_input(batch: int) -> torch.Tensor:
            x = random_input((batch,) + rest, INPUT_SEED + batch, dtype=dtype, device=device)
            return x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def timed(runtime: str, batch: int, candidates: dict[str, Callable[[], Any]]) -> Row:
            label = f"{runtime}, batch {batch}"

            def tick(done: int, total: int) -> None:
                if done == 1 or done % 5 == 0 or done == total:
                    say(f"timing {label}: round {done}/{total}")

            say(f"timing {label}: warm-up")
            samples = time_paired(candidates, repeats=repeats, warmup=warmup,
                                  max_seconds=max_seconds, sync=sync, progress=tick)
            return Row(runtime, batch, spread(samples["unfused"]), spread(samples["fused"]),
                       paired_ratio(samples, "fused", "unfused"))

        for runtime in runtimes:
            if runtime == "onnxruntime":
                result.rows.extend(_onnx_rows(unfused, fused, example, batch_sizes, batch_input,
                                              used_threads, device, dtype, timed, result, say,
                                              profile_runs=max(5, min(repeats, 50))
                                              if onnx_profile else 0))
                continue
            if runtime == "compile":
                result.rows.extend(_compile_rows(unfused, fused, batch_sizes, batch_input,
                                                 timed, say))
                continue
            if runtime == "executorch":
                result.rows.extend(_executorch_rows(unfused, fused, batch_sizes, batch_input,
                                                    used_threads, device, dtype, timed, result,
                                                    say))
                continue
            for batch in batch_sizes:
                x = batch_input(batch)
                result.rows.append(timed("eager", batch, {
                    "unfused": _inference(unfused, x), "fused": _inference(fused, x)}))
    return result


def _counts(counts, module: nn.Module) -> dict[str, int]:
    if counts is not None:
        return {"params": int(counts.params), "macs": int(counts.macs), "nodes": int(counts.nodes)}
    return {"params": sum(p.numel() for p in module.parameters()), "macs": 0, "nodes": 0}


def _inference(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return module(x)

    return run


def _onnx_rows(unfused, fused, example, batch_sizes, batch_input, threads, device, dtype, timed,
               result: BenchResult, say, profile_runs: int = 0) -> list[Row]:
    if device.type != "cpu" or dtype != torch.float32:
        why = "ONNX Runtime rows run on CPU in float32 only"
        return [Row("onnxruntime", b, error=why) for b in batch_sizes]
    from .optional import MissingExtra, require

    try:
        require("onnxruntime", "reparam bench --runtime onnxruntime")
        require("onnxscript", "reparam bench --runtime onnxruntime")
    except MissingExtra as exc:
        return [Row("onnxruntime", b, error=f"ONNX Runtime is not installed ({exc.install})")
                for b in batch_sizes]
    api = _export_api()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="reparam-bench-") as folder:
        paths = {"unfused": Path(folder) / "unfused.onnx", "fused": Path(folder) / "fused.onnx"}
        # A dynamic batch axis, traced on a batch of two (a batch of one would be specialised).
        export_example = random_input((2,) + tuple(example.shape[1:]), INPUT_SEED - 1)
        for label, module in (("unfused", unfused), ("fused", fused)):
            say(f"exporting the {label} model to ONNX")
            plain = module.to(memory_format=torch.contiguous_format) if result.channels_last \
                else module
            try:
                api.write_onnx(plain, export_example, paths[label], dynamic_batch=True)
            except Exception as exc:
                why = f"ONNX export of the {label} model failed: {first_line(exc)}"
                return [Row("onnxruntime", b, error=why) for b in batch_sizes]
            finally:
                if result.channels_last:
                    module.to(memory_format=torch.channels_last)
        result.onnx_nodes = {label: sum(api.onnx_op_counts(p).values())
                             for label, p in paths.items()}
        sessions = {label: onnx_session(p, threads) for label, p in paths.items()}
        for batch in batch_sizes:
            x = batch_input(batch).contiguous()
            try:
                rows.append(timed("onnxruntime", batch, {
                    label: _onnx_runner(s, x) for label, s in sessions.items()}))
            except Exception as exc:
                rows.append(Row("onnxruntime", batch, error=f"ONNX Runtime failed:"
                                f" {first_line(exc)}"))
        if profile_runs:
            say("profiling both ONNX files")
            x = batch_input(batch_sizes[0]).contiguous()
            result.onnx_profile = {label: onnx_op_profile(p, x, threads=threads,
                                                          runs=profile_runs)
                                   for label, p in paths.items()}
    return rows


def _compile_rows(unfused, fused, batch_sizes, batch_input, timed, say) -> list[Row]:
    say("compiling both models with torch.compile (first calls include compilation)")
    rows: list[Row] = []
    try:
        compiled = {"unfused": torch.compile(unfused), "fused": torch.compile(fused)}
    except Exception as exc:
        return [Row("compile", b, error=f"torch.compile failed: {first_line(exc)}")
                for b in batch_sizes]
    for batch in batch_sizes:
        x = batch_input(batch)
        runners = {label: _inference(m, x) for label, m in compiled.items()}
        try:
            for label, run in runners.items():
                say(f"compiling the {label} model for batch {batch}")
                run()  # compile now: compilation time is not latency
        except Exception as exc:
            rows.append(Row("compile", batch, error=f"torch.compile failed:"
                            f" {type(exc).__name__}: {first_line(exc)[:200]}"))
            continue
        rows.append(timed("compile", batch, runners))
    return rows


def _executorch_rows(unfused, fused, batch_sizes, batch_input, threads, device, dtype, timed,
                     result: BenchResult, say) -> list[Row]:
    """Both models lowered to XNNPACK by `reparam.export.executorch.write`, one program per batch
    size, loaded with the ExecuTorch runtime as its `check` does, and timed paired."""
    if device.type != "cpu" or dtype != torch.float32:
        why = "ExecuTorch rows run on CPU in float32 only"
        return [Row("executorch", b, error=why) for b in batch_sizes]
    from . import optional
    from .export import executorch as pte

    api = _export_api()
    try:
        with api.quiet():  # importing executorch prints library chatter
            for module in pte.REQUIRES:
                optional.require(module, "reparam bench --runtime executorch")
    except optional.MissingExtra as exc:
        return [Row("executorch", b, error=f"ExecuTorch is not installed ({exc.install})")
                for b in batch_sizes]
    with api.quiet():
        runtime = optional.require("executorch.runtime", "reparam bench --runtime executorch")
        try:  # where the thread pool is set; without it ExecuTorch keeps its own
            pool = optional.require("executorch.extension.pybindings.portable_lib",
                                    "reparam bench --runtime executorch")
        except optional.MissingExtra:
            pool = None
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="reparam-bench-") as folder, \
            _executorch_threads(pool, threads, result, api.quiet):
        for batch in batch_sizes:
            x = batch_input(batch).contiguous()
            methods = {}
            for label, module in (("unfused", unfused), ("fused", fused)):
                say(f"lowering the {label} model to ExecuTorch (XNNPACK), batch {batch}")
                path = Path(folder) / f"{label}-batch{batch}.pte"
                plain = module.to(memory_format=torch.contiguous_format) \
                    if result.channels_last else module
                step = "lowering"
                try:
                    written = pte.write(plain, x, path)
                    step = "loading"
                    with api.quiet():
                        methods[label] = runtime.Runtime.get().load_program(
                            str(path)).load_method("forward")
                except Exception as exc:
                    methods = None
                    rows.append(Row("executorch", batch, error=f"ExecuTorch {step} of the"
                                    f" {label} model failed: {first_line(exc)[:300]}"))
                    break
                finally:
                    if result.channels_last:
                        module.to(memory_format=torch.channels_last)
                if batch == batch_sizes[0]:
                    result.notes.extend(f"executorch, {label} model: {d}"
                                        for d in written.details)
            if methods is None:
                continue
            try:
                rows.append(timed("executorch", batch, {
                    label: _executorch_runner(m, x) for label, m in methods.items()}))
            except Exception as exc:
                rows.append(Row("executorch", batch, error=f"the ExecuTorch runtime failed:"
                                f" {type(exc).__name__}: {first_line(exc)[:300]}"))
    return rows


@contextlib.contextmanager
def _executorch_threads(pool, threads: int, result: BenchResult, quiet) -> Iterator[None]:
    """ExecuTorch's thread pool (XNNPACK's threads) set to `threads` for the block, restored
    after. The runtime offers this only as an experimental call: if it is missing, a note says
    how many threads ExecuTorch used."""
    reset = getattr(pool, "_unsafe_reset_threadpool", None)
    count = getattr(pool, "_threadpool_get_thread_count", None)
    saved = None
    with contextlib.suppress(Exception), quiet():  # the first call starts the pool, logging
        saved = int(count()) if count is not None else None
    changed = False
    if reset is not None and saved is not None and saved != threads:
        with contextlib.suppress(Exception), quiet():  # the runtime logs each reset
            reset(threads)
            changed = True
    if not changed and saved is not None and saved != threads:
        result.notes.append(f"executorch ran with its own thread pool of {saved} threads,"
                            f" not {threads}")
    try:
        yield
    finally:
        if changed:
            with contextlib.suppress(Exception), quiet():
                reset(saved)


def _executorch_runner(method, x: torch.Tensor) -> Callable[[], Any]:
    inputs = [x.detach()]
    return lambda: method.execute(inputs)


# --------------------------------------------------------------------------------------------
# Command line: `reparam bench`
# --------------------------------------------------------------------------------------------


_BENCH_EPILOG = """\
Unfused and fused run in one process, interleaved, on the same inputs; each latency is the median
of the timed rounds with its 10th-90th percentiles, and the ratio fused/unfused is taken per round.

examples:
  reparam bench fastvit_t12
  reparam bench fastvit_t12 --batch-size 1 8 --runtime eager,onnxruntime,compile --json t12.json
  reparam bench mobileone_s0 --runtime eager,executorch
  reparam bench mynets:build_net --input-shape 1,3,224,224 --threads 4 --channels-last
"""


def _runtime_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. eager,onnxruntime")
    for n in names:
        if n not in RUNTIMES:
            raise argparse.ArgumentTypeError(f"unknown runtime {n!r}; choose from"
                                             f" {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def add_bench_parser(subparsers, parents: Sequence[argparse.ArgumentParser] = ()):
    """Add the `bench` subcommand to the command line's subparsers.

    `parents` supply the model arguments shared with `export` (MODEL, --weights, --image-size,
    --input-shape) and the common flags (-v, --debug).
    """
    p = subparsers.add_parser(
        "bench", parents=list(parents),
        help="time a model unfused and fused (eager, ONNX Runtime, torch.compile,"
             " ExecuTorch)",
        description="Fuse MODEL (verified), then time the unfused and the fused model\n"
                    "interleaved in one process for each runtime and batch size, and print\n"
                    "latencies, their ratio, and parameters, MACs, graph nodes and fuse() time.",
        epilog=_BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=_positive(int), nargs="+", metavar="N",
                   help="batch sizes to time (default: 1, or the first axis of --input-shape)")
    p.add_argument("--threads", type=_positive(int), metavar="N",
                   help="intra-op threads for PyTorch and ONNX Runtime (default: PyTorch's)")
    p.add_argument("--runtime", type=_runtime_list, default=list(DEFAULT_RUNTIMES),
                   metavar="LIST", help="comma-separated runtimes among eager, onnxruntime,"
                   " compile, executorch (ExecuTorch with XNNPACK, one program per batch size;"
                   ' needs pip install "reparam[executorch]") (default: eager,onnxruntime)')
    p.add_argument("--channels-last", action="store_true",
                   help="run eager and compiled models in channels_last memory format")
    p.add_argument("--repeats", type=_positive(int), default=DEFAULT_REPEATS, metavar="N",
                   help=f"timed rounds per runtime and batch (default {DEFAULT_REPEATS}; fewer"
                        " if --max-seconds runs out first)")
    p.add_argument("--warmup", type=_non_negative_int, default=DEFAULT_WARMUP, metavar="N",
                   help=f"untimed rounds first (default {DEFAULT_WARMUP})")
    p.add_argument("--max-seconds", type=_positive(float), default=DEFAULT_MAX_SECONDS,
                   metavar="S", help="time budget of the timed rounds of one runtime and batch"
                   f" (default {DEFAULT_MAX_SECONDS:g}; at least {MIN_ROUNDS} rounds run)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="precision of both models and the input (default float32)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check the fused model against the original before timing")
    p.add_argument("--onnx-profile", action="store_true",
                   help="with the onnxruntime runtime: also print ONNX Runtime's time per"
                        " operator type for both files")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT"
                   " ('-' for standard output, instead of the table)")
    return p


def _progress_printer(enabled: bool) -> Callable[[str], None]:
    """One progress line on stderr, rewritten in place on a terminal, else printed per step."""
    if not enabled:
        return lambda message: None
    stream = sys.stderr
    tty = stream.isatty()
    last = {"step": None}

    def say(message: str) -> None:
        if tty:
            stream.write(f"\r\x1b[K[bench] {message}")
            stream.flush()
            return
        step = message.split(": round")[0]
        if step != last["step"]:  # not a terminal: one line per step, not per round
            last["step"] = step
            print(f"[bench] {step}", file=stream, flush=True)

    def done() -> None:
        if tty:
            stream.write("\r\x1b[K")
            stream.flush()

    say.done = done  # type: ignore[attr-defined]
    return say


def _check_json_destination(path: str) -> Path | None:
    if path == "-":
        return None
    out = Path(path).expanduser()
    if out.is_dir():
        raise InputError(f"--json {path} is a folder; give a file name, e.g. {out / 'bench.json'}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"--json: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--json: the folder {folder} is not writable")
    return out


def _write_json_atomically(out: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def run_bench_command(args) -> int:
    """Run `reparam bench` for parsed arguments; returns the exit code (errors propagate to the
    command line's handler: InputError -> exit 2, other reparam errors -> exit 1)."""
    api = _export_api()
    json_out = _check_json_destination(args.json) if args.json else None
    device = _check_device(args.device)
    dtype = _DTYPES[args.dtype]
    if args.onnx_profile and "onnxruntime" not in args.runtime:
        raise InputError("--onnx-profile needs the onnxruntime runtime (--runtime ...,onnxruntime)")
    shape = api.parse_input_shape(args.input_shape) if args.input_shape is not None else None
    batch_sizes = args.batch_size or ([shape[0]] if shape else list(DEFAULT_BATCH_SIZES))
    if shape is not None:
        shape = (batch_sizes[0],) + tuple(shape[1:])

    say = _progress_printer(True)
    say(f"building {args.model}")
    with api.quiet(not args.verbose):
        loaded = api.resolve_model(args.model, weights=args.weights, input_shape=shape,
                                   image_size=args.image_size, batch_size=None)
    example = random_input((batch_sizes[0],) + tuple(loaded.input_shape[1:]))
    api.check_input_accepted(loaded.model, example, name=f"model {args.model!r}")
    for note in loaded.notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.weights is None:
        print(f"warning: no --weights given: {args.model} is randomly initialised (seed"
              f" {api.INIT_SEED}); latency does not depend on the weights' values",
              file=sys.stderr)
    try:
        result = benchmark(loaded.model, example, name=args.model, batch_sizes=batch_sizes,
                           runtimes=args.runtime, threads=args.threads,
                           channels_last=args.channels_last, repeats=args.repeats,
                           warmup=args.warmup, max_seconds=args.max_seconds,
                           verify=not args.no_verify, device=device, dtype=dtype,
                           weights=loaded.weights, onnx_profile=args.onnx_profile, progress=say)
    finally:
        getattr(say, "done", lambda: None)()
    data = result.to_dict()
    if args.json == "-":
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(result.table())
    if json_out is not None:
        _write_json_atomically(json_out, data)
        print(f"wrote {json_out}")
    return 0


def _check_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {text!r} is not a device; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {text}: no CUDA device is available to PyTorch here")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {text}: only cpu and cuda are supported")
    return device
