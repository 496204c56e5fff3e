"""Branches on tensor metadata, decided from the example input while tracing.

Code written for training and scripting tests the metadata of its inputs in plain Python:
`if x.numel() == 0 and self.training:` (an empty batch), `if x.requires_grad:` (a frozen norm that
computes by hand when gradients flow), `if x.dim() == 3:`. torch.fx cannot trace such a test, since
a proxy has no shape. But the shape, dtype, device and `requires_grad` of every value are fixed by
those of the input, so reparam decides the test from the example input it was given, follows the
branch that input takes, and records a guard in the graph: an input for which the test comes out
the other way fails the guard with an AssertionError that names the line, instead of silently
computing something the original would not. A test that reads tensor VALUES (`if x.sum() > 0`)
is not decided: the module stays an untraceable leaf, as before.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx

try:  # while tracing, torch.fx patches Module.__call__ and __getattr__ to record; this undoes it
    from torch.fx._symbolic_trace import _maybe_revert_all_patches as _untraced
except ImportError:  # pragma: no cover - a torch without it: values come back as proxies, undecided
    _untraced = contextlib.nullcontext

# Attributes and methods of a tensor that give its metadata, never its numbers. Not
# `is_contiguous()`: fusion may change how an intermediate value is laid out in memory.
TENSOR_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad",
                         "is_sparse", "is_quantized", "is_meta"}
TENSOR_METADATA_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device",
                           "is_floating_point", "is_complex", "element_size"}
TENSOR_METADATA_FUNCTIONS = {torch.numel, torch.is_floating_point, torch.is_complex}
# Python arithmetic and logic on metadata (ints, bools, sizes, dtypes).
_COMBINING = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
              operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
              operator.truediv, operator.neg, operator.and_, operator.or_, operator.xor,
              operator.not_, operator.truth, operator.getitem, operator.contains, len, int, bool,
              min, max, abs}
# What a decided condition may be: never a tensor (its truth would be a value read).
_DECIDABLE = (bool, int, float, torch.Size, torch.dtype, torch.device, str, tuple)
_SYMBOLS = {operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=", operator.gt: ">",
            operator.ge: ">=", operator.add: "+", operator.sub: "-", operator.mul: "*",
            operator.floordiv: "//", operator.mod: "%", operator.truediv: "/", operator.and_: "&",
            operator.or_: "|", operator.xor: "^"}


def metadata_sources(node: torch.fx.Node) -> set[torch.fx.Node] | None:
    """The nodes whose metadata (only) `node` is computed from, or None when it reads anything else.

    `x.numel() == 0` gives {x}; `x.shape[1] // 2` gives {x}; `x.sum() > 0` gives None (a value
    read). The nodes returned must still be checked to be tensors on the example input."""
    sources: set[torch.fx.Node] = set()

    def is_metadata(n) -> bool:
        if not isinstance(n, torch.fx.Node):
            if isinstance(n, (tuple, list)):
                return all(is_metadata(a) for a in n)
            return not isinstance(n, torch.Tensor)
        if n.op == "call_function" and n.target is getattr and len(n.args) == 2 and not n.kwargs:
            base, attr = n.args
            if is_metadata(base):  # `x.device.type`
                return True
            if attr in TENSOR_METADATA_ATTRS:
                sources.add(base)
                return True
            return False
        if n.op == "call_method" and n.args:
            base, rest = n.args[0], (*n.args[1:], *n.kwargs.values())
            if not all(is_metadata(a) for a in rest):
                return False
            if is_metadata(base):  # `x.shape.numel()`
                return True
            if n.target in TENSOR_METADATA_METHODS:
                sources.add(base)
                return True
            return False
        if (n.op == "call_function" and n.target in TENSOR_METADATA_FUNCTIONS and len(n.args) == 1
                and isinstance(n.args[0], torch.fx.Node) and not n.kwargs):
            sources.add(n.args[0])
            return True
        if n.op == "call_function" and n.target in _COMBINING:
            return all(is_metadata(a) for a in (*n.args, *n.kwargs.values()))
        return False

    return sources if is_metadata(node) else None


class ExampleValues:
    """The values of the nodes of a graph being recorded, on the example inputs, computed on demand.

    Nodes run in graph order, each once (in-place updates happen in the order the model makes
    them); submodules recorded as calls are called; parameters and buffers are read from `root`.
    Runs without gradients, as `reparam.fuse` runs the model."""

    def __init__(self, root: torch.nn.Module, graph: torch.fx.Graph, inputs: tuple):
        self.root, self.graph, self.inputs = root, graph, inputs
        self.values: dict[torch.fx.Node, object] = {}
        self.placeholders = 0

    def forget(self) -> None:
        """Start again from the inputs (the tracer removed nodes it had recorded)."""
        self.values.clear()
        self.placeholders = 0

    def value(self, target: torch.fx.Node):
        if target in self.values:
            return self.values[target]
        with torch.no_grad(), _untraced():
            for node in self.graph.nodes:
                if node not in self.values:
                    self.values[node] = self.compute(node)
                if node is target:
                    break
        return self.values[target]

    def compute(self, node: torch.fx.Node):
        """`node`'s value from the values of its arguments (already in `values`)."""
        if node.op == "placeholder":
            i, self.placeholders = self.placeholders, self.placeholders + 1
            if i < len(self.inputs):
                given = self.inputs[i]
                return given.clone() if isinstance(given, torch.Tensor) else given
            if node.args:  # a default value
                return node.args[0]
            raise LookupError(f"no example value for the argument {node.target!r}")
        if node.op == "get_attr":
            obj = self.root
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        args = torch.fx.node.map_arg(node.args, lambda n: self.values[n])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: self.values[n])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(node.target)(*args, **kwargs)
        raise LookupError(f"cannot run a {node.op} node while tracing")

    def decide(self, condition: torch.fx.Node) -> bool | None:
        """The truth of `condition` on the example inputs when it depends only on metadata, else None."""
        sources = metadata_sources(condition)
        if sources is None:
            return None
        try:
            if not all(isinstance(self.value(s), torch.Tensor) and not isinstance(self.value(s), torch.fx.Proxy)
                       for s in sources):
                return None
            value = self.value(condition)
        except Exception:  # noqa: BLE001 - undecidable: the module stays an untraceable leaf
            return None
        if not isinstance(value, _DECIDABLE) or isinstance(value, torch.fx.Proxy):
            return None
        return bool(value)


