"""`reparam list` and `reparam explain`."""

from __future__ import annotations

import json

import pytest
import toy_models
from cli_helpers import assert_clean_error


def test_explain_prints_the_report(cli):
    result = cli("explain", "toy_models:rep_net", "--input-shape", "1,3,32,32")
    assert result.returncode == 0, result.output
    out = result.stdout
    assert "Traceback" not in result.output
    for fragment in ("example input 1,3,32,32", "graph nodes", "parameters", "MACs", "before",
                     "after"):
        assert fragment in out, out
    assert "Fused regions" in out
    # each fused region names the original modules that went into it
    for member in ("stem.k3.0", "stem.k3.1", "stem.k1.0", "stem.k1.1", "block.skip"):
        assert member in out, out


def test_explain_json(cli_inproc):
    result = cli_inproc("explain", "toy_models:rep_net_sized", "--json")
    assert result.returncode == 0, result.output
    data = json.loads(result.stdout)
    assert {"regions", "refusals", "before", "after"} <= set(data)
    # structure: each RepBlock is one 3x3 conv, its BatchNorm skip included; nothing refused
    assert [r["members"] for r in data["regions"]] == [
        ["stem.k3.0", "stem.k3.1", "stem.k1.0", "stem.k1.1", "add"],
        ["block.k3.0", "block.k3.1", "block.k1.0", "block.k1.1", "add_1", "block.skip", "add_2"],
    ]
    assert data["refusals"] == [] and data["leaves"] == []
    # counts, computed here from the model and from the geometry of the fused convolutions
    model = toy_models.rep_net_sized()
    assert data["before"]["params"] == sum(p.numel() for p in model.parameters())
    stem, block, head = (3 * 8 * 9 + 8), (8 * 8 * 9 + 8), (8 * 10 + 10)  # weights + biases
    assert data["after"]["params"] == stem + block + head
    positions = 16 * 16  # both convs produce 16x16 from the 32x32 input (the stem has stride 2)
    assert data["after"]["macs"] == (8 * 3 * 9 + 8 * 8 * 9) * positions + 8 * 10
    assert data["after"]["nodes"] < data["before"]["nodes"]


def test_explain_shows_refusals_with_reasons(cli_inproc):
    # a BatchNorm before a zero-padded 3x3 conv cannot be folded exactly: a refusal, not an error
    result = cli_inproc("explain", "toy_models:refused_net", "--input-shape", "1,3,8,8")
    assert result.returncode == 0, result.output
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
