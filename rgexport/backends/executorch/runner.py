"""The ExecuTorch runner: the program's methods (decode, prefill, reset, read_state) over one set of mutable buffers."""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rgexport.backends.base import Runner
from rgexport.backends.executorch.export import STATE_METHODS, planned_memory
from rgexport.errors import RgexportError

log = logging.getLogger(__name__)

# executorch::runtime::set_option / get_option (runtime/backend/interface.h), exported by libexecutorch.so.
# ExecuTorch 1.5.1's Python bindings have no way to set a backend option; these two are its C++ API.
_SET_OPTION = "_ZN10executorch7runtime10set_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"
_GET_OPTION = "_ZN10executorch7runtime10get_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"


class _BackendOption(ctypes.Structure):
    """executorch::runtime::BackendOption of runtime/backend/options.h (executorch 1.5.1, pinned): a 64-byte
    key, then std::variant<bool, int, std::array<char, 256>> (its 256-byte union, then the index byte)."""

    _fields_ = [("key", ctypes.c_char * 64), ("value", ctypes.c_ubyte * 256), ("index", ctypes.c_ubyte),
                ("_pad", ctypes.c_ubyte * 3)]


@functools.cache
def share_packed_weights() -> bool:
    """Turns on XNNPACK's weight cache for this process (the backend option `weight_cache_enabled`), so the
    methods of a program share one copy of their packed weights instead of one per method.

    Each of `decode` and `prefill` holds its own XNNPACK delegate over the same weights, and without the
    cache each delegate packs them again: a RecurrentGemma-2B int4 program settled at 4.50 GiB with both
    methods loaded, 2.84 GiB with the cache (peak while loading 6.16 -> 4.49 GiB), with byte-identical
    logits (notes/executorch.md). Entries are keyed by the weights' content hash (the serializer names
    them by sha256), so programs loaded side by side cannot mix their weights, and they are freed with
    the program. Returns whether the cache is on (False, logged, where this ExecuTorch lacks the option:
    only memory differs)."""
    return set_weight_cache(True)


def set_weight_cache(enabled: bool) -> bool:
    """Sets XNNPACK's `weight_cache_enabled` for programs loaded from now on and reads it back; whether it
    now reads `enabled`."""
    try:
        import executorch
        from executorch.extension.pybindings import portable_lib  # noqa: F401 - loads and registers XnnpackBackend

        lib = ctypes.CDLL(str(Path(list(executorch.__path__)[0]) / "lib" / "libexecutorch.so"))
        set_option, get_option = getattr(lib, _SET_OPTION), getattr(lib, _GET_OPTION)
    except (OSError, AttributeError, IndexError) as exc:
        log.warning("ExecuTorch: XNNPACK's weight cache option not found (%s); each method packs its own weights",
                    exc)
        return False
    for f in (set_option, get_option):
        f.restype, f.argtypes = ctypes.c_uint32, [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    option = _BackendOption(key=b"weight_cache_enabled", index=0)  # index 0: the bool alternative
    option.value[0] = int(enabled)
    error = set_option(b"XnnpackBackend", ctypes.addressof(option), 1)
    back = _BackendOption(key=b"weight_cache_enabled", index=0)
    read = get_option(b"XnnpackBackend", ctypes.addressof(back), 1)
    if error or read or back.index != 0 or back.value[0] != int(enabled):
        log.warning("ExecuTorch: XNNPACK's weight_cache_enabled could not be set to %s (set_option error %d, "
                    "read back error %d, alternative %d, value %d)", enabled, error, read, back.index,
                    back.value[0])
        return False
    return True


class ExecuTorchRunner(Runner):
    """Runs a `.pte` from this backend in ExecuTorch's Python runtime (`executorch.runtime`)."""

    def __init__(self, path: Path, prefill_chunk: int, state_names: Sequence[str], data_path: Path | None = None):
        """`data_path`: the `.ptd` holding named data the program keeps outside the `.pte` (int4's shared table)."""
        from executorch.runtime import Runtime

        self.path = Path(path)
        self.prefill_chunk = prefill_chunk
        self.state_names = list(state_names)
        share_packed_weights()
        self._program = Runtime.get().load_program(self.path, data_path=data_path)
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
