"""`reparam list` and `reparam explain`."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_clean_error, fuses_anything


def test_explain_prints_the_report(cli):
    result = cli("explain", "toy_models:rep_net", "--input-shape", "1,3,32,32")
    assert result.returncode == 0, result.output
    out = result.stdout
    assert "Traceback" not in result.output
    for fragment in ("example input 1,3,32,32", "graph nodes", "parameters", "MACs", "before",
                     "after"):
        assert fragment in out, out
    if not fuses_anything():
        pytest.xfail("reparam.fuse does not fuse yet (placeholder)")
    assert "Fused regions" in out
    # each fused region names the original modules that went into it
    for member in ("stem.k3.0", "stem.k3.1", "stem.k1.0", "stem.k1.1", "block.skip"):
        assert member in out, out


def test_explain_json(cli_inproc):
    result = cli_inproc("explain", "toy_models:rep_net_sized", "--json")
    assert result.returncode == 0, result.output
    data = json.loads(result.stdout)
    assert {"regions", "refusals", "before", "after"} <= set(data)


def test_explain_shows_refusals_with_reasons(cli_inproc):
    # a BatchNorm before a zero-padded 3x3 conv cannot be folded exactly: a refusal, not an error
    result = cli_inproc("explain", "toy_models:refused_net", "--input-shape", "1,3,8,8")
    assert result.returncode == 0, result.output
    if not fuses_anything():
        pytest.xfail("reparam.fuse does not fuse yet (placeholder)")
    assert "Refused" in result.stdout and "bn, conv" in result.stdout
    assert "padd" in result.stdout  # the reason names the padding


def test_explain_errors_are_clean(cli_inproc):
    result = cli_inproc("explain", "toy_models:flat_net", "--input-shape", "1,3,8,8")
    assert_clean_error(result, 2, "rejects an input of shape 1,3,8,8")


def test_list(cli_inproc):
    pytest.importorskip("reparam.models")
    result = cli_inproc("list")
    assert result.returncode == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "params", "(unfused)", "input"]
    t12 = next(line for line in lines if line.startswith("fastvit_t12 "))
    assert "7.5" in t12 and "3x256x256" in t12  # 7.55M parameters in training form
    import reparam.models

    assert f"{len(reparam.models.list_models())} models" in result.stdout
