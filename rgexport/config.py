"""Griffin / RecurrentGemma model configuration: a frozen dataclass, named presets, Hugging Face import.

Vocabulary follows the Griffin paper (arXiv:2402.19427) and DeepMind's `recurrentgemma` code:
`width` is the residual stream, `lru_width` the RG-LRU width, `block_types` the temporal-mixing block
of each residual block ("recurrent" or "attention").
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

from rgexport.errors import ConfigError

RECURRENT = "recurrent"
ATTENTION = "attention"
BLOCK_TYPES = (RECURRENT, ATTENTION)


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
    """Shape and numerics of a Griffin model. Frozen; checked on construction."""

    vocab_size: int
    width: int
    mlp_expanded_width: int
    num_heads: int
    block_types: tuple[str, ...]
    lru_width: int
    attention_window_size: int
    logits_soft_cap: float = 30.0
    embeddings_scale_by_sqrt_dim: bool = True
    num_kv_heads: int = 1
    conv1d_width: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_types", tuple(self.block_types))
        problems = []
        for name in ("vocab_size", "width", "mlp_expanded_width", "num_heads", "lru_width",
                     "attention_window_size", "num_kv_heads", "conv1d_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.block_types:
            problems.append("block_types is empty: a model needs at least one residual block")
        bad = sorted({b for b in self.block_types if b not in BLOCK_TYPES})
        if bad:
            problems.append(f"block_types has {bad}, expected each to be one of {list(BLOCK_TYPES)}")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.lru_width % self.num_heads:
            problems.append(
                f"lru_width {self.lru_width} is not divisible by num_heads {self.num_heads} "
                "(the RG-LRU gates are block-diagonal with one block per head)"
            )
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.width % self.num_heads == 0:
            rope_dim = int(self.head_dim * self.partial_rotary_factor)
            if rope_dim <= 0 or rope_dim % 2:
                problems.append(
                    f"head_dim {self.head_dim} x partial_rotary_factor {self.partial_rotary_factor} "
                    f"= {rope_dim} rotary dimensions, expected a positive even number"
                )
        if self.conv1d_width < 2:
            problems.append(f"conv1d_width must be at least 2, got {self.conv1d_width}")
        if self.logits_soft_cap < 0 or not math.isfinite(self.logits_soft_cap):
            problems.append(f"logits_soft_cap must be >= 0 (0 disables it), got {self.logits_soft_cap}")
        if problems:
            raise ConfigError("Impossible Griffin config: " + "; ".join(problems))

    # Derived shapes -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.block_types)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Rotary embedding covers the first `rope_dim` channels of each head (partial rotary)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def lru_block_width(self) -> int:
        return self.lru_width // self.num_heads

    @property
    def embedding_scale(self) -> float:
        """sqrt(width) rounded to bfloat16, as both references do (training ran in bf16)."""
        if not self.embeddings_scale_by_sqrt_dim:
            return 1.0
        import torch

        return float(torch.tensor(math.sqrt(self.width), device="cpu").to(torch.bfloat16).float())

    def num_parameters(self) -> int:
        """Parameter count with the output head tied to the embedding."""
        d, e, lw, h, hd = self.width, self.mlp_expanded_width, self.lru_width, self.num_heads, self.head_dim
        n = self.vocab_size * d + d  # embedding, final norm
        for block in self.block_types:
            n += 2 * d  # two RMSNorm scales
            n += 2 * (d * e + e) + e * d + d  # gated MLP
            if block == RECURRENT:
                n += 2 * (d * lw + lw) + lw * d + d  # linear_x, linear_y, linear_out
                n += self.conv1d_width * lw + lw  # Conv1D
                n += lw + 2 * (h * self.lru_block_width**2 + lw)  # a_param, two block-diagonal gates
            else:
                kv = self.num_kv_heads * hd
                n += d * d + 2 * d * kv + d * d + d  # q, k, v, final (with bias)
        return n

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_types"] = list(self.block_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GriffinConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"Unknown GriffinConfig fields {unknown}; expected some of {sorted(fields)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"Incomplete GriffinConfig: {e}") from None

    def replace(self, **changes: Any) -> GriffinConfig:
        return dataclasses.replace(self, **changes)

    # Hugging Face ---------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | Path) -> GriffinConfig:
        """Builds a config from a Hugging Face `RecurrentGemmaConfig` (dict or path to config.json).

        HF's `intermediate_size` is twice the MLP's hidden width (its gate and up projections each take
        half), and its attention window counts the current token, one fewer than DeepMind's; see
        `to_hf_config`.
        """
        if not isinstance(hf, dict):
            path = Path(hf)
            try:
                hf = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"Cannot read Hugging Face config {path}: {e}") from None
        model_type = hf.get("model_type")
        if model_type not in (None, "recurrent_gemma"):
            raise ConfigError(f"config.json has model_type {model_type!r}, expected 'recurrent_gemma'")
        try:
            width = int(hf["hidden_size"])
            num_layers = int(hf["num_hidden_layers"])
            pattern = list(hf.get("block_types") or ["recurrent", "recurrent", "attention"])
            rope = hf.get("rope_parameters") or {}
            if hf.get("tie_word_embeddings", True) is False:
                raise ConfigError("Untied output heads are not supported: RecurrentGemma ties lm_head to the embedding")
            num_heads = int(hf["num_attention_heads"])
            return cls(
                vocab_size=int(hf["vocab_size"]),
                width=width,
                mlp_expanded_width=int(hf["intermediate_size"]) // 2,
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                block_types=tuple((pattern * num_layers)[:num_layers]),
                lru_width=int(hf.get("lru_width") or width),
                attention_window_size=int(hf.get("attention_window_size", 2048)),
                logits_soft_cap=float(hf.get("logits_soft_cap") or 0.0),
                embeddings_scale_by_sqrt_dim=True,  # HF always scales by sqrt(hidden_size) in bf16
                conv1d_width=int(hf.get("conv1d_width", 4)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
                partial_rotary_factor=float(
                    rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
                ),
            )
        except KeyError as e:
            raise ConfigError(f"Hugging Face config lacks required field {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The matching Hugging Face `config.json` contents (model_type recurrent_gemma)."""
        if not self.embeddings_scale_by_sqrt_dim:
            raise ConfigError("Hugging Face's RecurrentGemma always scales embeddings; this config does not")
        pattern = _shortest_period(self.block_types)
        return {
            "architectures": ["RecurrentGemmaForCausalLM"],
            "model_type": "recurrent_gemma",
            "vocab_size": self.vocab_size,
            "hidden_size": self.width,
            "intermediate_size": 2 * self.mlp_expanded_width,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "lru_width": self.lru_width,
            "attention_window_size": self.attention_window_size,
            "conv1d_width": self.conv1d_width,
            "logits_soft_cap": self.logits_soft_cap,
            "rms_norm_eps": self.rms_norm_eps,
            "block_types": list(pattern),
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        }


