"""Optional packages: importing them with a message that names the extra to install.

reparam's core needs torch alone. Features built on other packages (timm interop, ExecuTorch and
Core ML exports, plots) import them through `require`, so that a missing package becomes one clear
`MissingExtra` error naming the `pip install "reparam[...]"` command, instead of an ImportError
from deep inside the feature.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ReparamError

EXTRAS = {  # module -> the extra that installs it
    "timm": "timm",
    "torchvision": "timm",
    "executorch": "executorch",
    "coremltools": "coreml",
    "matplotlib": "bench",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
}


class MissingExtra(ReparamError, ImportError):
    """An optional package a feature needs is not installed (or cannot be imported)."""

    def __init__(self, module: str, feature: str, cause: BaseException | None = None):
        extra = EXTRAS.get(module.split(".")[0], module)
        self.module, self.extra, self.install = module, extra, f'pip install "reparam[{extra}]"'
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None and not isinstance(
            cause, ModuleNotFoundError) else ""
        super().__init__(f"{feature} needs the package `{module}`, which cannot be imported{detail}; "
                         f"install it with: {self.install}")


def install_command(module: str) -> str:
    return f'pip install "reparam[{EXTRAS.get(module.split(".")[0], module)}]"'


def require(module: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise `MissingExtra` naming the extra to install."""
    if module.split(".")[0] in ("timm", "torchvision"):
        _allow_torchvision_without_its_extension()
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a package that fails while importing
        raise MissingExtra(module, feature, exc) from exc


def available(module: str) -> bool:
    try:
        require(module, "this check")
    except MissingExtra:
        return False
    return True


_torchvision_schema_library = None


def _allow_torchvision_without_its_extension() -> None:
    """Let torchvision import when its compiled extension cannot load.

    PyPI's torchvision wheels link their extension against torch's CUDA libraries; beside a CPU
    build of torch the extension fails to load, which torchvision tolerates, except that two fake
    (meta) registrations for `torchvision::nms` and `torchvision::qnms` then fail at import. Defining
    the two schemas first lets the pure-Python part import (timm needs only that); the operators
    themselves stay unavailable, and calling them fails as it would anyway.
    """
    global _torchvision_schema_library
    if _torchvision_schema_library is not None:
        return
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return
    if _torchvision_extension_loads(spec.submodule_search_locations[0]):
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, name):
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_schema_library = lib


def _torchvision_extension_loads(folder: str) -> bool:
    import glob
    import os

    import torch

    libraries = glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd"))
    if not libraries:
        return False
    try:
        torch.ops.load_library(libraries[0])
    except (OSError, RuntimeError):
        return False
    return True
