"""Fuzz: broken checkpoints (config.json fields, weights, pickles, state dicts) and tokenizers, through
`info --checkpoint`, `build` and `generate`. See conftest.py for what every case asserts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fuzzing import replace_file

# config.json field -> values that must each be refused with a message naming the field. Floats where an
# integer belongs are refused, not truncated (vocab_size 4096.7 used to become 4096).
FIELDS = {
    "vocab_size": ["4096", 4096.7, 4096.0, -1, 0, True, None, [4096], 10**9],
    "hidden_size": ["192", 192.5, -192, 0, False, None, {"w": 192}, 10**8],
    "intermediate_size": ["1152", 1152.5, -2, 1151, None, 10**9],
    "num_hidden_layers": [1e9, 10**9, 0, -6, "6", None, 6.5, 5000],
    "num_attention_heads": ["3", 3.0, -3, 0, None, 10**6],
    "num_key_value_heads": ["1", 1.5, -1, 10**6],
    "attention_window_size": ["128", 128.5, -128, 10**9],
    "conv1d_width": ["4", 4.5, -4, 10**4],
    "lru_width": ["192", 192.5, -1, 10**7],
    "rms_norm_eps": ["1e-6", float("nan"), float("inf"), [1e-6]],
    "logits_soft_cap": ["30", float("inf"), [30]],
    "block_types": ["recurrent", 3, [1, 2], {"a": 1}],
    "rope_parameters": ["default", 5, [1]],
}
CONFIG_CASES = [(field, value) for field, values in FIELDS.items() for value in values]


def _write_config(folder: Path, config: object, raw: bytes | None = None) -> None:
    path = folder / "config.json"
    replace_file(path, raw if raw is not None else json.dumps(config, allow_nan=True))


@pytest.mark.parametrize("field, value", CONFIG_CASES, ids=[f"{f}={v!r}" for f, v in CONFIG_CASES])
def test_config_field(sandbox, field, value):
    ckpt = sandbox.hf_copy(f"config-{field}")
    config = json.loads((ckpt / "config.json").read_text())
    config[field] = value
    _write_config(ckpt, config)
    sandbox.run(["info", "--checkpoint", ckpt], match=rf"config\.json.*'{field}'|{field}")


def _shipped_config(sandbox) -> dict:
    return json.loads((sandbox.shipped / "config.json").read_text())


WHOLE_CONFIGS = {
    "a-list": (b"[1, 2, 3]", r"config\.json holds a JSON list"),
    "a-string": (b'"recurrent_gemma"', r"config\.json holds a JSON str"),
    "binary": (bytes(range(256)) * 4, r"config\.json is not a JSON text file"),
    "empty": (b"", r"Cannot read Hugging Face config .*config\.json"),
    "truncated": (b'{"model_type": "recurrent_gemma", "vocab_s', r"Cannot read Hugging Face config"),
    "nested-deep": (b"[" * 100000 + b"]" * 100000, r"config\.json"),
    "llama": (json.dumps({"model_type": "llama"}).encode(), r"model_type 'llama'"),
    "no-width": (None, r"lacks required field 'hidden_size'"),
    "untied": (None, r"Untied output heads"),
    "heads-do-not-divide": (None, r"not divisible by num_heads"),
}


@pytest.mark.parametrize("case", sorted(WHOLE_CONFIGS))
def test_whole_config(sandbox, case):
    raw, match = WHOLE_CONFIGS[case]
    ckpt = sandbox.hf_copy(f"config-{case}")
    if raw is None:
        config = _shipped_config(sandbox)
        if case == "no-width":
            del config["hidden_size"]
        elif case == "untied":
            config["tie_word_embeddings"] = False
        else:
            config["num_attention_heads"] = 5
        _write_config(ckpt, config)
    else:
        _write_config(ckpt, None, raw)
    sandbox.run(["info", "--checkpoint", ckpt], match=match)


@pytest.mark.parametrize("command", ["build", "generate"])
@pytest.mark.parametrize("field, value", [("vocab_size", 4096.7), ("num_hidden_layers", 1e9),
                                          ("hidden_size", "wide")])
def test_config_through_other_commands(sandbox, command, field, value):
    ckpt = sandbox.hf_copy(f"{command}-{field}")
    config = _shipped_config(sandbox)
    config[field] = value
    _write_config(ckpt, config)
    out = sandbox.root / "outputs" / f"never-{command}-{field}"
    args = (["build", "--target", "onnx", "--out", out, "--checkpoint", ckpt] if command == "build"
            else ["generate", "--prompt", "The list", "--checkpoint", ckpt])
    sandbox.run(args, match=rf"config\.json.*'{field}'")
    assert not out.exists()


# Weights: each mutation of the shipped model's tensors, saved as safetensors in a Hugging Face folder.
def _mutations() -> dict:
    def nan(t):
        t["model.final_norm.weight"] = t["model.final_norm.weight"].clone().fill_(float("nan"))

    def inf(t):
        w = t["model.layers.0.mlp_block.up_proj.weight"].clone()
        w[3, 5] = float("inf")
        t["model.layers.0.mlp_block.up_proj.weight"] = w

    def all_nan(t):
        for k in t:
            t[k] = torch.full_like(t[k], float("nan"))

    def as_int(t):
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"].to(torch.int32)

    def as_bool(t):
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"] > 0

    def as_f64(t):
        t["model.final_norm.weight"] = t["model.final_norm.weight"].to(torch.float64)

    def shape(t):
        t["model.final_norm.weight"] = torch.zeros(7)

    def missing(t):
        t.pop("model.layers.2.temporal_block.q_proj.weight")

    def extra(t):
        t["model.layers.0.surprise"] = torch.zeros(3)

    return {
        "nan": (nan, r"model\.final_norm\.weight|final_norm\.scale.* nan"),
        "inf": (inf, r"inf"),
        "all-nan": (all_nan, r"nan"),
        "int32-embedding": (as_int, r"int32, expected bfloat16, float16 or float32"),
        "bool-embedding": (as_bool, r"bool, expected bfloat16"),
        "float64": (as_f64, r"float64, expected"),
        "wrong-shape": (shape, r"shape \[7\]"),
        "missing": (missing, r"missing 1 tensor"),
        "extra": (extra, r"unexpected tensor.*surprise"),
    }


MUTATIONS = _mutations()


@pytest.fixture(scope="module")
def shipped_tensors(sandbox):
    from safetensors.torch import load_file

    return load_file(str(sandbox.shipped / "model.safetensors"))


# Every mutation through `info`; build and generate share its loader, so a few through them too.
WEIGHT_CASES = [(case, "info") for case in sorted(MUTATIONS)] + [
    (case, command) for command in ("build", "generate") for case in ("nan", "all-nan", "int32-embedding", "missing")]


@pytest.mark.parametrize("case, command", WEIGHT_CASES, ids=[f"{c}-{m}" for c, m in WEIGHT_CASES])
def test_weights(sandbox, shipped_tensors, case, command):
    from safetensors.torch import save_file

    change, match = MUTATIONS[case]
    ckpt = sandbox.hf_copy(f"weights-{case}")
    tensors = dict(shipped_tensors)
    change(tensors)
    (ckpt / "model.safetensors").unlink()
    save_file(tensors, str(ckpt / "model.safetensors"))
    out = sandbox.root / "outputs" / f"never-{case}-{command}"
    args = {"info": ["info", "--checkpoint", ckpt],
            "build": ["build", "--target", "onnx", "--out", out, "--checkpoint", ckpt],
            "generate": ["generate", "--prompt", "x", "--checkpoint", ckpt]}[command]
    sandbox.run(args, match=match)
    assert not out.exists()


SAFETENSOR_FILES = {
    "garbage": os.urandom(4096),
    "empty": b"",
    "header-huge": (10**15).to_bytes(8, "little") + b"{}",
    "header-not-json": (8).to_bytes(8, "little") + b"notjson!",
    "truncated": None,
}


@pytest.mark.parametrize("case", sorted(SAFETENSOR_FILES))
def test_safetensors_file(sandbox, case):
    ckpt = sandbox.hf_copy(f"safetensors-{case}")
    data = SAFETENSOR_FILES[case]
    if data is None:
        data = (sandbox.shipped / "model.safetensors").read_bytes()[:100_000]
    replace_file(ckpt / "model.safetensors", data)
    sandbox.run(["info", "--checkpoint", ckpt], match=r"Cannot read safetensors file .*model\.safetensors")


def test_shard_index_escaping_the_folder(sandbox):
    ckpt = sandbox.hf_copy("index-escape")
    replace_file(ckpt / "model.safetensors.index.json",
                 json.dumps({"weight_map": {"model.embed_tokens.weight": "../../../../etc/passwd"}}))
    sandbox.run(["info", "--checkpoint", ckpt], match=r"points outside")


@pytest.mark.parametrize("content", ["[]", '{"weight_map": 3}', "{nope", '{"weight_map": {"a": 5}}'])
def test_shard_index_broken(sandbox, content):
    ckpt = sandbox.hf_copy("index-broken")
    replace_file(ckpt / "model.safetensors.index.json", content)
    sandbox.run(["info", "--checkpoint", ckpt], match=r"model\.safetensors\.index\.json")


class _Payload:
    """Unpickling this would create a marker file: it must never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state_dict_files(sandbox, folder: Path) -> dict[str, tuple[Path, str]]:
    from rgexport.checkpoint import load_checkpoint, to_deepmind_state_dict

    model = load_checkpoint().model
    dm = to_deepmind_state_dict(model.state_dict())
    marker = folder / "payload-ran"
    out = {}

    def save(name: str, obj: object) -> Path:
        p = folder / name
        torch.save(obj, p)
        return p

    out["pickled-code"] = (save("evil.pt", {"x": _Payload(str(marker))}), r"\(posix\.system\), which rgexport never")
    out["a-function"] = (save("func.pt", {"x": torch.zeros(1), "f": print}), r"\(print\), which rgexport never loads")
    out["a-list"] = (save("list.pt", [torch.zeros(1)]), r"holds a list, expected a state dict")
    out["non-tensor-values"] = (save("ints.pt", {**dm, "embedder.input_embedding": 5}), r"not a tensor")
    out["int-keys"] = (save("keys.pt", {1: torch.zeros(1)}), r"keys must be tensor names")
    out["int-weights"] = (save("intw.pt", {k: v.to(torch.int32) for k, v in dm.items()}), r"int32, expected")
    out["nan-weights"] = (save("nan.pt", {k: v.clone().fill_(float("nan")) for k, v in dm.items()}), r"nan")
    out["1d-embedding"] = (save("emb1d.pt", {**dm, "embedder.input_embedding": torch.zeros(4096)}),
                           r"expected \[vocabulary, width\]")
    garbage = folder / "garbage.pt"
    garbage.write_bytes(os.urandom(2048))
    out["garbage"] = (garbage, r"Cannot read .*garbage\.pt as a state dict")
    text = folder / "text.pt"
    text.write_text("not a checkpoint at all")
    out["text"] = (text, r"Cannot read .*text\.pt as a state dict")
    return out


