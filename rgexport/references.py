"""Two independent reference implementations of Griffin, fed our weights, for parity and validation.

- DeepMind's `recurrentgemma` (its PyTorch half), the authors' own code: our ground truth.
- Hugging Face's `RecurrentGemmaForCausalLM`.

Known differences, each covered by a test:
- HF's attention window counts the current token (it sees q - w + 1 .. q) where DeepMind's sees
  q - w .. q; an HF model built with window w + 1 matches DeepMind's with window w.
- HF does not clear its Conv1D state when a new sequence starts token by token at position 0.
- HF allocates its conv state with hidden_size, so decode fails when lru_width != hidden_size.
- HF's forward does not return its cache: recurrent state lives on modules, attention in a DynamicCache.
Both round sqrt(width) to bfloat16 before scaling the embedding; so do we.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

from rgexport.checkpoint import to_deepmind_state_dict, to_hf_state_dict
from rgexport.config import ATTENTION, RECURRENT, GriffinConfig
from rgexport.errors import MissingDependencyError
from rgexport.model import Griffin, State


def _import_recurrentgemma_torch() -> types.ModuleType:
    """Imports `recurrentgemma.torch` without the package's __init__, which imports its JAX/Flax half
    unconditionally (flax is not needed for the PyTorch implementation and is not installed)."""
    if "recurrentgemma.torch" in sys.modules:
        return sys.modules["recurrentgemma.torch"]
    spec = importlib.util.find_spec("recurrentgemma")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("recurrentgemma", "reference")
    if "recurrentgemma" not in sys.modules:
        package = types.ModuleType("recurrentgemma")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["recurrentgemma"] = package
    import recurrentgemma.torch as rgt

    return rgt


def _require_reference_shape(config: GriffinConfig, who: str) -> None:
    if config.num_kv_heads != 1 or config.conv1d_width != 4 or config.partial_rotary_factor != 0.5:
        raise ValueError(f"{who} supports one K/V head, Conv1D width 4 and half-rotary heads only")


# DeepMind --------------------------------------------------------------------------------------------
def deepmind_griffin(model: Griffin) -> torch.nn.Module:
    """DeepMind's `recurrentgemma.torch.Griffin` holding `model`'s weights (float32, eval)."""
    rgt = _import_recurrentgemma_torch()
    c = model.config
    _require_reference_shape(c, "DeepMind's recurrentgemma")
    kind = {RECURRENT: rgt.TemporalBlockType.RECURRENT, ATTENTION: rgt.TemporalBlockType.ATTENTION}
    dm_config = rgt.GriffinConfig(
        vocab_size=c.vocab_size, width=c.width, mlp_expanded_width=c.mlp_expanded_width,
        num_heads=c.num_heads, block_types=tuple(kind[b] for b in c.block_types),
        embeddings_scale_by_sqrt_dim=c.embeddings_scale_by_sqrt_dim,
        attention_window_size=c.attention_window_size, logits_soft_cap=c.logits_soft_cap,
        lru_width=c.lru_width,
    )
    dm = rgt.Griffin(dm_config, gradient_checkpointing=False)
    dm.load_state_dict(to_deepmind_state_dict(model.state_dict()), strict=True)
    return dm.eval()


def _deepmind_state(block_types: list[str], cache: dict) -> State:
    state = {}
    for i, block in enumerate(block_types):
        c = cache[f"blocks.{i}"]
        if block == RECURRENT:
            state[f"blocks.{i}.rg_lru"] = c.rg_lru_state.clone()
            state[f"blocks.{i}.conv1d"] = c.conv1d_state.clone()
        else:
            b, w = c.keys.shape[:2]
            state[f"blocks.{i}.keys"] = c.keys.reshape(b, w, -1).clone()
            state[f"blocks.{i}.values"] = c.values.reshape(b, w, -1).clone()
    return state


@torch.no_grad()
def deepmind_run(dm: torch.nn.Module, tokens: torch.Tensor, prefill: int = 0) -> tuple[torch.Tensor, State]:
    """Logits [b n v] for `tokens` [b n] from position 0: one prompt pass over the first `prefill`
    tokens (DeepMind's prompt mode), then one decode step per token. Returns the final state too."""
    b, n = tokens.shape
    config = dm.config
    outs = []
    if prefill:
        pos = torch.arange(prefill)[None].expand(b, prefill)
        logits, cache = dm(tokens[:, :prefill], pos, cache=None)
        outs.append(logits)
    else:
        cache = dm.init_cache(batch_size=b, dtype=torch.float32)
    for i in range(prefill, n):
        logits, cache = dm(tokens[:, i : i + 1], torch.full((b, 1), i), cache=cache)
        outs.append(logits)
    block_types = [RECURRENT if bt.name == "RECURRENT" else ATTENTION for bt in config.block_types]
    return torch.cat(outs, dim=1), _deepmind_state(block_types, cache)


# Hugging Face ----------------------------------------------------------------------------------------
def hf_causal_lm(model: Griffin, window: int | None = None) -> torch.nn.Module:
    """Hugging Face's `RecurrentGemmaForCausalLM` holding `model`'s weights (float32, eager attention).

    `window` defaults to the model's window + 1, which reproduces DeepMind's window (see module doc).
    """
    try:
        from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM
    except ImportError as e:
        raise MissingDependencyError("transformers", "reference", e) from None
    c = model.config
    _require_reference_shape(c, "Hugging Face's RecurrentGemma")
    hf_dict = c.to_hf_config()
    hf_dict["attention_window_size"] = window if window is not None else c.attention_window_size + 1
    hf_dict.pop("architectures")
    hf_dict.pop("model_type")
    hf_config = RecurrentGemmaConfig(**hf_dict)
    hf_config._attn_implementation = "eager"
    hf = RecurrentGemmaForCausalLM(hf_config)
    sd = to_hf_state_dict(model.state_dict())
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def _hf_state(hf: torch.nn.Module, cache, window: int) -> State:
    """HF's state in our layout. Its sliding cache is chronological; ours is a ring (slot = p % window)."""
    state = {}
    for i, layer in enumerate(hf.model.layers):
        block = layer.temporal_block
        if hasattr(block, "rg_lru"):
            state[f"blocks.{i}.rg_lru"] = block.rg_lru.recurrent_states.clone()
            state[f"blocks.{i}.conv1d"] = block.conv1d_state.transpose(1, 2).clone()
        else:
            layer_cache = cache.layers[i]
            keys, values = layer_cache.keys, layer_cache.values  # [b kvh s hd], oldest first
            b, kvh, s, hd = keys.shape
            n = int(cache.get_seq_length())  # tokens seen so far
            positions = torch.arange(n - s, n)
            ring_k = torch.zeros(b, window, kvh * hd)
            ring_v = torch.zeros(b, window, kvh * hd)
            keep = positions >= n - window
            slots = positions[keep] % window
            ring_k[:, slots] = keys.transpose(1, 2).reshape(b, s, -1)[:, keep]
            ring_v[:, slots] = values.transpose(1, 2).reshape(b, s, -1)[:, keep]
            state[f"blocks.{i}.keys"] = ring_k
            state[f"blocks.{i}.values"] = ring_v
    return state


@torch.no_grad()
def hf_run(hf: torch.nn.Module, tokens: torch.Tensor, prefill: int = 0,
           state_window: int | None = None) -> tuple[torch.Tensor, State]:
    """Logits [b n v] and final state, like `deepmind_run`, through HF's cache API."""
    from transformers import DynamicCache

    b, n = tokens.shape
    hf._setup_cache(hf.config, b, tokens.device, torch.float32)
    cache = DynamicCache(config=hf.config)
    outs = []
    if prefill:
        pos = torch.arange(prefill)[None].expand(b, prefill)
        out = hf(input_ids=tokens[:, :prefill], position_ids=pos, past_key_values=cache, use_cache=True)
        outs.append(out.logits)
    for i in range(prefill, n):
        out = hf(input_ids=tokens[:, i : i + 1], position_ids=torch.full((b, 1), i),
                 past_key_values=cache, use_cache=True)
        outs.append(out.logits)
    window = state_window if state_window is not None else hf.config.attention_window_size - 1
    return torch.cat(outs, dim=1), _hf_state(hf, cache, window)
