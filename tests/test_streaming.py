"""Streamed checkpoints: real layouts load by their key names and dtypes, part by part, and the loader never
holds more than the part in hand (counted in bytes, not timed)."""

from __future__ import annotations

import gc
import shutil

import pytest
import torch

from rgexport.checkpoint import load_checkpoint, load_deepmind, random_checkpoint
from rgexport.errors import CheckpointError
from rgexport.streaming import block_weight_bytes, stream_checkpoint, stream_random, stream_source


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def hf_bf16_shards(tmp_path_factory, shipped):
    """The shipped model as a Hugging Face release is laid out, written by transformers itself: bf16 shards
    with model.safetensors.index.json, config.json, generation_config.json and the tokenizer files."""
    pytest.importorskip("transformers")
    from transformers import GemmaTokenizer

    from rgexport.references import hf_causal_lm

    folder = tmp_path_factory.mktemp("hf-bf16")
    hf = hf_causal_lm(shipped.model, window=shipped.config.attention_window_size).to(torch.bfloat16)
    hf.save_pretrained(folder, max_shard_size="2MB")
    shutil.copy(shipped.tokenizer_path, folder / "tokenizer.model")
    GemmaTokenizer(vocab_file=str(shipped.tokenizer_path)).save_pretrained(folder)
    return folder


def test_hf_bf16_shards_stream_by_their_real_names_and_dtypes(hf_bf16_shards, shipped):
    from safetensors import safe_open

    folder = hf_bf16_shards
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (folder / "model.safetensors.index.json").is_file()
    assert (folder / "generation_config.json").is_file() and (folder / "tokenizer_config.json").is_file()
    with safe_open(str(shards[0]), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # as transformers wrote them

    stream = stream_checkpoint(folder)
    assert stream.format == "huggingface" and stream.config == shipped.config
    assert stream.digest == load_checkpoint(folder).digest
    assert stream.tokenizer_path == folder / "tokenizer.model"
    # The streamed parts are the eager loader's tensors exactly, and the originals rounded to bf16.
    eager = load_checkpoint(folder).model.state_dict()
    _assert_same_weights(stream.materialize().model.state_dict(), eager)
    rounded = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in shipped.model.state_dict().items()}
    _assert_same_weights(eager, rounded)