@pytest.fixture(scope="module")
def state_dicts(sandbox):
    folder = sandbox.case("state-dicts")
    return folder, _state_dict_files(sandbox, folder)


STATE_DICT_CASES = ["pickled-code", "a-function", "a-list", "non-tensor-values", "int-keys", "int-weights",
                    "nan-weights", "1d-embedding", "garbage", "text"]


@pytest.mark.parametrize("case", STATE_DICT_CASES)
def test_state_dict(sandbox, state_dicts, case):
    folder, files = state_dicts
    path, match = files[case]
    outcome = sandbox.run(["info", "--checkpoint", path, "--preset", "tiny"], match=match)
    assert "weights_only=False" not in outcome.output
    assert not (folder / "payload-ran").exists(), "the pickle's payload ran"


def test_state_dict_needs_a_preset(sandbox, state_dicts):
    _, files = state_dicts
    sandbox.run(["info", "--checkpoint", files["garbage"][0]], match=r"needs --preset")


def test_state_dict_unknown_preset(sandbox, state_dicts):
    _, files = state_dicts
    sandbox.run(["info", "--checkpoint", files["garbage"][0], "--preset", "gpt-9"], match=r"Unknown preset 'gpt-9'")


TOKENIZERS = {
    "garbage": (os.urandom(1000), r"is not a SentencePiece model"),
    "empty": (b"", r"is not a SentencePiece model"),
    "missing": (None, r"does not exist"),
}


