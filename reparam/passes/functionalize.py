"""Functionalization: in-place updates rewritten out of place wherever no reader can tell.

Real code updates values in place: `out += conv(x)` in a loop, `x.add_(y)`, `x.mul_(gamma)` for
a layer scale, `F.relu(x, inplace=True)`, `nn.ReLU(inplace=True)`. torch.fx already records `out +=
y` on a traced value as `out + y` (a proxy has no `__iadd__`), but the other spellings stay in place,
and an in-place update makes every linear operation that reads the updated value unfusible.

An update `a.op_(b)` at position p is rewritten as `c = a.op(b)`, every later reader of `a` (and of
the update's own result) reading `c` instead, when that cannot change any result:

* `a` does not share memory with a graph input, a parameter or a buffer: the update would be
  visible to the caller, or persist in the model's state across calls;
* no other value that may share memory with `a` (a view of it, or what it is a view of) is read
  after p: such a reader sees the update, and would not see it after the rewrite;
* the out-of-place result has `a`'s dtype (an in-place update never changes the dtype).

Otherwise the update stays in place and is reported with its reason: the linear operations that
read the updated value are then left alone (see `ops.Classifier`). Metadata reads (`x.shape`,
`x.dim()`) are not readers: an in-place update never changes them.

Whether two values may share memory is decided from what produced them: the ops listed here as
allocating their result give fresh memory; every other op (views, `reshape`, `contiguous`,
`Identity`, untraceable submodules, unknown functions) is assumed to return memory of its inputs.
"""

from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..module_table import module_table
from .cleanup import _IN_PLACE_FUNCS

# In-place spellings and the out-of-place op with the same arguments.
_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
              operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu,
              torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh}
_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "neg_": "neg",
            "relu_": "relu", "sigmoid_": "sigmoid", "tanh_": "tanh", "clamp_": "clamp",
            "clamp_min_": "clamp_min", "clamp_max_": "clamp_max", "abs_": "abs", "exp_": "exp"}

# Arithmetic that, applied to sizes only, gives a size.
_SIZE_ARITHMETIC = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                    operator.truediv, operator.mod, operator.neg}

# Ops whose result never shares memory with their inputs.
_ALLOCATING_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
    operator.pow, operator.matmul, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.cat,
    torch.concat, torch.stack, torch.matmul, torch.zeros, torch.zeros_like, torch.ones, torch.ones_like,
    torch.full, torch.full_like, torch.empty, torch.empty_like, torch.bmm, torch.einsum, torch.relu, torch.sigmoid,
    torch.tanh, torch.exp, torch.sqrt, torch.mean, torch.sum, torch.softmax, torch.conv1d,
    torch.conv2d, torch.conv3d, torch.addcmul, torch.where, torch.clamp,
    F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm, F.layer_norm, F.group_norm,
    F.instance_norm, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d,
    F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d, F.interpolate, F.pad, F.softmax, F.gelu, F.silu, F.sigmoid, F.tanh,
    F.mish, F.hardswish, F.hardsigmoid, F.relu, F.relu6, F.leaky_relu, F.elu, F.hardtanh,
    F.scaled_dot_product_attention, F.normalize,
}
_ALLOCATING_METHODS = {
    "add", "sub", "mul", "div", "neg", "__add__", "__sub__", "__mul__", "__truediv__", "__radd__",
    "__rsub__", "__rmul__", "__rtruediv__", "__neg__", "matmul", "__matmul__", "mean", "sum", "softmax",
    "sigmoid", "relu", "tanh", "exp", "sqrt", "pow", "clone", "clamp", "abs", "addcmul", "new_zeros",
    "new_ones", "new_full", "new_empty",
}
_ALLOCATING_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm,
    nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Softmax, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU,
    nn.Hardtanh, nn.PReLU, nn.MultiheadAttention,
)


@dataclass(frozen=True)
class KeptInPlace:
    """An in-place update left as it was, and why."""

    where: str
    reason: str


