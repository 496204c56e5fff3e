"""Graph cleanup: removing nodes nobody reads, without dropping in-place updates."""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..module_table import module_table

_IN_PLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def is_in_place(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Does `node` overwrite its first argument?"""
    if not node.args:
        return False
    if node.op == "call_function":
        return node.target in _IN_PLACE_FUNCS or node.kwargs.get("inplace") is True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def remove_dead_nodes(gm: torch.fx.GraphModule) -> None:
    """Erase unused nodes, last first; in-place updates and impure calls stay."""
    modules = None  # by name, for the module calls found dead (a look-up by dotted path is slow)
    for node in reversed(list(gm.graph.nodes)):
        if node.users or node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            if modules is None:
                modules = module_table(gm)
            module = modules.get(node.target)
            if module is None:
                module = gm.get_submodule(node.target)
            # What `Node.is_impure` and `is_in_place` say of a module call.
            if getattr(module, "_is_impure", False) or (node.args and getattr(module, "inplace", False) is True):
                continue
        elif node.op != "get_attr" and (node.is_impure() or is_in_place(gm, node)):
            continue
        gm.graph.erase_node(node)


# Pure functions of Python values: applied to the same arguments they give the same result.
_PURE_ON_METADATA = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                     operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
                     operator.truediv, operator.and_, operator.or_, operator.not_, operator.getitem,
                     len}
_ASSERTS = {torch._assert}
_RESHAPING_IN_PLACE = {"unsqueeze_", "squeeze_", "resize_", "resize_as_", "t_", "transpose_", "swapdims_",
                       "swapaxes_", "as_strided_", "set_"}


def deduplicate_metadata_checks(gm: torch.fx.GraphModule, is_metadata_read) -> int:
    """Merge repeated reads of a value's metadata and repeated asserts on them; return how many
    asserts were removed.

    Model libraries start every norm layer with a check such as `_assert(x.ndim == 4, ...)`. When
    a convolution absorbs several such norms (a branch sum over BatchNorm layers), their checks all
    read the fused value and repeat one another, hundreds of Python calls per forward pass. An fx
    graph has no control flow, so a later node computing the same pure function of the same
    arguments as an earlier one always sees the same value: it is replaced by the earlier one, and
    an assert of a condition already asserted is dropped. Checks on
    different values, or with different conditions, all stay.
    """
    if any(n.op == "call_method" and n.target in _RESHAPING_IN_PLACE for n in gm.graph.nodes):
        return 0  # a value's shape may change between two reads
    pure: set[torch.fx.Node] = set()
    seen: dict[tuple, torch.fx.Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if node.op in ("call_function", "call_method") and tensor_args and (
                is_metadata_read(node, node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node)
                else False):
            kind = "read"
        elif (node.op == "call_function" and node.target in _PURE_ON_METADATA and tensor_args
              and all(a in pure for a in tensor_args) and not node.kwargs):
            kind = "pure"
        elif node.op == "call_function" and node.target in _ASSERTS and tensor_args and tensor_args[0] in pure:
            kind = "assert"
        else:
            continue
        try:
            # An assert on a condition already asserted can never fail: its message does not matter
            # (traced messages differ anyway, they name the proxies they were formatted with).
            key = ((node.op, node.target, node.args[0]) if kind == "assert"
                   else (node.op, node.target, _key(node.args), _key(node.kwargs)))
        except TypeError:  # an unhashable argument: leave the node alone
            if kind != "assert":
                pure.add(node)
            continue
        earlier = seen.get(key)
        if earlier is None:
            seen[key] = node
            if kind != "assert":
                pure.add(node)
            continue
        if kind == "assert":
            gm.graph.erase_node(node)
            removed += 1
        else:
            node.replace_all_uses_with(earlier)
            gm.graph.erase_node(node)
    if removed:
        remove_dead_nodes(gm)
    return removed


def _key(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_key, value))
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    hash(value)
    return value


# -- rank checks implied by an earlier one ------------------------------------------------------
#
# Rule: ops such as convolutions, norms and activations return a value of the rank of their input
# (a Conv2d maps a 4-D input to 4-D and an unbatched 3-D one to 3-D), so along a chain of them
# every value has one rank, whatever the input. Once a check `v.ndim == k` has passed, a later
# check `w.ndim == k` on a value of the same chain can never fail: it is dropped. The first check
# stays, so an input of another rank fails at the same place with the same message as before.
#
#     pattern   _assert(eq(ndim(w), k)) after _assert(eq(ndim(v), k)), in graph order
#     check     v and w are linked by rank-preserving ops only (elementwise sums of values of
#               one chain included)
#     rewrite   erase the later assert (and its reads, once unused)

_RANK_PRESERVING_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Identity,
                            nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                            nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU, nn.Dropout, nn.Dropout2d,
                            nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_RANK_PRESERVING_FUNCS = {torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.gelu, F.silu,
                          F.hardswish, F.hardsigmoid, F.sigmoid, F.leaky_relu, F.elu, F.mish, F.dropout}
_RANK_PRESERVING_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "double", "half",
                            "to"}
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}
_ELEMENTWISE_METHODS = {"add", "sub", "mul"}


def _rank_source(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The tensor inputs whose common rank `node`'s output has, or None if it is not such an op."""
    args = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _RANK_PRESERVING_MODULES) and len(args) == 1 and not node.kwargs:
            return args
        return None
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    if (node.op == "call_function" and node.target in _RANK_PRESERVING_FUNCS
            or node.op == "call_method" and node.target in _RANK_PRESERVING_METHODS):
        return [node.args[0]] if all(not isinstance(a, torch.fx.Node) for a in node.args[1:]) else None
    if (node.op == "call_function" and node.target in _ELEMENTWISE
            or node.op == "call_method" and node.target in _ELEMENTWISE_METHODS):
        # A sum of two values of one rank has that rank; a Python number leaves it unchanged.
        operands = list(node.args[:2])
        if len(operands) == 2 and all(isinstance(a, (torch.fx.Node, int, float)) for a in operands):
            return [a for a in operands if isinstance(a, torch.fx.Node)]
    return None


