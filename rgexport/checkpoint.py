"""Checkpoints: Hugging Face folders and DeepMind `recurrentgemma` state dicts, into our Griffin.

Formats:
- Hugging Face: a folder with `config.json` (model_type recurrent_gemma), `model.safetensors` or shards
  listed in `model.safetensors.index.json`, and `tokenizer.model` (SentencePiece).
- DeepMind: a state-dict file of `recurrentgemma.torch.Griffin` (`.pt`/`.pth` via
  `torch.load(weights_only=True)`, or `.safetensors`) plus a preset name for what the tensors cannot say
  (attention window, logit soft-cap, embedding scaling).
Weights load only through safetensors or `torch.load(weights_only=True)`: never pickled code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from rgexport.config import GriffinConfig, get_preset
from rgexport.errors import CheckpointError, RgexportError
from rgexport.model import Griffin

Transform = Callable[[torch.Tensor], torch.Tensor]
def _IDENTITY(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclasses.dataclass
class Checkpoint:
    """A loaded model with where it came from."""

    model: Griffin
    config: GriffinConfig
    source: str  # path as given
    format: str  # "huggingface" | "deepmind"
    digest: str  # sha256 over the weight files, in name order
    tokenizer_path: Path | None
    chat_template: Any = None  # rgexport.templates.ChatTemplate, for a checkpoint that carries one


# Name maps: (our name pattern, their name template, ours->theirs, theirs->ours). `{i}` is the block index.
_HF_RULES: list[tuple[str, str, Transform, Transform]] = [
    (r"embedder\.input_embedding", "model.embed_tokens.weight", _IDENTITY, _IDENTITY),
    (r"final_norm\.scale", "model.final_norm.weight", _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.temporal_pre_norm\.scale", "model.layers.{i}.temporal_pre_norm.weight", _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.channel_pre_norm\.scale", "model.layers.{i}.channel_pre_norm.weight", _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.recurrent_block\.(linear_[xy]|linear_out)\.(weight|bias)",
     "model.layers.{i}.temporal_block.{1}.{2}", _IDENTITY, _IDENTITY),
    # HF keeps the Conv1D as a depthwise nn.Conv1d: weight [l, 1, tw] with w_hf[c, 0, k] = w[k, c].
    (r"blocks\.(\d+)\.recurrent_block\.conv_1d\.w", "model.layers.{i}.temporal_block.conv_1d.weight",
     lambda t: t.t().unsqueeze(1).contiguous(), lambda t: t[:, 0, :].t().contiguous()),
    (r"blocks\.(\d+)\.recurrent_block\.conv_1d\.b", "model.layers.{i}.temporal_block.conv_1d.bias",
     _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.recurrent_block\.rg_lru\.a_param", "model.layers.{i}.temporal_block.rg_lru.recurrent_param",
     _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.recurrent_block\.rg_lru\.input_gate\.w",
     "model.layers.{i}.temporal_block.rg_lru.input_gate_weight", _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.recurrent_block\.rg_lru\.input_gate\.b",
     "model.layers.{i}.temporal_block.rg_lru.input_gate_bias", _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.recurrent_block\.rg_lru\.a_gate\.w",
     "model.layers.{i}.temporal_block.rg_lru.recurrent_gate_weight", _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.recurrent_block\.rg_lru\.a_gate\.b",
     "model.layers.{i}.temporal_block.rg_lru.recurrent_gate_bias", _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.attention_block\.proj_q\.weight", "model.layers.{i}.temporal_block.q_proj.weight",
     _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.attention_block\.proj_k\.weight", "model.layers.{i}.temporal_block.k_proj.weight",
     _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.attention_block\.proj_v\.weight", "model.layers.{i}.temporal_block.v_proj.weight",
     _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.attention_block\.proj_final\.(weight|bias)", "model.layers.{i}.temporal_block.o_proj.{1}",
     _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.mlp_block\.ffw_gate\.(weight|bias)", "model.layers.{i}.mlp_block.gate_proj.{1}",
     _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.mlp_block\.ffw_up\.(weight|bias)", "model.layers.{i}.mlp_block.up_proj.{1}",
     _IDENTITY, _IDENTITY),
    (r"blocks\.(\d+)\.mlp_block\.ffw_down\.(weight|bias)", "model.layers.{i}.mlp_block.down_proj.{1}",
     _IDENTITY, _IDENTITY),
]


def _rename(name: str, rules: list[tuple[str, str, Transform, Transform]]) -> tuple[str, Transform, Transform]:
    for pattern, template, fwd, bwd in rules:
        m = re.fullmatch(pattern, name)
        if m:
            groups = m.groups()
            i = groups[0] if groups else ""
            return template.format(*groups, i=i), fwd, bwd
    raise KeyError(name)


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names and layouts -> Hugging Face RecurrentGemmaForCausalLM's (lm_head tied)."""
    out = {}
    for name, tensor in state_dict.items():
        hf_name, fwd, _ = _rename(name, _HF_RULES)
        out[hf_name] = fwd(tensor)
    return out