def test_streaming_never_holds_more_than_one_block(hf_bf16_shards):
    """Counted: float32 bytes alive that the stream handed out. Walking the blocks one at a time peaks at
    the largest block; materialising everything (the eager path) peaks at the whole model, so the count
    would catch a loader that kept what it read."""
    stream = stream_checkpoint(hf_bf16_shards)
    parts = block_weight_bytes(stream.config)
    blocks = [parts[f"block.{i}"] for i in range(len(stream.config.block_types))]
    assert len(blocks) == 6 and parts["embedder"] > max(blocks)

    # What a block-by-block build does with each block. (Not `enumerate`: its reused result tuple would
    # keep the previous block alive while the stream reads the next, and the count sees that too.)
    sizes = []
    for block in stream.blocks():
        sizes.append(sum(t.numel() * 4 for t in [*block.parameters(), *block.buffers()]))
        del block
    assert sizes == blocks
    assert stream.counter.parts == len(blocks)
    assert stream.counter.peak == max(blocks), (stream.counter.peak, blocks)
    assert stream.counter.live == 0

    stream.counter.reset_peak()
    embedder = stream.embedder()  # a build keeps the embedding (gather and tied head) beside one block
    for block in stream.blocks():
        del block
    assert stream.counter.peak == parts["embedder"] + max(blocks)
    del embedder
    gc.collect()
    assert stream.counter.live == 0

    stream.counter.reset_peak()
    whole = stream.materialize()
    assert stream.counter.peak == sum(parts.values())  # the eager path: everything at once
    del whole


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_deepmind_state_dict_streams(tmp_path, suffix):
    """A `recurrentgemma.torch.Griffin` state dict saved with torch.save (read through mmap) or as
    safetensors (safe_open), part by part."""
    from rgexport.config import get_preset
    from rgexport.model import Griffin
    from rgexport.references import deepmind_griffin

    ours = Griffin(get_preset("tiny")).reset_parameters_(torch.Generator().manual_seed(3))
    path = tmp_path / f"griffin{suffix}"
    state = {k: v.contiguous() for k, v in deepmind_griffin(ours).state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    stream = stream_checkpoint(path, preset="tiny")
    assert stream.format == "deepmind" and stream.config == ours.config
    _assert_same_weights(stream.materialize().model.state_dict(), load_deepmind(path, "tiny").model.state_dict())
    assert stream.counter.live == 0  # the materialised copy is gone with its last reference
    stream.counter.reset_peak()
    for block in stream.blocks():
        del block
    assert stream.counter.peak == max(v for k, v in block_weight_bytes(stream.config).items() if k.startswith("block"))


def test_random_weights_are_the_same_whatever_the_memory_path():
    """`--random-weights` drawn part by part, in order or not, equal the whole-model draw."""
    whole = random_checkpoint("tiny", seed=7).model.state_dict()
    in_order = stream_random("tiny", seed=7).materialize().model.state_dict()
    _assert_same_weights(in_order, whole)

    shuffled = stream_random("tiny", seed=7)
    block4 = shuffled.block(4)  # before anything else: earlier parts are drawn and dropped for their state
    assert shuffled.counter.peak == block_weight_bytes(shuffled.config)["block.4"]
    for name, t in block4.state_dict().items():
        assert torch.equal(t, whole[f"blocks.4.{name}"]), name
    for name, t in shuffled.embedder().state_dict().items():
        assert torch.equal(t, whole[f"embedder.{name}"]), name
    for name, t in shuffled.block(1).state_dict().items():
        assert torch.equal(t, whole[f"blocks.1.{name}"]), name
    assert not torch.equal(stream_random("tiny", seed=8).block(0).mlp_block.ffw_up.weight,
                           shuffled.block(0).mlp_block.ffw_up.weight)
    assert stream_source("random:tiny:seed7").digest == random_checkpoint("tiny", seed=7).digest


def test_streamed_loader_refuses_what_the_eager_loader_refuses(tmp_path, hf_bf16_shards):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(hf_bf16_shards, bad)
    shard = next(p for p in sorted(bad.glob("model-*.safetensors"))
                 if any(k.endswith("mlp_block.up_proj.weight") for k in load_file(str(p))))
    tensors = load_file(str(shard))
    name = next(k for k in tensors if k.endswith("mlp_block.up_proj.weight"))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as streamed:
        stream_checkpoint(bad)
    with pytest.raises(CheckpointError) as eager:
        load_checkpoint(bad)
    assert "has shape" in str(streamed.value) and str(streamed.value) == str(eager.value)


@pytest.mark.parametrize("batch", [None, 48, 128])
def test_layer_major_reference_equals_the_step_model(shipped, batch):
    """Validation's reference computed block by block (each block loaded once, every token through it)
    gives the step model's logits and state over a schedule that wraps the window, holding one part at a
    time; in the step model's own calls (batch None), or in chunked-prefill calls of `batch` tokens (what
    validation uses: the same values up to float32 rounding, with a block's weights read once per chunk)."""
    from rgexport.streaming import layer_major_run
    from rgexport.tokenizer import Tokenizer
    from rgexport.validate import EagerRunner, heldout_tokens, teacher_forced

    config = shipped.config
    chunk = 32
    tokens = heldout_tokens(Tokenizer(shipped.tokenizer_path), config.attention_window_size + 64)  # wraps once
    runner = EagerRunner(shipped.model, chunk)
    want = teacher_forced(runner, tokens)
    stream = stream_checkpoint()
    run = layer_major_run(stream, tokens, chunk, batch)
    calls = len(tokens) - chunk + 1 if batch is None else -(-len(tokens) // batch)
    assert len(run.segments) == calls and sum(t for _, t in run.segments) == len(tokens)
    parts = block_weight_bytes(config)
    assert stream.counter.peak == max(parts.values())  # the embedding or one block, never two parts
    got = torch.cat([run.logits(s, s + 50) for s in range(0, len(tokens), 50)]).numpy()
    assert got.shape == want.shape == (len(tokens), config.vocab_size)
    err = float(abs(got - want).max())
    assert err <= 1e-5 * float(abs(want).max()), err
    for name, value in runner.state().items():
        assert float((run.state[name][0] - torch.as_tensor(value)).abs().max()) <= 1e-5, name


def test_single_file_hf_folder_streams(tmp_path, shipped):
    """A folder with one model.safetensors (no index), written by rgexport's own writer."""
    from rgexport.checkpoint import save_huggingface

    folder = save_huggingface(shipped.model, tmp_path / "one", tokenizer=shipped.tokenizer_path)
    stream = stream_checkpoint(folder)
    _assert_same_weights(stream.materialize().model.state_dict(), shipped.model.state_dict())
