"""The LiteRT artifact on a device: one signature runner per method.

Standalone: the standard library, numpy and ai_edge_litert, nothing from rgexport and no torch, so
`rgexport/emulate/device_runner.py` can load it by path (the registry's `device_modules()`, from
`Backend.device_module`) on a machine with only the runtime, e.g. the emulated aarch64 device. It defines
`METHODS`: the class that loads an artifact from its manifest and calls one method with
{contract name: array} -> {name: array}. `ContractError` comes from the runner that loads this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rgexport_device_runner import ContractError


def _identifier(tensor: dict) -> str:
    """The name a runtime that forbids dots uses: `identifier`, `litert_name` in older bundles, else the name."""
    return tensor.get("identifier", tensor.get("litert_name", tensor["name"]))


class LiteRTMethods:
    """One LiteRT signature runner per method; contract names map to `identifier` when given (`litert_name`
    in bundles built before it)."""

    runtime = "ai-edge-litert"

    def __init__(self, folder: Path, manifest: dict, threads: int, **options: object):
        if options:
            raise ContractError(f"{type(self).runtime} takes no option {', '.join(sorted(options))}")
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


METHODS = LiteRTMethods
