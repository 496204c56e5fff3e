"""One comparison for every check: each output judged against its own scale.

A backbone returns feature maps of very different magnitudes. A written file whose smallest
output is five times too large must fail the export check, although its error is tiny next to
the largest output (a single scale over all outputs would let it pass).
"""

from __future__ import annotations

import pytest
import torch
from deploy_models import SmallOutputWrong, four_stages

from reparam import export as ex
from reparam.verify import DEFAULT_TOLERANCES, compare


def _break_the_writer(monkeypatch, module):
    real = module.write

    def wrong(fused, example, path, **kwargs):
        return real(SmallOutputWrong(fused), example, path, **kwargs)

    monkeypatch.setattr(module, "write", wrong)


def test_the_wrong_output_is_small_next_to_the_largest():
    # the premise: judged with one scale over all outputs, the error would be within tolerance
    model = four_stages()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        right, wrong = model(x), SmallOutputWrong(model)(x)
    error = (wrong[3] - right[3]).abs().max().item()
    rtol, atol = DEFAULT_TOLERANCES[torch.float32]
    global_allowance = atol + rtol * max(t.abs().max().item() for t in right)
    assert 0 < error < global_allowance
    result = compare(right, wrong)
    assert not result.ok and result.where == "output 3"


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_wrong_small_output_fails_the_export_check(tmp_path, monkeypatch, fmt):
    _break_the_writer(monkeypatch, ex.FORMATS[fmt])
    with pytest.raises(ex.CheckFailure, match="disagrees") as info:
        ex.export_model(four_stages(), torch.randn(1, 3, 16, 16), tmp_path / f"net.{fmt}")
    assert list(tmp_path.iterdir()) == []
    checks = info.value.checks
    assert len(checks) == 2 and not any(c.ok for c in checks)
    assert all(c.where == "output 3" for c in checks)
    assert "at output 3" in str(info.value)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_right_multi_output_export_passes(tmp_path, fmt):
    result = ex.export_model(four_stages(), torch.randn(1, 3, 16, 16), tmp_path / f"net.{fmt}")
    assert [c.ok for c in result.checks] == [True, True]
    assert all(c.allowed < 1e-3 for c in result.checks)  # held to the smallest output's scale


def test_nan_rule_is_the_same_everywhere():
    nan, inf = float("nan"), float("inf")
    assert compare(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.0])).ok
    assert not compare(torch.tensor([nan, 1.0]), torch.tensor([0.0, 1.0])).ok
    assert not compare(torch.tensor([0.0, 1.0]), torch.tensor([nan, 1.0])).ok
    assert compare(torch.tensor([inf, 1.0]), torch.tensor([inf, 1.0])).ok
    assert not compare(torch.tensor([inf, 1.0]), torch.tensor([-inf, 1.0])).ok
    assert not compare(torch.tensor([inf, 1.0]), torch.tensor([1.0, 1.0])).ok
    # an infinity in the reference does not make every difference acceptable
    assert not compare(torch.tensor([inf, 1.0]), torch.tensor([inf, 2.0])).ok


def test_numpy_outputs_compare_like_tensors():
    import numpy as np

    reference = (torch.ones(2, 3), torch.full((4,), 1e-3))
    structure = compare(reference, [np.ones((2, 3), np.float32), np.full(4, 1e-3, np.float32)])
    assert not structure.ok and "structure" in structure.where  # a tuple is not a list
    assert compare(list(reference), [np.ones((2, 3), np.float32), np.full(4, 1e-3, np.float32)]).ok
    assert not compare(list(reference), [np.ones((2, 3), np.float32), np.full(4, 5e-3, np.float32)]).ok


def test_tolerances_are_per_dtype():
    x64 = torch.tensor([1.0], dtype=torch.float64)
    assert not compare(x64, x64 + 1e-7).ok  # float64: 1e-9 relative
    x32 = torch.tensor([1.0])
    assert compare(x32, x32 + 1e-5).ok  # float32: 1e-4 relative
    assert not compare(x32, x32 + 1e-3).ok
