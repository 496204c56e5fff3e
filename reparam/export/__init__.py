"""Writing fused models to deployable files, and checking what was written.

    from reparam.export import export_model
    result = export_model(model, example_input, "model.onnx")     # fuse, write, check
    print(result.summary())

Formats, one module each (`reparam.export.<module>`), all with the same `write` and `check`:

| format   | module       | output                  | checked with                                   |
|----------|--------------|-------------------------|------------------------------------------------|
| `onnx`   | `onnx`       | `.onnx`                 | onnx.checker + ONNX Runtime, vs fused/unfused  |
| `pt2`    | `pt2`        | `.pt2` (torch.export)   | torch.export.load + run, vs fused/unfused      |
| `pte`    | `executorch` | `.pte` (XNNPACK)        | ExecuTorch runtime, vs fused/unfused           |
| `coreml` | `coreml`     | `.mlpackage` (a folder) | structure; predictions on macOS                |

Shared pieces live in `core` (errors, the result record, atomic output paths, quiet exporters,
the comparison of outputs through `reparam.verify.compare`), the table of formats in `formats`,
and the whole export in `orchestrate.export_model`. Model resolution (registered names,
`module:factory`, `--weights`) is `reparam.resolve`; its names are re-exported here.
"""

from __future__ import annotations

import torch

from ..resolve import (INIT_SEED, LoadedModel, check_input_accepted, import_factory,
                       is_factory_spec, load_weights_into, parse_input_shape, registered_input_size,
                       registered_models, resolve_model)
from ..verify import DEFAULT_TOLERANCES as _TOLERANCES
from . import coreml, executorch, onnx, pt2
from .core import (CHECK_BATCH, Check, CheckFailure, ExportError, ExportResult, Written,
                   check_output_path, default_output_path, quiet)
from .formats import DEFAULT_FORMAT, FORMATS, format_of_path, resolve_format
from .orchestrate import export_model

# float32 defaults of the checks: each output within ATOL + RTOL * max|that output|
RTOL, ATOL = _TOLERANCES[torch.float32]

write_onnx = onnx.write
check_onnx_file = onnx.check
onnx_op_counts = onnx.op_counts
write_pt2 = pt2.write
check_pt2_file = pt2.check

__all__ = [
    "ATOL",
    "RTOL",
    "CHECK_BATCH",
    "DEFAULT_FORMAT",
    "FORMATS",
    "ExportError",
    "CheckFailure",
    "Check",
    "Written",
    "LoadedModel",
    "ExportResult",
    "INIT_SEED",
    "parse_input_shape",
    "is_factory_spec",
    "resolve_model",
    "import_factory",
    "load_weights_into",
    "registered_input_size",
    "registered_models",
    "check_input_accepted",
    "default_output_path",
    "check_output_path",
    "format_of_path",
    "resolve_format",
    "export_model",
    "write_onnx",
    "write_pt2",
    "check_onnx_file",
    "check_pt2_file",
    "onnx_op_counts",
    "quiet",
]
