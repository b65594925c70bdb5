"""Checkpoints saved by the reference libraries themselves load into our model, and bad ones are refused."""

from __future__ import annotations

import json

import pytest
import torch

from rgexport.checkpoint import load_checkpoint, load_deepmind, load_huggingface, save_huggingface
from rgexport.errors import CheckpointError, RgexportError
from rgexport.references import _import_recurrentgemma_torch, deepmind_griffin, hf_causal_lm


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, small_model):
    """Saved by transformers' own save_pretrained, sharded, with a tokenizer beside it."""
    folder = tmp_path_factory.mktemp("hf")
    hf = hf_causal_lm(small_model, window=small_model.config.attention_window_size)
    hf.save_pretrained(folder, max_shard_size="100KB")
    return folder


def test_huggingface_sharded_folder_loads(hf_folder, small_model, small_tokens):
    assert (hf_folder / "model.safetensors.index.json").is_file()
    assert len(list(hf_folder.glob("*.safetensors"))) > 1
    ckpt = load_huggingface(hf_folder)
    assert ckpt.config == small_model.config
    assert ckpt.format == "huggingface" and len(ckpt.digest) == 64
    for name, tensor in small_model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[name], tensor), name
    assert torch.equal(ckpt.model.score(small_tokens), small_model.score(small_tokens))


def test_our_writer_round_trips_through_transformers(tmp_path, small_model, small_tokens):
    from transformers import RecurrentGemmaForCausalLM

    save_huggingface(small_model, tmp_path / "ours")
    hf = RecurrentGemmaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        w = small_model.config.attention_window_size
        ref = hf(small_tokens[:, :w]).logits  # inside the window HF and DeepMind conventions agree
    assert (small_model.score(small_tokens[:, :w]) - ref).abs().max() < 1e-4
    assert load_huggingface(tmp_path / "ours").config == small_model.config


def test_deepmind_state_dict_loads(tmp_path):
    """A `recurrentgemma.torch.Griffin` of the tiny preset's shape, saved with torch.save."""
    from rgexport.config import get_preset
    from rgexport.model import Griffin

    rgt = _import_recurrentgemma_torch()
    torch.manual_seed(0)
    # Build DeepMind's model from our preset through our converter's inverse, then save its own state dict.
    ours = Griffin(get_preset("tiny")).reset_parameters_(torch.Generator().manual_seed(3))
    dm = deepmind_griffin(ours)
    assert isinstance(dm, rgt.Griffin)
    path = tmp_path / "griffin.pt"
    torch.save(dm.state_dict(), path)
    ckpt = load_deepmind(path, "tiny")
    tokens = torch.randint(0, 4096, (1, 12))
    with torch.no_grad():
        ref, _ = dm(tokens, torch.arange(12)[None])
    assert (ckpt.model.score(tokens) - ref).abs().max() < 1e-4
    assert ckpt.format == "deepmind"


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path, hf_folder):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_folder / "config.json").read_text())
    tensors = {}
    for f in hf_folder.glob("*.safetensors"):
        tensors.update(load_file(f))
    tensors["model.layers.0.temporal_block.linear_x.weight"] = torch.zeros(64, 63)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.recurrent_block\.linear_x\.weight.*\[64, 63\].*\[64, 64\]"):
        load_huggingface(bad)


def test_missing_and_extra_tensors_are_named(tmp_path, hf_folder):
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in hf_folder.glob("*.safetensors"):
        tensors.update(load_file(f))
    for case, change in {
        "missing": lambda t: t.pop("model.final_norm.weight"),
        "extra": lambda t: t.__setitem__("model.layers.0.surprise", torch.zeros(1)),
    }.items():
        folder = tmp_path / case
        folder.mkdir()
        (folder / "config.json").write_text((hf_folder / "config.json").read_text())
        t = dict(tensors)
        change(t)
        save_file(t, folder / "model.safetensors")
        match = "final_norm" if case == "missing" else "surprise"
        with pytest.raises(CheckpointError, match=match):
            load_huggingface(folder)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "f": print}, path)  # a callable is not plain weights
    with pytest.raises(CheckpointError, match="never loads") as e:
        load_deepmind(path, "tiny")
    assert "weights_only=False" not in str(e.value) and "print" in str(e.value)


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RgexportError, match="--preset"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="torch.load"):
        load_checkpoint(tmp_path / "x.pt", preset="tiny")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RgexportError, match="recurrent_gemma"):
        load_checkpoint(empty)
