"""Shape propagation without arithmetic (`reparam.shape_rules`).

`propagate_shapes(..., values=False)` lets convolutions, linear layers and eval BatchNorms return
zeros of their result's shape. These tests hold it to running the graph for real: the same shape,
dtype and strides for every node; the same error where the real op raises; real values wherever
they are still needed (untraceable submodules, value-dependent shapes, in-place writes into real
memory)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.errors import InputError
from reparam.shape_rules import shape_only_nodes, stand_in
from reparam.trace import propagate_shapes, trace

from . import strategies as S

_CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}


@pytest.fixture(autouse=True)
def skip_even_for_small_inputs(monkeypatch):
    """The small inputs here would otherwise be computed for real (not worth skipping)."""
    import reparam.trace

    monkeypatch.setattr(reparam.trace, "_WORTH_SKIPPING", 0)


@st.composite
def conv_configs(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    per_axis = st.integers(1, 3)
    kernel = tuple(draw(per_axis) for _ in range(nd))
    size = tuple(draw(st.integers(1, 9)) for _ in range(nd))
    stride = draw(st.one_of(per_axis, st.tuples(*[per_axis] * nd)))
    dilation = draw(st.one_of(per_axis, st.tuples(*[per_axis] * nd)))
    padding = draw(st.one_of(st.integers(0, 3), st.tuples(*[st.integers(0, 3)] * nd),
                             st.sampled_from(["same", "valid"])))
    if padding == "same":
        stride = 1  # PyTorch refuses 'same' with strides
    return dict(nd=nd, cin=cin, cout=cout, kernel=kernel, size=size, stride=stride, dilation=dilation,
                padding=padding, groups=groups, bias=draw(st.booleans()), batch=draw(st.integers(1, 2)),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])))


def _real_or_error(fn):
    try:
        return fn(), None
    except Exception as exc:  # the real op's own error
        return None, exc


def _same_layout(fake: torch.Tensor, real: torch.Tensor):
    assert fake.shape == real.shape
    assert fake.dtype == real.dtype and fake.device == real.device
    assert fake.stride() == real.stride()
    assert not fake.requires_grad and not bool(fake.any())  # zeros, never uninitialized memory


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@given(conv_configs())
def test_conv_module_stand_in_matches_real_execution(cfg):
    module_type, _ = _CONV[cfg["nd"]]
    conv = module_type(cfg["cin"], cfg["cout"], cfg["kernel"], cfg["stride"], cfg["padding"], cfg["dilation"],
                       cfg["groups"], cfg["bias"], dtype=cfg["dtype"])
    x = torch.randn(cfg["batch"], cfg["cin"], *cfg["size"], dtype=cfg["dtype"])
    with torch.no_grad():
        real, error = _real_or_error(lambda: conv(x))
        fake = stand_in(None, conv, (x,), {})
    if error is not None:
        assert fake is None  # the op then runs for real and raises its own error
    else:
        assert fake is not None
        _same_layout(fake, real)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@given(conv_configs())
def test_conv_function_stand_in_matches_real_execution(cfg):
    _, function = _CONV[cfg["nd"]]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(cfg["cout"], cfg["cin"] // cfg["groups"], *cfg["kernel"], generator=g, dtype=cfg["dtype"])
    bias = torch.randn(cfg["cout"], generator=g, dtype=cfg["dtype"]) if cfg["bias"] else None
    x = torch.randn(cfg["batch"], cfg["cin"], *cfg["size"], generator=g, dtype=cfg["dtype"])
    # The call spelled as in model code: positional and keyword arguments mixed.
    args = (x, weight, bias, cfg["stride"])
    kwargs = dict(padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    node = _FunctionNode(function)
    with torch.no_grad():
        real, error = _real_or_error(lambda: function(*args, **kwargs))
        fake = stand_in(node, None, args, kwargs)
    if error is not None:
        assert fake is None
    else:
        assert fake is not None
        _same_layout(fake, real)


class _FunctionNode:
    def __init__(self, target):
        self.target = target


@pytest.mark.parametrize("make_input", [
    lambda: torch.randn(1, 3, 8, 8).to(memory_format=torch.channels_last),  # another layout
    lambda: torch.randn(3, 8, 8),                                           # unbatched
    lambda: torch.randn(1, 3, 8, 8, dtype=torch.float64),                   # dtype unlike the weight
    lambda: torch.randn(1, 4, 8, 8),                                        # wrong channel count
    lambda: torch.randn(1, 3, 1, 1),                                        # smaller than the kernel
    lambda: torch.randint(0, 3, (1, 3, 8, 8)),                              # integers
])
def test_unusual_conv_inputs_run_for_real(make_input):
    conv = nn.Conv2d(3, 4, 3)
    assert stand_in(None, conv, (make_input(),), {}) is None


def test_conv_with_another_padding_mode_or_hooks_runs_for_real():
    x = torch.randn(1, 3, 8, 8)
    assert stand_in(None, nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (x,), {}) is None
    hooked = nn.Conv2d(3, 4, 3)
    hooked.register_forward_hook(lambda *a: None)
    assert stand_in(None, hooked, (x,), {}) is None
    assert stand_in(None, nn.Conv2d(3, 4, 3), (x,), {}) is not None


@pytest.mark.parametrize("module, x", [
    (nn.Linear(5, 7), torch.randn(2, 3, 5)),
    (nn.Linear(5, 7, bias=False), torch.randn(5)),
    (nn.BatchNorm1d(4), torch.randn(3, 4)),
    (nn.BatchNorm1d(4), torch.randn(3, 4, 6)),
    (nn.BatchNorm2d(4), torch.randn(2, 4, 3, 5)),
    (nn.BatchNorm3d(4), torch.randn(1, 4, 2, 3, 5)),
    (nn.GELU(), torch.randn(2, 4, 3, 5)),
    (nn.GELU(approximate="tanh"), torch.randn(3, 5, dtype=torch.float64)),
    (nn.ReLU(), torch.randn(2, 4, 3)),
    (nn.Hardswish(), torch.randn(2, 4, 3, 3)),
])
def test_linear_norm_and_activation_stand_ins_match_real_execution(module, x):
    module.eval()
    with torch.no_grad():
        _same_layout(stand_in(None, module, (x,), {}), module(x))


def test_in_place_activations_and_other_layouts_run_for_real():
    x = torch.randn(2, 4, 3, 3)
    assert stand_in(None, nn.ReLU(inplace=True), (x,), {}) is None  # it returns its input itself
    assert stand_in(None, nn.GELU(), (x.transpose(2, 3),), {}) is None
    assert stand_in(None, nn.Linear(3, 5), (x.transpose(2, 3),), {}) is None


def test_batch_norm_in_training_mode_runs_for_real():
    bn = nn.BatchNorm2d(4)  # training mode updates its running statistics: that must happen
    x = torch.randn(2, 4, 3, 3)
    assert stand_in(None, bn, (x,), {}) is None
    assert stand_in(None, bn.eval(), (x,), {}) is not None
    node = _FunctionNode(F.batch_norm)
    stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    assert stand_in(node, None, (x, *stats, True, 0.1, 1e-5), {}) is None
    _same_layout(stand_in(node, None, (x, *stats), {"training": False}), F.batch_norm(x, *stats))
    assert stand_in(node, None, (torch.randn(2, 5, 3), *stats), {}) is None  # channels do not match


# -- whole graphs: shapes as with real execution, real values where they are needed -------------

class Mixed(nn.Module):
    """Convolutions, norms, attention over tokens, a layer scale, in-place updates, a head."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 5, padding="same", groups=c)
        self.pw = nn.Conv1d(c, c, 1)
        self.qkv = nn.Linear(c, 3 * c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.bn(self.stem(x))
        out = self.bn(x)
        out += self.dw(x)  # an in-place update of memory a stand-in allocated
        x = x + self.gamma * F.gelu(out)
        b, c, h, w = x.shape
        t = self.pw(x.flatten(2)).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        t = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        x = x + t.transpose(1, 2).reshape(b, c, h, w)
        return self.head(x.mean((2, 3)))


def _shapes(gm):
    return {n.name: (n.meta.get("reparam_shape"), n.meta["tensor_meta"].dtype if "tensor_meta" in n.meta else None,
                     n.meta["tensor_meta"].stride if "tensor_meta" in n.meta else None) for n in gm.graph.nodes}


def _both_ways(model, x, leaves=frozenset()):
    gm, failed = trace(model.eval())
    _, real_leaf_inputs = propagate_shapes(gm, (x.clone(),), set(failed))
    real = _shapes(gm)
    _, leaf_inputs = propagate_shapes(gm, (x.clone(),), set(failed), values=False)
    assert _shapes(gm) == real
    for node, (args, _) in leaf_inputs.items():
        for a, b in zip(args, real_leaf_inputs[node][0]):
            assert torch.equal(a, b)  # an untraceable submodule gets real values
    return gm, shape_only_nodes(gm, set(failed))


def test_every_node_has_the_shape_of_real_execution():
    gm, skipped = _both_ways(Mixed(), torch.randn(2, 3, 12, 10))
    convs = {n.target for n in skipped if n.op == "call_module"}
    assert convs == {"stem", "bn", "dw", "pw", "qkv", "head"}


class RealMemoryUpdated(nn.Module):
    """`out += conv(x)` into a value that is not a stand-in's: the conv must run for real."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        out = torch.relu(x)
        out += self.a(x)
        return self.b(out)


class FunctionalNorm(nn.BatchNorm2d):
    """A norm that calls F.batch_norm on its own parameters, as model libraries write it."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class SumInPlace(nn.Module):
    """MobileOne's `out = norm(x); out += conv(x)` over a ModuleList, then a layer scale."""

    def __init__(self):
        super().__init__()
        self.norm = FunctionalNorm(3)
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 3, padding=1) for _ in range(2))
        self.gamma = nn.Parameter(torch.full((3, 1, 1), 0.5))

    def forward(self, x):
        out = self.norm(x)
        for conv in self.convs:
            out += conv(x)
        return torch.relu(self.gamma * out)


