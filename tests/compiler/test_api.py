"""The public API: what fuse() promises about its arguments, its result and its report."""

import pytest
import torch
import torch.fx
from torch import nn

import reparam
from reparam.errors import InputError, TraceFailure, VerificationError

from .helpers import conv_bn, modules_of, n_bns, n_convs, rbn


class RepBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.kxk = conv_bn(c, c, 3)
        self.one = conv_bn(c, c, 1)
        self.skip = rbn(c)

    def forward(self, x):
        return torch.relu(self.kxk(x) + self.one(x) + self.skip(x))


def net(n=3, c=8):
    return nn.Sequential(*[RepBlock(c) for _ in range(n)])


def test_returns_eval_graph_module_with_report():
    model = net()
    x = torch.randn(2, 8, 10, 10)
    fused = reparam.fuse(model, x)
    assert isinstance(fused, torch.fx.GraphModule) and not fused.training
    report = fused.report
    assert len(report.regions) == 3 and not report.refusals
    assert report.before.params > report.after.params > 0
    assert report.before.nodes > report.after.nodes
    assert report.after.macs == 3 * 2 * 8 * 8 * 9 * 100
    assert report.max_abs_diff is not None and report.max_abs_diff <= report.tolerance
    assert torch.allclose(fused(x), model.eval()(x), atol=1e-5)
    text = str(report)
    assert "Fused regions" in text and "0.kxk.0" in text and "parameters" in text


def test_explain_returns_the_report():
    report = reparam.explain(net(1), torch.randn(1, 8, 6, 6))
    assert isinstance(report, reparam.Report)
    assert report.regions[0].members == ("0.kxk.0", "0.kxk.1", "0.one.0", "0.one.1", "add", "0.skip", "add_1")


def test_callers_model_is_untouched():
    model = net(2).train()
    calls = []
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = reparam.fuse(model, torch.randn(2, 8, 6, 6))
    assert model.training and all(m.training for m in model.modules())
    assert not fused.training
    assert calls == []  # no hook of the caller fired during fusion
    assert len(model[0]._forward_hooks) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm statistics did not move
    assert all(p.requires_grad for p in model.parameters())
    handle.remove()


def test_training_model_is_fused_from_its_eval_form():
    model = net(1).train()
    x = torch.randn(2, 8, 6, 6)
    fused = reparam.fuse(model, x)
    model.eval()
    assert torch.allclose(fused(x), model(x), atol=1e-5)


