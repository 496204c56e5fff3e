"""Models as other libraries write them, in the ways they call and wrap their layers: forwards with
further arguments that have defaults (mmcv's ConvModule), the deprecated weight-norm and
spectral-norm hooks (super-resolution, audio and GAN code), a forward patched onto a layer for
the duration of a call (mmcv's efficient conv-bn evaluation), and hooks the user registered.

Each test checks the structure (convs left, norms gone, what must not fuse) and the numbers in
float64 with randomized BatchNorms."""

from __future__ import annotations

import gc
import warnings
import weakref
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam

from .helpers import BN_TYPES, CONV_TYPES, assert_same, fuse64, modules_of, n_bns, n_convs, randomize_bn


def _weight_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, but still in many models
        return nn.utils.weight_norm(module)


# ------------------------------------------------------------------------------------------------
# mmcv's ConvModule: forward(x, activate=True, norm=True), and its efficient conv-bn evaluation
# ------------------------------------------------------------------------------------------------

def efficient_conv_bn_eval_forward(bn: nn.BatchNorm2d, conv: nn.Conv2d, x: torch.Tensor):
    """The BatchNorm folded into the conv's weight on every call (mmcv's spelling)."""
    weight_on_the_fly = conv.weight
    if conv.bias is not None:
        bias_on_the_fly = conv.bias
    else:
        bias_on_the_fly = torch.zeros_like(bn.running_var)
    bn_weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    bn_bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    weight_coeff = torch.rsqrt(bn.running_var + bn.eps).reshape([-1] + [1] * (len(conv.weight.shape) - 1))
    coefff_on_the_fly = bn_weight.view_as(weight_coeff) * weight_coeff
    weight_on_the_fly = weight_on_the_fly * coefff_on_the_fly
    bias_on_the_fly = bn_bias + coefff_on_the_fly.flatten() * (bias_on_the_fly - bn.running_mean)
    return conv._conv_forward(x, weight_on_the_fly, bias_on_the_fly)


class ConvModule(nn.Module):
    """conv / norm / act in a configurable order, each switchable per call."""

    def __init__(self, cin, cout, k, padding=0, order=("conv", "norm", "act"), efficient_conv_bn_eval=False):
        super().__init__()
        self.order = order
        self.with_norm = True
        self.with_activation = True
        self.with_explicit_padding = False
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.norm_name = "bn"
        self.add_module("bn", randomize_bn(nn.BatchNorm2d(cout)))
        self.activate = nn.ReLU(inplace=True)
        self.efficient_conv_bn_eval_forward = efficient_conv_bn_eval_forward if efficient_conv_bn_eval else None

    @property
    def norm(self):
        return getattr(self, self.norm_name)

    def forward(self, x: torch.Tensor, activate: bool = True, norm: bool = True) -> torch.Tensor:
        layer_index = 0
        while layer_index < len(self.order):
            layer = self.order[layer_index]
            if layer == "conv":
                if self.with_explicit_padding:
                    x = self.padding_layer(x)
                if layer_index + 1 < len(self.order) and self.order[layer_index + 1] == "norm" and norm and \
                        self.with_norm and not self.norm.training and \
                        self.efficient_conv_bn_eval_forward is not None:
                    self.conv.forward = partial(self.efficient_conv_bn_eval_forward, self.norm, self.conv)
                    layer_index += 1
                    x = self.conv(x)
                    del self.conv.forward
                else:
                    x = self.conv(x)
            elif layer == "norm" and norm and self.with_norm:
                x = self.norm(x)
            elif layer == "act" and activate and self.with_activation:
                x = self.activate(x)
            layer_index += 1
        return x


def test_conv_module_with_switches_as_the_model_itself_folds_its_norm():
    model = ConvModule(6, 8, 3, padding=1)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    fused = fuse64(model, x)
    assert not fused.report.leaves  # traced as a whole, not fallen back to its children
    assert n_convs(fused) == 1 and n_bns(fused) == 0
    assert [r.members for r in fused.report.regions] == [("conv", "bn")]
    assert modules_of(fused, nn.ReLU)  # activate=True: the activation stays
    assert any("activate=True" in n and "norm=True" in n for n in fused.report.notes)
    # The same calls as the original, by keyword or by position, with the values it was fused for.
    assert_same(model, partial(fused, activate=True), x)
    assert_same(model, partial(fused, norm=True, activate=True), x)
    with pytest.raises(AssertionError, match="norm=True"):
        fused(x, norm=False)
    with pytest.raises(AssertionError, match="activate=True"):
        fused(x, False)


