"""The operator algebra: affine maps that are one convolution, and the exact ways to combine them.

Every operation the compiler fuses is an affine map that can be written as

    y = conv(x, W, b, stride, padding, dilation, groups)        (zero padding unless stated)

`AffineConv` holds such a map with float64 weights. Linear layers acting on a channel axis are the
same thing with no spatial dimensions (`nd == 0`, weight `[C_out, C_in/groups]`).

Two operations combine them, each with a check that says why it would not be exact:

    sum:          A(x) + B(x)   = conv(x, pad(W_A) + pad(W_B), b_A + b_B)
                  exact when strides match and the kernels share a centre on every axis
    composition:  B(A(x))       = conv(x, W_B * W_A, B(b_A))
                  exact when B reads no padding, or A is pointwise without bias

Cost. `AffineConv.cost` gives multiply-accumulates per output position. MACs alone mislead on a
CPU: depthwise convolutions, norms and additions are memory-bound, so a depthwise 1xk + kx1 pair
with its BatchNorms and add is slower than one depthwise kxk although it has fewer MACs. The fusion
rules therefore compare `CostModel` estimates of latency, a linear model per operation:

    cost(op) = overhead + mac * MACs(dense) + mac_grouped * MACs(grouped) + byte * bytes moved

where "grouped" means fewer than `GROUPED_BELOW` input channels per group (depthwise convolutions,
BatchNorm as a depthwise 1x1, average pooling) and bytes moved counts the input read, the output
written and the weights read. An elementwise add costs `overhead + byte * 3 * elements * itemsize`.
The constants of `DEFAULT_COST` were fitted by `benchmarks/bench_cost_model.py` (one thread,
float32, eager CPU, 2-core x86 machine under load: the fit's median relative error was 0.26):
overhead 5.4 us, mac 0.045 ns, mac_grouped 0.14 ns, byte 0.02 ns. The model is coarse: on an idle
machine a re-run fits no better (median relative error 0.42, one thread), mostly because eager
PyTorch's depthwise convolutions take a fixed ~0.1 ms at these sizes whatever their kernel, which
one overhead shared by every operation cannot express. Re-run it on the target machine and pass
your own `CostModel` where the decision matters. `partition_sum` uses the model to split a
sum of many branches into the cheapest set of fused operators, whatever the order of the branches.

This module is pure torch: no torch.fx, no graphs.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from functools import reduce

import torch
import torch.nn.functional as F

Tuple = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class AffineConv:
    """`y = conv(x, weight, bias, stride, padding, dilation, groups)`, weights in float64."""

    weight: torch.Tensor  # [C_out, C_in // groups, *kernel], float64
    bias: torch.Tensor  # [C_out], float64
    stride: Tuple
    padding: Tuple
    dilation: Tuple
    groups: int = 1
    padding_mode: str = "zeros"  # only meaningful where some padding is non-zero

    # -- shape -------------------------------------------------------------------------------
    @property
    def nd(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> Tuple:
        return self.weight.shape[2:]  # a torch.Size: a tuple, made without a copy

    @property
    def is_pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: acts on each position separately."""
        return all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride) and not any(self.padding)

    @property
    def is_per_channel(self) -> bool:
        """Pointwise and diagonal: `y[c] = a[c] * x[c] + b[c]`."""
        return self.is_pointwise and self.groups == self.out_channels == self.in_channels

    @property
    def is_identity(self) -> bool:
        return self.is_per_channel and bool((self.weight == 1).all()) and not bool(self.bias.any())

    @property
    def is_crop(self) -> bool:
        """An identity 1x1 with negative padding on some axis and none positive (`crop`)."""
        return (all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)
                and any(p < 0 for p in self.padding) and all(p <= 0 for p in self.padding)
                and self.groups == self.out_channels == self.in_channels
                and bool((self.weight == 1).all()) and not bool(self.bias.any()))

    @property
    def has_padding(self) -> bool:
        return any(self.padding)

    @property
    def cost(self) -> int:
        """Multiply-accumulates per output position."""
        return self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel_size)

    def describe(self) -> str:
        if self.nd == 0:
            if self.is_per_channel:
                return f"channel affine ({self.out_channels})"
            return f"Linear {self.in_channels}->{self.out_channels}" + (
                f" groups={self.groups}" if self.groups > 1 else "")
        k = "x".join(str(v) for v in self.kernel_size)
        text = f"Conv{self.nd}d {k} {self.in_channels}->{self.out_channels}"
        if self.groups > 1:
            text += f" groups={self.groups}"
        if any(s != 1 for s in self.stride):
            text += f" stride={_short(self.stride)}"
        if any(d != 1 for d in self.dilation):
            text += f" dilation={_short(self.dilation)}"
        if self.has_padding:
            text += f" padding={_short(self.padding)}"
        if self.has_padding and self.padding_mode != "zeros":
            text += f" padding_mode={self.padding_mode}"
        return text

    # -- evaluation (reference semantics, used by tests and for checks) -----------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to `x` laid out as [N, C, *spatial] (or [N, C] when nd == 0)."""
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if self.nd == 0:
            if self.groups == 1:
                return F.linear(x, w, b)
            return conv(x.unsqueeze(-1), replace(self, weight=self.weight.unsqueeze(-1), stride=(1,),
                                                  padding=(0,), dilation=(1,))).squeeze(-1)
        if any(p < 0 for p in self.padding):  # a crop: read the kept part only
            amounts, op = split_crop(self)
            return op.apply(x[crop_key(amounts)])
        if self.has_padding and self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in (0, 1)]
            x = F.pad(x, pad, mode=self.padding_mode)
            return _CONV[self.nd](x, w, b, self.stride, 0, self.dilation, self.groups)
        return _CONV[self.nd](x, w, b, self.stride, self.padding, self.dilation, self.groups)


