"""The backend registry: each backend's name and the package that implements it.

Light on purpose (no backend module, no torch, no runtime is imported here), so the command line builds its
choices from it when it starts; `rgexport.backends.get_backend` imports a backend's package on first use.
With the target profiles (targets/*.toml), this is the one place outside `rgexport/backends/` that names a
backend (tests/test_architecture.py checks it).
"""

from __future__ import annotations

# name -> (module, class). The module is imported on first use.
BACKENDS: dict[str, tuple[str, str]] = {
    "executorch": ("rgexport.backends.executorch", "ExecuTorchBackend"),
    "coreml": ("rgexport.backends.coreml", "CoreMLBackend"),
    "onnx": ("rgexport.backends.onnx", "OnnxBackend"),
    "tflite": ("rgexport.backends.tflite", "TFLiteBackend"),
}


def backend_names() -> list[str]:
    """Every backend's name, in the registry's order (no backend module is imported)."""
    return list(BACKENDS)