_NO_VALUE = object()


def _plain_operand(frame, inst):
    """The value a load instruction pushes, when reading it cannot run code or touch a traced value."""
    if inst.opname == "LOAD_CONST":
        return inst.argval
    if inst.opname in ("LOAD_FAST", "LOAD_DEREF"):
        return frame.f_locals.get(inst.argval, _NO_VALUE)
    if inst.opname == "LOAD_GLOBAL":
        if inst.argval in frame.f_globals:
            return frame.f_globals[inst.argval]
        builtins = frame.f_builtins
        return builtins.get(inst.argval, _NO_VALUE)
    return _NO_VALUE


def outcome_matters(frame, instructions, index: int, decided: bool) -> bool:
    """Would the other outcome of the conditional jump `instructions[index]` send execution elsewhere?

    `if x.numel() == 0 and self.training:` in eval mode: the first operand is False on the example
    input, and were it True, the second (a plain attribute, False) would jump to the same place.
    Such an operand needs no guard. Only the simplest second operand is followed (a local, global or
    constant, then instance attributes, then the jump); anything else is assumed to matter."""
    jump = instructions[index]
    if_true = jump.opname.endswith("IF_TRUE")
    by_offset = {inst.offset: i for i, inst in enumerate(instructions)}

    def destination(i: int, taken: bool) -> int | None:
        if taken:
            return jump_target(i)
        return instructions[i + 1].offset if i + 1 < len(instructions) else None

    def jump_target(i: int) -> int | None:
        return instructions[i].argval if instructions[i].argval in by_offset else None

    here = destination(index, decided == if_true)
    start = by_offset.get(destination(index, decided != if_true))
    if here is None or start is None:
        return True
    def skip(i: int) -> int:  # prefixes of the next instruction (a jump far away)
        while i < len(instructions) and instructions[i].opname in ("EXTENDED_ARG", "NOP", "CACHE"):
            i += 1
        return i

    start = skip(start)
    if start >= len(instructions):
        return True
    value = _plain_operand(frame, instructions[start])
    i = skip(start + 1)
    while value is not _NO_VALUE and i < len(instructions) and instructions[i].opname == "LOAD_ATTR":
        if isinstance(value, (torch.Tensor, torch.fx.Proxy)):
            return True
        value = vars(value).get(instructions[i].argval, _NO_VALUE) if hasattr(value, "__dict__") else _NO_VALUE
        i = skip(i + 1)
    if value is _NO_VALUE or not isinstance(value, (bool, int, type(None))) or i >= len(instructions):
        return True
    then = instructions[i]
    if not then.opname.startswith("POP_JUMP") or "NONE" in then.opname or not (
            then.opname.endswith("IF_TRUE") or then.opname.endswith("IF_FALSE")):
        return True
    return destination(i, bool(value) == then.opname.endswith("IF_TRUE")) != here