def test_neck_with_a_keyword_only_mask_is_fused_for_no_mask():
    class Neck(nn.Module):
        def __init__(self):
            super().__init__()
            self.lateral = nn.Conv2d(6, 8, 1)
            self.lateral_bn = randomize_bn(nn.BatchNorm2d(8))
            self.fpn = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.fpn_bn = randomize_bn(nn.BatchNorm2d(8))

        def forward(self, x, *, mask=None, return_feats=False):
            lat = self.lateral_bn(self.lateral(x))
            if mask is not None:
                lat = lat * mask
            out = self.fpn_bn(self.fpn(lat))
            if return_feats:
                return out, lat
            return out

    model = Neck()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    fused = fuse64(model, x)
    assert not fused.report.leaves and n_bns(fused) == 0
    assert n_convs(fused) == 2  # the 1x1's bias would be wrong on the 3x3's zero border: two convs
    assert any("mask=None" in n and "return_feats=False" in n for n in fused.report.notes)
    with pytest.raises(AssertionError, match="mask=None"):
        fused(x, mask=torch.ones(1, 8, 1, 1, dtype=torch.float64))


def test_child_called_with_switches_by_an_untraceable_parent():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.reduce = ConvModule(6, 8, 1)
            self.smooth = ConvModule(8, 8, 3, padding=1)

        def forward(self, x):
            if x.abs().max() > 1e6:  # data-dependent: the head stays a leaf, fused inside
                return x
            return self.smooth(self.reduce(x, activate=False), False, False)

    model = Head()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    fused = fuse64(model, x)
    assert fused.report.leaves[0].module.startswith("Head")
    assert not fused.report.refusals
    notes = " ".join(fused.report.notes)
    assert "reduce: traced with activate=False, norm=True" in notes
    assert "smooth: traced with activate=False, norm=False" in notes
    assert n_bns(fused.reduce) == 0 and not modules_of(fused.reduce, nn.ReLU)  # activate=False
    assert type(fused.smooth) is ConvModule  # norm=False, activate=False: a conv, nothing to fuse


def test_child_called_with_different_switches_is_refused_by_name():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = ConvModule(6, 6, 1)
            self.block = ConvModule(6, 6, 3, padding=1)

        def forward(self, x):
            if x.abs().max() > 1e6:
                return x
            return self.block(self.block(self.stem(x)), activate=False)

    model = Twice()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    fused = fuse64(model, x)
    assert any(r.where == "block" and "different non-tensor arguments" in r.reason for r in fused.report.refusals)
    assert type(fused.block) is ConvModule  # left as it was, and right
    assert n_bns(fused.stem) == 0


def test_block_called_with_sizes_takes_any_size():
    class TokenMixer(nn.Module):
        """PVT/Swin style: tokens [B, N, C] and the map size passed along by the caller."""

        def __init__(self, c):
            super().__init__()
            self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
            self.bn = randomize_bn(nn.BatchNorm2d(c))

        def forward(self, x, H, W, return_map=False):
            B, N, C = x.shape
            y = self.bn(self.dw(x.transpose(1, 2).reshape(B, C, H, W)))
            return y if return_map else y.flatten(2).transpose(1, 2)

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([TokenMixer(8), TokenMixer(8)])

        def forward(self, x):
            B, C, H, W = x.shape
            x = x.flatten(2).transpose(1, 2)
            for i, blk in enumerate(self.blocks):
                if x.abs().max() > 1e6:  # data-dependent: the stage stays a leaf, fused inside
                    break
                x = blk(x, H, W, return_map=i == len(self.blocks) - 1)
            return x

    model = Stage()
    fused = fuse64(model, torch.randn(2, 8, 6, 6, dtype=torch.float64))
    assert not fused.report.refusals
    assert all(n_bns(fused.blocks[i]) == 0 for i in range(2))
    notes = " ".join(fused.report.notes)
    assert "blocks.0: traced with return_map=False" in notes and "blocks.1: traced with return_map=True" in notes
    assert_same(model, fused, torch.randn(1, 8, 5, 7, dtype=torch.float64), rel=1e-12)  # H, W are not fixed


