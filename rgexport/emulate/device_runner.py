#!/usr/bin/env python3
"""Runs an rgexport artifact from its manifest.json alone, the way a third-party program on a device would.

    python device_runner.py ARTIFACT_DIR TOKENS.npy OUT.npz [--threads N] [--greedy K] [--ort-format]
                            [--runtime BACKEND=PATH ...]

Reads `manifest.json` in ARTIFACT_DIR and drives the artifact in its runtime (`manifest["backend"]`, looked
up in a table of device modules: `--runtime BACKEND=PATH`, by default each `backends/<name>/device.py` of
the rgexport tree this file sits in) using only the I/O contract in `manifest["io"]`: method names,
input and output names, shapes and dtypes, the state tensors with their input/output names (placement
"io") or the `reset`/`read_state` methods (placement "internal"), and `prefill_chunk`. TOKENS.npy holds
n token ids (any integer dtype, shape [n]).

From position 0 it prefills the first `prefill_chunk` tokens (when n >= chunk > 1), then decodes the
rest one at a time, feeding each call's new state back, and writes to OUT.npz:
  logits        [n, vocab] float32, one row per input token
  state.<name>  the final state, per state tensor, where the runtime exposes it
  greedy        [K] int32 with --greedy K: greedy continuation of the first `prefill_chunk` tokens
  info          a JSON string: runtime and version, machine, seconds spent loading, prefilling and
                decoding (mean per token), the files it ran

This file is deliberately standalone: the standard library, numpy and the artifact's runtime (through the
backend's device module, itself standalone), nothing from rgexport and no torch (except that ExecuTorch's
Python runtime takes torch tensors), so it can be copied next to an artifact with the device module of its
backend (`--runtime`) and run on any machine that has the runtime, e.g. an emulated aarch64 one
(`rgexport validate --device emulated-arm64`). Exit status 0 on success, 2 on a contract problem.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


class ContractError(Exception):
    """The manifest does not say something this program needs, or the artifact disagrees with it."""


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        raise ContractError(f"unknown dtype {name!r} in the manifest") from None


# Runtimes: one module per backend, in the backend's package (`rgexport/backends/<name>/device.py`), loaded by
# path. Each defines METHODS, a class that loads the artifact (folder, manifest, threads, **options) and calls
# one method with {contract name: array} -> {name: array}; it raises this module's ContractError, which it
# imports under RUNNER_MODULE.
RUNNER_MODULE = "rgexport_device_runner"
sys.modules.setdefault(RUNNER_MODULE, sys.modules[__name__])
DEVICE_MODULE = "device.py"


def default_runtimes() -> dict[str, Path]:
    """backend -> its device module, where this file sits in an rgexport tree (backends/<name>/device.py)."""
    backends = Path(__file__).resolve().parents[1] / "backends"
    return {p.parent.name: p for p in sorted(backends.glob(f"*/{DEVICE_MODULE}"))}


def load_methods(backend: str, path: Path) -> type:
    """The METHODS class of the device module at `path`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"rgexport_device_{backend}", path)
    if spec is None or spec.loader is None or not Path(path).is_file():
        raise ContractError(f"the {backend} runtime module {path} does not exist")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.METHODS


