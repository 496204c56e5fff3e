"""Numerical equivalence of a fused model and its original, and default tolerances."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten

from .errors import VerificationError

# (rtol, atol) per dtype: the allowed difference is atol + rtol * max|reference| per output tensor.
# Fused weights are computed in float64, so the difference is float rounding in the model's dtype.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (2e-2, 1e-3),
    torch.bfloat16: (8e-2, 1e-2),
}


@dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    allowed: float
    where: str  # which output holds the largest excess

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.allowed


def tolerances(dtype: torch.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def compare(reference, candidate, rtol: float | None = None, atol: float | None = None) -> Comparison:
    """Compare two (possibly nested) outputs tensor by tensor."""
    ref_leaves, ref_spec = tree_flatten(reference)
    cand_leaves, cand_spec = tree_flatten(candidate)
    if ref_spec != cand_spec:
        return Comparison(float("inf"), 0.0, "output structure differs")
    worst = Comparison(0.0, 0.0, "")
    worst_excess = -float("inf")
    for i, (r, c) in enumerate(zip(ref_leaves, cand_leaves)):
        if not isinstance(r, torch.Tensor):
            if r != c:
                return Comparison(float("inf"), 0.0, f"output {i} differs")
            continue
        if r.shape != c.shape:
            return Comparison(float("inf"), 0.0, f"output {i} has shape {tuple(c.shape)}, not {tuple(r.shape)}")
        if not r.is_floating_point():
            diff = 0.0 if torch.equal(r, c) else float("inf")
            allowed = 0.0
        else:
            rt, at = tolerances(r.dtype, rtol, atol)
            r64, c64 = r.detach().double(), c.detach().double()
            if r64.numel() == 0:
                continue
            diff = float((r64 - c64).abs().max()) if r64.numel() else 0.0
            if torch.isnan(r64).any() or torch.isnan(c64).any():
                same_nan = torch.equal(torch.isnan(r64), torch.isnan(c64))
                diff = float((r64 - c64).nan_to_num(0.0).abs().max()) if same_nan else float("inf")
            allowed = at + rt * float(r64.nan_to_num(0.0).abs().max())
        if diff - allowed > worst_excess:
            worst_excess = diff - allowed
            worst = Comparison(diff, allowed, f"output {i}")
    return worst


def check(reference, candidate, model_name: str, rtol=None, atol=None) -> Comparison:
    result = compare(reference, candidate, rtol, atol)
    if not result.ok:
        raise VerificationError(
            f"fused {model_name} disagrees with the original on the example input: "
            f"max |difference| {result.max_abs_diff:.3g} at {result.where}, allowed {result.allowed:.3g}. "
            "This is a bug in reparam (please report it with the model); pass verify=False to get the "
            "fused model anyway, or rtol/atol if the tolerance is too tight for your dtype.",
            result.max_abs_diff, result.allowed)
    return result