def test_efficient_conv_bn_eval_is_traced_through_the_patched_forward():
    model = ConvModule(6, 8, 3, padding=1, efficient_conv_bn_eval=True)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    fused = fuse64(model, x)
    assert not fused.report.leaves
    # The norm is folded by the patched forward itself: one convolution, no BatchNorm call.
    assert n_bns(fused) == 0
    convs = [n for n in fused.graph.nodes if n.target in (torch.conv2d, F.conv2d)] + \
        [n for n in fused.graph.nodes if n.op == "call_module" and isinstance(fused.get_submodule(n.target), CONV_TYPES)]
    assert len(convs) == 1
    assert "forward" not in vars(model.conv)  # the model cleaned up after itself, as it does


def test_efficient_conv_bn_eval_in_a_residual_block_fuses_with_the_skip():
    class Basic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = ConvModule(8, 8, 3, padding=1, efficient_conv_bn_eval=True)
            self.conv2 = ConvModule(8, 8, 3, padding=1, efficient_conv_bn_eval=True)

        def forward(self, x):
            x = self.conv1(x)
            out = self.conv2(x, activate=False)
            out += x
            return F.relu(out)

    model = Basic()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    fused = fuse64(model, x)
    assert not fused.report.leaves and n_bns(fused) == 0
    assert any("add" in "".join(r.members) for r in fused.report.regions)  # the skip went into conv2


def test_patched_forward_that_cannot_be_traced_keeps_its_caller_whole_with_the_reason():
    def checked_conv_bn(bn, conv, x):
        if x.abs().max() > 1e6:  # data-dependent: cannot be traced
            raise ValueError("input out of range")
        return efficient_conv_bn_eval_forward(bn, conv, x)

    model = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), randomize_bn(nn.BatchNorm2d(6)),
                          ConvModule(6, 8, 3, padding=1, efficient_conv_bn_eval=True))
    model[2].efficient_conv_bn_eval_forward = checked_conv_bn
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    fused = fuse64(model, x)
    [leaf] = fused.report.leaves
    assert leaf.module == "2" and "conv runs a forward set on its instance (partial(" in leaf.reason
    assert n_convs(fused) == 1 and n_bns(fused) == 0  # the first conv-bn still folds; the leaf is whole


def test_rank_read_with_len_is_decided_and_guarded():
    class ChannelsLastNorm(nn.Module):
        """A norm for channels-last or channels-first input, by the rank of its weight and input."""

        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn = randomize_bn(nn.BatchNorm2d(c))

        def forward(self, x):
            if len(x.shape) == 3:  # unbatched
                x = x.unsqueeze(0)
            assert len(self.conv.weight.shape) == 4
            return self.bn(self.conv(x))

    model = ChannelsLastNorm(6)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    fused = fuse64(model, x)
    assert not fused.report.leaves and n_bns(fused) == 0 and n_convs(fused) == 1
    with pytest.raises(Exception, match="len"):
        fused(torch.randn(6, 5, 5, dtype=torch.float64))  # the other branch: refused, not miscomputed


# ------------------------------------------------------------------------------------------------
# torch.nn.utils.weight_norm / spectral_norm (deprecated hook API)
# ------------------------------------------------------------------------------------------------

class WNConvBlock(nn.Module):
    """Audio / vocoder style: weight-normalized 1-D convs with a BatchNorm and a residual."""

    def __init__(self, c):
        super().__init__()
        self.conv = _weight_norm(nn.Conv1d(c, c, 5, padding=2))
        self.bn = randomize_bn(nn.BatchNorm1d(c))
        self.proj = _weight_norm(nn.Conv1d(c, c, 1))

    def forward(self, x):
        return self.proj(F.gelu(self.bn(self.conv(x)))) + x


def test_weight_norm_conv_folds_its_batch_norm():
    model = WNConvBlock(6)
    with torch.no_grad():
        model.conv.weight_g.mul_(torch.rand_like(model.conv.weight_g) + 0.5)  # not the weight's norm
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    fused = fuse64(model, x)
    assert n_bns(fused) == 0 and n_convs(fused) == 2  # conv+bn; proj reads gelu, the skip reads x
    assert [r.members for r in fused.report.regions] == [("conv", "bn")]
    assert any("conv: its weight is computed by torch.nn.utils.weight_norm" in n for n in fused.report.notes)


