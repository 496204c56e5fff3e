"""The fusion report: what was fused, what was refused and why, and counts before and after.

A `Report` is plain data. `str(report)` renders it as tables for people; `report.to_dict()` gives
JSON-ready data for tools.
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class FusedRegion:
    """One new module that replaces several original operations."""

    name: str  # attribute name of the new module in the fused GraphModule
    op: str  # what it is, e.g. "Conv2d 3x3 48->48 groups=48 stride=1"
    members: tuple[str, ...]  # original module names (or graph node names) folded into it
    source: str  # graph node the new module reads from


@dataclass(frozen=True)
class Refusal:
    """A structure that was left as it was, and why."""

    where: str  # original module names / graph nodes involved
    reason: str


@dataclass(frozen=True)
class Leaf:
    """A submodule that torch.fx could not trace; it was kept whole and fused inside if possible."""

    module: str
    reason: str
    fused_inside: int = 0  # how many regions were fused within it


@dataclass(frozen=True)
class Counts:
    """Size of a model for the example input: graph nodes, parameters, multiply-accumulates (norms
    and pooling included, like the depthwise convolutions that can replace them) and the latency
    the cost model of the fusion rules estimates (`reparam.affine.CostModel`), in microseconds."""

    nodes: int
    params: int
    macs: int
    latency_us: float = 0.0


@dataclass
class Report:
    """Everything `reparam.fuse` did to a model."""

    model: str
    regions: list[FusedRegion] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    leaves: list[Leaf] = field(default_factory=list)
    before: Counts | None = None
    after: Counts | None = None
    max_abs_diff: float | None = None  # measured on the example input, None if not verified
    tolerance: float | None = None  # the allowed absolute difference used for verification
    fuse_seconds: float | None = None  # time spent fusing, verification excluded
    # What the fused model assumes or keeps that the caller should know (arguments fixed to the
    # values they had when fused, hooks kept, weight normalizations applied once).
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One paragraph: counts before and after and the verification result."""
        lines = [f"reparam report for {self.model}"]
        if self.before and self.after:
            lines.append(format_table(
                ["", "before", "after", "ratio"],
                [
                    ["graph nodes", self.before.nodes, self.after.nodes, _ratio(self.after.nodes, self.before.nodes)],
                    ["parameters", f"{self.before.params:,}", f"{self.after.params:,}", _ratio(self.after.params, self.before.params)],
                    ["MACs", f"{self.before.macs:,}", f"{self.after.macs:,}", _ratio(self.after.macs, self.before.macs)],
                ] + ([["est. latency (us)", f"{self.before.latency_us:,.0f}", f"{self.after.latency_us:,.0f}",
                       _ratio(self.after.latency_us, self.before.latency_us)]] if self.before.latency_us else []),
            ))
        lines.append(
            f"{len(self.regions)} fused regions, {len(self.refusals)} refusals, {len(self.leaves)} untraceable leaves"
        )
        if self.max_abs_diff is not None:
            lines.append(f"verified on the example input: max |fused - original| = {self.max_abs_diff:.3g}"
                         f" (allowed {self.tolerance:.3g})")
        else:
            lines.append("not verified")
        return "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.summary()]
        if self.regions:
            rows = [[r.name, r.op, ", ".join(r.members)] for r in self.regions]
            parts.append("Fused regions\n" + format_table(["new module", "operation", "replaces"], rows))
        if self.refusals:
            rows = [[r.where, r.reason] for r in self.refusals]
            parts.append("Refused (left as they were)\n" + format_table(["where", "reason"], rows))
        if self.leaves:
            rows = [[l.module, l.reason, l.fused_inside] for l in self.leaves]
            parts.append("Untraceable submodules (kept as leaves)\n"
                         + format_table(["module", "reason", "fused inside"], rows))
        if self.notes:
            parts.append("Notes\n" + "\n".join(textwrap.fill(n, 100, initial_indent="- ", subsequent_indent="  ")
                                                for n in self.notes))
        return "\n\n".join(parts)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f}" if b else "-"


def format_table(header: list, rows: list[list], wrap: int = 90, right_align: bool = False) -> str:
    """A plain-text table. Cells of the last column longer than `wrap` continue on further lines;
    `right_align` aligns every column but the first to the right (for columns of numbers)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    widths[-1] = min(wrap, widths[-1])

    def fit(i: int, text: str) -> str:
        return text.rjust(widths[i]) if right_align and i else text.ljust(widths[i])

    out = []
    for k, row in enumerate(cells):
        last = textwrap.wrap(row[-1], widths[-1], break_on_hyphens=False) or [""]
        for j, piece in enumerate(last):
            lead = row[:-1] if j == 0 else [""] * (len(row) - 1)
            out.append("  ".join([fit(i, c) for i, c in enumerate(lead)] + [fit(len(row) - 1, piece)]).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
