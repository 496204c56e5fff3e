"""fuse() works on a private copy: the fused model never shares memory or mutable state with the
caller's model, and the copy is what `copy.deepcopy` would make (minus hooks)."""

import copy

import torch
from torch import nn

import reparam
from reparam import affine
from reparam.pipeline import _private_copy

from .helpers import conv_bn, rbn


def _storages(module: nn.Module) -> dict[int, str]:
    return {t.untyped_storage().data_ptr(): name
            for name, t in [*module.named_parameters(remove_duplicate=False),
                            *module.named_buffers(remove_duplicate=False)] if t.numel()}


class Mixed(nn.Module):
    """Fused parts (conv+BN+skip, a conv lowered on its own through an identity), parts kept as
    written (a Linear, a buffer read in forward) and a plain attribute."""

    def __init__(self, c=6):
        super().__init__()
        self.kxk = conv_bn(c, c, 3)
        self.skip = rbn(c)
        self.alone = nn.Conv2d(c, c, 1)
        self.pass_through = nn.Identity()
        self.head = nn.Linear(c, 3)
        self.register_buffer("offset", torch.randn(1, c, 1, 1))
        self.config = {"widths": [c]}

    def forward(self, x):
        y = torch.relu(self.kxk(x) + self.skip(x))
        y = torch.relu(self.pass_through(self.alone(y))) * self.offset
        return self.head(y.mean((2, 3)))


class UntraceableTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Mixed()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: the model itself is not traceable, its child is
            return self.body(x)
        return self.body(-x)


def test_fused_model_shares_no_tensor_with_the_caller_nor_between_its_modules():
    for model in (Mixed(), UntraceableTop()):
        x = torch.randn(2, 6, 5, 5).abs()
        fused = reparam.fuse(model, x)
        theirs, ours = _storages(model), _storages(fused)
        assert not set(theirs) & set(ours), [theirs[p] for p in set(theirs) & set(ours)]
        params = [t for _, t in fused.named_parameters(remove_duplicate=False)]
        ptrs = [t.untyped_storage().data_ptr() for t in params]
        assert len(ptrs) == len(set(ptrs))  # no two parameters of the result share memory
        torch.testing.assert_close(fused(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_private_copy_is_a_deep_copy_without_hooks():
    model = Mixed()
    model.shared = model.alone  # one module under two names stays one module
    model.register_forward_hook(lambda *a: None)
    work = _private_copy(model, "Mixed")
    assert work.shared is work.alone and work.alone is not model.alone
    assert work.config == model.config and work.config["widths"] is not model.config["widths"]
    assert not work._forward_hooks and len(model._forward_hooks) == 1
    assert not work.training and model.training
    assert not set(_storages(work)) & set(_storages(model))
    for (name, a), (_, b) in zip(model.state_dict().items(), work.state_dict().items()):
        assert torch.equal(a, b), name


class CopiesItself(nn.Module):
    """A module with its own __deepcopy__: the private copy must use it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.copied = False

    def __deepcopy__(self, memo):
        new = CopiesItself()
        new.conv = copy.deepcopy(self.conv, memo)
        new.copied = True
        return new

    def forward(self, x):
        return self.conv(x)


def test_private_copy_respects_a_custom_deepcopy():
    model = nn.Sequential(CopiesItself(), nn.BatchNorm2d(3))
    work = _private_copy(model, "Sequential")
    assert work[0].copied and not model[0].copied


class FreezesItsNorm(nn.Module):
    """A `train` of its own (frozen norms, as detection backbones write it): `eval()` must call it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.calls = []

    def train(self, mode=True):
        self.calls.append(mode)
        return super().train(mode)


def test_private_copy_is_in_eval_mode_everywhere_without_hooks_or_gradients():
    listed = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(FreezesItsNorm(), CopiesItself(), nn.BatchNorm2d(3))
    model.extra = [listed]  # a module in a plain list: copied by copy.deepcopy
    model[2].register_forward_pre_hook(lambda *a: None)
    model[1].conv.register_forward_hook(lambda *a: None)
    work = _private_copy(model, "Sequential")
    assert work[0].calls[-1] is False and model[0].training  # its own train(False) ran on the copy only
    modules = [*work.modules(), *work.extra]
    assert not any(m.training for m in modules) and all(m.training for m in [*model.modules(), listed])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_float32_source_is_known_only_while_the_values_are_the_same():
    p = torch.randn(4, 3, 3, 3)
    wide = affine.widened(p)
    assert wide.dtype == torch.float64 and affine.float32_source(wide) is not None
    assert torch.equal(affine.float32_source(wide), p)
    assert affine.float32_source(affine.widened(wide)) is not None  # widened again: same source
    flat = wide.reshape(4, 27)
    assert affine.float32_source(flat).shape == (4, 27)
    assert affine.float32_source(wide[:2]) is None  # a part is not the whole
    assert affine.float32_source(wide * 1.0) is None  # a computed value is unknown
    wide.mul_(2.0)  # the copy changed: no longer the original's values
    assert affine.float32_source(wide) is None
    other = affine.widened(p)
    p.add_(1.0)  # the original changed
    assert affine.float32_source(other) is None
