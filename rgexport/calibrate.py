"""Calibration data for quantisation recipes that need activation ranges.

A stateful step is not calibrated with random inputs: we run the fp32 model over real text and capture
real (tokens, position, state) samples along the trajectory, including positions past the attention
window (where the ring buffer has wrapped and every slot is live), so activation ranges cover the states
a device will actually see.

Text comes from calibration/corpus/calibration.txt (disjoint from the training and held-out text) or a
user's file: plain text (documents separated by blank lines) or JSONL with a "text" or "prompt" field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from rgexport.config import GriffinConfig
from rgexport.errors import RgexportError
from rgexport.model import Griffin, State


def calibration_texts(path: Path | None = None) -> list[str]:
    from rgexport.assets import corpus_path

    p = Path(path) if path else corpus_path("calibration.txt")
    from rgexport.safety import read_text_file

    raw = read_text_file(p, "calibration text")
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RgexportError(f"{p}:{n} is not JSON: {e}") from None
            text = record.get("text") or record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise RgexportError(f'{p}:{n} has no "text" or "prompt" string field')
            texts.append(text)
    else:
        texts = [t for t in raw.split("\n\n") if t.strip()]
    if not texts:
        raise RgexportError(f"{p} holds no text to calibrate on")
    return texts


def calibration_token_sequences(
    tokenizer, config: GriffinConfig, path: Path | None = None, sequences: int = 4, length: int | None = None,
) -> list[list[int]]:
    """`sequences` token sequences of `length` (default 3x the window, so calibration sees it wrap)."""
    length = length or 3 * config.attention_window_size
    stream: list[int] = []
    for text in calibration_texts(path):
        stream.extend(tokenizer.encode(text, bos=False))
        stream.append(tokenizer.eos_id)
    if len(stream) < length:
        raise RgexportError(f"calibration text gives {len(stream)} tokens; at least {length} are needed")
    step = max(1, (len(stream) - length) // max(1, sequences - 1))
    return [[tokenizer.bos_id, *stream[i * step : i * step + length - 1]] for i in range(sequences)]


@dataclasses.dataclass
class Sample:
    """One calibration input of a decode (t = 1) or prefill (t = chunk) graph."""

    tokens: torch.Tensor  # [1, t] int32
    position: torch.Tensor  # [1] int32
    state: State  # float32, batch 1


@torch.no_grad()
def capture_samples(
    model: Griffin, sequences: list[list[int]], chunk: int = 1, every: int = 1, max_samples: int = 256
) -> list[Sample]:
    """The inputs of calls of `chunk` tokens along each sequence (the state *before* the call): every
    `every`-th call, thinned to at most `max_samples` spread evenly over all positions, past the window too.

    Only the kept calls are captured one at a time; the model runs through the tokens between them in
    chunks of up to a window (the same trajectory, reached in a few forward passes instead of one per
    token: 1,536 single steps become about 300 calls for the default 256 decode samples).
    """
    calls = [(i, s) for i, seq in enumerate(sequences) for n, s in enumerate(range(0, len(seq) - chunk + 1, chunk))
             if n % every == 0]
    if len(calls) > max_samples:  # keep an even spread over positions
        stride = len(calls) / max_samples
        calls = [calls[int(k * stride)] for k in range(max_samples)]
    window = model.config.attention_window_size
    samples: list[Sample] = []
    for i, seq in enumerate(sequences):
        state, done = model.init_state(), 0  # `state` holds the tokens before `done`
        for s in (s for j, s in calls if j == i):
            while done < s:  # advance to the sample's position
                n = min(window, s - done)
                _, state = model(torch.tensor([seq[done : done + n]]), torch.tensor([done], dtype=torch.int32), state)
                done += n
            samples.append(Sample(torch.tensor([seq[s : s + chunk]], dtype=torch.int32),
                                  torch.tensor([s], dtype=torch.int32), {k: v.clone() for k, v in state.items()}))
    return samples


def sample_facts(positions: dict[str, list[int]], sequences: list[list[int]], window: int) -> dict[str, Any]:
    """Manifest facts about calibration samples: `positions` lists each method's sample positions."""
    return {
        "source": "fp32 trajectory over the calibration text (rgexport.calibrate.capture_samples)",
        "sequences": len(sequences),
        "tokens": sum(len(s) for s in sequences),
        "samples": {m: len(p) for m, p in positions.items()},
        "positions": {m: [min(p), max(p)] for m, p in positions.items()},
        "samples_past_window": {m: sum(x >= window for x in p) for m, p in positions.items()},
    }
