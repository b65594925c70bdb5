"""The ONNX Runtime runner: two sessions (decode, prefill) whose state lives in OrtValues bound once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.backends.base import Runner
from rgexport.backends.onnx.export import _token_input
from rgexport.backends.onnx.graph_info import describe_onnx
from rgexport.errors import RgexportError
from rgexport.memory import peak_rss_bytes, rss_bytes


class OnnxRunner(Runner):
    """Decode and prefill sessions sharing one double-buffered state held in OrtValues.

    Each call binds the current state set as `state.*` inputs and the other set as `new_state.*` outputs
    (four IO bindings made once: two methods x two parities) and then swaps sets, so the state stays in
    ONNX Runtime's buffers between tokens; only the token, position and logits cross into numpy.
    """

    def __init__(self, decode_path: Path, prefill_path: Path, prefill_chunk: int, threads: int | None = None):
        import onnxruntime as ort

        self.paths = {"decode": Path(decode_path), "prefill": Path(prefill_path)}
        self.prefill_chunk = prefill_chunk
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.sessions = {
            m: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for m, p in self.paths.items()
        }

        inputs = {m: {i.name: i for i in s.get_inputs()} for m, s in self.sessions.items()}
        outputs = {m: {o.name: o for o in s.get_outputs()} for m, s in self.sessions.items()}
        state_inputs = [i for i in self.sessions["decode"].get_inputs() if i.name.startswith("state.")]
        self.state_names = [i.name.removeprefix("state.") for i in state_inputs]
        self.state_shapes = [list(i.shape) for i in state_inputs]
        for m in self.sessions:
            names = [i.name for i in self.sessions[m].get_inputs() if i.name.startswith("state.")]
            out_names = [o.name for o in self.sessions[m].get_outputs() if o.name.startswith("new_state.")]
            want = ([f"state.{n}" for n in self.state_names], [f"new_state.{n}" for n in self.state_names])
            if (names, out_names) != want:
                raise RgexportError(f"{self.paths[m].name}: state inputs/outputs do not match decode's")
        tokens_shape = list(inputs["prefill"]["tokens"].shape)
        if tokens_shape != [1, prefill_chunk]:
            raise RgexportError(f"{self.paths['prefill'].name} takes tokens {tokens_shape}, the manifest says "
                                f"chunk {prefill_chunk}")
        self.vocab_size = int(outputs["decode"]["logits"].shape[-1])

        def buffer(shape: list[int], dtype: type) -> Any:
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cpu", 0)
            value.update_inplace(np.zeros(shape, dtype))
            return value

        self._states = [[buffer(s, np.float32) for s in self.state_shapes] for _ in range(2)]
        self._token = {"decode": buffer([1], np.int32), "prefill": buffer([1, prefill_chunk], np.int32)}
        self._position = buffer([1], np.int32)
        # The prefill graph returns [1, chunk, v], or [1, 1, v] where it was built for the last logits alone.
        self.prefill_rows = int(outputs["prefill"]["logits"].shape[1])
        if self.prefill_rows not in (1, prefill_chunk):
            raise RgexportError(f"{self.paths['prefill'].name} returns {self.prefill_rows} rows of logits for a chunk "
                                f"of {prefill_chunk}")
        self._logits = {"decode": buffer([1, self.vocab_size], np.float32),
                        "prefill": buffer([1, self.prefill_rows, self.vocab_size], np.float32)}
        self._bindings = {}
        for method, session in self.sessions.items():
            for parity in (0, 1):
                b = session.io_binding()
                b.bind_ortvalue_input(_token_input(method), self._token[method])
                b.bind_ortvalue_input("position", self._position)
                b.bind_ortvalue_output("logits", self._logits[method])
                for name, src, dst in zip(self.state_names, self._states[parity], self._states[1 - parity]):
                    b.bind_ortvalue_input(f"state.{name}", src)
                    b.bind_ortvalue_output(f"new_state.{name}", dst)
                self._bindings[method, parity] = b
        self._current = 0

    def _run(self, method: str, tokens: np.ndarray, position: int) -> np.ndarray:
        self._token[method].update_inplace(tokens)
        self._position.update_inplace(np.array([position], np.int32))
        self.sessions[method].run_with_iobinding(self._bindings[method, self._current])
        self._current ^= 1
        return self._logits[method].numpy()[0].copy()  # numpy() is a view of the bound buffer

    def reset(self) -> None:
        for states in self._states:
            for value, shape in zip(states, self.state_shapes):
                value.update_inplace(np.zeros(shape, np.float32))
        self._current = 0

    def decode(self, token: int, position: int) -> np.ndarray:
        return self._run("decode", np.array([token], np.int32), position)

    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        if len(tokens) != self.prefill_chunk:
            raise RgexportError(f"prefill takes exactly {self.prefill_chunk} tokens, got {len(tokens)}")
        return self._run("prefill", np.asarray(tokens, np.int32).reshape(1, -1), position)

    def state(self) -> dict[str, np.ndarray]:
        return {n: v.numpy().copy() for n, v in zip(self.state_names, self._states[self._current])}

    def memory(self) -> dict[str, int]:
        """Bytes: weights as stored in the loaded files (each of the two sessions holds its own copy), the
        two state sets and the bound I/O buffers (`OrtValue.tensor_size_in_bytes`), and the process's
        current and peak resident size. ONNX Runtime's Python API has no per-session allocator statistics,
        and a resident-size difference around session creation is meaningless once the process has freed
        memory before (measured per session in a fresh process: notes/onnx.md)."""
        weights = 0
        for path in self.paths.values():
            if path.suffix == ".onnx":
                weights += describe_onnx(path)["weights"]["bytes"]
            else:
                weights += path.stat().st_size
        io_values = [*self._token.values(), self._position, *self._logits.values()]
        return {
            "weights_bytes": weights,
            "state_bytes": sum(v.tensor_size_in_bytes() for s in self._states for v in s),
            "io_bytes": sum(v.tensor_size_in_bytes() for v in io_values),
            "process_rss_bytes": rss_bytes(),
            "process_peak_rss_bytes": peak_rss_bytes(),
        }
