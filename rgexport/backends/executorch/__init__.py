"""ExecuTorch (.pte, XNNPACK): export, quantisation recipes, calibration, edge rewrites and the runner."""

from rgexport.backends.executorch.backend import ExecuTorchBackend

__all__ = ["ExecuTorchBackend"]
