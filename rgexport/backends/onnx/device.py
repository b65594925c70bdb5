"""The ONNX artifact on a device: one ONNX Runtime session per method.

Standalone: the standard library, numpy and onnxruntime, nothing from rgexport and no torch, so
`rgexport/emulate/device_runner.py` can load it by path (the registry's `device_modules()`, from
`Backend.device_module`) on a machine with only the runtime, e.g. the emulated aarch64 device. It defines
`METHODS`: the class that loads an artifact from its manifest and calls one method with
{contract name: array} -> {name: array}. `ContractError` comes from the runner that loads this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rgexport_device_runner import ContractError


class OnnxRuntimeMethods:
    """One ONNX Runtime session per method; tensors are addressed by their contract names."""

    runtime = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict, threads: int, **options: object):
        ort_format = bool(options.pop("ort_format", False))  # the .ort files (ONNX Runtime Mobile)
        if options:
            raise ContractError(f"{type(self).runtime} takes no option {', '.join(sorted(options))}")
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


METHODS = OnnxRuntimeMethods