def _condition_reads(node: torch.fx.Node, reads) -> bool:
    """Does the metadata condition computed by `node` contain a node for which `reads` is true?
    (`len(...)` of a shape is its rank, and not looked into.)"""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is len:
            continue
        if reads(n):
            return True
        if n.op in ("call_function", "call_method") and metadata_sources(n) is not None:
            stack.extend(n.all_input_nodes)
    return False


def reads_requires_grad(node: torch.fx.Node) -> bool:
    """Does the condition computed by `node` read some value's `requires_grad`?"""
    return _condition_reads(node, lambda n: n.op == "call_function" and n.target is getattr
                            and n.args[1:] == ("requires_grad",))


_SIZE_ATTRS = {"shape"}
_SIZE_METHODS = {"size", "numel", "nelement"}


def _reads_size_here(n: torch.fx.Node) -> bool:
    if n.op == "call_function" and n.target is getattr:
        return n.args[1] in _SIZE_ATTRS
    if n.op == "call_method":
        return n.target in _SIZE_METHODS
    return n.op == "call_function" and n.target is torch.numel


def reads_sizes(node: torch.fx.Node) -> bool:
    """Does the condition computed by `node` read some value's sizes (its rank aside:
    `len(x.shape)` is the rank)?"""
    return _condition_reads(node, _reads_size_here)


def _is_a_size(n) -> bool:
    """`x.numel()`, `x.shape[i]`, `x.size(i)`: one size, or the number of elements."""
    if not isinstance(n, torch.fx.Node):
        return False
    if n.op == "call_method" and n.target in ("numel", "nelement"):
        return True
    if n.op == "call_function" and n.target is torch.numel:
        return True
    if n.op == "call_method" and n.target == "size" and len(n.args) == 2:
        return True
    return (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int)
            and isinstance(n.args[0], torch.fx.Node) and _reads_size_here(n.args[0]))


def tests_emptiness(node: torch.fx.Node) -> bool:
    """Is the condition `node` a test for an empty tensor (`x.numel() == 0`, `x.shape[0] > 0`,
    `not x.numel()`)? Such a guard holds for every input but empty ones."""
    if node.op != "call_function":
        return False
    if node.target in (operator.not_, operator.truth) and len(node.args) == 1:
        return _is_a_size(node.args[0])
    if node.target in (operator.eq, operator.ne, operator.gt, operator.le) and len(node.args) == 2:
        a, b = node.args
        zero = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v == 0)
        return (zero(b) and _is_a_size(a)) or (zero(a) and _is_a_size(b))
    return False


GRAD_MODE_MESSAGE = ("reparam.fuse runs the model without gradients, and the model branches on `requires_grad`: "
                     "call the fused model under torch.no_grad() or torch.inference_mode() to take the same branch.")


def describe(node, depth: int = 0) -> str:
    """`x.numel() == 0` for the node computing it (names of tensors are those of their nodes)."""
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if depth > 6 or node.op not in ("call_function", "call_method") or metadata_sources(node) is None:
        return node.name  # a tensor: its name
    args = node.args
    if node.op == "call_method" and args:
        rest = ", ".join(describe(a, depth + 1) for a in args[1:])
        return f"{describe(args[0], depth + 1)}.{node.target}({rest})"
    if node.target is getattr and len(args) == 2:
        return f"{describe(args[0], depth + 1)}.{args[1]}"
    if node.target in _SYMBOLS and len(args) == 2:
        return f"({describe(args[0], depth + 1)} {_SYMBOLS[node.target]} {describe(args[1], depth + 1)})"
    if node.target is operator.getitem and len(args) == 2:
        return f"{describe(args[0], depth + 1)}[{describe(args[1], depth + 1)}]"
    if node.target is operator.not_ and len(args) == 1:
        return f"not {describe(args[0], depth + 1)}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}({', '.join(describe(a, depth + 1) for a in args)})"


def guard_message(source: str, where: str, expression: str, value: bool) -> str:
    message = (f"reparam traced this model for inputs where `{expression}` is {value} (in `{source}`, "
               f"{where}), as in the example input given to reparam.fuse; this input makes it {not value}, "
               f"a branch the fused model does not contain. Fuse the model again with an example input "
               f"like this one.")
    if "requires_grad" in expression:
        message += " " + GRAD_MODE_MESSAGE
    return message


__all__ = ["ExampleValues", "outcome_matters", "reads_requires_grad", "GRAD_MODE_MESSAGE", "metadata_sources", "describe", "guard_message", "TENSOR_METADATA_ATTRS",
           "TENSOR_METADATA_METHODS"]
