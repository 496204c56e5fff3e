"""Reads of metadata (`x.ndim`, `x.shape[1]`, `x.size(1)`, `x.dtype`, `x.device`, `x.dim()`,
`x.is_contiguous()`) are not uses: they never keep a Conv+BN apart."""

from __future__ import annotations

import torch
from torch import nn

import reparam

from .helpers import assert_same, n_bns, n_convs, randomize_bn


def assert_rejects_3d(fused, *inputs):
    """The rank checks that stay still check: a 3-D input (which conv2d accepts) fails one."""
    try:
        fused(*inputs)
    except AssertionError as exc:
        assert "expected 4D input" in str(exc)
    else:
        raise AssertionError("a rank check was lost")


class BatchNormAct2d(nn.BatchNorm2d):
    """A norm layer as popular model libraries write it: shape assert, functional BN, Identity act."""

    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     False, 0.1, self.eps)
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    def __init__(self, ci, co, k, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(ci, co, k, stride, k // 2, bias=False)
        self.bn = randomize_bn(BatchNormAct2d(co))

    def forward(self, x):
        return self.bn(self.conv(x))


def test_conv_bn_act_with_shape_assert_folds_when_channels_change():
    torch.manual_seed(0)
    model = nn.Sequential(ConvNormAct(4, 16, 3, stride=2), nn.ReLU(), ConvNormAct(16, 8, 1)).double().eval()
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 2 and n_bns(fused) == 0
    assert not fused.report.refusals
    assert_same(model, fused, x)
    # The first assert is still there, reading a value of the same shape; the second one is implied
    # by it (conv, relu and conv keep the rank), and a 3-D input still fails the first.
    asserts = [n for n in fused.graph.nodes if n.target is torch._assert]
    assert len(asserts) == 1
    assert_rejects_3d(fused, x[0])


class ManyReads(nn.Module):
    """Every kind of metadata read on the conv output, some used later in the forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = randomize_bn(nn.BatchNorm2d(8))
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.dim() == 4, "4D")
        torch._assert(y.is_contiguous(), "contiguous")
        c = y.shape[1]
        n = y.size(0)
        z = self.bn(y).to(y.dtype).to(y.device)
        z = z * self.scale
        return torch.relu(z).reshape(n, c, -1)


def test_every_kind_of_metadata_read_leaves_one_conv():
    torch.manual_seed(1)
    model = ManyReads().double().eval()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert_same(model, fused, x)
    x2 = torch.randn(1, 4, 9, 7, dtype=torch.float64)  # reads follow the new input's shape
    assert_same(model, fused, x2)


class NoCarrier(nn.Module):
    """The shape of the middle value is read, and no fused value has that shape: keep it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 16, 1)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        torch._assert(y.shape[1] == 16, "16 channels")
        return self.b(y)


def test_read_without_a_carrier_keeps_the_value_and_says_why():
    torch.manual_seed(2)
    model = NoCarrier().double().eval()
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 2
    (refusal,) = fused.report.refusals
    assert "reads its shape" in refusal.reason and "a" in refusal.where and "b" in refusal.where
    assert_same(model, fused, x)


def test_read_served_by_the_source_when_shapes_match():
    """`bn(x)` skip next to a 3x3 branch, with an assert on each branch's output."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = ConvNormAct(8, 8, 3)
            self.skip = randomize_bn(BatchNormAct2d(8))

        def forward(self, x):
            return self.conv(x) + self.skip(x)

    torch.manual_seed(3)
    model = Block().double().eval()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert_same(model, fused, x)


class MultiBranch(nn.Module):
    """MobileOne-style: kxk branches, a 1x1 branch and a BN skip, each norm asserting its rank."""

    def __init__(self, c, branches=3):
        super().__init__()
        self.convs = nn.ModuleList([ConvNormAct(c, c, 3) for _ in range(branches)])
        self.scale = ConvNormAct(c, c, 1)
        self.skip = randomize_bn(BatchNormAct2d(c))

    def forward(self, x):
        out = self.scale(x) + self.skip(x)
        for conv in self.convs:
            out += conv(x)
        torch._assert(out.shape[1] == self.skip.num_features, "channels")
        return torch.relu(out)


def test_repeated_rank_checks_on_one_fused_value_run_once():
    torch.manual_seed(4)
    model = nn.Sequential(MultiBranch(8), MultiBranch(8)).double().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert n_convs(fused) == 2 and n_bns(fused) == 0
    assert_same(model, fused, x)
    asserts = [n for n in fused.graph.nodes if n.target is torch._assert]
    # Before fusion: 5 norms with a rank check and one channel check per block. After: each block's
    # rank checks all read the one input of the block, so one stays per block, and the second
    # block's is implied by the first (conv, relu, conv keep the rank): one in all, beside the two
    # channel checks.
    before = torch.fx.symbolic_trace(model)
    assert sum(n.target is torch._assert for n in before.graph.nodes) == 12
    assert sorted(str(n.args[1]) for n in asserts).count("channels") == 2
    assert len(asserts) == 3
    # The checks that stay still check: a 3-D input (which conv2d would accept) fails.
    assert_rejects_3d(fused, x[0])


class TwoInputs(nn.Module):
    """Rank checks that no earlier check implies: on another input, after a flatten, with another
    rank, and on a sum of values of two inputs."""

    def __init__(self, c):
        super().__init__()
        self.a = ConvNormAct(c, c, 3)
        self.b = ConvNormAct(c, c, 3)
        self.c = ConvNormAct(c, c, 1)
        self.d = ConvNormAct(c, c, 1)

    def forward(self, x, y):
        u = torch.relu(self.a(x))  # checks x-chain: 4
        v = self.b(y)  # y is another input: its check stays
        w = self.c(u + v)  # u + v joins two chains: its check stays
        torch._assert(w.dim() == 4, "w is 4-D")  # implied by the check just above (same value)
        z = self.d(torch.relu(w))  # implied: relu keeps w's rank
        flat = z.flatten(2)
        torch._assert(flat.ndim == 3, "flattened")  # another rank, after a rank-changing op: stays
        return flat + u.mean()


def test_rank_checks_implied_by_an_earlier_one_are_dropped():
    from reparam.passes.cleanup import drop_implied_rank_checks

    torch.manual_seed(5)
    model = TwoInputs(4).double().eval()
    x, y = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, (x, y))
    assert n_convs(fused) == 4 and n_bns(fused) == 0
    assert_same(model, fused, x, y)
    messages = sorted(str(n.args[1]) for n in fused.graph.nodes if n.target is torch._assert)
    assert messages.count("flattened") == 1 and "w is 4-D" not in messages
    assert sum("expected 4D" in m for m in messages) == 3  # x, y and the joined chain
    assert drop_implied_rank_checks(fused) == 0  # nothing more to drop
    for bad in ((x[0], y), (x, y[0])):  # a 3-D input on either side still fails its check
        assert_rejects_3d(fused, *bad)
