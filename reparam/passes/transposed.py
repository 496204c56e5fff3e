"""Per-channel maps after a transposed convolution, folded into it.

Decoders, U-Net up blocks, FPN upsampling and GAN generators follow a `ConvTransposeNd` with a
BatchNorm (or a layer scale, or a shift). A transposed convolution with weight `W` of shape
`[C_in, C_out / groups, *k]` and bias `b` computes output channel `o = g * (C_out / groups) + j`
from `W[g * C_in / groups : (g + 1) * C_in / groups, j]`; a per-channel map `y_o = s_o * x_o + t_o`
after it therefore scales that slice:

    s * convT(x; W, b) + t  =  convT(x; W', s * b + t)     W'[i, j] = s_{g(i) * C_out / groups + j} * W[i, j]

whatever the stride, padding, output_padding and dilation (they place the same products; the map
only rescales them). The linear-form pass does not read transposed convolutions, so this pass
folds such maps before it runs:

    pattern   a per-channel map (BatchNorm module or `F.batch_norm` in eval mode, `x * c`, `x + c`,
              `x / c`, ... with `c` one value per channel or a scalar) whose input is a call of a
              `ConvTranspose1d/2d/3d` module (its exact torch type, or a subclass that computes
              what it computes) or of `F.conv_transpose1d/2d/3d` with constant weight and bias
    check     the map's constants vary along the channel axis only; the transposed conv's output
              has no other reader (reads of its shape, dtype or device aside); the conv pads with
              zeros and its weight and bias are constants
    rewrite   a new transposed conv module (a fresh name, the weights computed in float64 and
              stored in the model's dtype on its device) replaces both nodes

A chain (`convT -> BatchNorm -> layer scale`) folds one map at a time. A failed check leaves the
graph as written and returns the reason, which the report names.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..module_table import module_table
from ..report import FusedRegion
from ..trace import Constants, dtype_of, shape_of
from .linear_forms import RefusalRecord, is_metadata_read
from .ops import Classifier, LinearOp, bind, computes_as_its_torch_base, member_name

_TRANSPOSED_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_TRANSPOSED_FUNCS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3,
                     torch.conv_transpose1d: 1, torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}
_TRANSPOSED_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_MAP_KINDS = ("affine", "scale", "shift")


_LAYOUT_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "view_as", "reshape_as",
                   "contiguous", "squeeze", "unsqueeze"}
_LAYOUT_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze}


def _is_layout_step(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    return node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS


def is_transposed_conv(gm: torch.fx.GraphModule, node) -> bool:
    """A call of a ConvTranspose module (or a subclass of one) or of `F.conv_transpose*`."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_module":
        return _transposed_class(gm.get_submodule(node.target)) is not None
    return node.op == "call_function" and node.target in _TRANSPOSED_FUNCS