def test_in_place_sum_into_a_stand_in():
    gm, skipped = _both_ways(SumInPlace(), torch.randn(1, 3, 6, 6))
    assert {n.target for n in skipped if n.op == "call_module"} == {"convs.0", "convs.1"}
    assert [n.target for n in skipped if n.op == "call_function"] == [F.batch_norm]


def test_in_place_write_into_real_memory_runs_the_conv():
    gm, skipped = _both_ways(RealMemoryUpdated(), torch.randn(1, 3, 6, 6))
    assert {n.target for n in skipped} == {"b"}


class ValueDependent(nn.Module):
    """A result whose shape depends on values: `y[y > 0]`, `nonzero`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.other = nn.Conv2d(3, 4, 3)
        self.last = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        picked = y[y > 0]
        count = torch.nonzero(self.other(x)).shape[0]
        return self.last(y), picked, count


def test_value_dependent_shapes_keep_their_inputs_real():
    gm, skipped = _both_ways(ValueDependent(), torch.randn(1, 3, 7, 7))
    assert {n.target for n in skipped} == {"last"}


class Gate(nn.Module):
    """Untraceable: Python control flow on tensor values."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.side = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.gate(self.conv(x)) + self.side(x)


def test_leaf_inputs_are_real():
    gm, skipped = _both_ways(WithLeaf(), torch.randn(1, 3, 6, 6))
    assert {n.target for n in skipped} == {"side"}


