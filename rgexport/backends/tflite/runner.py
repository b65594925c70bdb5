"""The LiteRT runner: the decode and prefill signatures of one interpreter, the state copied output to input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rgexport.backends.base import Runner
from rgexport.backends.tflite.export import SIGNATURES
from rgexport.errors import RgexportError
from rgexport.model import identifier

# Runtime option `delegate` -> the interpreter's op resolver. XNNPACK is LiteRT's default CPU delegate;
# "none" runs LiteRT's builtin kernels (a second opinion on numerics).
DELEGATES = {"xnnpack": "AUTO", "none": "BUILTIN_WITHOUT_DEFAULT_DELEGATES"}

# Runner --------------------------------------------------------------------------------------------
class TFLiteRunner(Runner):
    """Drives the `decode` and `prefill` signatures, carrying the state between calls in numpy."""

    def __init__(self, interpreter: Any, io: dict[str, Any], model_bytes: int = 0):
        self._interpreter = interpreter
        self._io = io
        self.prefill_chunk = int(io["prefill_chunk"])
        self._model_bytes = model_bytes
        self._runners = {}
        available = set(interpreter.get_signature_list())
        for method in SIGNATURES:
            sig = io["methods"][method].get("signature", method)
            if sig not in available:
                raise RgexportError(f"The LiteRT model has no signature {sig!r} (it has {sorted(available)})")
            runner = interpreter.get_signature_runner(sig)
            _check_contract(method, runner, io["methods"][method])
            self._runners[method] = runner
        # state name -> (LiteRT input name, LiteRT output name, shape)
        self._state_io = [
            (t["name"], t.get("litert_input", identifier(t["input"])),
             t.get("litert_output", identifier(t["output"])), tuple(t["shape"]))
            for t in io["state"]["tensors"]
        ]
        self._vocab = int(io["methods"]["decode"]["outputs"][0]["shape"][-1])
        self._state: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        self._state = {inp: np.zeros(shape, np.float32) for _, inp, _, shape in self._state_io}

    def _run(self, method: str, first: str, tokens: np.ndarray, position: int) -> np.ndarray:
        if tokens.min() < 0 or tokens.max() >= self._vocab:
            raise RgexportError(f"Token ids must be in [0, {self._vocab}), got {tokens.min()}..{tokens.max()}")
        if position < 0:
            raise RgexportError(f"Position must be >= 0, got {position}")
        out = self._runners[method](**{first: tokens, "position": np.array([position], np.int32)}, **self._state)
        # The signature runner returns copies today, but views into the interpreter's arena would be
        # overwritten by the next call: own every array that is fed back.
        self._state = {inp: _owned(out[outp]) for _, inp, outp, _ in self._state_io}
        return _owned(out["logits"][0])

    def decode(self, token: int, position: int) -> np.ndarray:
        return self._run("decode", "token", np.array([token], np.int32), position)

    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        if len(tokens) != self.prefill_chunk:
            raise RgexportError(f"prefill takes exactly {self.prefill_chunk} tokens, got {len(tokens)}")
        return self._run("prefill", "tokens", np.asarray(tokens, np.int32)[None], position)

    def state(self) -> dict[str, np.ndarray]:
        return {name: self._state[inp].copy() for name, inp, _, _ in self._state_io}

    def memory(self) -> dict[str, int]:
        """Bytes the interpreter holds that it reports: the model, the state, each signature's I/O."""
        out = {"model_bytes": self._model_bytes,
               "state_bytes": sum(a.nbytes for a in self._state.values())}
        for method, runner in self._runners.items():
            out[f"{method}_io_bytes"] = sum(
                _nbytes(d) for details in (runner.get_input_details(), runner.get_output_details())
                for d in details.values()
            )
        return out

def _owned(a: np.ndarray) -> np.ndarray:
    return a if a.flags.owndata and a.base is None else a.copy()

def _nbytes(details: dict[str, Any]) -> int:
    return int(np.prod(details["shape"])) * np.dtype(details["dtype"]).itemsize

def _signature_name(tensor: dict[str, Any]) -> str:
    """A contract tensor's LiteRT name: `identifier` (`litert_name` in bundles built before it)."""
    return tensor.get("identifier", tensor.get("litert_name")) or identifier(tensor["name"])

def _check_contract(method: str, runner: Any, contract: dict[str, Any]) -> None:
    """The signature's names, shapes and dtypes must be those the manifest promises."""
    for kind, details in (("inputs", runner.get_input_details()), ("outputs", runner.get_output_details())):
        want = {_signature_name(t): (tuple(t["shape"]), t["dtype"]) for t in contract[kind]}
        got = {n: (tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"]).name) for n, d in details.items()}
        if want != got:
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            differ = sorted(n for n in set(want) & set(got) if want[n] != got[n])
            raise RgexportError(
                f"LiteRT signature {method} {kind} do not match the manifest: missing {missing}, "
                f"unexpected {extra}, different shape or dtype {differ}"
            )