def functionalize(gm: torch.fx.GraphModule, is_metadata_read) -> list[KeptInPlace]:
    """Rewrite in-place updates of `gm` out of place where exact; returns the updates kept.

    `is_metadata_read(node)` says whether a node reads only the shape/dtype/device of its input.
    Needs the shapes of `trace.propagate_shapes` (`reparam_shape`, `tensor_meta`) in the nodes' meta.
    """
    return _Functionalizer(gm, is_metadata_read).run()


def values_updated_in_place(gm: torch.fx.GraphModule, is_metadata_read, ignored=frozenset()) -> set[torch.fx.Node]:
    """Every node whose value may share memory with a value some node updates in place (updates
    by the nodes in `ignored` left out)."""
    modules = module_table(gm)
    if not any(node not in ignored and updates_in_place(gm, node, modules) for node in gm.graph.nodes):
        return set()  # the common case once `functionalize` has run: no classes of memory to find
    aliases = _Aliases(gm, is_metadata_read, modules)
    updated = set()
    for node in gm.graph.nodes:
        aliases.add(node)
        if node not in ignored and aliases.updates_in_place(node) and isinstance(node.args[0], torch.fx.Node):
            updated.add(aliases.find(node))
    return {n for n in gm.graph.nodes if n in aliases.parent and aliases.find(n) in updated}