def _rank_check(node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(value, k) for `_assert(value.ndim == k, ...)`, `value.dim() == k`, `len(value.shape) == k`."""
    if not (node.op == "call_function" and node.target in _ASSERTS and node.args
            and isinstance(node.args[0], torch.fx.Node)):
        return None
    cond = node.args[0]
    if not (cond.op == "call_function" and cond.target is operator.eq and len(cond.args) == 2):
        return None
    read, k = cond.args if isinstance(cond.args[0], torch.fx.Node) else reversed(cond.args)
    if not isinstance(read, torch.fx.Node) or type(k) is not int:
        return None
    if read.op == "call_function" and read.target is getattr and read.args[1:] == ("ndim",):
        value = read.args[0]
    elif read.op == "call_method" and read.target in ("dim", "ndimension") and len(read.args) == 1:
        value = read.args[0]
    elif (read.op == "call_function" and read.target is len and isinstance(read.args[0], torch.fx.Node)
          and read.args[0].op == "call_function" and read.args[0].target is getattr
          and read.args[0].args[1:] == ("shape",)):
        value = read.args[0].args[0]
    else:
        return None
    return (value, k) if isinstance(value, torch.fx.Node) else None


def drop_implied_rank_checks(gm: torch.fx.GraphModule) -> int:
    """Erase rank asserts that an earlier rank assert on the same chain implies; return how many.

    timm's norm layers each check `x.ndim == 4`; after fusion the convolutions that absorbed them
    keep one check per block, a Python call each on every forward pass, where the hand-written
    deploy form of such a network has none. Only the first check of each chain is needed."""
    if any(n.op == "call_method" and n.target in _RESHAPING_IN_PLACE for n in gm.graph.nodes):
        return 0
    parent: dict[torch.fx.Node, torch.fx.Node] = {}

    def find(n):
        root = n
        while parent.get(root, root) is not root:
            root = parent[root]
        while n is not root:
            parent[n], n = root, parent.get(n, n)
        return root

    proven: dict[torch.fx.Node, set[int]] = {}  # chain root -> ranks checked so far, in graph order
    removed = 0
    for node in list(gm.graph.nodes):
        check = _rank_check(node)
        if check is not None:
            value, k = check
            ranks = proven.setdefault(find(value), set())
            if k in ranks:
                gm.graph.erase_node(node)
                removed += 1
            else:
                ranks.add(k)
            continue
        sources = _rank_source(gm, node)
        if not sources:
            continue
        roots = {find(s) for s in sources}
        if len(roots) != 1:
            continue  # values of different chains: their ranks may differ
        root = roots.pop()
        parent[node] = root
    if removed:
        remove_dead_nodes(gm)
    return removed


# -- activations and sums back in place ---------------------------------------------------------
#
# passes/functionalize.py rewrites every in-place update out of place so that fusion can judge it;
# after lowering, the hand-written deploy form of such a network still runs `relu_` and `x += y`
# where the fused graph allocates a new tensor per activation and per residual sum. On a CPU that
# allocation (often fresh pages from the OS for a feature map) costs as much as the activation.
#
#     pattern   act(v) for an elementwise activation with an in-place form; add(v, w) / add(w, v)
#     check     v is the fresh result of an op whose gradient does not read its own result
#               (convolution, Linear, BatchNorm, add, sub, mul, addcmul, cat, reparam's fused
#               modules);
#               nothing else reads v's numbers (metadata reads do not change); v is not an output;
#               for a sum, v already has the sum's shape and dtype
#     rewrite   the in-place form, writing into v

_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FRESH_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, F.linear,
                F.batch_norm, operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul,
                torch.addcmul, torch.cat, torch.concat}
_FRESH_METHODS = {"add", "sub", "mul", "addcmul", "__add__", "__sub__", "__mul__"}
# module type -> (function with an `inplace` argument, the module attributes passed before it)
_ACTIVATION_MODULES = {nn.ReLU: (F.relu, ()), nn.ReLU6: (F.relu6, ()), nn.SiLU: (F.silu, ()),
                       nn.Hardswish: (F.hardswish, ()), nn.Hardsigmoid: (F.hardsigmoid, ()),
                       nn.Mish: (F.mish, ()), nn.LeakyReLU: (F.leaky_relu, ("negative_slope",)),
                       nn.ELU: (F.elu, ("alpha",)), nn.Hardtanh: (F.hardtanh, ("min_val", "max_val"))}
_ACTIVATION_FUNCS = {F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.leaky_relu, F.elu,
                     F.hardtanh}
_IN_PLACE_TWINS = {torch.relu: torch.relu_}
_ACTIVATION_METHODS = {"relu": "relu_"}
_SUMS = {operator.add, torch.add}
# Node meta key marking an update this pass made in place: nothing else reads the value it writes,
# so an analysis of the fused graph (`reparam.measure`) may read it as its out-of-place form.
RESTORED_IN_PLACE = "reparam_restored_in_place"


def _fresh_and_private(gm: torch.fx.GraphModule, value, reader: torch.fx.Node, is_metadata_read) -> bool:
    """May `reader` overwrite `value`: a fresh tensor whose numbers nothing else reads?"""
    if not isinstance(value, torch.fx.Node):
        return False
    if value.op == "call_module":
        module = gm.get_submodule(value.target)
        # Exact types only: a subclass may compute something else (and return its input).
        fresh = type(module) in _FRESH_MODULES or type(module).__module__ == "reparam.modules"
    elif value.op == "call_function":
        fresh = value.target in _FRESH_FUNCS and "out" not in value.kwargs
    elif value.op == "call_method":
        fresh = value.target in _FRESH_METHODS
    else:
        fresh = False
    return fresh and all(user is reader or is_metadata_read(user, value) for user in value.users)


def _tensor_meta(value):
    return value.meta.get("tensor_meta") if isinstance(value, torch.fx.Node) else None


def restore_in_place(gm: torch.fx.GraphModule, is_metadata_read) -> int:
    """Run activations and residual sums in place where that cannot change any result; return how
    many were rewritten (the rule is above)."""
    from .ops import member_name  # ops imports this module through functionalize

    graph = gm.graph
    rewritten = 0
    module_sites: dict[str, list[torch.fx.Node | None]] = {}  # activation module -> its calls that may run in place
    for node in graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in _ACTIVATION_MODULES:
            module_sites.setdefault(node.target, []).append(
                node if len(node.args) == 1 and not node.kwargs
                and _fresh_and_private(gm, node.args[0], node, is_metadata_read) else None)
    for target, sites in module_sites.items():
        module = gm.get_submodule(target)
        if all(sites) and getattr(module, "inplace", True) is False:
            module.inplace = True  # the fused model's own copy: every call of it qualifies
            for node in sites:
                node.meta[RESTORED_IN_PLACE] = True
            rewritten += len(sites)
    for node in list(graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            entry = _ACTIVATION_MODULES.get(type(module))
            if entry is None or getattr(module, "inplace", True) or len(node.args) != 1 or node.kwargs:
                continue
            value = node.args[0]
            if not _fresh_and_private(gm, value, node, is_metadata_read):
                continue
            fn, attributes = entry  # a module also called where it may not run in place
            with graph.inserting_before(node):
                twin = graph.call_function(fn, (value, *(getattr(module, a) for a in attributes)),
                                           {"inplace": True})
        elif node.op == "call_function" and node.target in _ACTIVATION_FUNCS:
            if len(node.args) != 1 or set(node.kwargs) - {"inplace"} or node.kwargs.get("inplace"):
                continue  # an activation with extra arguments by position: left as written
            value = node.args[0]
            if not _fresh_and_private(gm, value, node, is_metadata_read):
                continue
            with graph.inserting_before(node):
                twin = graph.call_function(node.target, (value,), {"inplace": True})
        elif node.op == "call_function" and node.target in _IN_PLACE_TWINS:
            if len(node.args) != 1 or node.kwargs or not _fresh_and_private(gm, node.args[0], node, is_metadata_read):
                continue
            with graph.inserting_before(node):
                twin = graph.call_function(_IN_PLACE_TWINS[node.target], (node.args[0],))
        elif node.op == "call_method" and node.target in _ACTIVATION_METHODS:
            if len(node.args) != 1 or node.kwargs or not _fresh_and_private(gm, node.args[0], node, is_metadata_read):
                continue
            with graph.inserting_before(node):
                twin = graph.call_method(_ACTIVATION_METHODS[node.target], (node.args[0],))
        elif node.op == "call_function" and node.target in _SUMS and len(node.args) == 2 and not node.kwargs:
            twin = _sum_in_place(gm, node, is_metadata_read)
            if twin is None:
                continue
        else:
            continue
        twin.meta = {**node.meta, RESTORED_IN_PLACE: True}
        # The report names the operation as it was written (`add_8`), not as its twin (`add__8`).
        twin.meta.setdefault("reparam_members", (member_name(node),))
        node.replace_all_uses_with(twin)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


def _sum_in_place(gm: torch.fx.GraphModule, node: torch.fx.Node, is_metadata_read):
    """`v.add_(w)` for `v + w` or `w + v` when v may be overwritten and holds the sum's shape."""
    a, b = node.args
    result = _tensor_meta(node)
    if result is None or a is b:
        return None
    for value, other in ((a, b), (b, a)):
        meta = _tensor_meta(value)
        if (meta is None or tuple(meta.shape) != tuple(result.shape) or meta.dtype != result.dtype
                or not _fresh_and_private(gm, value, node, is_metadata_read)):
            continue
        if isinstance(other, torch.fx.Node):
            other_meta = _tensor_meta(other)
            if other_meta is None or other_meta.dtype != result.dtype:
                continue  # a mixed-dtype sum promotes: in place it would not
        elif not isinstance(other, (int, float)) or isinstance(other, bool):
            continue
        with gm.graph.inserting_before(node):
            # Float addition is commutative, so v + w and w + v give the same bits.
            return gm.graph.call_method("add_", (value, other))
    return None


# -- reshapes that come back to where they started ----------------------------------------------
#
# A BatchNorm1d on tokens is written `bn(x.flatten(0, 1)).reshape_as(x)`; once the norm has folded
# into the Linear before it, `y.flatten(0, 1).reshape_as(y)` is left: two Python calls per block
# that give back y's own elements in y's own order and shape.
#
#     pattern   reshape_as(c, y) / view_as(c, y), c reached from y by flatten / view / reshape /
#               unflatten steps only (none of them reorders elements)
#     check     y is the output of a Linear (contiguous whatever the input, so y itself has the
#               strides the reshape would give)
#     rewrite   y

_ORDER_KEEPING_METHODS = {"flatten", "view", "reshape", "unflatten", "reshape_as", "view_as"}
_ORDER_KEEPING_FUNCS = {torch.flatten, torch.reshape, torch.unflatten}


def _is_linear_output(gm: torch.fx.GraphModule, value: torch.fx.Node) -> bool:
    if value.op == "call_module":
        return type(gm.get_submodule(value.target)) is nn.Linear
    return value.op == "call_function" and value.target is F.linear


def drop_reshape_round_trips(gm: torch.fx.GraphModule) -> int:
    """Replace reshapes that restore their source's own shape by that source; return how many."""
    return _replace_round_trips(gm, _reshape_round_trip)


def drop_permute_round_trips(gm: torch.fx.GraphModule) -> int:
    """Replace `x.permute(p).permute(q)` (or `transpose`) whose two steps undo each other by `x`;
    return how many. Such a pair is left where the linear operation between the two steps was
    fused into the convolution before them (a channels-last Linear after a conv): the pair is a
    view of `x` with `x`'s own sizes and strides, and an exporter would copy it twice."""
    return _replace_round_trips(gm, _permute_round_trip)


def _replace_round_trips(gm: torch.fx.GraphModule, source_of) -> int:
    """Replace every node for which `source_of(gm, node)` gives a node by that node; how many."""
    dropped = 0
    for node in list(gm.graph.nodes):
        source = source_of(gm, node)
        if source is not None:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        remove_dead_nodes(gm)
    return dropped


def _reshape_round_trip(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """`y.flatten(0, 1).reshape_as(y)` (layout steps that keep the order, back to `y`) for a
    Linear's output `y` (contiguous whatever its input): `y`, else None."""
    if not (node.op == "call_method" and node.target in ("reshape_as", "view_as") and len(node.args) == 2):
        return None
    step, source = node.args
    if not isinstance(source, torch.fx.Node) or not _is_linear_output(gm, source):
        return None
    while isinstance(step, torch.fx.Node) and step is not source and (
            (step.op == "call_method" and step.target in _ORDER_KEEPING_METHODS)
            or (step.op == "call_function" and step.target in _ORDER_KEEPING_FUNCS)):
        step = step.args[0]
    return source if step is source else None


def _permute_round_trip(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """`x.permute(p).permute(q)` with `q` undoing `p`: `x`, else None."""
    from ..trace import shape_of  # (trace imports this module)

    inner = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if inner is None or not inner.args or not isinstance(inner.args[0], torch.fx.Node):
        return None
    source = inner.args[0]
    shape = shape_of(source)
    if shape is None:
        return None
    first, second = _axis_order(inner, len(shape)), _axis_order(node, len(shape))
    if first is None or second is None or [first[i] for i in second] != list(range(len(shape))):
        return None
    return source


def _axis_order(node: torch.fx.Node, ndim: int) -> list[int] | None:
    """The input axis each output axis of a `permute`/`transpose` takes, or None for other nodes."""
    if node.kwargs:
        return None
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
    elif node.op == "call_function" and node.target is torch.permute and len(node.args) == 2:
        dims = node.args[1]
    elif (node.op == "call_method" and node.target == "transpose") or (
            node.op == "call_function" and node.target is torch.transpose):
        if len(node.args) != 3:
            return None
        a, b = node.args[1:]
        if type(a) is not int or type(b) is not int or not (-ndim <= a < ndim and -ndim <= b < ndim):
            return None
        order = list(range(ndim))
        order[a % ndim], order[b % ndim] = order[b % ndim], order[a % ndim]
        return order
    else:
        return None
    if not isinstance(dims, (tuple, list)) or len(dims) != ndim or any(type(d) is not int for d in dims):
        return None
    order = [d % ndim for d in dims]
    return order if sorted(order) == list(range(ndim)) else None
