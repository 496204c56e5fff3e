"""reparam: exact structural reparameterization of PyTorch models.

    fused = reparam.fuse(model, example_input)   # a torch.fx.GraphModule in eval mode
    print(fused.report)                           # what was fused, what was refused and why

The public API is `fuse`, `explain`, `Report` and the errors in `reparam.errors`. The model zoo
(`reparam.models`) and the exporters (`reparam.export`) are imported on first use, so that
`import reparam` stays light.
"""

from .errors import InputError, ReparamError, TraceFailure, VerificationError
from .pipeline import explain, fuse
from .report import Report

__all__ = [
    "fuse",
    "explain",
    "Report",
    "ReparamError",
    "InputError",
    "TraceFailure",
    "VerificationError",
]
__version__ = "0.1.0"

_LAZY_SUBMODULES = ("models", "export", "resolve")


def __getattr__(name: str):
    # `reparam.models.create(...)` after a plain `import reparam`: import the subpackage on first
    # access (its heavy optional dependencies stay unimported until a feature needs them).
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
