#!/usr/bin/env python
"""Check that the tests catch deliberate defects in the compiler.

For each defect of `tests/mutations.py` (a no-op fuse, BatchNorm folded without its shift, kernels
summed off-centre, padding dropped when composing, the wrong channel axis through a layout op),
run a selected subset of the compiler and command-line tests with that defect applied, in fresh
processes, and require that some test fails. The same subset must pass without any defect.

    python scripts/mutation_check.py              # every defect; exit status 1 if one survives
    python scripts/mutation_check.py --list       # the defects and the functions they replace
    python scripts/mutation_check.py -d bn_no_shift --tree /path/to/checkout

The defect reaches subprocesses that the tests start (`python -m reparam.cli`) through a
temporary `sitecustomize` module on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Test groups, fast failers first (each run stops at the first failure).
GROUPS = {
    "compiler": [
        "tests/compiler/test_affine.py",
        "tests/compiler/test_api.py",
        "tests/compiler/test_structures.py",
        "tests/compiler/test_refusals.py",
        "tests/compiler/test_regressions.py",
    ],
    "cli": [
        "tests/cli/test_cli_list_explain.py::test_explain_prints_the_report",
        "tests/cli/test_cli_list_explain.py::test_explain_json",
        "tests/cli/test_cli_list_explain.py::test_explain_shows_refusals_with_reasons",
        "tests/cli/test_cli_export.py::test_onnx_has_a_dynamic_batch_axis",
        "tests/cli/test_cli_export.py::test_onnx_is_fused_no_batchnorm_fewer_convs",
    ],
}

SITECUSTOMIZE = '''\
import os
if os.environ.get("REPARAM_MUTATION"):
    import mutations  # tests/mutations.py: applies the defect on import
'''

_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


@dataclass
class Outcome:
    defect: str | None
    group: str
    returncode: int
    first_failure: str | None
    seconds: float
    applied: bool
    tail: str


def _run(tree: Path, shim: Path, defect: str | None, group: str, timeout: float) -> Outcome:
    env = dict(os.environ)
    env.pop("REPARAM_MUTATION", None)
    paths = [str(shim), str(tree / "tests"), str(tree)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    log = shim / f"applied-{defect}-{group}.log"
    if defect:
        env["REPARAM_MUTATION"] = defect
        env["REPARAM_MUTATION_LOG"] = str(log)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "mutations",
               *GROUPS[group]]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = -1, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    seconds = time.perf_counter() - start
    match = _FAILED.search(output)
    applied = defect is None or (log.exists() and defect in log.read_text())
    return Outcome(defect, group, code, match.group(1) if match else None, seconds, applied, output[-3000:])


def _verdict(outcome: Outcome) -> str:
    if outcome.defect is None:
        return "pass" if outcome.returncode == 0 else "FAILS WITHOUT ANY DEFECT"
    if not outcome.applied:
        return "NOT APPLIED"
    if outcome.returncode == 0:
        return "not caught by this group"
    if outcome.returncode == 1 and outcome.first_failure:
        return f"caught by {outcome.first_failure}"
    return f"BROKEN RUN (pytest exit {outcome.returncode})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout under test (default: this one)")
    parser.add_argument("-d", "--defect", action="append", help="only this defect (repeatable)")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="test runs in parallel (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    parser.add_argument("--list", action="store_true", help="list the defects and exit")
    args = parser.parse_args(argv)
    tree = args.tree.resolve()

    sys.path.insert(0, str(tree / "tests"))
    sys.path.insert(0, str(tree))
    import mutations

    if args.list:
        for name, (what, module, attr, _) in mutations.DEFECTS.items():
            print(f"{name:24} {what:48} replaces {module}.{attr}")
        return 0
    defects = args.defect or list(mutations.DEFECTS)
    unknown = [d for d in defects if d not in mutations.DEFECTS]
    if unknown:
        parser.error(f"unknown defect(s) {', '.join(unknown)}; see --list")
    missing = {name: why for name, why in mutations.check_targets().items() if why and name in defects}
    for name, why in missing.items():
        print(f"error: defect {name} cannot be applied: {why}", file=sys.stderr)
    if missing:
        return 2

    jobs = [(None, g) for g in GROUPS] + [(d, g) for d in defects for g in GROUPS]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reparam-mutation-") as tmp:
        shim = Path(tmp)
        (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = list(pool.map(lambda job: _run(tree, shim, job[0], job[1], args.timeout), jobs))
    elapsed = time.perf_counter() - start

    by_key = {(o.defect, o.group): o for o in outcomes}
    width = max(len(d) for d in ["defect", "(no defect)", *defects])
    print(f"{'defect':{width}}  {'group':8}  {'time':>6}  result")
    ok = True
    for defect in [None, *defects]:
        for group in GROUPS:
            o = by_key[(defect, group)]
            print(f"{defect or '(no defect)':{width}}  {group:8}  {o.seconds:5.0f}s  {_verdict(o)}")
            if defect is None and o.returncode != 0:
                ok = False
            if defect is not None and (not o.applied or o.returncode not in (0, 1)):
                ok = False
        if defect is not None:
            caught = any(by_key[(defect, g)].returncode == 1 and by_key[(defect, g)].applied for g in GROUPS)
            ok &= caught
            if not caught:
                print(f"{defect:{width}}  SURVIVED: no test of any group failed")
    for o in outcomes:
        verdict = _verdict(o)
        if verdict.startswith(("FAILS", "NOT APPLIED", "BROKEN")):
            print(f"\n--- {o.defect or '(no defect)'} / {o.group}: {verdict}\n{o.tail}", file=sys.stderr)
    print(f"{'every defect was caught' if ok else 'MUTATION CHECK FAILED'} ({elapsed:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
