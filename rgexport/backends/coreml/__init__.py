"""Core ML (.mlpackage, iOS 18 stateful): export, compression recipes, calibration and the MIL-interpreter runner."""

from rgexport.backends.coreml.backend import CoreMLBackend

__all__ = ["CoreMLBackend"]
