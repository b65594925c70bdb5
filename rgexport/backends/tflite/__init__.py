"""TFLite / LiteRT (.tflite): conversion, quantisation recipes, calibration and the runner."""

from rgexport.backends.tflite.backend import TFLiteBackend

__all__ = ["TFLiteBackend"]
