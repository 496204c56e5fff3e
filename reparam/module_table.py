"""A model's modules by qualified name, in one walk.

`nn.Module.named_modules` is a recursive generator: every module's path and value pass through
the generators of all its ancestors, so one walk over a deep model costs several times the number
of its modules in generator steps, and the compiler walks the graph's modules a dozen times per
`fuse`. The same table, built with an explicit stack."""

from __future__ import annotations

from torch import nn


def module_table(root: nn.Module) -> dict[str, nn.Module]:
    """`dict(root.named_modules())`: each module once, under its first name, in the same order."""
    table: dict[str, nn.Module] = {}
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        table[path] = module
        children = [(f"{path}.{name}" if path else name, child)
                    for name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))
    return table


def parameter_count(root: nn.Module) -> int:
    """`sum(p.numel() for p in root.parameters())`: shared parameters counted once."""
    seen: set[int] = set()
    total = 0
    for module in module_table(root).values():
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