@pytest.mark.parametrize("command", ["generate", "build"])
@pytest.mark.parametrize("case", sorted(TOKENIZERS))
def test_tokenizer(sandbox, case, command):
    data, match = TOKENIZERS[case]
    folder = sandbox.case(f"tokenizer-{case}")
    tok = folder / "tokenizer.model"
    if data is not None:
        tok.write_bytes(data)
    out = sandbox.root / "outputs" / f"never-tok-{case}-{command}"
    args = (["generate", "--prompt", "x", "--tokenizer", tok] if command == "generate"
            else ["build", "--target", "onnx", "--out", out, "--tokenizer", tok, "--checkpoint", sandbox.shipped])
    if command == "generate":
        args += ["--checkpoint", sandbox.shipped]
    sandbox.run(args, match=match)
    assert not out.exists()


def test_tokenizer_larger_than_the_vocabulary(sandbox, tmp_path):
    """A tokenizer with more pieces than the model's embedding: refused, naming both sizes."""
    import sentencepiece as spm

    from rgexport.assets import corpus_path

    folder = sandbox.case("tokenizer-too-big")
    prefix = tmp_path / "big"
    spm.SentencePieceTrainer.train(input=str(corpus_path("calibration.txt")), model_prefix=str(prefix),
                                   vocab_size=5000, model_type="bpe", minloglevel=2, input_sentence_size=20000,
                                   shuffle_input_sentence=False)
    tok = folder / "tokenizer.model"
    tok.write_bytes(prefix.with_suffix(".model").read_bytes())
    sandbox.run(["generate", "--prompt", "x", "--checkpoint", sandbox.shipped, "--tokenizer", tok],
                match=r"5000 pieces but the model's vocabulary is 4096")
