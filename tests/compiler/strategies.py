"""Hypothesis strategies that build random reparameterizable modules (and random affine operators).

Every strategy draws a *spec*: plain frozen dataclasses that hypothesis prints when a property fails,
so a counterexample reads as a description of the network. `build_net(spec)` turns a spec into a real
`nn.Module` (float64, eval mode) and an input tensor. Parameter and buffer values are not drawn by
hypothesis: each spec carries a seed, and `randomize` fills every conv weight/bias, every BatchNorm's
running_mean, running_var, weight, bias and eps, and every layer-scale/shift parameter from it (a
fresh BatchNorm, mean 0 and var 1, hides bugs).

What the specs describe
-----------------------
`Block`: `out = s0*b0(x) + s1*b1(x) + ...` over branches b_i (conv [+BN], BN-only skip, identity,
AvgPool with count_include_pad=True), each sign s_i = +-1; then optionally a layer scale
(`gamma * out`, `out * gamma`, `out / gamma` with a per-channel or scalar parameter, or a Python
float), a per-channel shift (`out + beta`, `beta + out`, `out - beta`, `beta - out`), and an
identity residual `x + out`. The sums are written left to right with `+`/`-`, `torch.add`/
`torch.sub`, `out.add(y)`/`out.sub(y)` or `torch.add(out, y, alpha=+-1)`, or as a balanced tree
`(a + b) + (c - d)`; convolutions as `nn.ConvNd` modules (padding as numbers or 'same', padding
modes zeros/reflect/replicate/circular) or as `F.convNd` with parameters. `Concat` stacks several
blocks over one input with `torch.cat(dim=1)`. A network (`Net`) is a chain of parts with a
nonlinearity (ReLU, GELU, tanh, SiLU, sigmoid; module or function) between consecutive parts.

`fusible_blocks` builds blocks that the compiler must collapse into exactly one convolution, and
knows it by construction: every branch has the block's stride, is centred (padding =
dilation*(k-1)//2 per axis, odd kernels), and its taps lie on the tap grid of one "main" conv
branch: per axis `k_b == 1`, or `d_b % d_main == 0` and `d_b*(k_b-1) <= d_main*(k_main-1)`.
All conv branches share the main conv's groups; BN, identity and pooling branches are depthwise
(their groups are a multiple of the main's). So the complete sum has the main conv's geometry:
fused cost == main conv cost <= cost of the parts, and the sum is exact. The branches come in any
order and the sum may be written as a balanced tree, so partial sums (3x1 + 1x3 before the 3x3)
can cost more than their parts: only the complete sum counts. Under padding modes other than
zeros every branch is a conv of the main's geometry (the compiler does not mix geometries there).

`free_blocks` drops the grid and the groups rules (any kernel 1..7 including even ones, dilation
1/2, groups per branch, a common centre that need not be 0) but keeps a shared centre and stride:
every sum is exact, but the cost rule may refuse some.

`DefectSpec` is a structure the compiler must refuse (see `DEFECTS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from reparam import affine

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)

MAX_C = 8
ODD = (1, 3, 5, 7)
# Spatial size per axis of the input, by number of spatial dims (small: the model's run time is noise).
SIZES = {1: (1, 12), 2: (1, 8), 3: (1, 5)}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ================================================================================================
# Specs
# ================================================================================================

@dataclass(frozen=True)
class ConvBranch:
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int
    bias: bool
    bn: bool
    functional: bool = False  # F.convNd with parameters instead of nn.ConvNd
    padding_mode: str = "zeros"
    same: bool = False  # written padding='same' (stride 1, centred)


@dataclass(frozen=True)
class BNBranch:
    """A BatchNorm-only skip."""


@dataclass(frozen=True)
class IdentityBranch:
    module: bool  # through nn.Identity (True) or the raw input (False)


@dataclass(frozen=True)
class PoolBranch:
    kernel: tuple[int, ...]
    padding: tuple[int, ...]


@dataclass(frozen=True)
class BlockSpec:
    nd: int
    cin: int
    cout: int
    stride: tuple[int, ...]
    branches: tuple
    signs: tuple[int, ...]
    spelling: str = "op"  # "op", "torch", "method", "alpha"; "tree": balanced pairwise sums
    # None, "channel" (parameter [C, 1..]), "scalar" (parameter []), "bcast" (parameter [1, C, 1..]),
    # "div" (out / parameter [C, 1..]), "const" (a Python float)
    scale: str | None = None
    scale_left: bool = True
    shift: str | None = None  # per-channel parameter beta: "add" out + beta, "radd" beta + out,
    #                           "sub" out - beta, "rsub" beta - out; after the scale
    residual: bool = False  # x + out, outside the scale
    main: int = 0  # fusible blocks: index of the branch whose geometry the fused conv has


@dataclass(frozen=True)
class ConcatSpec:
    """`torch.cat([block(x) for block in blocks], dim=1)`: sub-blocks over one input, stacked."""

    nd: int
    cin: int
    blocks: tuple  # BlockSpec, each reading the same input

    @property
    def cout(self) -> int:
        return sum(b.cout for b in self.blocks)

    @property
    def stride(self) -> tuple[int, ...]:
        return self.blocks[0].stride


@dataclass(frozen=True)
class DefectSpec:
    """A structure that must be refused (kind in DEFECTS); in a `Net` it is attribute `part{i}`."""

    kind: str
    nd: int
    cin: int
    cout: int
    kernels: tuple[int, ...] = ()
    bn: tuple[bool, ...] = ()
    pre_conv: bool = False


# The defects (modules in DEFECT_MODULES; what each leaves behind: `defect_expectation`):
#   bn_before_padded_conv  BatchNorm (a per-channel shift) before a zero-padded conv [+ BN]
#   bn_without_stats       [conv ->] BatchNorm(track_running_stats=False)
#   reflect_sum            two padding_mode='reflect' convs [+ BN] of different kernel sizes, summed
#   cost                   depthwise kxk conv + BN, then a dense 1x1 conv that expands channels
DEFECTS = ("bn_before_padded_conv", "bn_without_stats", "reflect_sum", "cost")


@dataclass(frozen=True)
class NetSpec:
    nd: int
    batch: int
    size: tuple[int, ...]
    cin: int
    parts: tuple  # BlockSpec, ConcatSpec or DefectSpec, a nonlinearity between consecutive parts
    acts: tuple[str, ...]  # "none": the next part reads the previous one's output directly
    seed: int

    @property
    def blocks(self) -> list:
        """The parts that must each become one conv (blocks and concatenations of blocks)."""
        return [p for p in self.parts if isinstance(p, (BlockSpec, ConcatSpec))]


# ================================================================================================
# Modules
# ================================================================================================

class ConvBN(nn.Module):
    """A conv branch: `nn.ConvNd` or `F.convNd` with parameters, optionally followed by BatchNorm."""

    def __init__(self, nd: int, cin: int, cout: int, stride, b: ConvBranch):
        super().__init__()
        self.nd, self.functional = nd, b.functional
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), b.padding, b.dilation, b.groups
        if b.same:
            self.padding = "same"
        if b.functional:
            self.weight = nn.Parameter(torch.empty(cout, cin // b.groups, *b.kernel))
            self.bias = nn.Parameter(torch.empty(cout)) if b.bias else None
        else:
            self.conv = CONV[nd](cin, cout, b.kernel, stride, self.padding, b.dilation, b.groups, bias=b.bias,
                                 padding_mode=b.padding_mode)
        self.bn = BN[nd](cout) if b.bn else None

    def forward(self, x):
        if self.functional:
            y = FCONV[self.nd](x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return y


class RawInput(nn.Module):
    """Marker for an identity branch that uses `x` itself (no module call)."""


def _combine(out, y, sign: int, spelling: str):
    if spelling == "torch":
        return torch.add(out, y) if sign > 0 else torch.sub(out, y)
    if spelling == "method":
        return out.add(y) if sign > 0 else out.sub(y)
    if spelling == "alpha":
        return torch.add(out, y, alpha=sign)
    return out + y if sign > 0 else out - y


def _tree_sum(terms: list) -> object:
    """Balanced pairwise sum of signed terms [(value, sign)], as `(a + b) + (c - d)`."""
    while len(terms) > 1:
        nxt = []
        for i in range(0, len(terms) - 1, 2):
            (a, sa), (b, sb) = terms[i], terms[i + 1]
            if sa == sb:
                nxt.append((a + b, sa))
            elif sa > 0:
                nxt.append((a - b, 1))
            else:
                nxt.append((b - a, 1))
        if len(terms) % 2:
            nxt.append(terms[-1])
        terms = nxt
    value, sign = terms[0]
    return value if sign > 0 else -value


class Block(nn.Module):
    """Signed sum of branches over one input, then layer scale, shift and residual (see BlockSpec)."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        nd, cin, cout = spec.nd, spec.cin, spec.cout
        mods = []
        for b in spec.branches:
            if isinstance(b, ConvBranch):
                mods.append(ConvBN(nd, cin, cout, spec.stride, b))
            elif isinstance(b, BNBranch):
                mods.append(BN[nd](cout))
            elif isinstance(b, IdentityBranch):
                mods.append(nn.Identity() if b.module else RawInput())
            elif isinstance(b, PoolBranch):
                mods.append(POOL[nd](b.kernel, spec.stride, b.padding, count_include_pad=True))
            else:
                raise TypeError(b)
        self.branches = nn.ModuleList(mods)
        self.signs = list(spec.signs)
        self.spelling, self.scale, self.scale_left = spec.spelling, spec.scale, spec.scale_left
        self.shift, self.residual = spec.shift, spec.residual
        if spec.scale in ("channel", "div"):
            self.gamma = nn.Parameter(torch.ones(cout, *([1] * nd)))
        elif spec.scale == "bcast":
            self.gamma = nn.Parameter(torch.ones(1, cout, *([1] * nd)))
        elif spec.scale == "scalar":
            self.gamma = nn.Parameter(torch.ones(()))
        if spec.shift:
            self.beta = nn.Parameter(torch.zeros(cout, *([1] * nd)))

    def forward(self, x):
        ys = [x if isinstance(branch, RawInput) else branch(x) for branch in self.branches]
        if self.spelling == "tree":
            out = _tree_sum(list(zip(ys, self.signs)))
        else:
            out = None
            for y, sign in zip(ys, self.signs):
                if out is None:
                    out = y if sign > 0 else -y
                else:
                    out = _combine(out, y, sign, self.spelling)
        if self.scale == "div":
            out = out / self.gamma
        elif self.scale == "const":
            out = 0.75 * out if self.scale_left else out * -1.25
        elif self.scale is not None:
            out = self.gamma * out if self.scale_left else out * self.gamma
        if self.shift == "add":
            out = out + self.beta
        elif self.shift == "radd":
            out = self.beta + out
        elif self.shift == "sub":
            out = out - self.beta
        elif self.shift == "rsub":
            out = self.beta - out
        if self.residual:
            out = x + out
        return out