def conv(x: torch.Tensor, op: AffineConv) -> torch.Tensor:
    return op.apply(x)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _short(t: Tuple) -> str:
    return str(t[0]) if len(set(t)) == 1 else str(t)


def _f64(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return widened(t)
    return torch.as_tensor(t, dtype=torch.float64)


# float64 copies of float32 tensors, by id: (weak reference to the copy, the original, the
# original's version, the copy's version): an update in place of either forgets the link.
_WIDENED: dict[int, tuple[weakref.ref, torch.Tensor, int, int]] = {}


def widened(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64. A copy of a float32 tensor remembers its original while it lives (see
    `float32_source`), so that whoever stores it can keep the float32 tensor instead, exactly."""
    wide = t.detach().to(dtype=torch.float64)
    if t.dtype == torch.float32:
        _remember(wide, t.detach(), t._version)
    elif t.dtype == torch.float64 and wide is not t:  # widened again: the copy has the same source
        entry = _WIDENED.get(id(t))
        if entry is not None and entry[0]() is t:
            if entry[3] == t._version:
                _remember(wide, entry[1], entry[2])
    return wide


def _remember(wide: torch.Tensor, source: torch.Tensor, version: int) -> None:
    key = id(wide)

    def forget(ref, key=key):
        entry = _WIDENED.get(key)
        if entry is not None and entry[0] is ref:
            del _WIDENED[key]

    _WIDENED[key] = (weakref.ref(wide, forget), source, version, wide._version)


def float32_source(t: torch.Tensor) -> torch.Tensor | None:
    """The float32 tensor `t` was widened from by `widened` (or a same-size view of such a copy),
    holding exactly `t`'s values; None when unknown. Costs no arithmetic."""
    for candidate in (t, t._base):
        entry = _WIDENED.get(id(candidate)) if candidate is not None else None
        if entry is None or entry[0]() is not candidate:
            continue
        _, source, version, wide_version = entry
        if source._version != version or candidate._version != wide_version or source.shape != candidate.shape:
            return None
        if candidate is t:
            return source
        if (t.numel() == candidate.numel() and t.is_contiguous() and candidate.is_contiguous()
                and t.storage_offset() == candidate.storage_offset() == 0):
            return source.reshape(t.shape)
    return None


def _tuple(v, nd: int) -> Tuple:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(i) for i in v)
    return v * nd if len(v) == 1 else v


# --------------------------------------------------------------------------------------------
# Lifting graph operations into operators
# --------------------------------------------------------------------------------------------

def from_conv(weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
              padding_mode="zeros") -> AffineConv:
    """A convolution (or a linear layer when `weight` is 2-D) with integer padding."""
    weight = _f64(weight)
    nd = weight.dim() - 2
    b = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if bias is None else _f64(bias)
    return AffineConv(weight, b, _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd), int(groups),
                      padding_mode)


def from_linear(weight, bias=None) -> AffineConv:
    """`y = x @ W.T + b` along the channel axis."""
    return from_conv(weight, bias, (), (), (), 1)