def test_tuple_inputs_and_other_input_shapes():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(3, 4, 3), conv_bn(3, 4, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = Two().eval()
    x, y = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, (x, y))
    assert n_bns(fused) == 0 and n_convs(fused) == 2
    x2, y2 = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    assert torch.allclose(fused(x2, y2), model(x2, y2), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_at_least_as_close_as_unfused(dtype):
    torch.manual_seed(1)
    model = net(3)
    x = torch.randn(2, 8, 10, 10)
    ref = model.double().eval()(x.double()).detach()
    half = model.to(dtype)
    fused = reparam.fuse(half, x.to(dtype))
    assert all(p.dtype == dtype for p in fused.parameters())
    assert len(fused.report.regions) == 3 and n_convs(fused) == 3 and n_bns(fused) == 0
    with torch.no_grad():
        err_unfused = float((half(x.to(dtype)).double() - ref).abs().max())
        err_fused = float((fused(x.to(dtype)).double() - ref).abs().max())
    # one rounding per fused conv instead of one per branch and per BatchNorm: strictly closer
    assert err_fused < err_unfused
    assert err_fused <= 8 * torch.finfo(dtype).eps * float(ref.abs().max())


def test_float64_model_stays_float64_and_exact():
    model = net(2).double()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    assert len(fused.report.regions) == 2 and n_convs(fused) == 2 and n_bns(fused) == 0
    x2 = torch.randn(3, 8, 7, 9, dtype=torch.float64)  # not the example input the report used
    for inp in (x, x2):
        with torch.no_grad():
            out, ref = fused(inp), model.eval()(inp)
        assert out.dtype == torch.float64
        assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


class DataDependent(nn.Module):
    """Untraceable: Python control flow on a tensor value."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), rbn(4))

    def forward(self, x):
        if x.mean() > 100:
            return x
        return self.body(x)


def test_untraceable_submodule_is_a_leaf_fused_inside():
    model = nn.Sequential(conv_bn(4, 4, 1), DataDependent(), nn.ReLU()).eval()
    x = torch.randn(1, 4, 6, 6)
    fused = reparam.fuse(model, x)
    leaves = fused.report.leaves
    assert [leaf.module for leaf in leaves] == ["1"] and "control flow" in leaves[0].reason
    assert leaves[0].fused_inside == 1
    assert n_bns(fused) == 0  # both the outer conv+BN and the one inside the leaf are folded
    assert isinstance(fused.get_submodule("1"), DataDependent)
    assert torch.allclose(fused(x), model(x), atol=1e-5)
    assert isinstance(model[1].body, nn.Sequential)  # the caller's leaf was not edited
    assert "Untraceable" in str(fused.report)


def test_untraceable_model_raises_a_clear_error():
    model = DataDependent()
    model.body = nn.Identity()  # no submodule left that could be traced and fused on its own
    model.gain = nn.Parameter(torch.ones(1))
    with pytest.raises(TraceFailure, match="DataDependent.*control flow"):
        reparam.fuse(model, torch.randn(1, 4, 6, 6))


def test_not_a_module():
    with pytest.raises(InputError, match="nn.Module"):
        reparam.fuse(lambda x: x, torch.randn(1))


def test_empty_model():
    with pytest.raises(InputError, match="nothing to fuse"):
        reparam.fuse(nn.Sequential(), torch.randn(1, 3))


@pytest.mark.parametrize("bad", [[1, 2, 3], "x", ()])
def test_example_input_of_wrong_type(bad):
    with pytest.raises(InputError, match="example_input"):
        reparam.fuse(net(1), bad)


def test_example_input_of_wrong_shape_names_model_and_shape():
    with pytest.raises(InputError, match=r"Sequential rejected example_input \(\(1, 3, 6, 6\) float32\)"):
        reparam.fuse(net(1), torch.randn(1, 3, 6, 6))


def test_verification_catches_a_wrong_fusion(monkeypatch):
    import reparam.passes.lower as lower

    original = lower.to_module

    def broken(*args, **kwargs):
        m = original(*args, **kwargs)
        with torch.no_grad():
            m.weight.mul_(1.01)
        return m

    monkeypatch.setattr(lower, "to_module", broken)
    with pytest.raises(VerificationError, match="disagrees") as info:
        reparam.fuse(net(1), torch.randn(1, 8, 6, 6))
    assert info.value.max_abs_diff > info.value.allowed
    fused = reparam.fuse(net(1), torch.randn(1, 8, 6, 6), verify=False)
    assert fused.report.max_abs_diff is None


def test_nothing_fusible_leaves_graph_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.GELU())
    x = torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, x)
    assert not fused.report.regions and n_convs(fused) == 2
    assert fused.report.before == fused.report.after
    assert torch.equal(fused(x), model(x))


def test_dropout_and_identity_vanish():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Identity(), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    fused = reparam.fuse(model, x)
    kinds = [type(m) for m in modules_of(fused, nn.Module)]
    assert nn.Dropout not in kinds and nn.Identity not in kinds and kinds == [nn.Conv2d, nn.ReLU]
    assert torch.equal(fused(x), model(x))


def test_tied_parameters_are_copied_once_and_never_shared_with_the_caller():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.GELU())
    model[2].weight = model[0].weight  # tied weights
    fused = reparam.fuse(model, torch.randn(1, 4, 6, 6))
    convs = modules_of(fused, nn.Conv2d)
    assert convs[0].weight is convs[1].weight  # still tied in the copy
    assert convs[0].weight is not model[0].weight
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training the caller's model later does not change the fused one
    assert not torch.equal(convs[0].weight, model[0].weight)