def scaled_transposed_conv(weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                           scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of `scale * convT(x; weight, bias) + shift` (per output channel), in float64.

    `weight` has the transposed layout `[C_in, C_out / groups, *k]`; `scale` and `shift` are
    vectors of `C_out` values or scalars."""
    weight = weight.detach().to(torch.float64)
    c_in, c_out_g, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    c_out = c_out_g * groups
    scale = scale.to(torch.float64).to(weight.device).reshape(-1).expand(c_out)
    shift = shift.to(torch.float64).to(weight.device).reshape(-1).expand(c_out)
    blocks = weight.reshape(groups, c_in // groups, c_out_g, *kernel)
    blocks = blocks * scale.reshape(groups, 1, c_out_g, *([1] * len(kernel)))
    b = torch.zeros(c_out, dtype=torch.float64, device=weight.device) if bias is None \
        else bias.detach().to(torch.float64).to(weight.device)
    return blocks.reshape(weight.shape), b * scale + shift


def fold_maps_into_transposed_convs(gm: torch.fx.GraphModule, consts: Constants,
                                    regions: list[FusedRegion] | None = None) -> list[RefusalRecord]:
    """Fold every per-channel map that follows a transposed convolution into it; returns the
    refusals to report (maps that stay, with the reason). When `regions` is given, one
    `FusedRegion` per new module (the conv and the maps it absorbed) is appended to it."""
    if not any(_transposed_class(m) is not None for m in module_table(gm).values()) and not any(
            n.op == "call_function" and n.target in _TRANSPOSED_FUNCS for n in gm.graph.nodes):
        return []  # most graphs: no look-up per node
    convs = [n for n in gm.graph.nodes if is_transposed_conv(gm, n)]
    if not convs:
        return []
    folder = _Folder(gm, consts)
    for node in convs:
        members = [member_name(node)]
        last = None
        while node is not None:  # the folded conv's reader may be a map too (a layer scale)
            found = folder.fold_next(node)
            if found is not None:
                members.append(folder.absorbed)
                last = found
            node = found
        if last is not None and regions is not None:
            m = gm.get_submodule(last.target)
            op = f"{type(m).__name__} {'x'.join(map(str, m.kernel_size))} {m.in_channels}->{m.out_channels}" + (
                f" groups={m.groups}" if m.groups > 1 else "") + f" stride={'x'.join(map(str, m.stride))}"
            source = last.args[0].name if last.args and isinstance(last.args[0], torch.fx.Node) else ""
            regions.append(FusedRegion(str(last.target), op, tuple(members), source))
    if folder.changed:
        gm.recompile()
    return folder.refusals


class _Transposed:
    """A transposed conv call, its constants (float64) and its geometry."""

    def __init__(self, nd, weight, bias, stride, padding, output_padding, groups, dilation, dtype, device):
        self.nd, self.weight, self.bias = nd, weight, bias
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.groups, self.dilation, self.dtype, self.device = groups, dilation, dtype, device


class _Folder:
    def __init__(self, gm: torch.fx.GraphModule, consts: Constants):
        self.gm = gm
        self.consts = consts
        self.classifier = Classifier(gm, consts)
        self.refusals: list[RefusalRecord] = []
        self.changed = False
        self.absorbed = ""  # the report's name of the map folded last
        self.origin: dict[torch.fx.Node, str] = {}  # a folded conv: the report's name of the original

    def refuse(self, where: list[str], reason: str) -> None:
        record = RefusalRecord(", ".join(where), reason)
        if not any((r.where, r.reason) == (record.where, record.reason) for r in self.refusals):
            self.refusals.append(record)

    def fold_next(self, conv: torch.fx.Node) -> torch.fx.Node | None:
        """Fold the per-channel map reading `conv`, if there is one; returns the new conv call
        (whose reader may be the next map), or None."""
        readers = _real_users(conv)
        found = [(u, self.map_of(u, conv)) for u in readers]
        maps = [(u, m) for u, m in found if m is not None]
        if not maps:
            self._refuse_behind_a_layout_step(conv, readers)
            return None
        node, (rule, scale, shift, problem) = maps[0]
        conv_name = self.origin.get(conv, member_name(conv))
        where = [conv_name, rule.member]
        if problem is not None:
            self.refuse(where, f"kept after the transposed conv: {problem}")
            return None
        if len(readers) > 1:
            others = ", ".join(u.name for u in readers if u is not node)
            self.refuse(where, f"kept after the transposed conv: the output of {conv_name} is also "
                               f"read by {others}, which needs it without the map")
            return None
        if conv in self.classifier.mutated or node in self.classifier.mutated:
            self.refuse(where, "kept after the transposed conv: its output is updated in place")
            return None
        found_conv, problem = self.transposed(conv)
        if problem is not None:
            self.refuse(where, f"kept after the transposed conv: {problem}")
            return None
        self.absorbed = rule.member
        new = self.rewrite(conv, node, found_conv, scale, shift)
        self.origin[new] = conv_name
        return new

    def _refuse_behind_a_layout_step(self, conv: torch.fx.Node, readers: list) -> None:
        """A map after a reshape of the transposed conv's output (`bn1d(y.flatten(2))`) is not
        folded here: say so rather than leave it unexplained."""
        if len(readers) != 1 or not _is_layout_step(readers[0]):
            return
        step = readers[0]
        for user in _real_users(step):
            rule = self.classifier(user)
            if rule is not None and rule.kind in _MAP_KINDS and rule.inputs and rule.inputs[0] is step:
                self.refuse([self.origin.get(conv, member_name(conv)), rule.member],
                            f"kept after the transposed conv: the layout change {step.name} stands between "
                            "them (only a map on the transposed conv's own output is folded into it)")

    # -- recognising -----------------------------------------------------------------------------
    def map_of(self, node: torch.fx.Node, x: torch.fx.Node):
        """(rule, scale, shift, problem) when `node` is a per-channel map of `x` (problem: why its
        constants do not fold, or None), else None."""
        if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), (nn.Linear, nn.modules.conv._ConvNd)):
            return None  # mixes channels (and classifying it would read its weights)
        if node.op == "call_function" and node.target in (F.linear, F.conv1d, F.conv2d, F.conv3d):
            return None
        rule: LinearOp | None = self.classifier(node)
        if rule is None or rule.kind not in _MAP_KINDS or not rule.inputs or rule.inputs[0] is not x:
            return None
        shape = shape_of(x)
        if shape is None or len(shape) < 3 or shape_of(node) != shape:
            return None
        ndim, channels = len(shape), shape[1]
        if rule.kind == "affine":
            if not rule.op.is_per_channel:
                return None
            if rule.axis is None or rule.axis % ndim != 1 or rule.op.in_channels != channels:
                return rule, None, None, f"{rule.member} acts along axis {rule.axis}, not the channel axis 1"
            return rule, rule.op.weight.reshape(-1), rule.op.bias.reshape(-1), None
        if rule.kind == "scale":
            scale, shift = rule.scale, torch.zeros((), dtype=torch.float64)
        else:
            scale, shift = torch.tensor(rule.sign, dtype=torch.float64), rule.shift
        for c in (scale, shift):
            axes = {ndim - c.dim() + i for i, n in enumerate(c.shape) if n != 1}
            if c.dim() > ndim or axes - {1}:
                return rule, None, None, (f"the constant of {rule.member} (shape {tuple(c.shape)}) varies "
                                          "along an axis other than the channel axis 1")
        return rule, scale.reshape(-1), shift.reshape(-1), None

    def transposed(self, conv: torch.fx.Node) -> tuple[_Transposed | None, str | None]:
        """The transposed conv's constants and geometry, or the reason they cannot be rewritten."""
        device = None
        if conv.op == "call_module":
            m = self.gm.get_submodule(conv.target)
            if not computes_as_its_torch_base(m):
                return None, f"{type(m).__name__} ({conv.target}) overrides forward: not read as a transposed conv"
            if m.padding_mode != "zeros":
                return None, f"{conv.target} pads with {m.padding_mode!r}"
            nd = _transposed_class(m)[1]
            device = m.weight.device
            return _Transposed(nd, m.weight.detach().to(torch.float64),
                               None if m.bias is None else m.bias.detach().to(torch.float64),
                               m.stride, m.padding, m.output_padding, m.groups, m.dilation,
                               m.weight.dtype, device), None
        a = bind(conv, _TRANSPOSED_ARGS)
        if set(a) - set(_TRANSPOSED_ARGS):
            return None, f"{conv.name} is called with arguments {sorted(set(a) - set(_TRANSPOSED_ARGS))}"
        weight_node, bias_node = a.get("weight"), a.get("bias")
        weight = self.consts.get(weight_node) if isinstance(weight_node, torch.fx.Node) else None
        bias = self.consts.get(bias_node) if isinstance(bias_node, torch.fx.Node) else None
        if weight is None or not weight.is_floating_point() or (bias_node is not None and bias is None):
            return None, f"the weight or bias of {conv.name} is computed from the input, not a constant"
        nd = _TRANSPOSED_FUNCS[conv.target]
        geometry = [a.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("output_padding", 0),
                                             ("groups", 1), ("dilation", 1))]
        if not all(_static(v) for v in geometry):
            return None, f"the stride, padding or dilation of {conv.name} is computed in the graph"
        stride, padding, output_padding, groups, dilation = geometry
        if weight.dim() != nd + 2 or not isinstance(groups, int):
            return None, f"{conv.name} has a weight of shape {tuple(weight.shape)}"
        stored = self.consts.stored.get(weight_node)  # the model's own tensor, when there is one
        dtype = stored.dtype if stored is not None else (dtype_of(conv) or torch.float32)
        device = stored.device if stored is not None else weight.device
        return _Transposed(nd, weight, bias, _tuple(stride, nd), _tuple(padding, nd),
                           _tuple(output_padding, nd), groups, _tuple(dilation, nd), dtype, device), None

    # -- rewriting -------------------------------------------------------------------------------
    def rewrite(self, conv: torch.fx.Node, node: torch.fx.Node, t: _Transposed, scale, shift) -> torch.fx.Node:
        weight, bias = scaled_transposed_conv(t.weight, t.bias, t.groups, scale, shift)
        c_in, c_out = weight.shape[0], weight.shape[1] * t.groups
        has_bias = t.bias is not None or bool(bias.any())
        cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[t.nd]
        module = cls(c_in, c_out, tuple(weight.shape[2:]), stride=t.stride, padding=t.padding,
                     output_padding=t.output_padding, groups=t.groups, bias=has_bias, dilation=t.dilation,
                     device="meta")
        module.weight = nn.Parameter(weight.to(dtype=t.dtype, device=t.device))
        if has_bias:
            module.bias = nn.Parameter(bias.to(dtype=t.dtype, device=t.device))
        module.eval()
        name = self._fresh_name(str(conv.target) if conv.op == "call_module" else conv.name)
        self.gm.add_submodule(name, module)
        if conv.op == "call_module":
            args, kwargs = conv.args, conv.kwargs  # `output_size=` too, read the same way
        else:
            args, kwargs = (bind(conv, _TRANSPOSED_ARGS)["input"],), {}
        with self.gm.graph.inserting_after(conv):  # before the conv's metadata readers too
            new = self.gm.graph.call_module(name, args, kwargs)
        new.meta.update({k: node.meta[k] for k in ("reparam_shape", "tensor_meta") if k in node.meta})
        node.replace_all_uses_with(new)
        for user in list(conv.users):  # reads of the shape, dtype or device: the same for the new value
            user.replace_input_with(conv, new)
        inputs = conv.all_input_nodes
        self.gm.graph.erase_node(node)
        self.gm.graph.erase_node(conv)
        for n in inputs:  # the functional form's weight and bias, now unused
            if n.op == "get_attr" and not n.users:
                self.gm.graph.erase_node(n)
        self.changed = True
        return new

    def _fresh_name(self, base: str) -> str:
        base = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in base) + "_folded"
        name, k = base, 1
        while hasattr(self.gm, name):
            name, k = f"{base}_{k}", k + 1
        return name


# -- helpers -------------------------------------------------------------------------------------

def _transposed_class(m: nn.Module):
    """(torch class, spatial dims) when `m` is a ConvTranspose module or a subclass of one."""
    for cls, nd in _TRANSPOSED_MODULES.items():
        if isinstance(m, cls):
            return cls, nd
    return None


def _real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if not is_metadata_read(u, node)]


def _static(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(type(v) is int for v in value)
    return type(value) is int


def _tuple(value, nd: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * nd


__all__ = ["fold_maps_into_transposed_convs", "is_transposed_conv", "scaled_transposed_conv"]
