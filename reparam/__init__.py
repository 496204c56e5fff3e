"""reparam: exact structural reparameterization of PyTorch models.

    fused = reparam.fuse(model, example_input)   # a torch.fx.GraphModule in eval mode
    print(fused.report)                           # what was fused, what was refused and why

The public API is `fuse`, `explain`, `Report` and the errors in `reparam.errors`.
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
