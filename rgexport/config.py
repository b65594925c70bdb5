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

from rgexport.errors import ConfigError, RgexportError

# What a built artifact's prefill call returns: every token's logits, or the last token's (`--prefill-logits`).
PREFILL_LOGITS = ("all", "last")


def prefill_last_only(prefill_logits: str) -> bool:
    """Whether a build's prefill graph returns the last token's logits alone (`graphs.PrefillIO(last_only=)`)."""
    if prefill_logits not in PREFILL_LOGITS:
        raise RgexportError(f"prefill logits {prefill_logits!r}: expected one of {list(PREFILL_LOGITS)} (all: every "
                            "token's logits, as scoring needs; last: the last token's, all that generation reads)")
    return prefill_logits == "last"

RECURRENT = "recurrent"
ATTENTION = "attention"
BLOCK_TYPES = (RECURRENT, ATTENTION)

# Bounds well above any published Griffin (RecurrentGemma-9B: width 4096, 38 blocks, vocabulary 256000),
# so that a mistyped config is refused before anything is allocated for it.
INT_LIMITS = {
    "vocab_size": 1 << 21, "width": 1 << 16, "mlp_expanded_width": 1 << 18, "num_heads": 1 << 10,
    "lru_width": 1 << 16, "attention_window_size": 1 << 20, "num_kv_heads": 1 << 10, "conv1d_width": 1 << 8,
}
MAX_LAYERS = 1024
# Hugging Face config.json field -> GriffinConfig field, where the two differ only in name.
_HF_NAMES = {"vocab_size": "vocab_size", "hidden_size": "width", "intermediate_size": "mlp_expanded_width",
             "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "lru_width": "lru_width",
             "attention_window_size": "attention_window_size", "conv1d_width": "conv1d_width"}