class OnTheMetaDevice(nn.Module):
    """What consumes stand-ins runs on the meta device: sums and products with numbers, parameters
    and 0-d tensors, in place and not, strided views, norms with weights of their own (they read
    zeros), and device queries that must answer the real device."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Conv2d(3, c, 1)
        self.ln = nn.LayerNorm(c)
        self.gn = nn.GroupNorm(2, c)
        self.pool = nn.AvgPool2d(2)
        self.gamma = nn.Parameter(torch.randn(c, 1, 1))
        self.register_buffer("scale", torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x):
        y = self.a(x)
        z = 1.0 - self.b(x) * 0.5
        z = z / 3 + self.gamma * y
        z += y
        z = z.mul(self.scale.float())
        t = self.ln(z.permute(0, 2, 3, 1))  # a strided view, then a norm with weights
        z = z + t.permute(0, 3, 1, 2)  # strided + contiguous: torch's own meta rule
        mask = torch.ones(z.shape[1], device=z.device)  # a real tensor built from a device query
        z = self.gn(z) * mask.view(1, -1, 1, 1)
        return self.pool(z).mean((2, 3))


def test_consumers_of_stand_ins_match_real_execution():
    gm, skipped = _both_ways(OnTheMetaDevice(), torch.randn(2, 3, 6, 6))
    assert {n.target for n in skipped if n.op == "call_module"} == {"a", "b"}


@given(st.one_of(S.fusible_nets(), S.free_nets(), S.defect_nets()))
def test_random_networks_have_the_shapes_of_real_execution(spec):
    """Random branch structures (the compiler's property-test networks): every node's shape,
    dtype and strides with stand-ins on the meta device equal those of running it for real."""
    model, x = S.build_net(spec)
    _both_ways(model, x)


def test_no_arithmetic_runs_on_the_meta_device():
    """torch's meta kernels for arithmetic are written in Python: the first costs seconds of
    set-up. Stand-ins and their sums and views are made directly; anything else runs on zeros."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if kwargs.get("device") == torch.device("meta") or any(
                    isinstance(t, torch.Tensor) and t.is_meta for t in torch.utils._pytree.tree_leaves((args, kwargs))):
                self.ops.add(func.overloadpacket.__name__)
            return func(*args, **kwargs)

    for model in (OnTheMetaDevice(), Mixed()):
        gm, failed = trace(model.eval())
        with Record() as record:
            propagate_shapes(gm, (torch.randn(2, 3, 12, 10),), set(failed), values=False)
        assert record.ops, "stand-ins are meta tensors"
        views = {"empty", "view", "permute", "transpose", "expand", "unsqueeze", "squeeze", "slice", "select",
                 "split", "split_with_sizes", "unbind", "chunk", "_unsafe_view", "clone", "t", "alias", "as_strided",
                 "_to_copy", "empty_strided", "copy_", "detach", "reshape", "flatten", "unflatten"}
        assert record.ops <= views, record.ops - views


