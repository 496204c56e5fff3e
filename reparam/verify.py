"""Numerical equivalence of two models' outputs: the one comparison reparam uses everywhere.

`fuse` verifies the fused model against the original with it, every exporter checks the file it
wrote with it (against the fused and the unfused model), and the tests use it too.

Rules:
- Outputs are compared tensor by tensor (any nesting of tuples, lists and dicts; the structure
  must be the same). Each tensor is judged against its own scale: the allowed difference is
  `atol + rtol * max|reference|` over that tensor's finite values, so a small output (a backbone's
  high-resolution feature map, a logit scale) is held to its own magnitude, not to the largest
  output's.
- Tolerances depend on the reference's dtype (`DEFAULT_TOLERANCES`): fused weights are computed
  in float64 and rounded once, so what remains is rounding in the model's dtype.
- Non-finite values: a NaN must face a NaN, and an infinity the same infinity; anywhere else a
  non-finite value is a mismatch. Differences and scales are taken over the finite entries.
- Integer and boolean tensors must be equal; other values (ints, strings, None) must be equal.
- Arrays that are not torch tensors (NumPy arrays from ONNX Runtime, for instance) are compared
  as tensors.
"""

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

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        where = f" at {self.where}" if self.where else ""
        return f"max |difference| {self.max_abs_diff:.3g}{where}, allowed {self.allowed:.3g}: {verdict}"


def tolerances(dtype: torch.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def compare(reference, candidate, rtol: float | None = None, atol: float | None = None) -> Comparison:
    """Compare two (possibly nested) outputs tensor by tensor, each against its own scale.

    Returns the output with the largest excess over its allowance (or, when all pass, the largest
    excess that is still within). rtol/atol override the dtype's defaults for every output.
    """
    ref_leaves, ref_spec = tree_flatten(reference)
    cand_leaves, cand_spec = tree_flatten(candidate)
    if ref_spec != cand_spec:
        return Comparison(float("inf"), 0.0, f"the output structure ({_describe(cand_spec)},"
                                             f" expected {_describe(ref_spec)})")
    worst = Comparison(0.0, 0.0, "")
    worst_excess = -float("inf")
    for i, (r, c) in enumerate(zip(ref_leaves, cand_leaves)):
        r, c = _as_tensor(r), _as_tensor(c)
        if not isinstance(r, torch.Tensor) or not isinstance(c, torch.Tensor):
            if isinstance(r, torch.Tensor) or isinstance(c, torch.Tensor) or r != c:
                return Comparison(float("inf"), 0.0, f"output {i} ({c!r:.40}, expected {r!r:.40})")
            continue
        if r.shape != c.shape:
            return Comparison(float("inf"), 0.0, f"output {i} (shape {tuple(c.shape)},"
                                                 f" expected {tuple(r.shape)})")
        if r.numel() == 0:
            continue
        if not r.is_floating_point() and not r.is_complex():
            diff, allowed = (0.0 if torch.equal(r, c.to(r.dtype)) else float("inf")), 0.0
        else:
            rt, at = tolerances(r.dtype, rtol, atol)
            diff, scale = _difference(r.detach().cpu(), c.detach().cpu())
            allowed = at + rt * scale
        if diff - allowed > worst_excess:
            worst_excess = diff - allowed
            worst = Comparison(diff, allowed, f"output {i}")
    return worst


def _difference(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(max |candidate - reference| over finite entries, max |reference| over finite entries);
    inf when the non-finite entries do not face the same non-finite value."""
    r64 = reference.to(torch.complex128 if reference.is_complex() else torch.float64)
    c64 = candidate.to(r64.dtype)
    finite_r, finite_c = torch.isfinite(r64), torch.isfinite(c64)
    if not torch.equal(finite_r, finite_c):
        return float("inf"), _max_abs(r64[finite_r])
    special = ~finite_r
    if special.any():
        same_nan = torch.equal(torch.isnan(r64[special]), torch.isnan(c64[special]))
        inf_r, inf_c = r64[special].nan_to_num(0.0), c64[special].nan_to_num(0.0)
        if not same_nan or not torch.equal(inf_r, inf_c):
            return float("inf"), _max_abs(r64[finite_r])
    return _max_abs(r64[finite_r] - c64[finite_r]), _max_abs(r64[finite_r])


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _as_tensor(value):
    if isinstance(value, torch.Tensor) or not hasattr(value, "__array__"):
        return value
    return torch.as_tensor(value)


def _describe(spec) -> str:
    n = spec.num_leaves
    kind = "a single value" if spec.is_leaf() else f"a {getattr(spec.type, '__name__', spec.type)}"
    return f"{kind} of {n}" if not spec.is_leaf() else kind


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