def per_channel(scale, shift, nd: int) -> AffineConv:
    """`y[c] = scale[c] * x[c] + shift[c]` as a depthwise 1x..x1 convolution."""
    scale, shift = _f64(scale), _f64(shift)
    c = scale.numel()
    weight = scale.reshape(c, 1, *([1] * nd))
    return AffineConv(weight, shift.reshape(c).clone(), (1,) * nd, (0,) * nd, (1,) * nd, c)


def identity(channels: int, nd: int, device=None) -> AffineConv:
    ones = torch.ones(channels, dtype=torch.float64, device=device)
    return per_channel(ones, torch.zeros_like(ones), nd)


def batch_norm(running_mean, running_var, weight, bias, eps: float, nd: int) -> AffineConv:
    """BatchNorm with running statistics: `a = gamma / sqrt(var + eps)`, `b = beta - mean * a`."""
    mean, var = _vector64(running_mean), _vector64(running_var)
    a = torch.rsqrt(var + eps)
    if weight is not None:
        a *= _vector64(weight)
    shift = -mean * a
    if bias is not None:
        shift += _vector64(bias)
    c = a.numel()
    # `a` and `shift` are new tensors: no copy of them is needed (`per_channel` makes one).
    return AffineConv(a.reshape(c, *([1] * (nd + 1))), shift.reshape(c), (1,) * nd, (0,) * nd, (1,) * nd, c)


def _vector64(t) -> torch.Tensor:
    """A norm's statistic or affine parameter in float64. Unlike `widened`, its float32 origin
    is not remembered: a norm's constants end up in products, which float32 rarely holds."""
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


def zero_pad(channels: int, padding, nd: int, device=None) -> AffineConv:
    """`F.pad` with zeros, the same amount on both sides of each spatial axis: an identity 1x1
    convolution with that padding (its border is the bias, zero)."""
    ones = torch.ones(channels, dtype=torch.float64, device=device)
    op = per_channel(ones, torch.zeros_like(ones), nd)
    return replace(op, padding=_tuple(padding, nd))


def crop(channels: int, amounts, nd: int, device=None) -> AffineConv:
    """`x[..., a:-a, b:-b]`: the same number of positions dropped from both ends of each spatial
    axis, an identity 1x1 convolution with negative padding `-a, -b`.

    Negative padding means "start `a` positions in and read no padding": a convolution after the
    crop that reads none of the crop's border itself (padding <= 0 on that axis) is the same
    convolution with its padding reduced by `a` (`compose`). Lowered as a slice, then a convolution
    with the padding left (`split_crop`)."""
    return zero_pad(channels, tuple(-a for a in _tuple(amounts, nd)), nd, device)


def split_crop(op: AffineConv) -> tuple[Tuple, AffineConv]:
    """(`a` per spatial axis, `op'`) with `op(x) == op'(x[..., a:-a, ...])` and no negative padding."""
    amounts = tuple(max(-p, 0) for p in op.padding)
    return amounts, replace(op, padding=tuple(max(p, 0) for p in op.padding))


def crop_key(amounts: Tuple) -> tuple:
    """The index `x[key]` of a crop by `amounts` on the spatial axes of an [N, C, *spatial] tensor."""
    return (slice(None), slice(None)) + tuple(slice(a, -a) if a else slice(None) for a in amounts)


def avg_pool(channels: int, kernel_size, stride, padding, nd: int, divisor=None, device=None) -> AffineConv:
    """Average pooling that counts padding (`count_include_pad=True`): depthwise kxk of 1/k^2."""
    k = _tuple(kernel_size, nd)
    stride = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _tuple(stride, nd)
    divisor = divisor or math.prod(k)
    weight = torch.full((channels, 1, *k), 1.0 / divisor, dtype=torch.float64, device=device)
    bias = torch.zeros(channels, dtype=torch.float64, device=device)
    return AffineConv(weight, bias, stride, _tuple(padding, nd), (1,) * nd, channels)


# --------------------------------------------------------------------------------------------
# Simple transformations
# --------------------------------------------------------------------------------------------