def test_weight_norm_model_is_untouched_and_read_as_it_is_now():
    model = WNConvBlock(6).double()
    hooks = dict(model.conv._forward_pre_hooks)
    weight = model.conv.weight
    params = {n: p.clone() for n, p in model.named_parameters()}
    # A checkpoint loaded after the last call: the stored `weight` is stale, g and v are not.
    state = model.state_dict()
    state["conv.weight_g"] = state["conv.weight_g"] * 1.7
    model.load_state_dict(state)
    assert model.conv.weight is weight
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert dict(model.conv._forward_pre_hooks) == hooks and model.training
    assert model.conv.weight is weight
    assert_same(model, fused, x, rel=1e-12)  # the weight from g and v, not the stale one
    assert "weight" not in model.conv._parameters and {"weight_g", "weight_v"} <= set(model.conv._parameters)
    assert all(torch.equal(p, params[n]) or n == "conv.weight_g" for n, p in model.named_parameters())


def test_spectral_norm_conv_folds_its_batch_norm_as_in_eval_mode():
    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(4, 8, 3, padding=1)), randomize_bn(nn.BatchNorm2d(8)),
                          nn.LeakyReLU(0.2))
    model.train()(torch.randn(4, 4, 6, 6))  # a few power iterations: u and v are not their initial values
    model(torch.randn(4, 4, 6, 6))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = fuse64(model, x)
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    assert any("spectral_norm" in n for n in fused.report.notes)


def test_pruned_conv_folds_its_batch_norm_with_the_mask_applied():
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), randomize_bn(nn.BatchNorm2d(8)), nn.ReLU())
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[0], "weight", amount=0.2)  # a PruningContainer of two masks
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = fuse64(model, x)
    assert n_bns(fused) == 0 and n_convs(fused) == 1
    assert any("prune" in n for n in fused.report.notes)
    assert isinstance(next(iter(model[0]._forward_pre_hooks.values())), prune.BasePruningMethod)


# ------------------------------------------------------------------------------------------------
# Hooks the user registered: run by the fused model as by the original, never while fusing
# ------------------------------------------------------------------------------------------------

class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = randomize_bn(nn.BatchNorm2d(8))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(8)))
        self.head = nn.Conv2d(8, 8, 1)
        self.head_bn = randomize_bn(nn.BatchNorm2d(8))

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.relu(self.block(y))
        return self.head_bn(self.head(y))


def test_hooked_conv_is_kept_whole_and_its_hook_runs():
    model = Stem().double()
    calls = []

    def double_it(module, inputs, output):  # changes what the conv returns
        calls.append(1)
        return output * 2

    model.conv.register_forward_hook(double_it)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert calls == []  # never fired while fusing
    assert_same(model, fused, x, rel=1e-12)  # the original with its hook
    assert calls == [1, 1]  # once by the original, once by the fused model
    leaf = next(l for l in fused.report.leaves if l.module == "conv")
    assert "forward hook" in leaf.reason and "double_it" in leaf.reason
    # The hooked conv stays as it was; its BatchNorm cannot fold into it, the others fold.
    assert fused.get_submodule("conv")._forward_hooks and n_bns(fused) == 1
    assert n_convs(fused) == 3
    assert len(model.conv._forward_hooks) == 1


def test_pre_hooked_block_is_kept_whole_and_fused_inside():
    model = Stem().double()
    model.block.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    model.block.register_forward_pre_hook(lambda module, args, kwargs: ((args[0] + 1,), kwargs), with_kwargs=True)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert_same(model, fused, x, rel=1e-12)
    leaf = next(l for l in fused.report.leaves if l.module == "block")
    assert "pre-hook" in leaf.reason and leaf.fused_inside == 1
    assert n_bns(fused) == 0 and n_bns(fused.block) == 0  # its own conv and BN still fold
    assert fused.block._forward_pre_hooks


def test_hooks_of_the_model_itself_run_around_the_fused_graph():
    model = Stem().double()
    seen = []
    model.register_forward_pre_hook(lambda module, args: (args[0].flip(-1),))
    model.register_forward_hook(lambda module, args, output: seen.append(output.shape) or output + 1)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model, x)
    assert seen == []
    assert n_bns(fused) == 0 and n_convs(fused) == 3  # nothing inside is hooked: all folds
    assert_same(model, fused, x, rel=1e-12)
    assert len(seen) == 2
    assert any("the model itself" in n and "forward hook" in n for n in fused.report.notes)
    original = weakref.ref(model)
    del model
    gc.collect()
    assert original() is None  # the fused model keeps the hooks, not the caller's model
    assert fused(x).shape == (2, 8, 6, 6) and len(seen) == 3


