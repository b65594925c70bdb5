"""Calibration inputs of the w8a8 recipe: real (token, position, state) feeds per graph along the fp32 trajectory."""

from __future__ import annotations

import numpy as np

from rgexport.backends.base import BuildContext
from rgexport.backends.onnx.export import expected_names
from rgexport.errors import RgexportError
from rgexport.model import Griffin

CALIBRATION_SAMPLES = 256  # decode samples kept (evenly over positions); prefill keeps every chunk up to this

def _calibration_inputs(ctx: BuildContext) -> tuple[str, list[list[int]]]:
    """(calibration method, token sequences) of a calibrated recipe, checked."""
    from rgexport.backends.onnx.recipes import DEFAULT_CALIBRATION_METHOD, calibration_method

    method = calibration_method(ctx.options.get("calibration_method", DEFAULT_CALIBRATION_METHOD))
    return method, ctx.calibration_sequences()

def calibration_feeds(model: Griffin, sequences: list[list[int]], method: str, chunk: int,
                      max_samples: int = CALIBRATION_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Input dicts for one graph (`method` "decode" or "prefill") captured along the fp32 model's own
    trajectory over `sequences` (`rgexport.calibrate.capture_samples`: positions past the window, real state)."""
    from rgexport.calibrate import capture_samples

    t = 1 if method == "decode" else chunk
    if max(len(s) for s in sequences) < t:
        raise RgexportError(f"calibration sequences are shorter than one prefill chunk ({t} tokens)")
    inputs, _ = expected_names(model, method)
    feeds = []
    for sample in capture_samples(model, sequences, chunk=t, max_samples=max_samples):
        tokens = sample.tokens.numpy().astype(np.int32)
        feed = {inputs[0]: tokens.reshape(-1) if method == "decode" else tokens,
                "position": sample.position.numpy().astype(np.int32).reshape(1)}
        for name in inputs[2:]:
            feed[name] = sample.state[name.removeprefix("state.")].numpy().astype(np.float32)
        feeds.append(feed)
    return feeds
