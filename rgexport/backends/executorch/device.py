"""The ExecuTorch program on a device, through ExecuTorch's Python runtime.

Standalone: the standard library, numpy and executorch.runtime, nothing from rgexport (torch only inside
the class: ExecuTorch's Python bindings take torch tensors), so
`rgexport/emulate/device_runner.py` can load it by path (the registry's `device_modules()`, from
`Backend.device_module`) on a machine with only the runtime, e.g. the emulated aarch64 device. It defines
`METHODS`: the class that loads an artifact from its manifest and calls one method with
{contract name: array} -> {name: array}. `ContractError` comes from the runner that loads this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rgexport_device_runner import ContractError


class ExecuTorchMethods:
    """ExecuTorch's Python runtime; inputs and outputs are positional, in the contract's order."""

    runtime = "executorch"

    def __init__(self, folder: Path, manifest: dict, threads: int, **options: object):
        if options:
            raise ContractError(f"{type(self).runtime} takes no option {', '.join(sorted(options))}")
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
        data = manifest.get("backend_facts", {}).get("data_file")  # the .ptd of a shared table, if any
        if data:
            if not (folder / data).is_file():
                raise ContractError(f"{folder / data} does not exist")
            self.files["data"] = data
        self.specs = manifest["io"]["methods"]
        program = Runtime.get().load_program(path, data_path=folder / data if data else None)
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


METHODS = ExecuTorchMethods
