"""The ExecuTorch runner: the program's methods (decode, prefill, reset, read_state) over one set of mutable buffers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rgexport.backends.base import Runner
from rgexport.backends.executorch.export import STATE_METHODS, planned_memory
from rgexport.errors import RgexportError


class ExecuTorchRunner(Runner):
    """Runs a `.pte` from this backend in ExecuTorch's Python runtime (`executorch.runtime`)."""

    def __init__(self, path: Path, prefill_chunk: int, state_names: Sequence[str]):
        from executorch.runtime import Runtime

        self.path = Path(path)
        self.prefill_chunk = prefill_chunk
        self.state_names = list(state_names)
        self._program = Runtime.get().load_program(self.path)
        missing = sorted({"decode", "prefill", *STATE_METHODS} - self._program.method_names)
        if missing:
            raise RgexportError(f"{self.path} lacks methods {missing}; rebuild it with this version of rgexport")
        # Load everything now: loading a method later would re-initialise the shared state mid-sequence.
        self._methods = {m: self._program.load_method(m) for m in ("decode", "prefill", *STATE_METHODS)}
        self._memory: dict[str, int] | None = None

    def reset(self) -> None:
        self._methods["reset"].execute([])

    def decode(self, token: int, position: int) -> np.ndarray:
        tokens = torch.tensor([[token]], dtype=torch.int32)
        out = self._methods["decode"].execute([tokens, torch.tensor([position], dtype=torch.int32)])
        return out[0][0, 0].numpy()

    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        if len(tokens) != self.prefill_chunk:
            raise RgexportError(f"prefill takes exactly {self.prefill_chunk} tokens, got {len(tokens)}")
        chunk = torch.tensor([list(tokens)], dtype=torch.int32)
        out = self._methods["prefill"].execute([chunk, torch.tensor([position], dtype=torch.int32)])
        return out[0][0].numpy()

    def state(self) -> dict[str, np.ndarray]:
        values = self._methods["read_state"].execute([])
        return {n: v.numpy().astype(np.float32) for n, v in zip(self.state_names, values, strict=True)}

    def memory(self) -> dict[str, int]:
        """Planned bytes read from the program (the Python runtime reports no allocation figures).

        `activations` is the largest method's arena (host methods share one in the Python runtime);
        `state` is the shared state arena.
        """
        if self._memory is None:
            from rgexport.backends.executorch.weights import read_program

            planned = planned_memory(read_program(self.path))  # the flatbuffer only, not a GB of segments
            self._memory = {
                "activations": max(p["activations"] for p in planned.values()),
                "state": max(p["state"] for p in planned.values()),
            }
        return dict(self._memory)
