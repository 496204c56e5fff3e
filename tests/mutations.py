"""Deliberate defects for the mutation check (scripts/mutation_check.py).

With `REPARAM_MUTATION=<name>` in the environment, importing this module breaks the compiler in
one known way, by replacing one function of `reparam` for the whole process. The test suite must
then fail. Load it as a pytest plugin (`pytest -p mutations`, with this folder on the import path)
or import it from a `sitecustomize` module so that subprocesses started by the tests (the command
line tests run `python -m reparam.cli`) carry the same defect.

Each defect replaces a function at a clear boundary of the algebra or of the linear-form pass:

    no_op_fuse          passes.linear_forms.LinearFormPass.run   finds no linear form at all
    bn_no_shift         affine.batch_norm                        drops the shift beta - mean * a
    sum_off_centre      affine._placement                        smaller kernels one tap off centre
    compose_drops_padding  affine.compose                        ignores the second operator's padding
    wrong_layout_axis   passes.linear_forms.channel_axis_after   channels never move through a layout op

If a target no longer exists (renamed in a refactoring), applying the defect raises
`MissingTarget`: re-point the defect here rather than letting the check pass vacuously.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import replace

ENV = "REPARAM_MUTATION"
LOG_ENV = "REPARAM_MUTATION_LOG"  # optional file: each process that applied a defect appends a line


class MissingTarget(RuntimeError):
    """The function a defect replaces is gone: the defect must be re-pointed."""


def _target(module_name: str, attr: str):
    module = importlib.import_module(module_name)
    owner, _, name = attr.rpartition(".")
    holder = module
    for part in filter(None, owner.split(".")):
        holder = getattr(holder, part, None)
        if holder is None:
            raise MissingTarget(f"{module_name}.{attr}: {part} not found")
    if not hasattr(holder, name):
        raise MissingTarget(f"{module_name}.{attr} not found; re-point this defect in tests/mutations.py")
    return holder, name, getattr(holder, name)


def _replace(module_name: str, attr: str, make):
    """Replace `module.attr` by `make(original)`, and every reference already imported elsewhere
    in reparam (`from .affine import batch_norm`) as well."""
    holder, name, original = _target(module_name, attr)
    replacement = make(original)
    setattr(holder, name, replacement)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "reparam" or mod_name.startswith("reparam.")):
            continue
        for key, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, key, replacement)
    return original


# -- the defects: each `make(original)` returns the broken replacement --------------------------

def _no_op_fuse(original):
    def run(self):
        return self  # no node gets a linear form: nothing is fused, nothing is refused
    return run


def _bn_no_shift(original):
    def batch_norm(*args, **kwargs):
        op = original(*args, **kwargs)
        return replace(op, bias=op.bias.new_zeros(op.bias.shape))
    return batch_norm


def _sum_off_centre(original):
    def placement(op, dilation, kernel):
        index = list(original(op, dilation, kernel))
        last = index[-1]
        if last.start > 0:  # a kernel smaller than the sum's: one tap right of the centre
            index[-1] = slice(last.start + 1, last.stop + 1, last.step)
        return tuple(index)
    return placement


def _compose_drops_padding(original):
    def compose(after, before):
        return replace(original(after, before), padding=before.padding)
    return compose


def _wrong_layout_axis(original):
    def channel_axis_after(node, layout, in_shape, axis):
        moved = original(node, layout, in_shape, axis)
        return moved if moved is None else axis  # as if the channels stayed where they were
    return channel_axis_after


# name: (what breaks, module, function replaced, maker)
DEFECTS = {
    "no_op_fuse": ("no-op fuse: the linear-form pass finds no form",
                   "reparam.passes.linear_forms", "LinearFormPass.run", _no_op_fuse),
    "bn_no_shift": ("BatchNorm folded without its shift",
                    "reparam.affine", "batch_norm", _bn_no_shift),
    "sum_off_centre": ("kernels summed off-centre by one",
                       "reparam.affine", "_placement", _sum_off_centre),
    "compose_drops_padding": ("padding dropped when composing",
                              "reparam.affine", "compose", _compose_drops_padding),
    "wrong_layout_axis": ("wrong channel axis through flatten/transpose",
                          "reparam.passes.linear_forms", "channel_axis_after", _wrong_layout_axis),
}

_applied: str | None = None


def apply(name: str) -> None:
    """Break reparam in this process as `name` says (once)."""
    global _applied
    if _applied == name:
        return
    if _applied is not None:
        raise RuntimeError(f"mutation {_applied!r} already applied; one per process")
    if name not in DEFECTS:
        raise KeyError(f"unknown mutation {name!r}; known: {', '.join(DEFECTS)}")
    _, module, attr, make = DEFECTS[name]
    _replace(module, attr, make)
    _applied = name
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{name} {os.getpid()}\n")


def check_targets() -> dict[str, str | None]:
    """For each defect, None if the function it replaces exists, else why not (nothing applied)."""
    out = {}
    for name, (_, module, attr, _make) in DEFECTS.items():
        try:
            _target(module, attr)
            out[name] = None
        except (MissingTarget, ImportError) as exc:
            out[name] = str(exc)
    return out


def pytest_report_header(config):
    return f"reparam mutation: {_applied}" if _applied else None


if os.environ.get(ENV):
    apply(os.environ[ENV])
