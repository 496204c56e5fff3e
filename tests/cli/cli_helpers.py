"""Helpers for the command-line tests: run `python -m reparam.cli` in a subprocess.

(A module of its own, not conftest.py, so that `from cli_helpers import ...` is unambiguous.)

The toy models of `toy_models.py` (this folder) are importable as `toy_models:<factory>` in the
subprocesses (this folder is put on PYTHONPATH) and in-process (pytest puts it on sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str, cwd: Path, timeout: float = 240, env: dict | None = None) -> Result:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(HERE)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p])
    environment.setdefault("OMP_NUM_THREADS", "2")
    environment.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "reparam.cli", *map(str, args)], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_error(result: Result, code: int, *fragments: str) -> None:
    """Exit code `code`, an `error: ...` line on stderr, the fragments in it, no traceback."""
    assert result.returncode == code, result.output
    assert "Traceback" not in result.output, result.output
    assert "error:" in result.stderr, result.output
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr}"


def has_models() -> bool:
    try:
        import reparam.models  # noqa: F401
    except ImportError:
        return False
    return True

