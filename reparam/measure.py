"""Sizes of a traced model: graph nodes, parameters, multiply-accumulates and estimated latency.

The counts use the same terms as the fusion rules (`affine.CostModel`), so that a fusion the rules
accept never makes "after" larger than "before": a BatchNorm counts like the depthwise 1x1
convolution (or channel affine) that replaces it, average pooling like its depthwise kernel, and
elementwise additions and products of two tensors count their memory traffic.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import affine
from .module_table import module_table, parameter_count
from .modules import ChannelAffine
from .report import Counts
from .trace import dtype_of, shape_of

_MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
           torch.div, operator.iadd, operator.isub, operator.imul}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def count_params(module: nn.Module) -> int:
    return parameter_count(module)


def _linear_ops(gm: torch.fx.GraphModule):
    """(node, macs per output element, weight elements, grouped) for every op the rules count."""
    modules = module_table(gm)  # one walk, not a dotted-path look-up per call
    for node in gm.graph.nodes:
        out = shape_of(node)
        if out is None or len(out) == 0:
            continue
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                cin_g = m.in_channels // m.groups
                yield node, cin_g * math.prod(m.kernel_size), m.weight.numel(), cin_g < affine.GROUPED_BELOW
            elif isinstance(m, nn.Linear):
                yield node, m.in_features, m.weight.numel(), False
            elif isinstance(m, _BN) or isinstance(m, ChannelAffine):
                yield node, 1, 2 * (m.num_features if isinstance(m, _BN) else m.scale.numel()), True
            elif isinstance(m, _POOL):
                k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * (len(out) - 2)
                yield node, math.prod(k), 0, True
        elif node.op == "call_function":
            if node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d):
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                w = shape_of(w) or _attr_shape(gm, w)
                if w:
                    yield node, math.prod(w[1:]), math.prod(w), len(w) > 2 and w[1] < affine.GROUPED_BELOW
            elif node.target is F.batch_norm:
                yield node, 1, 2 * (out[1] if len(out) > 1 else 1), True
            elif node.target in _MATMUL and len(node.args) == 2:
                a = shape_of(node.args[0])
                if a:
                    yield node, a[-1], 0, False
        elif node.op == "call_method" and node.target in ("matmul", "bmm", "mm", "__matmul__"):
            a = shape_of(node.args[0])
            if a:
                yield node, a[-1], 0, False


def count_macs(gm: torch.fx.GraphModule) -> int:
    """Multiply-accumulates of convolutions, linear layers, matrix products, norms and pooling.

    Uses the shapes stored by `trace.propagate_shapes`. A BatchNorm (or channel affine) counts one
    MAC per element, like the depthwise 1x1 convolution that can replace it; average pooling counts
    its window, like its depthwise kernel.
    """
    return sum(math.prod(shape_of(node)) * per for node, per, _, _ in _linear_ops(gm))


def estimate_latency(gm: torch.fx.GraphModule, model: affine.CostModel = affine.DEFAULT_COST) -> float:
    """Estimated latency in nanoseconds of the ops the fusion rules count (`affine.CostModel`)."""
    total = 0.0
    for node, per, weights, grouped in _linear_ops(gm):
        out = math.prod(shape_of(node))
        src = node.args[0] if node.args else None
        inp = math.prod(shape_of(src)) if shape_of(src) else out
        size = _itemsize(node)
        total += (model.overhead + (model.mac_grouped if grouped else model.mac) * out * per
                  + model.byte * size * (inp + out + weights))
    for node in gm.graph.nodes:
        is_binary = (node.op == "call_function" and node.target in _BINARY) or (
            node.op == "call_method" and node.target in _BINARY_METHODS)
        if is_binary and shape_of(node) and sum(isinstance(a, torch.fx.Node) and shape_of(a) is not None
                                                and a.op != "get_attr" for a in node.args[:2]) == 2:
            total += model.elementwise(math.prod(shape_of(node)), 2, _itemsize(node))
    return total


def _itemsize(node) -> int:
    dtype = dtype_of(node)
    return dtype.itemsize if dtype is not None else 4


def _attr_shape(gm, node):
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return tuple(obj.shape)
    return None


def counts(gm: torch.fx.GraphModule) -> Counts:
    return Counts(nodes=len(gm.graph.nodes), params=count_params(gm), macs=count_macs(gm),
                  latency_us=estimate_latency(gm) / 1000)


# --------------------------------------------------------------------------------------------
# Accounting: no linear operation is left beside another without a word in the report
# --------------------------------------------------------------------------------------------

def unaccounted_linear_ops(fused: nn.Module, report=None) -> list[str]:
    """Pairs of adjacent linear operations in `fused` that the report does not explain.

    A linear operation (conv, norm, linear, channel affine, layer scale, average pooling...) that
    feeds another one directly (through identities and layout steps only, as its only consumer)
    could have been combined with it; so could one that feeds it through an average that keeps
    constants (global average pooling, `mean` over spatial axes), which a pointwise map moves
    through (passes/commute.py), or through an upsampling that copies pixels (PixelShuffle, nearest
    upsampling), which pointwise maps cross (passes/distribute.py). Concatenations and channel
    splits are looked through as well: a per-channel map after `torch.cat` of linear outputs acts
    on each of them (each "input -> map" is a pair), and a per-channel map on a piece of `chunk`/`split`/`y[:, a:b]` of a linear output
    could move before the split (passes/distribute.py). Such a pair is accounted for when a refusal
    of the report (`fused.report` unless given) names one of the two, or one of the operations a
    fused module in the pair replaced. A per-channel map read by several operations, one of them
    linear, must be named as well (it could fold into each of its readers). Returns "A -> B" for
    each pair that is not; an empty list means every linear operation left is either alone or
    explained.

    Reads of metadata (`x.shape`, `x.size(1)`, `torch._assert(x.ndim == 4)`) are not consumers,
    and values that do not depend on the model's inputs (positional encodings computed from
    `arange`, shape arithmetic) are not operations on data: neither is counted. A sum whose
    operands are linear maps of one value, kept as several operations, is listed as "A + B"
    unless the report names one of them. `fused` may also be a model whose own `forward` could
    not be traced: the graphs of its submodules, fused separately, are checked.
    """
    report = report if report is not None else getattr(fused, "report", None)
    named: set[str] = set()
    regions: dict[str, set[str]] = {}
    if report is not None:
        for r in report.refusals:
            named.update(part.strip() for part in r.where.split(","))
        regions = {r.name: set(r.members) for r in report.regions}
    # The model's own graph, and those of submodules fused separately (an untraceable model or
    # leaf, whose children were fused one by one): the report names their operations by path.
    missing = []
    for path, gm in fused.named_modules():
        if isinstance(gm, torch.fx.GraphModule):
            missing += _unaccounted_in(gm, named, regions, f"{path}." if path else "")
    return missing


def _unaccounted_in(fused: torch.fx.GraphModule, named: set[str], regions: dict[str, set[str]],
                    prefix: str) -> list[str]:
    """`unaccounted_linear_ops` for one graph, whose operations the report names after `prefix`."""
    from .passes.cleanup import RESTORED_IN_PLACE
    from .passes.distribute import _split_pieces, copying_upsample
    from .passes.functionalize import values_updated_in_place
    from .passes.linear_forms import is_metadata_read
    from .passes.ops import Classifier
    from .passes.ops import member_name as own_name
    from .passes.transposed import is_transposed_conv
    from .trace import Constants, is_shape_query

    def member_name(node) -> str:
        return prefix + own_name(node)

    consts = Constants({n: (v.detach().double() if v.is_floating_point() else v.detach())
                        for n in fused.graph.nodes if n.op == "get_attr"
                        for v in [_fetch(fused, n.target)] if isinstance(v, torch.Tensor)})
    classify = Classifier(fused, consts)
    # Updates `restore_in_place` made after fusion write values nothing else reads: as computations
    # they are their out-of-place forms.
    restored = {n for n in fused.graph.nodes if n.meta.get(RESTORED_IN_PLACE)}
    if restored:
        classify.mutated = values_updated_in_place(fused, is_shape_query, restored)
    on_data = _computed_from_inputs(fused)
    rules: dict = {}

    def rule_of(node):
        if node not in rules:
            rules[node] = classify(node) if isinstance(node, torch.fx.Node) and node in on_data else None
        return rules[node]

    def kind(node):
        if not isinstance(node, torch.fx.Node) or node not in on_data:
            return None
        if node.op == "call_module" and isinstance(fused.get_submodule(node.target), ChannelAffine):
            return "affine"
        rule = rule_of(node)
        return rule.kind if rule is not None else None

    def is_linear(node) -> bool:
        return kind(node) in ("affine", "scale", "shift")

    def names(node) -> set[str]:
        name = member_name(node)
        # A module the lowering created stands for the operations it replaced: the report's
        # region, or (one operation rewritten alone) the members recorded on its node.
        return {name} | regions.get(name, set()) | {prefix + m for m in node.meta.get("reparam_members", ())}

    def readers(node) -> list:
        return [u for u in node.users if not is_metadata_read(u, node)]

    def first_input(node):
        return node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None

    def piece_of(node):
        """The value `node` is a channel piece of (`chunk`/`split` then getitem, or a slice)."""
        if node.op != "call_function" or node.target is not operator.getitem or not node.args:
            return None
        parent = node.args[0]
        if not isinstance(parent, torch.fx.Node):
            return None
        if shape_of(parent) is not None and _split_pieces(node, parent) is not None:
            return parent  # `y[:, a:b]`
        y = first_input(parent)
        if y is not None and shape_of(y) is not None and _split_pieces(parent, y) is not None:
            return y  # `y.chunk(2, 1)[k]`, `torch.split(y, sizes, 1)[k]`
        return None

    def linear_inputs(node) -> list:
        """The linear ops feeding `node` through identities, layout steps and averages (each
        feeding only that), and, for a per-channel map, through a concatenation or a split."""
        found = []
        todo = [first_input(node)]
        while todo:
            x = todo.pop()
            while x is not None and len(readers(x)) == 1:
                k = kind(x)
                if k in ("identity", "layout", "average") or through_upsampling(x, node):
                    x = first_input(x)
                    continue
                if k in ("affine", "scale", "shift"):
                    found.append(x)
                elif k == "concat" and per_channel(node):
                    todo.extend(v for v in rule_of(x).inputs if isinstance(v, torch.fx.Node))
                elif per_channel(node) and piece_of(x) is not None:
                    y = piece_of(x)  # the pieces of `y` are all that is read of it
                    if is_linear(y) and all(_split_pieces(r, y) is not None for r in readers(y)):
                        found.append(y)
                break
        return found

    def through_upsampling(x, node) -> bool:
        """Does the pointwise map `node` move across `x`, an upsampling that copies pixels
        (passes/distribute.py)? Per-channel maps across any; 1x1 convs across nearest upsampling."""
        how = copying_upsample(fused, x)
        if how is None:
            return False
        if per_channel(node):
            return True
        rule = rule_of(node)
        return how[0] == "nearest" and rule is not None and rule.kind == "affine" and rule.op.is_pointwise

    def per_channel(node) -> bool:
        if node.op == "call_module" and isinstance(fused.get_submodule(node.target), ChannelAffine):
            return True
        rule = rule_of(node)
        if rule is None:
            return False
        if rule.kind in ("scale", "shift"):  # constants that vary along one axis at most
            ndim = len(shape_of(node))
            return len({ndim - c.dim() + i for c in (rule.scale, rule.shift) if c is not None
                        for i, n in enumerate(c.shape) if n != 1}) <= 1
        return rule.kind == "affine" and rule.op.is_per_channel

    def terms(node) -> list:
        """The operands of a sum, nested sums read only by it expanded."""
        out = []
        for x in rule_of(node).inputs:
            if kind(x) == "sum" and len(readers(x)) == 1:
                out.extend(terms(x))
            else:
                out.append(x)
        return out

    def branch(x):
        """(source, linear ops on the way) of one operand: back through linear ops, layout steps
        and identities that only this operand reads."""
        ops = []
        while isinstance(x, torch.fx.Node) and kind(x) in ("affine", "scale", "shift", "identity", "layout") \
                and len(readers(x)) == 1:
            if is_linear(x):
                ops.append(x)
            x = first_input(x)
        return x, ops

    missing = []
    for node in fused.graph.nodes:
        if kind(node) == "sum" and not any(kind(u) == "sum" and len(readers(node)) == 1 for u in readers(node)):
            # A sum whose operands are linear maps of one value could be one operation.
            by_source: dict = {}
            for t in terms(node):
                source, ops = branch(t)
                by_source.setdefault(source, []).append(ops)
            for source, branches in by_source.items():
                ops = [op for b in branches for op in b]
                if len(branches) > 1 and ops and source is not None and not any(
                        names(op) & named for op in ops) and member_name(node) not in named:
                    missing.append(" + ".join(member_name(b[0]) if b else prefix + source.name for b in branches))
            continue
        if not is_linear(node):
            continue
        users = readers(node)
        linear_users = [u for u in users if is_linear(u)]
        if len(users) > 1 and linear_users and per_channel(node) and not names(node) & named:
            # A per-channel map read by several operations could fold into each linear one.
            missing.append(f"{member_name(node)} -> {', '.join(member_name(u) for u in linear_users)}")
            continue
        befores = linear_inputs(node)
        if not befores and per_channel(node):  # a map a transposed conv could absorb (passes/transposed.py)
            rule = rule_of(node)
            x = rule.inputs[0] if rule is not None and rule.inputs else None
            if isinstance(x, torch.fx.Node) and is_transposed_conv(fused, x) and len(readers(x)) == 1:
                befores = [x]
        for before in befores:
            if not (names(node) | names(before)) & named:
                missing.append(f"{member_name(before)} -> {member_name(node)}")
    return missing


def _computed_from_inputs(gm: torch.fx.GraphModule) -> set:
    """Nodes whose value depends on the numbers of a graph input (metadata reads do not count)."""
    from .passes.linear_forms import is_metadata_read

    found = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            found.add(node)
        elif any(x in found and not is_metadata_read(node, x) for x in node.all_input_nodes):
            found.add(node)
    return found


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