def _fuse_both_ways(model, x, monkeypatch):
    """`fuse` as it is, and with every value computed; the two must agree exactly."""
    import reparam.pipeline as pipeline

    fused = reparam.fuse(model, x)  # verifies against the original
    real = pipeline.propagate_shapes
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "propagate_shapes", lambda gm, args, leaves, values: real(gm, args, leaves))
        reference = reparam.fuse(model, x)
    assert fused.code == reference.code
    for attr in ("regions", "refusals", "leaves", "before", "after"):
        assert getattr(fused.report, attr) == getattr(reference.report, attr)
    assert torch.equal(fused(x), reference(x))
    return fused


def _random_biases(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.bias)
    return model


@pytest.mark.parametrize("make", [WithLeaf, RealMemoryUpdated, Mixed, SumInPlace, OnTheMetaDevice])
def test_fuse_gives_the_same_result_as_with_real_values(make, monkeypatch):
    fused = _fuse_both_ways(_random_biases(make()), torch.randn(1, 3, 6, 6), monkeypatch)
    if make is WithLeaf:
        assert [leaf.module for leaf in fused.report.leaves] == ["gate"]
        assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2
    if make is RealMemoryUpdated:  # relu(x) + conv3x3(x) stays; the 1x1 after it stays
        assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2
    if make is Mixed:  # bn(stem) folds; bn(x) + dw(x) becomes one depthwise conv
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


class Mismatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv(x)


def test_mismatched_conv_raises_the_real_error():
    gm, failed = trace(Mismatched())
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError) as real:
        propagate_shapes(gm, (x,), set(failed))
    with pytest.raises(RuntimeError) as skipped:
        propagate_shapes(gm, (x,), set(failed), values=False)
    assert str(skipped.value) == str(real.value)
    with pytest.raises(InputError, match="expected input.* to have 4 channels"):
        reparam.fuse(Mismatched(), x)


def test_fuse_runs_no_convolution_to_learn_shapes(monkeypatch):
    """The pipeline asks for shapes only: on an input large enough to matter, no conv runs."""
    import reparam.trace

    monkeypatch.undo()  # the real threshold, not the module's fixture
    model = _random_biases(Mixed(16)).eval()
    x = torch.randn(1, 3, 64, 64)
    assert x.numel() >= reparam.trace._WORTH_SKIPPING
    calls = []
    real_conv2d = F.conv2d

    def counting_conv2d(*args, **kwargs):
        calls.append(args[0].shape)
        return real_conv2d(*args, **kwargs)

    monkeypatch.setattr(F, "conv2d", counting_conv2d)
    fused = reparam.fuse(model, x, verify=False)
    assert calls == []
    monkeypatch.undo()
    torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