class Concat(nn.Module):
    def __init__(self, spec: ConcatSpec):
        super().__init__()
        self.blocks = nn.ModuleList(Block(b) for b in spec.blocks)

    def forward(self, x):
        return torch.cat([b(x) for b in self.blocks], dim=1)


# -- defects -------------------------------------------------------------------------------------

class BNBeforePaddedConv(nn.Module):
    """BatchNorm (a per-channel shift) before a zero-padded conv: the border would see the shift."""

    def __init__(self, d: DefectSpec):
        super().__init__()
        k = d.kernels[0]
        self.bn = BN[d.nd](d.cin)
        self.conv = CONV[d.nd](d.cin, d.cout, k, padding=k // 2, bias=False)
        self.bn2 = BN[d.nd](d.cout) if d.bn[0] else None

    def forward(self, x):
        y = self.conv(self.bn(x))
        return y if self.bn2 is None else self.bn2(y)


class BNWithoutStats(nn.Module):
    """BatchNorm with track_running_stats=False: batch statistics even in eval, not affine."""

    def __init__(self, d: DefectSpec):
        super().__init__()
        self.conv = CONV[d.nd](d.cin, d.cout, d.kernels[0], padding=d.kernels[0] // 2) if d.pre_conv else None
        self.bn = BN[d.nd](d.cout if d.pre_conv else d.cin, track_running_stats=False,
                           affine=d.bn[0] or not d.pre_conv)

    def forward(self, x):
        if self.conv is not None:
            x = self.conv(x)
        return self.bn(x)


class ReflectSum(nn.Module):
    """Two padding_mode='reflect' branches of different kernel sizes, summed."""

    def __init__(self, d: DefectSpec):
        super().__init__()
        self.a = CONV[d.nd](d.cin, d.cout, d.kernels[0], padding=d.kernels[0] // 2, padding_mode="reflect")
        self.b = CONV[d.nd](d.cin, d.cout, d.kernels[1], padding=d.kernels[1] // 2, padding_mode="reflect")
        self.a_bn = BN[d.nd](d.cout) if d.bn[0] else None
        self.b_bn = BN[d.nd](d.cout) if d.bn[1] else None

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.a_bn is not None:
            a = self.a_bn(a)
        if self.b_bn is not None:
            b = self.b_bn(b)
        return a + b


class CostDefect(nn.Module):
    """Depthwise kxk conv + BN, then a dense 1x1 conv expanding channels: fusing costs more."""

    def __init__(self, d: DefectSpec):
        super().__init__()
        k = d.kernels[0]
        self.dw = CONV[d.nd](d.cin, d.cin, k, padding=k // 2, groups=d.cin, bias=False)
        self.bn = BN[d.nd](d.cin)
        self.pw = CONV[d.nd](d.cin, d.cout, 1, bias=d.bn[0])

    def forward(self, x):
        return self.pw(self.bn(self.dw(x)))


DEFECT_MODULES = {"bn_before_padded_conv": BNBeforePaddedConv, "bn_without_stats": BNWithoutStats,
                  "reflect_sum": ReflectSum, "cost": CostDefect}


def defect_expectation(d: DefectSpec, name: str) -> dict:
    """What must remain of a defect after fusion and what its refusal must name.

    kept:    module names that must still be called in the fused graph
    named:   module names that one refusal's `where` must all contain
    convs:   convolutions the defect leaves (its fusible parts fused, the refused step kept apart)
    bns:     BatchNorms the defect leaves
    """
    p = name + "."
    if d.kind == "bn_before_padded_conv":
        return dict(kept=[p + "bn"] + ([] if d.bn[0] else [p + "conv"]), named=[p + "bn", p + "conv"],
                    convs=1, bns=1)
    if d.kind == "bn_without_stats":
        return dict(kept=[p + "bn"] + ([p + "conv"] if d.pre_conv else []), named=[p + "bn"],
                    convs=int(d.pre_conv), bns=1)
    if d.kind == "reflect_sum":
        kept = [p + c for c, bn in zip("ab", d.bn) if not bn]
        return dict(kept=kept, named=[p + "a", p + "b"], convs=2, bns=0)
    if d.kind == "cost":
        return dict(kept=[p + "pw"], named=[p + "dw", p + "bn", p + "pw"], convs=2, bns=0)
    raise ValueError(d.kind)


# -- network -------------------------------------------------------------------------------------

ACTS = ("relu", "gelu", "tanh", "silu", "relu_module", "sigmoid")


class Net(nn.Module):
    """Parts (blocks or defects) with a nonlinearity between consecutive parts."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.acts = list(spec.acts)
        self.act_relu = nn.ReLU()
        for i, part in enumerate(spec.parts):
            if isinstance(part, BlockSpec):
                self.add_module(f"part{i}", Block(part))
            elif isinstance(part, ConcatSpec):
                self.add_module(f"part{i}", Concat(part))
            else:
                self.add_module(f"part{i}", DEFECT_MODULES[part.kind](part))
        self.n = len(spec.parts)

    def forward(self, x):
        for i in range(self.n):
            if i:
                x = _act(self, self.acts[i - 1], x)
            x = getattr(self, f"part{i}")(x)
        return x


def _act(net, name: str, x):
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "silu":
        return F.silu(x)
    if name == "sigmoid":
        return x.sigmoid()
    if name == "none":
        return x
    return net.act_relu(x)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter and buffer from `seed` (float64): conv weights ~ N(0, 1/fan_in), BN
    running_mean ~ N(0, 1), running_var ~ U(0.2, 3), weight/bias ~ N(0, 1), eps in {1e-5, 1e-3, 0.1};
    layer scales and shifts ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                m.eps = (1e-5, 1e-3, 0.1)[int(torch.randint(3, (), generator=g))]
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                    m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) * 2.8 + 0.2)
        for name, p in model.named_parameters():
            if p.dim() >= 3 and not name.endswith(("gamma", "beta")):  # a conv weight
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def build_net(spec: NetSpec) -> tuple[nn.Module, torch.Tensor]:
    """The float64 eval-mode network of `spec` and an input for it."""
    model = Net(spec).double().eval()
    randomize(model, spec.seed)
    g = torch.Generator().manual_seed(spec.seed ^ 0x5EED)
    x = torch.randn(spec.batch, spec.cin, *spec.size, generator=g, dtype=torch.float64)
    return model, x


# ================================================================================================
# Strategies for blocks and networks
# ================================================================================================

def _out_size(n: int, k: int, d: int, p: int, s: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def _stride(draw, nd: int) -> tuple[int, ...]:
    if draw(st.booleans()):
        return (1,) * nd
    if draw(st.booleans()):
        return (2,) * nd
    return tuple(draw(st.sampled_from([1, 2])) for _ in range(nd))


@st.composite
def _main_kernel(draw, nd: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Kernel and dilation of a block's main conv: kxk..., kx1 / 1xk (one axis), or free per axis."""
    shape = draw(st.sampled_from(["cube", "axis", "free"])) if nd > 1 else "cube"
    if shape == "cube":
        k = draw(st.sampled_from(ODD))
        kernel = (k,) * nd
    elif shape == "axis":
        k = draw(st.sampled_from(ODD[1:]))
        a = draw(st.integers(0, nd - 1))
        kernel = tuple(k if i == a else 1 for i in range(nd))
    else:
        kernel = tuple(draw(st.sampled_from(ODD)) for _ in range(nd))
    if draw(st.booleans()):
        dilation = (draw(st.sampled_from([1, 1, 2])),) * nd
    else:
        dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(nd))
    return kernel, dilation


def _on_grid(k: int, d: int, km: int, dm: int) -> bool:
    """A centred kernel (k, d) whose taps all lie on the tap grid of the centred kernel (km, dm)."""
    if k == 1:
        return True
    return km > 1 and d % dm == 0 and d * (k - 1) <= dm * (km - 1)


@st.composite
def fusible_blocks(draw, nd: int, cin: int, size: tuple[int, ...], allow_stride: bool = True, stride=None,
                   main=None, groups=None) -> BlockSpec:
    """A block that must collapse into exactly one convolution (see the module docstring).

    `size` is the spatial size of the block's input (avg-pool kernels must fit in it); `stride`,
    `main` (kernel, dilation of the main conv) and `groups` fix those choices.
    """
    cout = cin if draw(st.booleans()) else draw(st.integers(1, MAX_C))  # skips need cout == cin
    if stride is None:
        stride = draw(_stride(nd)) if allow_stride else (1,) * nd
    skips_ok = cin == cout and all(s == 1 for s in stride)
    if groups is None:
        groups = draw(st.sampled_from(divisors(math.gcd(cin, cout))))
    km, dm = main or draw(_main_kernel(nd))
    # Padding modes other than zeros: fusible when every branch is a conv of the main's geometry
    # (the compiler refuses to mix geometries under reflect/replicate/circular padding).
    pads = [dm_ * (km_ - 1) // 2 for km_, dm_ in zip(km, dm)]
    modes = ["zeros"] + [m for m in ("reflect", "replicate", "circular")
                         if all(p < n if m == "reflect" else p <= n for p, n in zip(pads, size))]
    mode = draw(st.sampled_from(modes)) if main is None and draw(st.integers(0, 4)) == 0 else "zeros"

    def conv(kernel, dilation):
        return ConvBranch(kernel, dilation, tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)), groups,
                          bias=draw(st.booleans()), bn=draw(st.booleans()),
                          functional=mode == "zeros" and draw(st.integers(0, 4)) == 0, padding_mode=mode,
                          same=all(s == 1 for s in stride) and draw(st.integers(0, 4)) == 0)

    branches = [conv(km, dm)]
    grid = [[(k, d) for k in ODD for d in (1, 2) if _on_grid(k, d, k_m, d_m)] for k_m, d_m in zip(km, dm)]
    if mode != "zeros":
        grid = [[(k_m, d_m)] for k_m, d_m in zip(km, dm)]
        skips_ok = False
    kinds = ["conv"]
    if skips_ok:
        kinds += ["bn", "identity"]
    pool_axes = [[k for k in ODD if k == 1 or (d_m == 1 and k <= min(k_m, n))] for k_m, d_m, n in zip(km, dm, size)]
    if cin == cout and mode == "zeros":
        kinds.append("pool")
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            kd = [draw(st.sampled_from(axis)) for axis in grid]
            branches.append(conv(tuple(k for k, _ in kd), tuple(d for _, d in kd)))
        elif kind == "bn":
            branches.append(BNBranch())
        elif kind == "identity":
            branches.append(IdentityBranch(module=draw(st.booleans())))
        else:
            kernel = tuple(draw(st.sampled_from(axis)) for axis in pool_axes)
            branches.append(PoolBranch(kernel, tuple((k - 1) // 2 for k in kernel)))
    # Any order, and sums written left to right or as a balanced tree: partial sums such as
    # 3x1 + 1x3 may cost more than their parts, only the complete sum is judged.
    main_branch = branches[0]
    if draw(st.booleans()):
        branches = draw(st.permutations(branches))
    block = _finish_block(draw, nd, cin, cout, stride, branches, skips_ok, tree=True)
    return replace(block, main=branches.index(main_branch))


def _finish_block(draw, nd, cin, cout, stride, branches, skips_ok, tree=False) -> BlockSpec:
    signs = tuple(draw(st.sampled_from([1, 1, -1])) for _ in branches)
    scale = draw(st.sampled_from([None, None, "channel", "scalar", "bcast", "div", "const"]))
    spellings = ["op", "op", "torch", "method", "alpha"] + (["tree", "tree"] if tree else [])
    return BlockSpec(
        nd, cin, cout, stride, tuple(branches), signs,
        spelling=draw(st.sampled_from(spellings)),
        scale=scale, scale_left=draw(st.booleans()),
        shift=draw(st.sampled_from([None, None, None, "add", "radd", "sub", "rsub"])),
        residual=skips_ok and draw(st.integers(0, 2)) == 0,
    )


@st.composite
def free_blocks(draw, nd: int, cin: int, size: tuple[int, ...]) -> BlockSpec:
    """Branches with a common stride and centre, but any groups, kernels 1..7 (even ones too) and
    dilations 1/2: every sum is exact, the cost rule may refuse some."""
    cout = cin if draw(st.booleans()) else draw(st.integers(1, MAX_C))
    stride = draw(_stride(nd))
    # Twice the centre offset per axis; a centre != 0 changes the output size (n - c).
    centre = tuple(draw(st.sampled_from([0, 0, 0, 1, -1, 2, -2] if n >= 3 else [0, 0, -1, -2])) for n in size)
    skips_ok = cin == cout and all(s == 1 for s in stride) and not any(centre)
    gcd = math.gcd(cin, cout)

    def kd_options(c):
        return [(k, d) for k in range(1, 8) for d in (1, 2)
                if (d * (k - 1) - c) % 2 == 0 and d * (k - 1) - c >= 0 and not (k == 1 and d == 2)]

    def conv():
        kd = [draw(st.sampled_from(kd_options(c))) for c in centre]
        kernel, dilation = tuple(k for k, _ in kd), tuple(d for _, d in kd)
        padding = tuple((d * (k - 1) - c) // 2 for (k, d), c in zip(kd, centre))
        return ConvBranch(kernel, dilation, padding, draw(st.sampled_from(divisors(gcd))),
                          bias=draw(st.booleans()), bn=draw(st.booleans()),
                          functional=draw(st.integers(0, 4)) == 0,
                          same=all(s == 1 for s in stride) and not any(centre) and draw(st.integers(0, 4)) == 0)

    branches = [conv()]
    kinds = ["conv", "conv"]
    n_more = draw(st.integers(0, 3))
    if skips_ok:
        kinds += ["bn", "identity"]
    pool_axes = [[k for k in ODD if 0 <= (k - 1 - c) // 2 <= k // 2 and (k - 1 - c) % 2 == 0 and k <= n]
                 for c, n in zip(centre, size)]
    if cin == cout and all(pool_axes):
        kinds.append("pool")
    for _ in range(n_more):
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            branches.append(conv())
        elif kind == "bn":
            branches.append(BNBranch())
        elif kind == "identity":
            branches.append(IdentityBranch(module=draw(st.booleans())))
        else:
            kernel = tuple(draw(st.sampled_from(axis)) for axis in pool_axes)
            branches.append(PoolBranch(kernel, tuple((k - 1 - c) // 2 for k, c in zip(kernel, centre))))
    branches = draw(st.permutations(branches))
    return _finish_block(draw, nd, cin, cout, stride, branches, skips_ok, tree=True)


def block_out_size(b: BlockSpec, size: tuple[int, ...]) -> tuple[int, ...]:
    first = next(x for x in b.branches if isinstance(x, (ConvBranch, PoolBranch)))
    if isinstance(first, ConvBranch):
        return tuple(_out_size(n, k, d, p, s) for n, k, d, p, s in
                     zip(size, first.kernel, first.dilation, first.padding, b.stride))
    return tuple(_out_size(n, k, 1, p, s) for n, k, p, s in zip(size, first.kernel, first.padding, b.stride))


@st.composite
def _net_head(draw, nd: int | None = None):
    nd = nd or draw(st.sampled_from([1, 2, 2, 3]))
    lo, hi = SIZES[nd]
    size = tuple(draw(st.integers(lo, hi)) for _ in range(nd)) if draw(st.booleans()) else \
        (draw(st.integers(lo, hi)),) * nd
    return nd, draw(st.integers(1, 2)), size, draw(st.integers(1, MAX_C))


@st.composite
def concat_blocks(draw, nd: int, cin: int, size: tuple[int, ...]) -> ConcatSpec:
    """2-3 fusible blocks over one input, concatenated along channels; all dense (groups 1: stacking
    groups>1 blocks along outputs is denser and may cost more) with one main kernel, so the
    concatenation is one conv costing exactly its parts."""
    stride = draw(_stride(nd))
    main = draw(_main_kernel(nd))
    n = draw(st.integers(2, 3))
    return ConcatSpec(nd, cin, tuple(draw(fusible_blocks(nd, cin, size, stride=stride, main=main, groups=1))
                                     for _ in range(n)))


@st.composite
def fusible_nets(draw) -> NetSpec:
    """1-4 fusible blocks (or concatenations of them) with nonlinearities between them."""
    nd, batch, size, cin = draw(_net_head())
    parts, c, n = [], cin, size
    for _ in range(draw(st.integers(1, 4))):
        b = draw(fusible_blocks(nd, c, n) if draw(st.integers(0, 4)) else concat_blocks(nd, c, n))
        parts.append(b)
        c, n = b.cout, tuple((m - 1) // s + 1 for m, s in zip(n, b.stride))
    acts = tuple(draw(st.sampled_from(ACTS)) for _ in parts[1:])
    return NetSpec(nd, batch, size, cin, tuple(parts), acts, draw(st.integers(0, 2**32 - 1)))


@st.composite
def free_nets(draw) -> NetSpec:
    """1-2 free blocks (mixed groups, shared centres) with nonlinearities between them."""
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    lo, hi = SIZES[nd]
    size = tuple(draw(st.integers(max(lo, 3), hi + 2)) for _ in range(nd))
    batch, cin = draw(st.integers(1, 2)), draw(st.integers(1, MAX_C))
    parts, c, n = [], cin, size
    for _ in range(draw(st.integers(1, 2))):
        b = draw(free_blocks(nd, c, n))
        parts.append(b)
        c, n = b.cout, block_out_size(b, n)
        if min(n) < 3:
            break
    acts = tuple(draw(st.sampled_from(ACTS + ("none",))) for _ in parts[1:])
    return NetSpec(nd, batch, size, cin, tuple(parts), acts, draw(st.integers(0, 2**32 - 1)))


@st.composite
def defects(draw, nd: int, cin: int) -> DefectSpec:
    kind = draw(st.sampled_from(DEFECTS))
    cout = draw(st.integers(1, MAX_C))
    if kind == "bn_before_padded_conv":
        return DefectSpec(kind, nd, cin, cout, (draw(st.sampled_from([3, 5, 7])),), (draw(st.booleans()),))
    if kind == "bn_without_stats":
        return DefectSpec(kind, nd, cin, cout if draw(st.booleans()) else cin, (draw(st.sampled_from(ODD)),),
                          (draw(st.booleans()),), pre_conv=draw(st.booleans()))
    if kind == "reflect_sum":
        ks = draw(st.lists(st.sampled_from(ODD), min_size=2, max_size=2, unique=True))
        return DefectSpec(kind, nd, cin, cout, tuple(ks), (draw(st.booleans()), draw(st.booleans())))
    # cost: one dense kxk (cout*cin*k^nd) must exceed dw (cin*k^nd) + bn (cin) + pw (cout*cin).
    k = draw(st.sampled_from([3, 5, 7]))
    K = k**nd
    cout = draw(st.sampled_from([c for c in range(2, MAX_C + 1) if c * cin * K > cin * K + cin + c * cin]))
    return DefectSpec(kind, nd, cin, cout, (k,), (draw(st.booleans()),))


def defect_cout(d: DefectSpec) -> int:
    return d.cout if d.kind != "bn_without_stats" or d.pre_conv else d.cin


@st.composite
def defect_nets(draw) -> NetSpec:
    """[fusible block] -> defect -> [fusible block], nonlinearities between them.

    Sizes >= 4 per axis: reflect padding of a 7x7 needs more than 3 pixels, batch statistics need
    more than one value per channel.
    """
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    lo, hi = SIZES[nd]
    size = tuple(draw(st.integers(4, max(hi, 5))) for _ in range(nd))
    batch, cin = draw(st.integers(1, 2)), draw(st.integers(1, MAX_C))
    parts, c = [], cin
    if draw(st.booleans()):
        b = draw(fusible_blocks(nd, c, size, allow_stride=False))
        parts.append(b)
        c = b.cout
    d = draw(defects(nd, c))
    parts.append(d)
    c = defect_cout(d)
    if draw(st.booleans()):
        parts.append(draw(fusible_blocks(nd, c, size)))
    acts = tuple(draw(st.sampled_from(ACTS)) for _ in parts[1:])
    return NetSpec(nd, batch, size, cin, tuple(parts), acts, draw(st.integers(0, 2**32 - 1)))


# ================================================================================================
# Strategies for the algebra alone (reparam.affine)
# ================================================================================================

MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class OpSpec:
    """An `AffineConv` description; weights come from `seed`."""

    cin: int
    cout: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    mode: str
    bias: bool
    seed: int

    @property
    def nd(self) -> int:
        return len(self.kernel)

    def centre2(self, axis: int) -> int:
        return self.dilation[axis] * (self.kernel[axis] - 1) - 2 * self.padding[axis]

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride) and not any(self.padding)


def to_affine(o: OpSpec) -> affine.AffineConv:
    g = torch.Generator().manual_seed(o.seed)
    w = torch.randn(o.cout, o.cin // o.groups, *o.kernel, generator=g, dtype=torch.float64)
    b = torch.randn(o.cout, generator=g, dtype=torch.float64) if o.bias else None
    return affine.from_conv(w, b, o.stride, o.padding, o.dilation, o.groups, o.mode)


def ref_apply(o: OpSpec, x: torch.Tensor) -> torch.Tensor:
    """`o` applied with torch.nn.functional directly from the spec (independent of AffineConv)."""
    g = torch.Generator().manual_seed(o.seed)
    w = torch.randn(o.cout, o.cin // o.groups, *o.kernel, generator=g, dtype=torch.float64)
    b = torch.randn(o.cout, generator=g, dtype=torch.float64) if o.bias else None
    if o.mode != "zeros" and any(o.padding):
        pad = [p for p in reversed(o.padding) for _ in range(2)]
        return FCONV[o.nd](F.pad(x, pad, mode=o.mode), w, b, o.stride, 0, o.dilation, o.groups)
    return FCONV[o.nd](x, w, b, o.stride, o.padding, o.dilation, o.groups)


def op_valid_for(o: OpSpec, size: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output size of `o` on an input of `size`, or None when torch would reject it."""
    out = []
    for n, k, d, p, s in zip(size, o.kernel, o.dilation, o.padding, o.stride):
        if n + 2 * p < d * (k - 1) + 1:
            return None
        if p and o.mode == "reflect" and p >= n:
            return None
        if p and o.mode == "circular" and p > n:
            return None
        out.append(_out_size(n, k, d, p, s))
    return tuple(out)


@st.composite
def op_specs(draw, nd: int, cin: int, cout: int, *, stride=None, centre=None, mode=None, groups=None,
             pointwise: bool = False, max_k: int = 5) -> OpSpec:
    """A random operator; `stride`/`centre` (twice the centre offset, per axis) fix its geometry."""
    if pointwise:
        kernel, dilation, padding, stride = (1,) * nd, (1,) * nd, (0,) * nd, (1,) * nd
    else:
        stride = stride or tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(nd))
        kernel, dilation, padding = [], [], []
        for a in range(nd):
            if centre is None:
                k, d = draw(st.integers(1, max_k)), draw(st.sampled_from([1, 1, 2]))
                p = draw(st.integers(0, (d * (k - 1)) // 2 + 1))
            else:
                c = centre[a]
                opts = [(k, d) for k in range(1, max_k + 1) for d in (1, 2)
                        if (d * (k - 1) - c) % 2 == 0 and d * (k - 1) >= c]
                k, d = draw(st.sampled_from(opts))
                p = (d * (k - 1) - c) // 2
            kernel.append(k)
            dilation.append(d)
            padding.append(p)
        kernel, dilation, padding = tuple(kernel), tuple(dilation), tuple(padding)
    if groups is None:
        groups = draw(st.sampled_from(divisors(math.gcd(cin, cout))))
    mode = mode or draw(st.sampled_from(["zeros", "zeros", "zeros"] + list(MODES[1:])))
    return OpSpec(cin, cout, groups, kernel, tuple(stride), padding, dilation, mode, draw(st.booleans()),
                  draw(st.integers(0, 2**32 - 1)))


@st.composite
def op_groups(draw, concat: bool = False) -> list[OpSpec]:
    """2-3 operators over one input: usually with a shared stride and centre (the exact case),
    sometimes not; padding modes all zeros, all one mode, or mixed."""
    nd = draw(st.integers(1, 3))
    cin = draw(st.integers(1, 6))
    cout = draw(st.integers(1, 6))
    n = draw(st.integers(2, 3))
    aligned = draw(st.integers(0, 3)) > 0
    stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(nd)) if aligned else None
    centre = tuple(draw(st.integers(-2, 2)) for _ in range(nd)) if aligned else None
    mode_kind = draw(st.sampled_from(["zeros", "zeros", "same", "mixed"]))
    common_mode = draw(st.sampled_from(MODES[1:]))
    ops = []
    for _ in range(n):
        co = draw(st.integers(1, 6)) if concat else cout
        mode = "zeros" if mode_kind == "zeros" else common_mode if mode_kind == "same" else None
        ops.append(draw(op_specs(nd, cin, co, stride=stride, centre=centre, mode=mode)))
    return ops


def common_input_size(ops: list[OpSpec], extra: int) -> tuple[int, ...] | None:
    """A small input size every op accepts (all ops share stride and centre when this is used)."""
    nd = ops[0].nd
    size = []
    for a in range(nd):
        n = 1
        while n < 40 and any(op_valid_for(_axis(o, a), (n,)) is None for o in ops):
            n += 1
        size.append(n + extra)
    return tuple(size)


def _axis(o: OpSpec, a: int) -> OpSpec:
    return OpSpec(o.cin, o.cout, o.groups, (o.kernel[a],), (o.stride[a],), (o.padding[a],), (o.dilation[a],),
                  o.mode, o.bias, o.seed)
