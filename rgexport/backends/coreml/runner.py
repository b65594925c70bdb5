"""Core ML runners: MLModel.predict with states on macOS, rgexport's MIL interpreter elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.backends.base import Runner
from rgexport.backends.coreml.export import FUNCTIONS
from rgexport.errors import RgexportError
from rgexport.model import TensorSpec


def _specs_from_contract(io: dict[str, Any]) -> list[TensorSpec]:
    import torch

    return [TensorSpec(t["name"], tuple(t["shape"]), torch.float32, t["kind"]) for t in io["state"]["tensors"]]

def _names_from_contract(io: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """{state name: (name fed, name read back)} as the package holds them: feature names (float32 state) or
    Core ML state names; read from the contract, so packages built under an older naming rule still run."""
    tensors = io["state"]["tensors"]
    if io["state"]["placement"] == "io":
        return {t["name"]: (t["input"], t["output"]) for t in tensors}
    return {t["name"]: (t.get("identifier", t.get("coreml_state")),) * 2 for t in tensors}

# Runners ----------------------------------------------------------------------------------------
class _StepRunner(Runner):
    """Shared input building and state handling; subclasses run one function."""

    def __init__(self, specs: list[TensorSpec], names: dict[str, tuple[str, str]], chunk: int, stateful: bool):
        self.specs = specs
        self.names = names
        self.prefill_chunk = chunk
        self.stateful = stateful
        self.io_state: dict[str, np.ndarray] = {}

    def _run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _call(self, function: str, token_name: str, tokens: np.ndarray, position: int) -> np.ndarray:
        inputs = {token_name: tokens, "position": np.array([position], np.int32)}
        if not self.stateful:
            inputs.update({self.names[s.name][0]: self.io_state[s.name] for s in self.specs})
        out = self._run(function, inputs)
        if not self.stateful:
            self.io_state = {s.name: np.asarray(out[self.names[s.name][1]], np.float32) for s in self.specs}
        return np.asarray(out["logits"], np.float32)

    def reset(self) -> None:
        self.io_state = {s.name: np.zeros(s.shape, np.float32) for s in self.specs}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Replaces the state (by state name, any float dtype); kept in the program's storage dtype."""
        self.io_state = {s.name: np.asarray(state[s.name], np.float32).reshape(s.shape) for s in self.specs}

    def decode(self, token: int, position: int) -> np.ndarray:
        return self._call("decode", "token", np.array([token], np.int32), position)[0]

    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        if len(tokens) != self.prefill_chunk:
            raise RgexportError(f"prefill takes exactly {self.prefill_chunk} tokens, got {len(tokens)}")
        return self._call("prefill", "tokens", np.asarray(tokens, np.int32)[None], position)[0]

class InterpreterRunner(_StepRunner):
    """Runs the ML program in rgexport's numpy MIL interpreter (Linux, or anywhere)."""

    stand_in = "rgexport's numpy MIL interpreter, not Core ML: its speed says nothing about a device"

    def __init__(self, path: Path, specs: list[TensorSpec], names: dict[str, tuple[str, str]], chunk: int,
                 stateful: bool):
        from rgexport.backends.coreml.mil_interpreter import Program
        from rgexport.config import LARGE_MODEL_BYTES
        from rgexport.memory import map_large_allocations

        super().__init__(specs, names, chunk, stateful)
        if Path(path, "Data").exists() and sum(
                f.stat().st_size for f in Path(path, "Data").rglob("*") if f.is_file()) > LARGE_MODEL_BYTES // 8:
            map_large_allocations()  # a large model's per-slice temporaries go back when freed (memory.py)
        self.program = Program.load(path)
        missing = set(FUNCTIONS) - set(self.program.functions)
        if missing:
            raise RgexportError(f"{path} lacks functions {sorted(missing)}; has {sorted(self.program.functions)}")
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.states = self.program.new_state("decode")

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        for s in self.specs if self.stateful else ():
            self.states[self.names[s.name][0]][...] = np.asarray(state[s.name]).reshape(s.shape)

    def _run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.program.run(function, inputs, self.states)

    def state(self) -> dict[str, np.ndarray]:
        if not self.stateful:
            return {k: v.copy() for k, v in self.io_state.items()}
        return {s.name: self.states[self.names[s.name][0]].astype(np.float32) for s in self.specs}

class CoreMLRunner(_StepRunner):
    """Runs the package with Core ML itself (macOS 15+): one MLState shared by both functions."""

    def __init__(self, path: Path, specs: list[TensorSpec], names: dict[str, tuple[str, str]], chunk: int,
                 stateful: bool, compute_units: str = "ALL"):
        import coremltools as ct

        super().__init__(specs, names, chunk, stateful)
        units = getattr(ct.ComputeUnit, compute_units)
        self.models = {fn: ct.models.MLModel(str(path), function_name=fn, compute_units=units) for fn in FUNCTIONS}
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.ml_state = self.models["decode"].make_state() if self.stateful else None

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        for s in self.specs if self.stateful else ():
            self.ml_state.write_state(self.names[s.name][0], np.asarray(state[s.name], np.float16).reshape(s.shape))

    def _run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.stateful:
            return self.models[function].predict(inputs, state=self.ml_state)
        return self.models[function].predict(inputs)

    def state(self) -> dict[str, np.ndarray] | None:
        if not self.stateful:
            return {k: v.copy() for k, v in self.io_state.items()}
        if not hasattr(self.ml_state, "read_state"):
            return None
        return {s.name: np.asarray(self.ml_state.read_state(self.names[s.name][0]), np.float32) for s in self.specs}