class _Aliases:
    """Union-find over nodes: one class per block of memory values may share."""

    def __init__(self, gm: torch.fx.GraphModule, is_metadata_read, modules: dict | None = None):
        self.gm = gm
        self.is_metadata_read = is_metadata_read
        self.modules = module_table(gm) if modules is None else modules
        self._in_place: dict[torch.fx.Node, bool] = {}
        self.parent: dict[torch.fx.Node, torch.fx.Node] = {}
        self.members: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self._sizes: set[torch.fx.Node] = set()  # metadata reads, and integer arithmetic on them

    def find(self, node: torch.fx.Node) -> torch.fx.Node:
        root = node
        while self.parent[root] is not root:
            root = self.parent[root]
        while self.parent[node] is not root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: torch.fx.Node, b: torch.fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra].extend(self.members.pop(rb))

    def add(self, node: torch.fx.Node, fresh: bool | None = None) -> None:
        """Place a node, after all its inputs, in its class."""
        self.parent[node] = node
        self.members[node] = [node]
        self._note_size(node)
        if fresh is None:
            fresh = self._allocates(node)
        if fresh:
            return
        if self.updates_in_place(node):  # the result is the updated value itself
            if isinstance(node.args[0], torch.fx.Node) and node.args[0] in self.parent:
                self.union(node, node.args[0])
            return
        for source in node.all_input_nodes:
            if source in self.parent and source not in self._sizes:
                self.union(node, source)

    def _note_size(self, node: torch.fx.Node) -> None:
        # Sizes (`x.shape[3] // 2`) hold no tensor memory: two tensors reshaped with the same size
        # do not share memory through it.
        if self.is_metadata_read(node) or (
                node.op == "call_function" and node.target in _SIZE_ARITHMETIC and node.all_input_nodes
                and all(n in self._sizes for n in node.all_input_nodes)):
            self._sizes.add(node)

    def updates_in_place(self, node: torch.fx.Node) -> bool:
        if node not in self._in_place:
            self._in_place[node] = updates_in_place(self.gm, node, self.modules)
        return self._in_place[node]

    def class_of(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return self.members[self.find(node)]

    def _allocates(self, node: torch.fx.Node) -> bool:
        if node.op in ("placeholder", "get_attr", "output") or self.is_metadata_read(node):
            return True
        if self.updates_in_place(node):
            return False
        if node.op == "call_function":
            return node.target in _ALLOCATING_FUNCTIONS
        if node.op == "call_method":
            return node.target in _ALLOCATING_METHODS
        if node.op == "call_module":
            return isinstance(self.modules[node.target], _ALLOCATING_MODULES)
        return False


class _Functionalizer:
    def __init__(self, gm: torch.fx.GraphModule, is_metadata_read):
        self.gm = gm
        self.graph = gm.graph
        self.is_metadata_read = is_metadata_read
        self.aliases = _Aliases(gm, is_metadata_read)
        self.modules = self.aliases.modules
        self.position: dict[torch.fx.Node, int] = {}
        self.kept: list[KeptInPlace] = []
        self._module_sites: dict[str, int] = {}

    def run(self) -> list[KeptInPlace]:
        for i, node in enumerate(self.graph.nodes):
            self.position[node] = i
            if node.op == "call_module" and self.aliases.updates_in_place(node):
                self._module_sites[node.target] = self._module_sites.get(node.target, 0) + 1
        for node in list(self.graph.nodes):
            if not self.aliases.updates_in_place(node) or not isinstance(node.args[0], torch.fx.Node) \
                    or "reparam_shape" not in node.args[0].meta:
                self.aliases.add(node)
                continue
            reason = self._unsafe(node)
            if reason is None:
                reason = self._rewrite(node)
            if reason is not None:
                self.aliases.add(node)
                self.kept.append(KeptInPlace(_where(node), reason))
        return self.kept

    # -- check ---------------------------------------------------------------------------------
    def _unsafe(self, node: torch.fx.Node) -> str | None:
        """Why rewriting the update `node` out of place could change a result, or None."""
        target = node.args[0]
        what = f"{_spelling(node)} updates {_label(target)} in place"
        here = self.position[node]
        for member in self.aliases.class_of(target):
            if member.op == "placeholder":
                shared = "is" if member is target else "shares memory with"
                return (f"{what}, which {shared} the graph input {member.name}: the caller's tensor "
                        "changes; kept in place, so linear operations reading it are not fused")
            if member.op == "get_attr":
                shared = "is" if member is target else "shares memory with"
                return (f"{what}, which {shared} the parameter or buffer {member.target}: the model's "
                        "state changes on every call; kept in place, so linear operations reading it "
                        "are not fused")
            if member is target:
                continue
            for user in member.users:
                if user is not node and self.position.get(user, -1) > here and not self.is_metadata_read(user):
                    return (f"{what} while {_label(member)}, which shares its memory, is read afterwards "
                            f"by {_label(user)}: that reader sees the update; kept in place, so linear "
                            "operations reading it are not fused")
        return self._dtype_change(node)

    def _dtype_change(self, node: torch.fx.Node) -> str | None:
        target = node.args[0]
        dtype = _dtype(target)
        if dtype is None:
            return None
        for arg in node.args[1:]:
            if isinstance(arg, torch.fx.Node) and _dtype(arg) not in (None, dtype) and _ndim(arg) != 0:
                return (f"{_spelling(node)} updates {_label(target)} ({_name(dtype)}) in place with "
                        f"{_label(arg)} ({_name(_dtype(arg))}): out of place the result would be promoted; "
                        "kept in place, so linear operations reading it are not fused")
        return None

    # -- rewrite -------------------------------------------------------------------------------
    def _rewrite(self, node: torch.fx.Node) -> str | None:
        target = node.args[0]
        if node.op == "call_module":
            replacement = self._out_of_place_module(node)
        else:
            op, fn = _out_of_place(node)
            if fn is None:
                return (f"{_spelling(node)} updates {_label(target)} in place and has no known out-of-place "
                        "form; kept in place, so linear operations reading it are not fused")
            args, kwargs = _without_inplace(node)
            with self.graph.inserting_before(node):
                replacement = self.graph.create_node(op, fn, args, kwargs, name=_fresh_name(node))
            replacement.meta = dict(node.meta)
            self.position[replacement] = self.position[node]
        here = self.position[node]
        for user in list(target.users):
            if user is not node and user is not replacement and self.position.get(user, -1) > here:
                user.replace_input_with(target, replacement)
        if replacement is not node:
            node.replace_all_uses_with(replacement)
            self.graph.erase_node(node)
        self.aliases.add(replacement, fresh=_result_allocates(replacement, self.modules))
        return None

    def _out_of_place_module(self, node: torch.fx.Node) -> torch.fx.Node:
        module = self.modules[node.target]
        if self._module_sites.get(node.target, 0) > 1:  # shared module: a copy for this call only
            module = copy.copy(module)
            module.inplace = False
            owner, _, leaf = node.target.rpartition(".")
            name, i = f"{leaf}_out_of_place", 0
            parent = self.gm.get_submodule(owner) if owner else self.gm
            while hasattr(parent, name):
                i += 1
                name = f"{leaf}_out_of_place_{i}"
            parent.add_module(name, module)
            self.modules[f"{owner}.{name}" if owner else name] = module
            node.target = f"{owner}.{name}" if owner else name
        else:
            module.inplace = False
        return node


def updates_in_place(gm: torch.fx.GraphModule, node: torch.fx.Node, modules: dict | None = None) -> bool:
    """Does `node` overwrite its first argument (any spelling, `inplace` passed by position too)?

    `modules`: `dict(gm.named_modules())`, to save a look-up per call on large graphs."""
    if not node.args:
        return False
    if node.op == "call_function":
        if node.target in _FUNCTIONS or node.target in _IN_PLACE_FUNCS or node.kwargs.get("inplace") is True:
            return True
        i = _inplace_position(node.target)
        return i is not None and i < len(node.args) and node.args[i] is True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_module":
        module = modules[node.target] if modules is not None else gm.get_submodule(node.target)
        return getattr(module, "inplace", False) is True
    return False


def _result_allocates(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _ALLOCATING_MODULES)
    if node.op == "call_method":
        return node.target in _ALLOCATING_METHODS
    return node.target in _ALLOCATING_FUNCTIONS


def _out_of_place(node: torch.fx.Node):
    if node.op == "call_method":
        name = _METHODS.get(node.target)
        return ("call_method", name) if name else (None, None)
    if node.target in _FUNCTIONS:
        return "call_function", _FUNCTIONS[node.target]
    if node.kwargs.get("inplace") is True or _inplace_position(node.target) is not None:
        return "call_function", node.target
    return None, None


def _without_inplace(node: torch.fx.Node) -> tuple[tuple, dict]:
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if "inplace" in kwargs:
        kwargs["inplace"] = False
    elif node.op == "call_function":
        i = _inplace_position(node.target)
        if i is not None and i < len(args):
            args = args[:i] + (False,) + args[i + 1:]
    return args, kwargs


_INPLACE_POSITIONS: dict[object, int | None] = {}


def _inplace_position(fn) -> int | None:
    """Index of the `inplace` parameter of a function, if it has one."""
    if fn not in _INPLACE_POSITIONS:
        try:
            names = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            names = []
        _INPLACE_POSITIONS[fn] = names.index("inplace") if "inplace" in names else None
    return _INPLACE_POSITIONS[fn]


def _spelling(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} (inplace=True)"
    if node.op == "call_method":
        return f"{node.name} (.{node.target})"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)}, in place)"


def _label(node: torch.fx.Node) -> str:
    """How messages name a value: the module that computed it, or the node."""
    if node.op in ("call_module", "get_attr"):
        return f"{node.target} ({node.name})" if node.op == "call_module" else str(node.target)
    return node.name


def _where(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _fresh_name(node: torch.fx.Node) -> str:
    return node.name.rstrip("_") + "_out_of_place"


def _dtype(node: torch.fx.Node):
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def _ndim(node: torch.fx.Node) -> int | None:
    shape = node.meta.get("reparam_shape")
    return None if shape is None else len(shape)


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


__all__ = ["functionalize", "values_updated_in_place", "updates_in_place", "KeptInPlace"]