def scaled(op: AffineConv, scale) -> AffineConv:
    """`scale * op(x)` with a scalar or a per-output-channel scale."""
    s = _f64(scale).to(op.weight.device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(op.out_channels)
    return replace(op, weight=op.weight * s.reshape(-1, *([1] * (op.weight.dim() - 1))), bias=op.bias * s)


def regrouped(op: AffineConv, groups: int) -> AffineConv:
    """The same map written with fewer groups (`groups` must divide `op.groups`).

    Each new group holds `r = op.groups // groups` old groups on its block diagonal.
    """
    if groups == op.groups:
        return op
    if op.groups % groups:
        raise ValueError(f"cannot regroup {op.groups} groups into {groups}")
    r = op.groups // groups
    co_g, ci_g = op.out_channels // op.groups, op.weight.shape[1]
    k = op.kernel_size
    w = op.weight.reshape(groups, r, co_g, 1, ci_g, *k)
    eye = torch.eye(r, dtype=w.dtype, device=w.device).reshape(1, r, 1, r, 1, *([1] * len(k)))
    weight = (w * eye).reshape(op.out_channels, r * ci_g, *k)
    return replace(op, weight=weight, groups=groups)


def dilated(op: AffineConv, dilation: Tuple) -> AffineConv:
    """The same map written with a smaller dilation that divides the current one (zeros between taps)."""
    if dilation == op.dilation:
        return op
    k_new, factors = [], []
    for k, d_old, d_new in zip(op.kernel_size, op.dilation, dilation):
        if k == 1:
            k_new.append(1)
            factors.append(1)
            continue
        if d_old % d_new:
            raise ValueError(f"dilation {d_new} does not divide {d_old}")
        f = d_old // d_new
        k_new.append((k - 1) * f + 1)
        factors.append(f)
    weight = op.weight.new_zeros(*op.weight.shape[:2], *k_new)
    index = (slice(None), slice(None)) + tuple(slice(None, None, f) for f in factors)
    weight[index] = op.weight
    return replace(op, weight=weight, dilation=tuple(dilation))


def as_pointwise(op: AffineConv) -> AffineConv:
    """A pointwise operator without spatial dimensions (nd = 0)."""
    assert op.is_pointwise
    return AffineConv(op.weight.reshape(op.weight.shape[0], op.weight.shape[1]), op.bias, (), (), (), op.groups)


def with_spatial_dims(op: AffineConv, nd: int) -> AffineConv:
    """A pointwise operator re-expressed with `nd` spatial dimensions of size 1."""
    assert op.is_pointwise
    if op.nd == nd:
        return op
    w = op.weight.reshape(op.weight.shape[0], op.weight.shape[1], *([1] * nd))
    return AffineConv(w, op.bias, (1,) * nd, (0,) * nd, (1,) * nd, op.groups)


def densest_groups(op: AffineConv) -> AffineConv:
    """Rewrite with the largest number of groups the weight's block structure allows."""
    g = op.groups
    cands = [d for d in _divisors(math.gcd(op.in_channels, op.out_channels)) if d > g and d % g == 0]
    for d in sorted(cands, reverse=True):
        dense = regrouped(op, 1).weight  # [Co, Ci, *k]
        co_d, ci_d = op.out_channels // d, op.in_channels // d
        blocks = dense.reshape(d, co_d, d, ci_d, *op.kernel_size)
        mask = ~torch.eye(d, dtype=torch.bool, device=dense.device).reshape(d, 1, d, *([1] * (1 + op.nd)))
        if not (blocks * mask).any():
            idx = torch.arange(d, device=dense.device)
            w = blocks[idx, :, idx]  # [d, co_d, ci_d, *k]
            return replace(op, weight=w.reshape(op.out_channels, ci_d, *op.kernel_size), groups=d)
    return op


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------------------------
# Sum:  A(x) + B(x)
# --------------------------------------------------------------------------------------------

def _centre2(op: AffineConv, axis: int) -> int:
    """Twice the offset of the kernel centre from the output position, in input pixels."""
    return -2 * op.padding[axis] + op.dilation[axis] * (op.kernel_size[axis] - 1)


def _padding_mode(ops) -> str | None:
    modes = {op.padding_mode for op in ops if op.has_padding}
    return modes.pop() if len(modes) == 1 else ("zeros" if not modes else None)


def sum_refusal(ops: list[AffineConv]) -> str | None:
    """Why `sum(ops)` cannot be one operator, or None when it can."""
    first = ops[0]
    for op in ops[1:]:
        if op.nd != first.nd:
            return "branches have different numbers of spatial dimensions"
        if op.in_channels != first.in_channels or op.out_channels != first.out_channels:
            return (f"branches have different channel counts ({first.in_channels}->{first.out_channels}"
                    f" vs {op.in_channels}->{op.out_channels})")
        if op.stride != first.stride:
            return f"branches have different strides ({_short(first.stride)} vs {_short(op.stride)})"
        for axis in range(first.nd):
            if _centre2(op, axis) != _centre2(first, axis):
                return (f"branch kernels are centred differently on axis {axis} "
                        f"({first.describe()} vs {op.describe()})")
    mode = _padding_mode(ops)
    if mode is None:
        return "branches pad with different padding modes"
    if mode != "zeros":
        # Summing kernels of different extents under reflect/replicate padding is not a kernel sum.
        geometry = {(op.kernel_size, op.padding, tuple(d if k > 1 else 1 for k, d in zip(op.kernel_size, op.dilation)))
                    for op in ops}
        if len(geometry) > 1:
            return f"padding_mode='{mode}' branches of different geometry cannot share one padding"
    return None


def _common_geometry(ops: list[AffineConv]) -> tuple[Tuple, Tuple, Tuple]:
    """Dilation, kernel size and padding of one kernel that holds every op's taps.

    Assumes equal strides and centres (see `sum_refusal`). Per axis the common dilation divides
    every dilation that matters and every offset between kernel starts.
    """
    dilation, kernel, padding = [], [], []
    for axis in range(ops[0].nd):
        spans = [op.dilation[axis] * (op.kernel_size[axis] - 1) for op in ops]
        widest = max(spans)
        ds = [op.dilation[axis] for op in ops if op.kernel_size[axis] > 1]
        ds += [(widest - s) // 2 for s in spans if s != widest]
        d = reduce(math.gcd, ds) if ds else 1
        dilation.append(d)
        kernel.append(widest // d + 1)
        padding.append((widest - _centre2(ops[0], axis)) // 2)
    return tuple(dilation), tuple(kernel), tuple(padding)


def _placement(op: AffineConv, dilation: Tuple, kernel: Tuple) -> tuple[slice, ...]:
    """Where `op`'s taps sit inside the common kernel (same centre, spread by the dilation ratio)."""
    index = []
    for k, d_op, d, big in zip(op.kernel_size, op.dilation, dilation, kernel):
        step = d_op // d if k > 1 else 1
        start = (big - 1 - step * (k - 1)) // 2
        index.append(slice(start, start + step * (k - 1) + 1, step))
    return tuple(index)


def add(ops: list[AffineConv]) -> AffineConv:
    """The single operator equal to `sum(op(x) for op in ops)`; check `sum_refusal` first."""
    reason = sum_refusal(ops)
    if reason:
        raise ValueError(reason)
    groups = reduce(math.gcd, (op.groups for op in ops))
    dilation, kernel, padding = _common_geometry(ops)
    first = ops[0]
    weight = first.weight.new_zeros(first.out_channels, first.in_channels // groups, *kernel)
    bias = first.bias.clone()
    for i, op in enumerate(ops):
        weight[(slice(None), slice(None)) + _placement(op, dilation, kernel)] += regrouped(op, groups).weight
        if i:
            bias += op.bias
    return AffineConv(weight, bias, first.stride, padding, dilation, groups, _padding_mode(ops))


def _sum_stub(ops: list[AffineConv]) -> AffineConv:
    """An operator with the geometry of `add(ops)` and zero weights that hold no memory (expanded
    scalars), for costing it."""
    groups = reduce(math.gcd, (op.groups for op in ops))
    dilation, kernel, padding = _common_geometry(ops)
    first = ops[0]
    zero = first.weight.new_zeros(())
    weight = zero.expand(first.out_channels, first.in_channels // groups, *kernel)
    return AffineConv(weight, zero.expand(first.out_channels), first.stride, padding, dilation, groups,
                      _padding_mode(ops))


def sum_cost(ops: list[AffineConv]) -> int:
    """Cost of `add(ops)` per output position, from geometry alone."""
    groups = reduce(math.gcd, (op.groups for op in ops))
    _, kernel, _ = _common_geometry(ops)
    return ops[0].out_channels * (ops[0].in_channels // groups) * math.prod(kernel)


# --------------------------------------------------------------------------------------------
# Composition:  B(A(x))
# --------------------------------------------------------------------------------------------

def compose_refusal(after: AffineConv, before: AffineConv) -> str | None:
    """Why `after(before(x))` cannot be one operator, or None when it can."""
    if after.in_channels != before.out_channels:
        return f"channel counts do not chain ({before.out_channels} -> {after.in_channels})"
    if after.nd != before.nd:
        return "operators have different numbers of spatial dimensions"
    for axis in range(min(after.nd, before.nd)):
        if after.padding[axis] > 0 and before.padding[axis] < 0:
            return (f"the convolution pads the cropped tensor on axis {axis}: its border would read zeros where "
                    "the uncropped input has values")
    if any(p > 0 for p in after.padding):
        # A 1x1 stride-1 map without bias sends zeros to zeros, so zero padding commutes with it,
        # whatever padding it has itself (a zero `F.pad` is such a map). (A negative padding, a
        # crop, reads no padding at all.)
        one_by_one = all(k == 1 for k in before.kernel_size) and all(s == 1 for s in before.stride)
        if not one_by_one:
            return ("the second convolution pads its input, and the first is not pointwise: "
                    "its border would see zeros instead of the first's output")
        if before.has_padding and (before.padding_mode != "zeros" or after.padding_mode != "zeros"):
            return "padding modes other than 'zeros' on both sides of a composition"
        if before.bias.any() and after.padding_mode == "zeros":
            return ("a per-channel shift before a zero-padded convolution: the padded border would "
                    "see zeros instead of the shift")
    if before.has_padding and before.padding_mode != "zeros" and not after.is_pointwise:
        return f"padding_mode='{before.padding_mode}' before a spatial convolution"
    return None


def composed_geometry(after: AffineConv, before: AffineConv) -> tuple[Tuple, Tuple, Tuple, Tuple, int]:
    """Stride, padding, dilation, kernel size and groups of `after(before(x))`."""
    stride, padding, dilation, kernel = [], [], [], []
    for a in range(before.nd):
        sa, da, ka, pa = before.stride[a], before.dilation[a], before.kernel_size[a], before.padding[a]
        sb, db, kb, pb = after.stride[a], after.dilation[a], after.kernel_size[a], after.padding[a]
        step_b = sa * db  # offset between taps of `after`, in input pixels
        ds = ([da] if ka > 1 else []) + ([step_b] if kb > 1 else [])
        d = reduce(math.gcd, ds) if ds else 1
        span = da * (ka - 1) + step_b * (kb - 1)
        stride.append(sa * sb)
        # `after`'s padding is only allowed when `before` is pointwise (stride 1, no padding).
        padding.append(pa + pb * sa)
        dilation.append(d)
        kernel.append(span // d + 1)
    groups = math.gcd(after.groups, before.groups)
    return tuple(stride), tuple(padding), tuple(dilation), tuple(kernel), groups


def composed_cost(after: AffineConv, before: AffineConv) -> int:
    """Multiply-accumulates per output position of the composition, without computing it."""
    _, _, _, kernel, groups = composed_geometry(after, before)
    return after.out_channels * (before.in_channels // groups) * math.prod(kernel)


def compose(after: AffineConv, before: AffineConv) -> AffineConv:
    """The single operator equal to `after(before(x))`; check `compose_refusal` first."""
    reason = compose_refusal(after, before)
    if reason:
        raise ValueError(reason)
    if after.is_per_channel:  # the common case (BatchNorm, layer scale after a conv): scale the rows
        scale = after.weight.reshape(-1)
        return replace(before, weight=before.weight * scale.reshape(-1, *([1] * (before.weight.dim() - 1))),
                       bias=before.bias * scale + after.bias)
    if before.is_per_channel:  # BatchNorm before a conv or Linear: scale the input columns
        return _compose_after_per_channel(after, before)
    stride, padding, dilation, kernel, g = composed_geometry(after, before)
    a, b = regrouped(before, g), regrouped(after, g)
    nd = a.nd
    co, cm, ci = b.out_channels, a.out_channels, a.in_channels
    wa = a.weight.reshape(g, cm // g, ci // g, *a.kernel_size)
    wb = b.weight.reshape(g, co // g, cm // g, *b.kernel_size)
    weight = a.weight.new_zeros(g, co // g, ci // g, *kernel)
    # Every tap j of `after` adds W_B[..., j] @ W_A at offset (sa * db * j) / d in the combined kernel.
    for j in _taps(b.kernel_size):
        block = torch.einsum("gom,gmi...->goi...", wb[(slice(None), slice(None), slice(None)) + j], wa)
        index = [slice(None)] * 3
        for axis in range(nd):
            start = a.stride[axis] * b.dilation[axis] * j[axis] // dilation[axis]
            step = a.dilation[axis] // dilation[axis] if a.kernel_size[axis] > 1 else 1
            index.append(slice(start, start + step * (a.kernel_size[axis] - 1) + 1, step))
        weight[tuple(index)] += block
    weight = weight.reshape(co, ci // g, *kernel)
    # Bias: `after` applied to the constant image `before.bias` (no padding is ever read there).
    wb_sum = b.weight.sum(dim=tuple(range(2, b.weight.dim()))) if nd else b.weight
    bias_in = a.bias.reshape(g, cm // g)
    bias = torch.einsum("gom,gm->go", wb_sum.reshape(g, co // g, cm // g), bias_in).reshape(co) + b.bias
    mode = before.padding_mode if before.has_padding else after.padding_mode
    return AffineConv(weight, bias, stride, padding, dilation, g, mode)


def _compose_after_per_channel(after: AffineConv, before: AffineConv) -> AffineConv:
    """`after(a * x + b)` for a per-channel `before`: the same values as the general rule (whose
    sums over the diagonal add only exact zeros), without expanding `before` to a dense matrix."""
    g, nd = after.groups, after.nd
    co, ci = after.out_channels, after.in_channels
    spatial = [1] * nd
    scale = before.weight.reshape(g, 1, ci // g, *spatial)
    weight = (after.weight.reshape(g, co // g, ci // g, *after.kernel_size) * scale).reshape(after.weight.shape)
    # Bias: `after` applied to the constant image `before.bias` (no padding is ever read there).
    wb_sum = after.weight.sum(dim=tuple(range(2, after.weight.dim()))) if nd else after.weight
    bias = torch.einsum("gom,gm->go", wb_sum.reshape(g, co // g, ci // g),
                        before.bias.reshape(g, ci // g)).reshape(co) + after.bias
    stride, padding, dilation, _, _ = composed_geometry(after, before)
    return replace(after, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation)


def _taps(kernel: Tuple):
    import itertools

    return itertools.product(*(range(k) for k in kernel))


# --------------------------------------------------------------------------------------------
# Concatenation along the output channels:  cat([A(x), B(x)], dim=channels)
# --------------------------------------------------------------------------------------------

def concat_refusal(ops: list[AffineConv]) -> str | None:
    """Why `cat([op(x) ...])` cannot be one operator, or None when it can."""
    first = ops[0]
    for op in ops[1:]:
        if op.in_channels != first.in_channels or op.nd != first.nd:
            return "branches read different channel counts"
        if op.stride != first.stride:
            return f"branches have different strides ({_short(first.stride)} vs {_short(op.stride)})"
        for axis in range(first.nd):
            if _centre2(op, axis) != _centre2(first, axis):
                return f"branch kernels are centred differently on axis {axis}"
    if _padding_mode(ops) is None:
        return "branches pad with different padding modes"
    return None


def concat(ops: list[AffineConv]) -> AffineConv:
    """One operator whose output channels are those of `ops`, in order; check `concat_refusal`."""
    reason = concat_refusal(ops)
    if reason:
        raise ValueError(reason)
    # Block-diagonal structure does not survive stacking along outputs: place each op densely,
    # then recover whatever groups the stacked weight still has.
    dilation, kernel, padding = _common_geometry(ops)
    first = ops[0]
    weight = first.weight.new_zeros(sum(op.out_channels for op in ops), first.in_channels, *kernel)
    row = 0
    for op in ops:
        rows = slice(row, row + op.out_channels)
        weight[(rows, slice(None)) + _placement(op, dilation, kernel)] += regrouped(op, 1).weight
        row += op.out_channels
    bias = torch.cat([op.bias for op in ops])
    merged = AffineConv(weight, bias, first.stride, padding, dilation, 1, _padding_mode(ops))
    return densest_groups(merged)


def concat_cost(ops: list[AffineConv]) -> int:
    """Cost of `concat(ops)` per output position (dense; `densest_groups` may lower it)."""
    _, kernel, _ = _common_geometry(ops)
    return sum(op.out_channels for op in ops) * ops[0].in_channels * math.prod(kernel)


# --------------------------------------------------------------------------------------------
# Cost: a latency estimate per operation, and the cheapest partition of a sum
# --------------------------------------------------------------------------------------------

GROUPED_BELOW = 8  # input channels per group under which MACs count at the grouped rate


@dataclass(frozen=True)
class CostModel:
    """Estimated latency of one operation, in nanoseconds (see the module docstring)."""

    overhead: float = 5400.0  # per operation
    mac: float = 0.045  # per multiply-accumulate of a dense (or widely grouped) convolution
    mac_grouped: float = 0.14  # per multiply-accumulate with < GROUPED_BELOW channels per group
    byte: float = 0.02  # per byte read or written

    def conv(self, op: AffineConv, in_elements: int, positions: int, itemsize: int = 4) -> float:
        """`op` reading `in_elements` values and producing `positions` outputs per output channel."""
        macs = op.cost * positions
        rate = self.mac_grouped if op.in_channels // op.groups < GROUPED_BELOW else self.mac
        moved = in_elements + positions * op.out_channels + op.weight.numel() + op.out_channels
        return self.overhead + rate * macs + self.byte * itemsize * moved

    def elementwise(self, elements: int, operands: int = 2, itemsize: int = 4) -> float:
        """An elementwise operation of `operands` inputs (an add, a multiply by a tensor)."""
        return self.overhead + self.byte * itemsize * elements * (operands + 1)


DEFAULT_COST = CostModel()


def geometry_key(op: AffineConv):
    """Branches with equal keys always merge: their sum has the same kernel as each of them."""
    return (op.kernel_size, op.stride, op.padding, op.dilation, op.padding_mode if op.has_padding else "zeros",
            op.nd)


def joins_for_free(peers: list[AffineConv], op: AffineConv) -> bool:
    """Does adding `op` to `sum(peers)` cost nothing? True when `op` has the geometry of every
    peer (so `partition_sum` always merges it with them), the sum stays exact, and the merged
    operator keeps the peers' groups, hence their kernel and cost (a depthwise 3x3 joining a dense
    3x3). Reads geometry only: `op` may be a stub with no weights of its own."""
    if not peers or any(geometry_key(p) != geometry_key(op) for p in peers):
        return False
    if sum_refusal(peers + [op]):
        return False
    return sum_cost(peers + [op]) <= sum_cost(peers)


def _set_partitions(items: list):
    """Every partition of `items` into non-empty blocks (Bell(n) of them: keep n small)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


EXHAUSTIVE_UP_TO = 7  # geometry classes searched exhaustively; more are merged greedily


def partition_sum(ops: list[AffineConv], op_cost, join_cost: float) -> tuple[list[list[int]], float]:
    """The cheapest way to compute `sum(ops)` over one input as a sum of fused operators.

    `op_cost(op)` estimates one operator (see `CostModel.conv`) from its geometry: a merged
    candidate is given with zero weights (its sum is not computed); `join_cost` is one add between two
    partial results. Branches of equal geometry always merge; the geometry classes are then
    grouped in every way that is exact (`sum_refusal`), exhaustively up to `EXHAUSTIVE_UP_TO`
    classes and greedily beyond. Returns the blocks (lists of indices into `ops`, in order of first
    appearance) and their total cost. The result does not depend on the order of `ops`.
    """
    classes: dict = {}
    for i, op in enumerate(ops):
        classes.setdefault(geometry_key(op), []).append(i)
    blocks = [classes[k] for k in sorted(classes, key=repr)]  # ties break alike in any order
    cache: dict[tuple, float] = {}

    def block_cost(members: tuple[int, ...]) -> float:
        if members not in cache:
            chosen = [ops[i] for i in members]
            if len(chosen) > 1 and sum_refusal(chosen):
                cache[members] = math.inf
            else:
                cache[members] = op_cost(_sum_stub(chosen) if len(chosen) > 1 else chosen[0])
        return cache[members]

    def total(grouping) -> float:
        return sum(block_cost(tuple(sorted(m))) for m in grouping) + join_cost * (len(grouping) - 1)

    if len(blocks) <= EXHAUSTIVE_UP_TO:
        best, best_cost = None, math.inf
        for part in _set_partitions(blocks):
            grouping = [[i for cls in block for i in cls] for block in part]
            c = total(grouping)
            if c < best_cost - 1e-9 * abs(c) or best is None:
                best, best_cost = grouping, c
    else:  # merge the pair of blocks that saves most, while some merge saves anything
        best = [list(b) for b in blocks]
        best_cost = total(best)
        improved = True
        while improved and len(best) > 1:
            improved = False
            for i in range(len(best)):
                for j in range(i + 1, len(best)):
                    trial = [b for k, b in enumerate(best) if k not in (i, j)] + [best[i] + best[j]]
                    c = total(trial)
                    if c < best_cost:
                        best, best_cost, improved = trial, c, True
                        break
                if improved:
                    break
    best = sorted((sorted(b) for b in best), key=lambda b: b[0])
    return best, best_cost