# The driver: everything below uses only the contract ------------------------------------------------
class ArtifactDriver:
    """Decode/prefill with the state carried as the manifest says, from position 0."""

    def __init__(self, folder: str | Path, threads: int = 1, ort_format: bool = False, on_tokens=None,
                 runtimes: dict[str, Path] | None = None):
        self.folder = Path(folder)
        self.on_tokens = on_tokens or (lambda n: None)  # called with the number of tokens each call consumed
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ContractError(f"{self.folder} has no {MANIFEST}")
        self.manifest = json.loads(path.read_text())
        self.io = self.manifest["io"]
        backend = self.manifest["backend"]
        runtimes = default_runtimes() if runtimes is None else runtimes
        if backend not in runtimes:
            raise ContractError(f"backend {backend!r} has no runtime in this program ({', '.join(sorted(runtimes))})")
        methods = load_methods(backend, runtimes[backend])
        start = time.perf_counter()
        self.rt = methods(self.folder, self.manifest, threads, **({"ort_format": True} if ort_format else {}))
        self.load_seconds = time.perf_counter() - start
        self.chunk = int(self.io["prefill_chunk"])
        self.placement = self.io["state"]["placement"]
        self.state_tensors = self.io["state"]["tensors"]
        self.state_inputs = {t["input"] for t in self.state_tensors} if self.placement == "io" else set()
        self._calls: dict[str, tuple[str, dict, dict]] = {}
        for method in ("decode", "prefill"):
            spec = self.io["methods"][method]
            others = [t for t in spec["inputs"] if t["name"] not in self.state_inputs]
            position = [t for t in others if t["name"] == "position"]
            tokens = [t for t in others if t["name"] != "position"]
            if len(position) != 1 or len(tokens) != 1:
                raise ContractError(f"method {method}: expected one token input and one 'position' input besides "
                                    f"the state, found {[t['name'] for t in others]}")
            logits = [t for t in spec["outputs"] if t["name"] == "logits"]
            if len(logits) != 1:
                raise ContractError(f"method {method} has no output named 'logits'")
            self._calls[method] = (spec, tokens[0], position[0])
        self.vocab = int(self._calls["decode"][0]["outputs"][0]["shape"][-1])
        self.state: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        if self.placement == "io":
            self.state = {t["input"]: np.zeros(t["shape"], _dtype(t["dtype"])) for t in self.state_tensors}
        elif "reset" in self.rt.methods():
            self.rt.call("reset", {})
        # Otherwise position 0 starts a new sequence by contract.

    def _run(self, method: str, tokens: list[int], position: int) -> np.ndarray:
        spec, tok, pos = self._calls[method]
        feeds = {
            tok["name"]: np.asarray(tokens, _dtype(tok["dtype"])).reshape(tok["shape"]),
            pos["name"]: np.full(pos["shape"], position, _dtype(pos["dtype"])),
            **self.state,
        }
        out = self.rt.call(method, feeds)
        self.on_tokens(len(tokens))
        if self.placement == "io":
            self.state = {t["input"]: out[t["output"]] for t in self.state_tensors}
        return np.asarray(out["logits"], np.float32).reshape(-1, self.vocab)

    def decode(self, token: int, position: int) -> np.ndarray:
        return self._run("decode", [token], position)[0]

    def prefill(self, tokens: list[int], position: int) -> np.ndarray:
        if len(tokens) != self.chunk:
            raise ContractError(f"prefill takes exactly {self.chunk} tokens, got {len(tokens)}")
        return self._run("prefill", tokens, position)

    def final_state(self) -> dict[str, np.ndarray] | None:
        if self.placement == "io":
            return {t["name"]: self.state[t["input"]] for t in self.state_tensors}
        if "read_state" in self.rt.methods():
            out = self.rt.call("read_state", {})
            return {t["name"]: out[t["name"]] for t in self.state_tensors if t["name"] in out}
        return None

    def teacher_forced(self, tokens: list[int]) -> tuple[np.ndarray, float, float]:
        """Logits [n, v]; seconds in prefill; seconds in decode (wall; CPU seconds in `decode_cpu_seconds`)."""
        self.reset()
        out, start = [], 0
        t_prefill = t_decode = 0.0
        if self.chunk > 1 and len(tokens) >= self.chunk:
            if self.io.get("prefill_logits") == "last":  # the chunk's other rows through decode, as validate does
                out.extend(self.decode(tokens[i], i)[None] for i in range(self.chunk - 1))
                self.reset()
            t = time.perf_counter()
            out.append(self.prefill(tokens[: self.chunk], 0))
            t_prefill = time.perf_counter() - t
            start = self.chunk
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(start, len(tokens)):
            out.append(self.decode(tokens[i], i)[None])
        t_decode = time.perf_counter() - t
        self.decode_cpu_seconds = time.process_time() - cpu
        return np.concatenate(out, axis=0), t_prefill, t_decode

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """Greedy continuation of `prompt` (only the generated steps are reported to `on_tokens`)."""
        report, self.on_tokens = self.on_tokens, (lambda n: None)
        try:
            logits = self.teacher_forced(prompt)[0][-1]
        finally:
            self.on_tokens = report
        out = []
        for i in range(steps):
            token = int(np.argmax(logits))
            out.append(token)
            logits = self.decode(token, len(prompt) + i)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="artifact folder holding manifest.json")
    parser.add_argument("tokens", help=".npy file with the token ids [n]")
    parser.add_argument("out", help=".npz file to write")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    parser.add_argument("--greedy", type=int, default=0, help="also generate K tokens greedily")
    parser.add_argument("--ort-format", action="store_true", help="ONNX: run the .ort files instead of .onnx")
    parser.add_argument("--progress", action="store_true", help="print '@progress N' after each call")
    parser.add_argument("--runtime", action="append", default=[], metavar="BACKEND=PATH",
                        help="the device module of a backend's runtime (repeatable; default: "
                             f"backends/*/{DEVICE_MODULE} beside this program)")
    args = parser.parse_args(argv)
    on_tokens = (lambda n: print(f"@progress {n}", flush=True)) if args.progress else None
    runtimes = None
    if args.runtime:
        pairs = [r.partition("=") for r in args.runtime]
        if any(not sep or not name for name, sep, _ in pairs):
            parser.error("--runtime takes BACKEND=PATH")
        runtimes = {name: Path(path) for name, _, path in pairs}
    try:
        tokens = [int(t) for t in np.load(args.tokens).reshape(-1)]
        driver = ArtifactDriver(args.artifact, threads=args.threads, ort_format=args.ort_format,
                                on_tokens=on_tokens, runtimes=runtimes)
        if any(not 0 <= t < driver.vocab for t in tokens):
            raise ContractError(f"token ids must lie in [0, {driver.vocab})")
        logits, t_prefill, t_decode = driver.teacher_forced(tokens)
        decode_cpu = driver.decode_cpu_seconds  # before greedy's own teacher_forced overwrites it
        arrays = {"logits": logits}
        for name, value in (driver.final_state() or {}).items():
            arrays[f"state.{name}"] = np.asarray(value, np.float32)
        if args.greedy:
            arrays["greedy"] = np.asarray(driver.greedy(tokens[: driver.chunk], args.greedy), np.int32)
    except ContractError as e:
        print(f"device_runner: {e}", file=sys.stderr)
        return 2
    decoded = len(tokens) - (driver.chunk if driver.chunk > 1 and len(tokens) >= driver.chunk else 0)
    info = {
        "runtime": driver.rt.runtime,
        "runtime_version": driver.rt.version,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "files": driver.rt.files,
        "threads": args.threads,
        "tokens": len(tokens),
        "load_seconds": driver.load_seconds,
        "prefill_seconds": t_prefill,
        "decode_seconds": t_decode,
        "decode_seconds_per_token": t_decode / decoded if decoded else None,
        # CPU time of this process (all its threads; under qemu, the emulator's): steadier than wall time
        # on a shared machine.
        "decode_cpu_seconds_per_token": decode_cpu / decoded if decoded else None,
    }
    arrays["info"] = np.array(json.dumps(info))
    np.savez(args.out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