def _shortest_period(seq: tuple[str, ...]) -> tuple[str, ...]:
    for n in range(1, len(seq) + 1):
        if all(seq[i] == seq[i % n] for i in range(len(seq))):
            return seq[:n]
    return seq


def _griffin_pattern(n: int) -> tuple[str, ...]:
    """Two recurrent blocks, then one local-attention block, repeated."""
    return tuple(itertools.islice(itertools.cycle((RECURRENT, RECURRENT, ATTENTION)), n))


# Public shapes: RecurrentGemma from its model cards and DeepMind's `recurrentgemma` presets; Griffin and
# Hawk 7B from the Griffin paper (arXiv:2402.19427, Table and DeepMind's GRIFFIN_PAPER_7B/HAWK_PAPER_7B).
PRESETS: dict[str, GriffinConfig] = {
    "recurrentgemma-2b": GriffinConfig(
        vocab_size=256_000, width=2560, mlp_expanded_width=3 * 2560, num_heads=10, lru_width=2560,
        block_types=_griffin_pattern(26), attention_window_size=2048, logits_soft_cap=30.0,
    ),
    "recurrentgemma-9b": GriffinConfig(
        vocab_size=256_000, width=4096, mlp_expanded_width=3 * 4096, num_heads=16, lru_width=4096,
        block_types=_griffin_pattern(38), attention_window_size=2048, logits_soft_cap=30.0,
    ),
    "griffin-7b": GriffinConfig(
        vocab_size=256_000, width=4096, mlp_expanded_width=3 * 4096, num_heads=32, lru_width=5632,
        block_types=_griffin_pattern(32), attention_window_size=1024, logits_soft_cap=0.0,
        embeddings_scale_by_sqrt_dim=False,
    ),
    "hawk-7b": GriffinConfig(
        vocab_size=256_000, width=4096, mlp_expanded_width=3 * 4096, num_heads=32, lru_width=5632,
        block_types=(RECURRENT,) * 32, attention_window_size=1024, logits_soft_cap=0.0,
        embeddings_scale_by_sqrt_dim=False,
    ),
    # The shipped model (rgexport/assets/tiny), trained by scripts/train_tiny.py.
    "tiny": GriffinConfig(
        vocab_size=4096, width=192, mlp_expanded_width=576, num_heads=3, lru_width=192,
        block_types=_griffin_pattern(6), attention_window_size=128, logits_soft_cap=30.0,
    ),
}


def get_preset(name: str) -> GriffinConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"Unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
