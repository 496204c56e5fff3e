"""Fixtures of the command-line tests; helpers live in cli_helpers.py."""

from __future__ import annotations

import sys

import pytest
from cli_helpers import Result, run_cli


@pytest.fixture
def cli(tmp_path):
    """run_cli in a fresh folder: cli("export", ...) -> Result."""

    def run(*args, **kwargs):
        kwargs.setdefault("cwd", tmp_path)
        return run_cli(*args, **kwargs)

    return run


@pytest.fixture
def cli_inproc(tmp_path, monkeypatch, capsys):
    """Like `cli`, but calls `reparam.cli.main` in this process (no interpreter start-up cost).

    The subprocess fixture `cli` proves the real command's behaviour on a representative subset;
    the remaining cases run here to keep the suite fast.
    """
    from reparam.cli import main

    def run(*args, cwd=None):
        monkeypatch.chdir(cwd or tmp_path)
        saved = list(sys.path)
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code
        finally:
            sys.path[:] = saved
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run
