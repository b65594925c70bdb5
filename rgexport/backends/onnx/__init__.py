"""ONNX (.onnx / .ort for ONNX Runtime): export, fusions, quantisation recipes, calibration and the runner."""

from rgexport.backends.onnx.backend import OnnxBackend

__all__ = ["OnnxBackend"]
