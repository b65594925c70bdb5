"""Backends, one package each, imported only when asked for (their runtimes are optional extras)."""

from __future__ import annotations

import importlib

from rgexport.backends.base import Backend, BuildContext, Recipe, Runner, feed
from rgexport.errors import RgexportError

# name -> (module, class). The module is imported on first use.
BACKENDS: dict[str, tuple[str, str]] = {
    "executorch": ("rgexport.backends.executorch", "ExecuTorchBackend"),
    "coreml": ("rgexport.backends.coreml", "CoreMLBackend"),
    "onnx": ("rgexport.backends.onnx", "OnnxBackend"),
    "tflite": ("rgexport.backends.tflite", "TFLiteBackend"),
}


def get_backend(name: str) -> Backend:
    """The backend called `name`; its runtime library is imported only when a stage needs it."""
    if name not in BACKENDS:
        raise RgexportError(f"Unknown backend {name!r}; expected one of {sorted(BACKENDS)}")
    module_name, cls_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise RgexportError(f"Backend {name!r} is not implemented in this version of rgexport") from None
        raise
    return getattr(module, cls_name)()


__all__ = ["BACKENDS", "Backend", "BuildContext", "Recipe", "Runner", "feed", "get_backend"]