MAX_PARAMETERS = 100_000_000_000


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
        problems = []
        if isinstance(self.block_types, str) or not isinstance(self.block_types, tuple | list):
            raise ConfigError(f"block_types must be a list of block names, got {self.block_types!r}")
        object.__setattr__(self, "block_types", tuple(self.block_types))
        for name, limit in INT_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
            elif value > limit:
                problems.append(f"{name} is {value:,}, above the largest rgexport accepts ({limit:,})")
        for name in ("logits_soft_cap", "rms_norm_eps", "rope_theta", "partial_rotary_factor"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.embeddings_scale_by_sqrt_dim, bool):
            problems.append(f"embeddings_scale_by_sqrt_dim must be true or false, got "
                            f"{self.embeddings_scale_by_sqrt_dim!r}")
        if len(self.block_types) > MAX_LAYERS:
            problems.append(f"{len(self.block_types):,} blocks, above the largest rgexport accepts ({MAX_LAYERS:,})")
        if problems:
            raise ConfigError("; ".join(problems))
        if not 0 < self.partial_rotary_factor <= 1:
            problems.append(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if not 0 < self.rms_norm_eps < 1:
            problems.append(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            problems.append(f"rope_theta must be positive, got {self.rope_theta}")
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
        if not problems and self.num_parameters() > MAX_PARAMETERS:
            problems.append(f"{self.num_parameters():,} parameters, above the largest rgexport accepts "
                            f"({MAX_PARAMETERS:,}; {4 * self.num_parameters() / 2**30:,.0f} GiB in float32)")
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
        if not isinstance(d, dict):
            raise ConfigError(f"a Griffin config must be a JSON object, got {type(d).__name__}")
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
        where = "config.json"
        if not isinstance(hf, dict):
            path = Path(hf)
            where = str(path)
            try:
                hf = json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path} is not a JSON text file (byte {e.object[e.start]:#04x} at offset "
                                  f"{e.start} is not UTF-8); expected a Hugging Face config.json") from None
            except (OSError, json.JSONDecodeError, RecursionError) as e:
                raise ConfigError(f"Cannot read Hugging Face config {path}: {e}") from None
            if not isinstance(hf, dict):
                raise ConfigError(f"{path} holds a JSON {type(hf).__name__}, expected an object (a Hugging Face "
                                  "config.json)")

        def need(key: str) -> Any:
            if key not in hf:
                raise ConfigError(f"{where} lacks required field '{key}'")
            return hf[key]

        def integer(key: str, default: Any = None, required: bool = False) -> int:
            value = need(key) if required else hf.get(key, default)
            if value is None and not required:
                value = default
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{where}: field '{key}' must be an integer, got {value!r}")
            limit = INT_LIMITS.get(_HF_NAMES.get(key, ""), MAX_LAYERS if key == "num_hidden_layers" else None)
            if value < (0 if key in ("num_key_value_heads", "lru_width") else 1):
                raise ConfigError(f"{where}: field '{key}' must be a positive integer, got {value}")
            if limit is not None and value > limit * (2 if key == "intermediate_size" else 1):
                raise ConfigError(f"{where}: field '{key}' is {value:,}, above the largest rgexport accepts "
                                  f"({limit:,})")
            return value

        def number(value: Any, key: str) -> float:
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{where}: field '{key}' must be a finite number, got {value!r}")
            return float(value)

        model_type = hf.get("model_type")
        if model_type not in (None, "recurrent_gemma"):
            raise ConfigError(f"{where} has model_type {model_type!r}, expected 'recurrent_gemma'")
        width = integer("hidden_size", required=True)
        num_layers = integer("num_hidden_layers", required=True)
        if not 0 < num_layers <= MAX_LAYERS:
            raise ConfigError(f"{where}: field 'num_hidden_layers' is {num_layers:,}, expected 1 to {MAX_LAYERS}")
        pattern = hf.get("block_types") or ["recurrent", "recurrent", "attention"]
        if not isinstance(pattern, list) or not all(isinstance(b, str) for b in pattern):
            raise ConfigError(f"{where}: field 'block_types' must be a list of block names, got {pattern!r}")
        rope = hf.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{where}: field 'rope_parameters' must be an object, got {rope!r}")
        if hf.get("tie_word_embeddings", True) is False:
            raise ConfigError("Untied output heads are not supported: RecurrentGemma ties lm_head to the embedding")
        num_heads = integer("num_attention_heads", required=True)
        intermediate = integer("intermediate_size", required=True)
        if intermediate % 2:
            raise ConfigError(f"{where}: field 'intermediate_size' must be even (gate and up halves), got "
                              f"{intermediate}")
        try:
            return cls(
                vocab_size=integer("vocab_size", required=True),
                width=width,
                mlp_expanded_width=intermediate // 2,
                num_heads=num_heads,
                num_kv_heads=integer("num_key_value_heads", num_heads) or num_heads,
                block_types=tuple((pattern * num_layers)[:num_layers]),
                lru_width=integer("lru_width", width) or width,
                attention_window_size=integer("attention_window_size", 2048),
                logits_soft_cap=number(hf.get("logits_soft_cap") or 0.0, "logits_soft_cap"),
                embeddings_scale_by_sqrt_dim=True,  # HF always scales by sqrt(hidden_size) in bf16
                conv1d_width=integer("conv1d_width", 4),
                rms_norm_eps=number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
                rope_theta=number(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)), "rope_theta"),
                partial_rotary_factor=number(
                    rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)), "partial_rotary_factor"
                ),
            )
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None

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


# float32 weights above this are never copied during a build, and their validation streams the reference
LARGE_MODEL_BYTES = 2 * 1024**3


def is_small(config: GriffinConfig) -> bool:
    """Whether a build may hold a second copy of the float32 weights and validate against the whole float32
    model in memory (`LARGE_MODEL_BYTES`); a larger model streams its reference."""
    return config.num_parameters() * 4 < LARGE_MODEL_BYTES
