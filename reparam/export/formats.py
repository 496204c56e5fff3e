"""The table of output formats: one module per format, each with the same interface.

A format module defines NAME, SUFFIX (of the output, without the dot), DESCRIPTION, IS_FOLDER
(its output is a folder), DYNAMIC_BATCH (whether it can keep the batch axis dynamic), OPTIONS
(the keyword options of its writer), REQUIRES (optional packages, imported before any work),
FEATURE (what `reparam.optional.require` names in its message), and the functions

    validate(**options)                                   InputError for options it cannot honour
    write(fused, example, path, *, dynamic_batch, verbose, **options) -> Written
    check(path, fused, original, batch, *, rtol, atol, **options) -> list[Check]
    describe(path) -> (label, {operator: count})          operators in the written output
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..errors import InputError
from ..optional import require
from . import coreml, executorch, onnx, pt2
from .core import quiet

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (onnx, pt2, executorch, coreml)}
DEFAULT_FORMAT = "onnx"


def format_module(name: str) -> ModuleType:
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown format {name!r}; use one of {', '.join(FORMATS)}") from None


def format_of_path(path: str | Path | None) -> str | None:
    """The format an output name's suffix stands for (`t8.mlpackage` -> coreml), else None."""
    if path is None:
        return None
    suffix = Path(str(path).rstrip("/\\")).suffix.lstrip(".").lower()
    return next((m.NAME for m in FORMATS.values() if m.SUFFIX == suffix), None)


def resolve_format(format: str | None, output: str | Path | None) -> str:
    """The format to write: `format` if given (it must agree with a known output suffix), else
    the output suffix's, else onnx."""
    by_suffix = format_of_path(output)
    if format is None:
        return by_suffix or DEFAULT_FORMAT
    format = format.lower()
    format_module(format)
    if by_suffix is not None and by_suffix != format:
        raise InputError(f"--format {format} contradicts the output name {output}"
                         f" (a .{FORMATS[by_suffix].SUFFIX} name is written as {by_suffix})")
    return format


_DEFAULTS = {"exporter": "dynamo"}  # an option left at its default was not asked for


def format_options(name: str, **given) -> dict:
    """The options the format's writer takes, from those given (None: not given); an InputError
    for an option given to a format that has no such option (`--opset` with pte...)."""
    fmt = format_module(name)
    for key, value in given.items():
        if key in fmt.OPTIONS or value is None or value == _DEFAULTS.get(key):
            continue
        owners = [n for n, m in FORMATS.items() if key in m.OPTIONS]
        raise InputError(f"--{key.replace('_', '-')} only applies to --format"
                         f" {' or '.join(owners)}, not {name}")
    return {k: v for k, v in given.items() if k in fmt.OPTIONS and v is not None}


def require_extras(name: str) -> None:
    """Import the format's optional packages, or raise MissingExtra naming the extra to install."""
    fmt = format_module(name)
    with quiet():
        for module in fmt.REQUIRES:
            require(module, fmt.FEATURE)
