"""What a model costs on device: parameters, the fixed-size decode state, and a transformer's KV cache.

A transformer's KV cache grows with every token: 2 (K and V) x layers x kv_heads x head_dim x bytes per
token. Griffin's state does not grow: RG-LRU and Conv1D state per recurrent block, and a ring buffer of
`window` keys and values per attention block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rgexport.config import GriffinConfig
from rgexport.model import state_spec

# Gemma-2B (Gemma 1, 2B) from its public config: 18 layers, 8 query heads, 1 K/V head of 256.
GEMMA_2B = {"name": "gemma-2b", "layers": 18, "kv_heads": 1, "head_dim": 256}


@dataclasses.dataclass(frozen=True)
class KVCacheComparison:
    name: str
    bytes_per_token: int

    def at(self, tokens: int) -> int:
        return self.bytes_per_token * tokens


def transformer_of_same_width(config: GriffinConfig, bytes_per_element: int = 4) -> KVCacheComparison:
    """A multi-head transformer with the same width and depth, every layer global attention."""
    return KVCacheComparison(
        f"transformer, width {config.width}, {config.num_layers} layers (MHA)",
        2 * config.num_layers * config.width * bytes_per_element,
    )


def gemma_2b(bytes_per_element: int = 4) -> KVCacheComparison:
    g = GEMMA_2B
    return KVCacheComparison("Gemma-2B (18 layers, MQA, head 256)",
                             2 * g["layers"] * g["kv_heads"] * g["head_dim"] * bytes_per_element)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def model_info(config: GriffinConfig) -> dict:
    """Everything `rgexport info` prints, as data."""
    specs = state_spec(config)
    total = sum(s.nbytes for s in specs)
    comparisons = [transformer_of_same_width(config), gemma_2b()]
    return {
        "config": config.to_dict(),
        "parameters": config.num_parameters(),
        "weights_bytes_fp32": 4 * config.num_parameters(),
        "state": [s.to_dict() for s in specs],
        "state_total_bytes": total,
        "state_by_kind": {
            kind: sum(s.nbytes for s in specs if s.kind == kind) for kind in ("rg_lru", "conv1d", "keys", "values")
        },
        "kv_cache_comparison": [
            {"model": c.name, "bytes_per_token": c.bytes_per_token,
             "at_tokens": {str(n): c.at(n) for n in (2048, 8192, 32768)}}
            for c in comparisons
        ],
    }


def describe_path(path: Path) -> dict:
    """`rgexport info PATH`: a file one backend reads alone (a .onnx graph: the backend's summary of it,
    `Backend.describe_file`), else an artifact folder or its manifest.json (the manifest)."""
    from rgexport.backends import Backend, backend_for_file
    from rgexport.errors import RgexportError
    from rgexport.manifest import read_manifest

    path = Path(path)
    backend = None if path.is_dir() or path.suffix.lower() in ("", ".json") else backend_for_file(path)
    if backend is not None and type(backend).describe_file is not Backend.describe_file:
        if not path.is_file():
            raise RgexportError(f"{path} does not exist")
        data = backend.describe_file(path)
        if data is not None:
            return data
    _, data = read_manifest(path)
    return data