def _hf_expected(config: GriffinConfig) -> dict[str, tuple[str, Transform]]:
    """HF name -> (our name, their->ours transform) for every parameter of `config`."""
    expected = {}
    for name in _meta_model(config).state_dict():
        hf_name, _, bwd = _rename(name, _HF_RULES)
        expected[hf_name] = (name, bwd)
    return expected


# DeepMind's names equal ours except the MLP, which DeepMind holds as one Einsum (gate and up stacked).
def to_deepmind_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names and layouts -> `recurrentgemma.torch.Griffin`'s."""
    out = {}
    for name, tensor in state_dict.items():
        m = re.fullmatch(r"(blocks\.\d+\.mlp_block)\.ffw_(gate|up)\.(weight|bias)", name)
        if not m:
            out[name] = tensor
            continue
        prefix = m.group(1)
        if m.group(2) == "up":
            continue
        gate_w, up_w = state_dict[f"{prefix}.ffw_gate.weight"], state_dict[f"{prefix}.ffw_up.weight"]
        gate_b, up_b = state_dict[f"{prefix}.ffw_gate.bias"], state_dict[f"{prefix}.ffw_up.bias"]
        if m.group(3) == "weight":
            out[f"{prefix}.ffw_up.w"] = torch.stack([gate_w.t(), up_w.t()])
        else:
            out[f"{prefix}.ffw_up.b"] = torch.stack([gate_b, up_b])[:, None, None, :]
    return out


def from_deepmind_state_dict(dm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in dm.items():
        m = re.fullmatch(r"(blocks\.\d+\.mlp_block)\.ffw_up\.(w|b)", name)
        if not m:
            out[name] = tensor
            continue
        prefix = m.group(1)
        if m.group(2) == "w":
            out[f"{prefix}.ffw_gate.weight"] = tensor[0].t()
            out[f"{prefix}.ffw_up.weight"] = tensor[1].t()
        else:
            out[f"{prefix}.ffw_gate.bias"] = tensor[0].reshape(-1)
            out[f"{prefix}.ffw_up.bias"] = tensor[1].reshape(-1)
    return out


def _meta_model(config: GriffinConfig) -> Griffin:
    with torch.device("meta"):
        return Griffin(config)


def _check_and_build(
    config: GriffinConfig, tensors: dict[str, torch.Tensor], source: str
) -> Griffin:
    """Checks names and shapes against `config`, then builds the model without a second full copy."""
    check_fits_in_memory(config, source)
    expected = {k: v.shape for k, v in _meta_model(config).state_dict().items()}
    not_tensors = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{source}: entry {not_tensors[0]!r} is a {type(tensors[not_tensors[0]]).__name__}, "
                              "not a tensor; expected a state dict of tensors")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(
            f"{source}: missing {len(missing)} tensor(s) the config needs, first {missing[:3]}. "
            "Check that the checkpoint and its config (or preset) describe the same model."
        )
    if extra:
        raise CheckpointError(
            f"{source}: {len(extra)} unexpected tensor(s), first {extra[:3]}. "
            "Check that the checkpoint and its config (or preset) describe the same model."
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(tensors[name].shape)} but the config needs "
                f"{list(shape)}. Check that the checkpoint and its config (or preset) describe the same model."
            )
    for name in expected:
        check_weights(name, tensors[name], source)
    model = _meta_model(config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, assign=True)
    model.materialize_buffers()
    return model.eval()


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_weights(name: str, tensor: torch.Tensor, source: str) -> None:
    """Refuses a weight that is not bf16/fp16/fp32, or holds NaN or infinity (checked in slices, so no
    full-size temporary is made for a large embedding table)."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{source}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, expected "
                              "bfloat16, float16 or float32 weights; convert the checkpoint's weights to a float type")
    if tensor.is_meta:  # a streamed checkpoint's shape check: no values yet (checked as each part loads)
        return
    flat = tensor.reshape(-1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        if not bool(torch.isfinite(part).all()):
            bad = int((~torch.isfinite(part)).nonzero()[0]) + start
            value = float(flat[bad])
            raise CheckpointError(f"{source}: tensor {name} holds {value} (element {bad:,}): the checkpoint is "
                                  "corrupt or diverged in training; use another checkpoint")


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(config: GriffinConfig, source: str) -> None:
    """Refuses, before anything is allocated, a model whose float32 weights exceed this machine's memory."""
    need = 4 * config.num_parameters()
    have = physical_memory_bytes()
    if have and need > have:
        raise CheckpointError(f"{source}: {config.num_parameters():,} parameters need {need / 2**30:.1f} GiB in "
                              f"float32, more than this machine's {have / 2**30:.1f} GiB of memory; check the "
                              "config, or use a machine with more memory")


