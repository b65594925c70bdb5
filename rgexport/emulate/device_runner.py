#!/usr/bin/env python3
"""Runs an rgexport artifact from its manifest.json alone, the way a third-party program on a device would.

    python device_runner.py ARTIFACT_DIR TOKENS.npy OUT.npz [--threads N] [--greedy K] [--ort-format]

Reads `manifest.json` in ARTIFACT_DIR and drives the artifact in its runtime (`manifest["backend"]`:
onnx -> onnxruntime, tflite -> ai_edge_litert.interpreter, executorch -> executorch.runtime) using only
the I/O contract in `manifest["io"]`: method names, input and output names, shapes and dtypes, the state
tensors with their input/output names (placement "io") or the `reset`/`read_state` methods (placement
"internal"), and `prefill_chunk`. TOKENS.npy holds n token ids (any integer dtype, shape [n]).

From position 0 it prefills the first `prefill_chunk` tokens (when n >= chunk > 1), then decodes the
rest one at a time, feeding each call's new state back, and writes to OUT.npz:
  logits        [n, vocab] float32, one row per input token
  state.<name>  the final state, per state tensor, where the runtime exposes it
  greedy        [K] int32 with --greedy K: greedy continuation of the first `prefill_chunk` tokens
  info          a JSON string: runtime and version, machine, seconds spent loading, prefilling and
                decoding (mean per token), the files it ran

This file is deliberately standalone: the standard library, numpy and the artifact's runtime, nothing
from rgexport and no torch (except that ExecuTorch's Python runtime takes torch tensors), so it can be
copied next to an artifact and run on any machine that has the runtime, e.g. an emulated aarch64 one
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


def _identifier(tensor: dict) -> str:
    """The name a runtime that forbids dots uses: `identifier`, `litert_name` in older bundles, else the name."""
    return tensor.get("identifier", tensor.get("litert_name", tensor["name"]))


# Runtimes: each loads the artifact and calls one method with {contract name: array} -> {name: array}.
class OnnxRuntimeMethods:
    """One ONNX Runtime session per method; tensors are addressed by their contract names."""

    runtime = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict, threads: int, ort_format: bool = False):
        import onnxruntime as ort

        self.version = ort.__version__
        io, facts = manifest["io"], manifest.get("backend_facts") or {}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.files = {}
        self.sessions = {}
        for method in ("decode", "prefill"):
            spec = io["methods"][method]
            key = "ort_file" if ort_format else "file"
            name = spec.get(key) or (facts.get("onnx_ort_files" if ort_format else "onnx_files") or {}).get(method)
            if name is None:
                raise ContractError(
                    f"the manifest names no {'ORT-format ' if ort_format else ''}file for method {method} "
                    f"(io.methods.{method}.{key} or backend_facts.{'onnx_ort_files' if ort_format else 'onnx_files'})"
                )
            path = folder / name
            if not path.is_file():
                raise ContractError(f"{path} (method {method}) does not exist")
            self.files[method] = name
            self.sessions[method] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            got_in = [i.name for i in self.sessions[method].get_inputs()]
            got_out = [o.name for o in self.sessions[method].get_outputs()]
            want_in = [t["name"] for t in spec["inputs"]]
            want_out = [t["name"] for t in spec["outputs"]]
            if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
                raise ContractError(f"{name} has inputs {got_in} and outputs {got_out}; the manifest says "
                                    f"{want_in} and {want_out}")
        self.outputs = {m: [t["name"] for t in io["methods"][m]["outputs"]] for m in self.sessions}

    def methods(self) -> set[str]:
        return set(self.sessions)

    def call(self, method: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.sessions[method].run(self.outputs[method], feeds)
        return dict(zip(self.outputs[method], values))


class LiteRTMethods:
    """One LiteRT signature runner per method; contract names map to `identifier` when given (`litert_name`
    in bundles built before it)."""

    runtime = "ai-edge-litert"

    def __init__(self, folder: Path, manifest: dict, threads: int):
        from ai_edge_litert import interpreter as litert

        try:
            from importlib.metadata import version

            self.version = version("ai-edge-litert")
        except Exception:  # noqa: BLE001 - metadata is optional here (e.g. a copied site dir)
            self.version = getattr(litert, "__version__", "unknown")
        path = folder / manifest["artifact"]["file"]
        if not path.is_file():
            raise ContractError(f"{path} does not exist")
        self.files = {"model": manifest["artifact"]["file"]}
        self.interpreter = litert.Interpreter(model_path=str(path), num_threads=threads)
        available = set(self.interpreter.get_signature_list())
        self.runners = {}
        self.names = {}  # method -> (inputs {contract: litert}, outputs {contract: litert})
        for method, spec in manifest["io"]["methods"].items():
            signature = spec.get("signature", method)
            if signature not in available:
                if method in ("decode", "prefill"):
                    raise ContractError(f"{path.name} has no signature {signature!r} (it has {sorted(available)})")
                continue
            runner = self.interpreter.get_signature_runner(signature)
            names_in = {t["name"]: _identifier(t) for t in spec["inputs"]}
            names_out = {t["name"]: _identifier(t) for t in spec["outputs"]}
            got_in, got_out = set(runner.get_input_details()), set(runner.get_output_details())
            if set(names_in.values()) != got_in or set(names_out.values()) != got_out:
                raise ContractError(
                    f"signature {signature}: inputs {sorted(got_in)} and outputs {sorted(got_out)}, the manifest "
                    f"says {sorted(names_in.values())} and {sorted(names_out.values())} (identifier)"
                )
            self.runners[method] = runner
            self.names[method] = (names_in, names_out)

    def methods(self) -> set[str]:
        return set(self.runners)

    def call(self, method: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names_in, names_out = self.names[method]
        out = self.runners[method](**{names_in[k]: v for k, v in feeds.items()})
        # Copies: the runner's arrays may be views into the interpreter's arena.
        return {k: np.array(out[v], copy=True) for k, v in names_out.items()}


class ExecuTorchMethods:
    """ExecuTorch's Python runtime; inputs and outputs are positional, in the contract's order."""

    runtime = "executorch"

    def __init__(self, folder: Path, manifest: dict, threads: int):
        import torch  # ExecuTorch's Python bindings take and return torch tensors
        from executorch.runtime import Runtime

        self.torch = torch
        try:
            from importlib.metadata import version

            self.version = version("executorch")
        except Exception:  # noqa: BLE001
            self.version = "unknown"
        torch.set_num_threads(threads)
        path = folder / manifest["artifact"]["file"]
        if not path.is_file():
            raise ContractError(f"{path} does not exist")
        self.files = {"program": manifest["artifact"]["file"]}
        self.specs = manifest["io"]["methods"]
        program = Runtime.get().load_program(path)
        wanted = [m for m in self.specs if m in program.method_names]
        if not {"decode", "prefill"} <= set(wanted):
            raise ContractError(f"{path.name} has methods {sorted(program.method_names)}, needs decode and prefill")
        # Load every method before running any (loading one re-initialises shared mutable state).
        self.loaded = {m: program.load_method(m) for m in wanted}

    def methods(self) -> set[str]:
        return set(self.loaded)

    def call(self, method: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[method]
        args = [self.torch.from_numpy(np.ascontiguousarray(feeds[t["name"]])) for t in spec["inputs"]]
        # A method that returns nothing (reset) yields one None output.
        out = [v for v in self.loaded[method].execute(args) if v is not None]
        if len(out) != len(spec["outputs"]):
            raise ContractError(f"method {method} returned {len(out)} outputs, the manifest lists "
                                f"{len(spec['outputs'])}")
        return {t["name"]: np.array(v.numpy(), copy=True) for t, v in zip(spec["outputs"], out)}


# The driver: everything below uses only the contract ------------------------------------------------
class ArtifactDriver:
    """Decode/prefill with the state carried as the manifest says, from position 0."""

    def __init__(self, folder: str | Path, threads: int = 1, ort_format: bool = False, on_tokens=None):
        self.folder = Path(folder)
        self.on_tokens = on_tokens or (lambda n: None)  # called with the number of tokens each call consumed
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ContractError(f"{self.folder} has no {MANIFEST}")
        self.manifest = json.loads(path.read_text())
        self.io = self.manifest["io"]
        backend = self.manifest["backend"]
        start = time.perf_counter()
        if backend == "onnx":
            self.rt = OnnxRuntimeMethods(self.folder, self.manifest, threads, ort_format)
        elif backend == "tflite":
            self.rt = LiteRTMethods(self.folder, self.manifest, threads)
        elif backend == "executorch":
            self.rt = ExecuTorchMethods(self.folder, self.manifest, threads)
        else:
            raise ContractError(f"backend {backend!r} has no runtime in this program (onnx, tflite, executorch)")
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
    args = parser.parse_args(argv)
    on_tokens = (lambda n: print(f"@progress {n}", flush=True)) if args.progress else None
    try:
        tokens = [int(t) for t in np.load(args.tokens).reshape(-1)]
        driver = ArtifactDriver(args.artifact, threads=args.threads, ort_format=args.ort_format,
                               on_tokens=on_tokens)
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