def test_observing_hook_leaves_the_rest_fused():
    # A feature-collecting hook (returns None): the hooked module is kept whole all the same,
    # since reparam cannot tell what a hook does without running it.
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), randomize_bn(nn.BatchNorm2d(8)), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), randomize_bn(nn.BatchNorm2d(8)))
    feats = {}
    model[2].register_forward_hook(lambda m, i, o: feats.__setitem__("relu", o))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = fuse64(model, x)
    assert n_bns(fused) == 0 and n_convs(fused) == 2
    assert [l.module for l in fused.report.leaves] == ["2"]
    feats.clear()
    fused(x)
    assert "relu" in feats and isinstance(feats["relu"], torch.Tensor)


# ------------------------------------------------------------------------------------------------
# Inputs as detection and multi-modal code passes them: a tuple, list or dict as one argument
# ------------------------------------------------------------------------------------------------

class TwoStreams(nn.Module):
    """forward(self, inputs): a pair of feature maps, each through its own conv-bn, then summed."""

    def __init__(self):
        super().__init__()
        self.rgb = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(8)))
        self.depth = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(8)))

    def forward(self, inputs, use_depth: bool = True):
        rgb, depth = inputs
        out = self.rgb(rgb)
        if use_depth:
            out = out + self.depth(depth)
        return out


def test_pair_of_tensors_as_one_argument():
    model = TwoStreams().double().eval()
    pair = (torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 2, 6, 6, dtype=torch.float64))
    fused = reparam.fuse(model, (pair,))  # one argument: the pair
    assert n_bns(fused) == 0 and n_convs(fused) == 2 and not fused.report.leaves
    assert any("use_depth=True" in n for n in fused.report.notes)
    fresh = tuple(torch.randn_like(t) for t in pair)
    assert_same(model, fused, fresh, rel=1e-12)
    assert_same(model, fused, list(fresh), rel=1e-12)  # a list unpacks the same way
    with pytest.raises(AssertionError, match="use_depth=True"):
        fused(fresh, use_depth=False)


def test_dict_of_tensors_as_one_argument():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), randomize_bn(nn.BatchNorm2d(4)))
            self.reg = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(4)))

        def forward(self, feats):
            return {"cls": self.cls(feats["p3"]), "reg": self.reg(feats["p4"])}

    model = Heads().double().eval()
    feats = {"p3": torch.randn(1, 4, 8, 8, dtype=torch.float64), "p4": torch.randn(1, 4, 4, 4, dtype=torch.float64)}
    fused = reparam.fuse(model, feats)  # a dict is one argument
    assert n_bns(fused) == 0 and n_convs(fused) == 2
    out, ref = fused(feats), model(feats)
    assert out.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-12)


def test_tuple_given_as_separate_arguments_says_how_to_pass_it():
    model = TwoStreams().double()
    pair = (torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 2, 6, 6, dtype=torch.float64))
    with pytest.raises(reparam.InputError, match=r"takes 2 \(inputs, use_depth\).*example_input=\(\(x1, x2\),\)"):
        reparam.fuse(model, (pair[0], pair[1], pair[0]))
    with pytest.raises(reparam.InputError, match=r"example_input\[0\]` must be a torch.Tensor, or a tuple, list "
                                                 r"or dict of tensors, got a tuple of int"):
        reparam.fuse(model, ((1, 2),))


def test_hooked_block_that_cannot_be_traced_is_listed_once_and_fused_inside():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(8)))

        def forward(self, x):
            if x.abs().max() > 1e6:  # data-dependent
                return x
            return self.body(x)

    model = nn.Sequential(nn.Conv2d(4, 8, 1), Gated())
    model[1].register_forward_hook(lambda m, i, o: o.clamp(min=-1))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fused = reparam.fuse(model.double(), x)
    assert_same(model, fused, x, rel=1e-12)
    assert [leaf.module for leaf in fused.report.leaves] == ["1"]
    assert "forward hook" in fused.report.leaves[0].reason and fused.report.leaves[0].fused_inside == 1
    assert n_bns(fused.get_submodule("1.body")) == 0 and fused.get_submodule("1")._forward_hooks