def _sha256_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _read_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in paths:
        try:
            out.update(load_file(str(p)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"Cannot read safetensors file {p}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the format parser on a damaged file: one line naming it
            raise CheckpointError(f"Cannot read safetensors file {p}: {type(e).__name__}: {e}") from None
    return out


def hf_folder(path: str | Path) -> tuple[GriffinConfig, list[Path]]:
    """A Hugging Face RecurrentGemma folder's config and weight files (one file, or the shards its
    `model.safetensors.index.json` names, each inside the folder); an error naming what is wrong."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; expected a Hugging Face RecurrentGemma folder")
    config = GriffinConfig.from_hf_config(config_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        from rgexport.safety import contained

        files = sorted({contained(folder, f, f"{index}: weight_map shard") for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {absent}")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{folder} has no *.safetensors weights (pickled .bin weights are not loaded: convert them "
                "with transformers' save_pretrained(safe_serialization=True))"
            )
    return config, files


def load_huggingface(path: str | Path) -> Checkpoint:
    """Loads a Hugging Face RecurrentGemma folder."""
    folder = Path(path)
    config, files = hf_folder(folder)
    hf = _read_safetensors(files)
    hf.pop("lm_head.weight", None)  # tied to the embedding
    expected = _hf_expected(config)
    ours = {}
    for hf_name, tensor in hf.items():
        if hf_name in expected:
            name, bwd = expected[hf_name]
            ours[name] = bwd(tensor)
        else:
            ours[hf_name] = tensor  # reported as unexpected by _check_and_build
    # Report missing tensors under their Hugging Face names.
    missing = sorted(set(expected) - set(hf))
    if missing:
        raise CheckpointError(
            f"{folder}: missing {len(missing)} tensor(s) that config.json implies, first {missing[:3]}"
        )
    model = _check_and_build(config, ours, str(folder))
    tokenizer = folder / "tokenizer.model"
    from rgexport.templates import load_chat_template

    return Checkpoint(model, config, str(folder), "huggingface", _sha256_files(files),
                      tokenizer if tokenizer.is_file() else None, load_chat_template(folder))


def load_deepmind(path: str | Path, preset: str, tokenizer: str | Path | None = None) -> Checkpoint:
    """Loads a `recurrentgemma.torch.Griffin` state-dict file; the preset supplies what tensors cannot say."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"Checkpoint file {file} does not exist")
    base = get_preset(preset)  # an unknown preset is refused before the file is read
    if file.suffix == ".safetensors":
        dm = _read_safetensors([file])
    else:
        try:
            try:
                dm = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                dm = torch.load(file, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
        except Exception as e:  # noqa: BLE001 - a damaged user file: one line naming it
            from rgexport.safety import first_line, sentence

            text = str(e)
            if re.search(r"unsupported global|allowed global", text, re.IGNORECASE):
                # torch's message goes on to suggest weights_only=False, which would run the file's code: never.
                found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
                what = f" ({found.group(1)})" if found else ""
                raise CheckpointError(
                    f"{file} holds pickled objects other than tensors{what}, which rgexport never loads (unpickling "
                    "them can run code); save the weights alone (torch.save(model.state_dict(), ...)) or as "
                    ".safetensors"
                ) from None
            found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
            detail = found.group(1) if found else first_line(e)
            if "weights_only" in detail or "Weights only" in detail:
                detail = type(e).__name__
            raise CheckpointError(
                f"Cannot read {file} as a state dict with torch.load(weights_only=True): {sentence(detail)}; "
                "expected a file written by torch.save(state_dict) or a .safetensors file"
            ) from None
        if not isinstance(dm, dict):
            raise CheckpointError(f"{file} holds a {type(dm).__name__}, expected a state dict")
        if not all(isinstance(k, str) for k in dm):
            raise CheckpointError(f"{file}: state dict keys must be tensor names (strings)")
    emb = dm.get("embedder.input_embedding")
    if emb is not None and not isinstance(emb, torch.Tensor):
        raise CheckpointError(f"{file}: embedder.input_embedding is a {type(emb).__name__}, not a tensor")
    if emb is not None and emb.dim() != 2:
        raise CheckpointError(f"{file}: embedder.input_embedding has shape {list(emb.shape)}, expected "
                              "[vocabulary, width]")
    try:
        config = base.replace(vocab_size=int(emb.shape[0])) if emb is not None else base
    except RgexportError as e:
        raise CheckpointError(f"{file}: embedder.input_embedding: {e}") from None
    model = _check_and_build(config, from_deepmind_state_dict(dm), str(file))
    tok = Path(tokenizer) if tokenizer else None
    return Checkpoint(model, config, str(file), "deepmind", _sha256_files([file]), tok)


def checkpoint_format(path: str | Path | None, preset: str | None = None) -> tuple[str, Path]:
    """Which reader a checkpoint path needs: ("huggingface", folder) for the shipped model (no path) or a
    Hugging Face folder, ("deepmind", file) for a DeepMind state dict (which needs `preset`). Shared by
    `load_checkpoint` and `rgexport.streaming.stream_checkpoint`, so both read the same things."""
    if path is None:
        from rgexport.assets import shipped_model_dir

        return "huggingface", Path(shipped_model_dir())
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"Checkpoint {p} does not exist")
    if p.is_dir():
        return "huggingface", p
    if preset is None:
        raise RgexportError(
            f"{p} is a single file, read as a DeepMind recurrentgemma state dict, which needs --preset "
            "(e.g. --preset recurrentgemma-2b) for the window and soft-cap that tensors do not record"
        )
    return "deepmind", p


def load_checkpoint(
    path: str | Path | None = None, preset: str | None = None, tokenizer: str | Path | None = None,
) -> Checkpoint:
    """Loads the shipped model (no path), a Hugging Face folder, or a DeepMind state dict (with preset).

    `rgexport.streaming.stream_checkpoint` reads the same formats block by block instead (memory-mapped).
    """
    kind, p = checkpoint_format(path, preset)
    if kind == "deepmind":
        return load_deepmind(p, preset, tokenizer)
    ckpt = load_huggingface(p)
    if tokenizer:
        ckpt.tokenizer_path = Path(tokenizer)
    return ckpt


def save_huggingface(
    model: Griffin, folder: str | Path, tokenizer: str | Path | None = None, max_shard_bytes: int | None = None
) -> Path:
    """Writes `model` as a Hugging Face RecurrentGemma folder that transformers and `load_huggingface` read."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = {k: v.detach().contiguous() for k, v in to_hf_state_dict(model.state_dict()).items()}
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_config(), indent=2) + "\n")
    if max_shard_bytes is None:
        save_file(hf, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in hf.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n"
        )
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return folder


RANDOM_PREFIX = "random:"
SHIPPED_SOURCE = "shipped:tiny"  # the manifest's checkpoint source for the shipped model


def random_checkpoint(preset: str, seed: int = 0) -> Checkpoint:
    """A model of `preset`'s shape with the paper's random initialisation, for sizing and speed work when
    no real weights are at hand. Deterministic in (preset, seed), so validation can rebuild it; the
    shipped tokenizer supplies token ids for validation text."""
    from rgexport.assets import shipped_model_dir
    from rgexport.config import get_preset

    config = get_preset(preset)
    model = _meta_model(config)
    model.to_empty(device="cpu")
    model.materialize_buffers()
    model.reset_parameters_(torch.Generator().manual_seed(seed))
    source = f"{RANDOM_PREFIX}{preset}:seed{seed}"
    digest = hashlib.sha256(source.encode()).hexdigest()
    return Checkpoint(model.eval(), config, source, "random", digest, shipped_model_dir() / "tokenizer.model")


def parse_source(source: str) -> tuple[str, str | None, int | None]:
    """A manifest's checkpoint source -> ("shipped", None, None), ("random", preset, seed) or ("path", path, None)."""
    if source == SHIPPED_SOURCE:
        return "shipped", None, None
    if source.startswith(RANDOM_PREFIX):
        name, _, seed = source[len(RANDOM_PREFIX):].rpartition(":seed")
        return "random", name, int(seed)
    return "path", source, None


def load_source(source: str, preset: str | None = None) -> Checkpoint:
    """Loads what a manifest's checkpoint source names: the shipped model, a random preset, or a path
    (`rgexport.streaming.stream_source` streams it instead)."""
    kind, what, seed = parse_source(source)
    if kind == "shipped":
        return load_checkpoint()
    if kind == "random":
        return random_checkpoint(what, seed)
    return load_checkpoint(source, preset)
