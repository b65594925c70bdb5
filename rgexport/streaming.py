"""Streamed checkpoints: tensors stay memory-mapped on disk and become float32 one part at a time.

`stream_checkpoint` (and `stream_source`, for a manifest's source) return a `StreamedCheckpoint` instead of
the whole model `load_checkpoint` builds. Its tensors
are read through safetensors' `safe_open` (each shard memory-mapped, a tensor copied out only when asked
for) or, for a DeepMind `.pt`, `torch.load(mmap=True, weights_only=True)`; names, shapes and the config are
checked against the header data before anything is materialised, with the same errors as the eager loader.
A build or a reference then takes the embedding, each block and the final norm in turn
(`embedder()`, `blocks()`, `final_norm()`), so only the part in hand is float32 in memory.

Random weights (`random:<preset>:seed<n>`) are drawn part by part in `Griffin.reset_parameters_`'s order
from one generator whose state is kept at every part boundary, so the values equal the whole-model
path's (`random_checkpoint`) whichever way they are asked for.

`MaterialisedBytes` counts what the stream has handed out and is still alive (weak references on every
tensor), so tests can prove the streaming by counting bytes, not by timing or RSS.
"""

from __future__ import annotations

import dataclasses
import pickle
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rgexport.config import GriffinConfig
from rgexport.errors import CheckpointError
from rgexport.model.blocks import ResidualBlock
from rgexport.model.griffin import Embedder, Griffin, init_block_, init_embedder_
from rgexport.model.layers import RMSNorm, RotaryEmbedding

Part = nn.Module  # an Embedder, a ResidualBlock or the final RMSNorm


class MaterialisedBytes:
    """Float bytes handed out by a stream and still alive; `peak` is the most alive at once."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.parts = 0  # parts materialised so far

    def track(self, module: nn.Module) -> nn.Module:
        """Counts `module`'s parameters and buffers until each is freed."""
        for t in [*module.parameters(), *module.buffers()]:
            n = t.numel() * t.element_size()
            self.live += n
            weakref.finalize(t, self._free, n)
        self.peak = max(self.peak, self.live)
        self.parts += 1
        return module

    def reset_peak(self) -> None:
        """Starts a new peak from what is alive now."""
        self.peak = self.live

    def _free(self, n: int) -> None:
        self.live -= n


class _Tensors:
    """Named tensors of a checkpoint, read one at a time from memory-mapped files."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor]):
        self.shapes = shapes
        self._get = get

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)


def _safetensors(files: list[Path]) -> _Tensors:
    """Each tensor read through a `safe_open` of its own: the tensor it returns is a view of that file's memory
    map, which then lives exactly as long as the tensor (a bf16 view is dropped as soon as its part is cast to
    float32). A handle kept open for the whole stream kept every page it had read resident, and counted in
    RSS: 5.4 GB of bf16 shards by the end of a 2B build."""
    from safetensors import SafetensorError, safe_open

    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for p in files:
        try:
            with safe_open(str(p), framework="pt") as h:
                for name in h.keys():
                    shapes[name] = tuple(h.get_slice(name).get_shape())
                    where[name] = p
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"Cannot read safetensors file {p}: {e}") from None

    def get(name: str) -> torch.Tensor:
        try:
            with safe_open(str(where[name]), framework="pt") as h:
                return h.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"Cannot read {name} from safetensors file {where[name]}: {e}") from None

    return _Tensors(shapes, get)


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@dataclasses.dataclass
class StreamedCheckpoint:
    """A checkpoint read part by part: the embedding, each block, the final norm, each in float32 only
    while the caller holds it."""

    config: GriffinConfig
    source: str
    format: str  # "huggingface" | "deepmind" | "random"
    _digest: str | Callable[[], str]  # or how to compute it, on first use (`digest`)
    tokenizer_path: Path | None
    _load: Callable[[str, int | None], Part]  # ("embedder" | "block" | "final_norm", block index)
    counter: MaterialisedBytes = dataclasses.field(default_factory=MaterialisedBytes)

    @property
    def digest(self) -> str:
        """The checkpoint's sha256, computed on first use: it reads every file (5.4 GB of shards at 2B), which
        a caller that wants only the config or the tokenizer should not pay for."""
        if callable(self._digest):
            self._digest = self._digest()
        return self._digest

    def embedder(self) -> Embedder:
        """The embedding table (and tied head), float32."""
        return self.counter.track(self._load("embedder", None))  # type: ignore[return-value]

    def block(self, i: int) -> ResidualBlock:
        """Block `i`, float32, in eval mode."""
        if not 0 <= i < len(self.config.block_types):
            raise IndexError(f"block {i} of {len(self.config.block_types)}")
        return self.counter.track(self._load("block", i))  # type: ignore[return-value]

    def blocks(self) -> Iterator[ResidualBlock]:
        """Every block in order, each materialised when the iterator reaches it (drop it before the next)."""
        for i in range(len(self.config.block_types)):
            yield self.block(i)

    def final_norm(self) -> RMSNorm:
        return self.counter.track(self._load("final_norm", None))  # type: ignore[return-value]

    def materialize(self) -> Any:
        """The whole float32 model as a `Checkpoint` (for callers that need it all; the eager path)."""
        from rgexport.checkpoint import Checkpoint

        model = _meta_griffin(self.config)
        model.embedder = self.embedder()
        model.blocks = nn.ModuleList(list(self.blocks()))
        model.final_norm = self.final_norm()
        return Checkpoint(model.eval(), self.config, self.source, self.format, self.digest, self.tokenizer_path)


def _meta_griffin(config: GriffinConfig) -> Griffin:
    with torch.device("meta"):
        return Griffin(config)


def fake_griffin(config: GriffinConfig) -> Griffin:
    """A Griffin whose parameters are FakeTensors on the CPU (shapes and dtypes, no storage) and whose buffers
    (RoPE frequencies) are real: what `torch.export` needs to trace the graphs while the weights stay in
    the stream (`rgexport.backends.onnx.export.fill_from_stream` gives the graphs their values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _meta_griffin(config)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            with mode:
                fake = torch.empty(p.shape, dtype=p.dtype)
            setattr(module, name, nn.Parameter(fake, requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, torch.empty(b.shape, dtype=b.dtype),
                                   persistent=name not in module._non_persistent_buffers_set)
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()
    return model.eval()


def assert_real(model: nn.Module) -> None:
    """Raises if a parameter or buffer of `model` is still a FakeTensor or on the meta device (a part of a
    `fake_griffin` that was never given its weights)."""
    from torch._subclasses.fake_tensor import FakeTensor

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(t, FakeTensor) or t.device.type == "meta":
            raise AssertionError(f"{name} has no weights: it was not read from the stream")


def _part_module(config: GriffinConfig, kind: str, i: int | None) -> Part:
    """An empty (meta) module of one part."""
    with torch.device("meta"):
        if kind == "embedder":
            return Embedder(config)
        if kind == "final_norm":
            return RMSNorm(config.width, config.rms_norm_eps)
        return ResidualBlock(config, config.block_types[i])


def _prefix(kind: str, i: int | None) -> str:
    return {"embedder": "embedder.", "final_norm": "final_norm."}.get(kind, f"blocks.{i}.")


def _assemble(config: GriffinConfig, kind: str, i: int | None, tensors: dict[str, torch.Tensor]) -> Part:
    """A part from its tensors under our names (full names, prefix included), cast to float32."""
    module = _part_module(config, kind, i)
    prefix = _prefix(kind, i)
    module.load_state_dict({k[len(prefix):]: v.to(torch.float32) for k, v in tensors.items()}, assign=True)
    for m in module.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_buffers()
    return module.eval()


def _our_names(config: GriffinConfig, kind: str, i: int | None) -> list[str]:
    prefix = _prefix(kind, i)
    return [n for n in _meta_griffin(config).state_dict() if n.startswith(prefix)]


def stream_huggingface(path: str | Path) -> StreamedCheckpoint:
    """A Hugging Face RecurrentGemma folder (single file or shards with an index), streamed."""
    from rgexport.checkpoint import _check_and_build, _hf_expected, _sha256_files, hf_folder

    folder = Path(path)
    config, files = hf_folder(folder)
    source = _safetensors(files)
    source.shapes.pop("lm_head.weight", None)  # tied to the embedding
    expected = _hf_expected(config)
    missing = sorted(set(expected) - set(source.shapes))
    if missing:
        raise CheckpointError(
            f"{folder}: missing {len(missing)} tensor(s) that config.json implies, first {missing[:3]}")
    ours_to_hf = {ours: (hf, bwd) for hf, (ours, bwd) in expected.items()}
    # Names and shapes checked as the eager loader checks them, on meta tensors: nothing is read yet.
    shapes = {ours: bwd(torch.empty(source.shapes[hf], device="meta")) for ours, (hf, bwd) in ours_to_hf.items()}
    unexpected = {n: torch.empty(s, device="meta") for n, s in source.shapes.items() if n not in expected}
    _check_and_build(config, {**shapes, **unexpected}, str(folder))

    def load(kind: str, i: int | None) -> Part:
        names = _our_names(config, kind, i)
        return _assemble(config, kind, i, {n: ours_to_hf[n][1](source.get(ours_to_hf[n][0])) for n in names})

    tokenizer = folder / "tokenizer.model"
    return StreamedCheckpoint(config, str(folder), "huggingface", lambda: _sha256_files(files),
                              tokenizer if tokenizer.is_file() else None, load)


def stream_deepmind(path: str | Path, preset: str, tokenizer: str | Path | None = None) -> StreamedCheckpoint:
    """A `recurrentgemma.torch.Griffin` state dict (`.pt` memory-mapped, or `.safetensors`), streamed."""
    from rgexport.checkpoint import _check_and_build, _sha256_files, from_deepmind_state_dict
    from rgexport.config import get_preset

    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"Checkpoint file {file} does not exist")
    if file.suffix == ".safetensors":
        source = _safetensors([file])
    else:
        try:
            # mmap=True: the tensors are views of the mapped file until a part copies them out.
            dm = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            raise CheckpointError(
                f"Cannot read {file} as a state dict with torch.load(weights_only=True): {e}") from None
        if not isinstance(dm, dict):
            raise CheckpointError(f"{file} holds a {type(dm).__name__}, expected a state dict")
        source = _Tensors({k: tuple(v.shape) for k, v in dm.items()}, dm.__getitem__)
    base = get_preset(preset)
    emb = source.shapes.get("embedder.input_embedding")
    config = base.replace(vocab_size=int(emb[0])) if emb is not None else base
    _check_and_build(config, from_deepmind_state_dict(_meta(source.shapes)), str(file))

    def load(kind: str, i: int | None) -> Part:
        prefix = _prefix(kind, i)
        return _assemble(config, kind, i, from_deepmind_state_dict(
            {n: source.get(n) for n in source.shapes if n.startswith(prefix)}))

    tok = Path(tokenizer) if tokenizer else None
    return StreamedCheckpoint(config, str(file), "deepmind", lambda: _sha256_files([file]), tok, load)


def stream_random(preset: str, seed: int = 0) -> StreamedCheckpoint:
    """`random_checkpoint(preset, seed)`'s weights, drawn part by part (see the module docstring)."""
    import hashlib

    from rgexport.assets import shipped_model_dir
    from rgexport.checkpoint import RANDOM_PREFIX
    from rgexport.config import get_preset

    config = get_preset(preset)
    n = len(config.block_types)
    # Generator state before each drawn part: [embedder, block 0, ..., block n-1]; filled as parts are drawn.
    states: list[torch.Tensor | None] = [torch.Generator().manual_seed(seed).get_state()] + [None] * n

    def draw(k: int) -> Part:
        """Part k of the draw order (0: the embedding, 1 + i: block i), from the generator state before it."""
        first = max(j for j in range(k + 1) if states[j] is not None)
        for j in range(first, k + 1):  # parts before k not drawn yet: draw and drop them for their states
            g = torch.Generator()
            g.set_state(states[j])
            module = _part_module(config, "embedder" if j == 0 else "block", None if j == 0 else j - 1)
            module.to_empty(device="cpu")
            if j == 0:
                init_embedder_(module, config, g)  # type: ignore[arg-type]
            else:
                init_block_(module, config, g)  # type: ignore[arg-type]
                for m in module.modules():
                    if isinstance(m, RotaryEmbedding):
                        m.reset_buffers()
            if j + 1 <= n:
                states[j + 1] = g.get_state()
            if j == k:
                return module.eval()
            del module
        raise AssertionError("unreachable")

    def load(kind: str, i: int | None) -> Part:
        if kind == "final_norm":
            module = _part_module(config, kind, None)
            module.to_empty(device="cpu")
            module.scale.data.zero_()  # type: ignore[union-attr]
            return module.eval()
        return draw(0 if kind == "embedder" else 1 + int(i))  # type: ignore[arg-type]

    source = f"{RANDOM_PREFIX}{preset}:seed{seed}"
    digest = hashlib.sha256(source.encode()).hexdigest()
    return StreamedCheckpoint(config, source, "random", digest, shipped_model_dir() / "tokenizer.model", load)


def schedule(n: int, chunk: int) -> list[tuple[int, int]]:
    """(start, length) of each call validation makes over n tokens: one prefill chunk, then single tokens
    (`rgexport.validate.teacher_forced`)."""
    start = chunk if chunk > 1 and n >= chunk else 0
    return ([(0, chunk)] if start else []) + [(i, 1) for i in range(start, n)]


def batched(n: int, batch: int) -> list[tuple[int, int]]:
    """(start, length) of chunked-prefill calls of `batch` tokens over n tokens."""
    return [(i, min(batch, n - i)) for i in range(0, n, batch)]


# Tokens per call of a validation's layer-major runs: every call reads the block's weights once, so the step
# model's single-token calls read them once per token (at 2B, 315 MB a block, 96 times for 32 tokens and their
# greedy continuation); chunks of 256 read them once per 256 tokens. The values are those of the step model's
# calls up to float32 rounding (the same ops over more rows at once). At most the attention window.
VALIDATION_BATCH = 256


def validation_batch(config: GriffinConfig) -> int:
    """`VALIDATION_BATCH`, capped at `config`'s attention window."""
    return min(VALIDATION_BATCH, config.attention_window_size)


@dataclasses.dataclass
class LayerMajorRun:
    """The float32 reference over a token sequence, computed block by block (`layer_major_run`)."""

    hidden: torch.Tensor  # [n, width]: the final-normed hidden state of every token
    state: dict[str, torch.Tensor]  # the state after the last token, by name (as Griffin's)
    segments: list[tuple[int, int]]  # the calls the step model would have made
    stream: StreamedCheckpoint
    _embedder: Embedder | None = None
    _shared: Any = None  # a _SharedEmbedder of the pass that made this run

    @torch.no_grad()
    def logits(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Logits [stop - start, vocab] of tokens start..stop (a slice at a time keeps a 256000-entry
        vocabulary's logits from filling memory); the embedding is read again on first use."""
        if self._embedder is None:
            self._embedder = self._shared.get() if self._shared is not None else self.stream.embedder()
        out = self._embedder.decode(self.hidden[start:stop])
        cap = self.stream.config.logits_soft_cap
        return torch.tanh(out / cap) * cap if cap else out

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.hidden.shape[0]), int(self.stream.config.vocab_size))

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def __getitem__(self, rows: slice) -> np.ndarray:
        """The logits of a slice of tokens as a float32 array, so that a run reads like the other
        `rgexport.logits.Logits`: computed for that slice only."""
        start, stop, _ = rows.indices(len(self))
        return self.logits(start, stop).numpy()

    def release(self) -> None:
        """Lets the embedding go (2.6 GB of float32 at 2B) until the next `logits`, which reads it again."""
        self._embedder = None
        if self._shared is not None:
            self._shared.embedder = None


@torch.no_grad()
def layer_major_run(stream: StreamedCheckpoint, tokens: list[int] | torch.Tensor, chunk: int,
                    batch: int | None = None) -> LayerMajorRun:
    """The fp32 step model's result over `tokens` from position 0, layer-major: each block is loaded once and
    every token goes through it (in the calls of `schedule`, its state carried from call to call) before
    the next block loads. What is resident at once is one block (or the embedding) plus the activations of
    the sequence ([n, width]), so a model larger than memory can be the reference of its own artifact.
    """
    return layer_major_runs(stream, [tokens], chunk, batch)[0]


@torch.no_grad()
def layer_major_runs(stream: StreamedCheckpoint, sequences: list[list[int] | torch.Tensor],
                     chunk: int, batch: int | None = None) -> list[LayerMajorRun]:
    """`layer_major_run` of several sequences (each from position 0, each with its own state) in one pass
    over the weights: every part is loaded once for all of them. The runs share one embedding for their
    logits, read again on first use.

    The calls are those of `schedule` (the step model's, value for value), or with `batch` chunks of that
    many tokens (`batched`: the same values up to float32 rounding, far faster; see `VALIDATION_BATCH`)."""
    from rgexport.model import init_state

    config = stream.config
    if batch is not None and not 1 <= batch <= config.attention_window_size:
        raise ValueError(f"batch {batch}: expected 1 to the attention window ({config.attention_window_size})")
    ids = [torch.as_tensor(t, dtype=torch.long).reshape(1, -1) for t in sequences]
    segments = [schedule(i.shape[1], chunk) if batch is None else batched(i.shape[1], batch) for i in ids]
    embedder = stream.embedder()
    xs = [embedder.encode(i) for i in ids]  # [1 n d] each
    del embedder  # the head needs it again at the end; one block at a time is the budget meanwhile
    zero = init_state(config)
    states: list[dict[str, torch.Tensor]] = [{} for _ in ids]
    for i in range(len(config.block_types)):
        block = stream.block(i)  # the previous block is gone: `del block` below dropped the last reference
        n0, n1 = [k for k in zero if k.startswith(f"blocks.{i}.")]
        for k, (x, segs) in enumerate(zip(xs, segments)):
            s0, s1 = zero[n0], zero[n1]
            out = torch.empty_like(x)
            for start, t in segs:
                positions = torch.arange(start, start + t, dtype=torch.float32)[None]
                out[:, start:start + t], s0, s1 = block(x[:, start:start + t], positions, s0, s1)
            xs[k], states[k][n0], states[k][n1] = out, s0, s1
            del out
        del block
    norm = stream.final_norm()
    runs = [LayerMajorRun(norm(x)[0], state, segs, stream) for x, state, segs in zip(xs, states, segments)]
    shared = _SharedEmbedder(stream)
    for run in runs:
        run._shared = shared
    return runs


class _SharedEmbedder:
    """One embedding for the logits of several runs of one pass, loaded on first use."""

    def __init__(self, stream: StreamedCheckpoint):
        self.stream, self.embedder = stream, None

    def get(self) -> Embedder:
        if self.embedder is None:
            self.embedder = self.stream.embedder()
        return self.embedder


def stream_model(model: Griffin) -> StreamedCheckpoint:
    """A model already in memory as a stream: each part handed out is a copy (so that a caller may quantise
    it in place) and the model itself is left as it was."""
    import copy

    def load(kind: str, i: int | None) -> Part:
        part = model.embedder if kind == "embedder" else model.final_norm if kind == "final_norm" else model.blocks[i]
        return copy.deepcopy(part).eval()

    return StreamedCheckpoint(model.config, "memory", "memory", "", None, load)


def quantised_stream(stream: StreamedCheckpoint, quantise: Callable[[Part, str], Part]) -> StreamedCheckpoint:
    """`stream` with every part passed through `quantise(part, kind)` as it is handed out (a backend's
    `quantise_part`): a quantised model, a part at a time, for `layer_major_runs`."""
    load = stream._load
    return dataclasses.replace(stream, _load=lambda kind, i: quantise(load(kind, i), kind),
                               counter=MaterialisedBytes())


def stream_checkpoint(path: str | Path | None = None, preset: str | None = None,
                      tokenizer: str | Path | None = None) -> StreamedCheckpoint:
    """`load_checkpoint(path, preset, tokenizer)`, streamed: the shipped model (no path), a Hugging Face
    folder, or a DeepMind state dict (with preset)."""
    from rgexport.checkpoint import checkpoint_format

    kind, p = checkpoint_format(path, preset)
    if kind == "deepmind":
        return stream_deepmind(p, preset, tokenizer)
    ckpt = stream_huggingface(p)
    if tokenizer:
        ckpt.tokenizer_path = Path(tokenizer)
    return ckpt


def block_weight_bytes(config: GriffinConfig) -> dict[str, int]:
    """float32 bytes of each part: `embedder`, `final_norm`, and `block.{i}` for every block."""
    model = _meta_griffin(config)
    out = {"embedder": 4 * model.embedder.input_embedding.numel(), "final_norm": 4 * model.final_norm.scale.numel()}
    for i, block in enumerate(model.blocks):
        out[f"block.{i}"] = 4 * sum(t.numel() for t in [*block.parameters(), *block.buffers()])
    return out


__all__ = ["LayerMajorRun", "MaterialisedBytes", "StreamedCheckpoint", "block_weight_bytes", "fake_griffin",
           "layer_major_run", "layer_major_runs", "quantised_stream", "schedule", "stream_checkpoint",
           "stream_deepmind", "stream_huggingface", "stream_model", "stream_random"]


def stream_source(source: str, preset: str | None = None) -> StreamedCheckpoint:
    """`load_source(source, preset)`, streamed: the shipped model, a random preset, or a path."""
    from rgexport.checkpoint import parse_source

    kind, what, seed = parse_source(source)
    if kind == "random":
        return stream_random(what, seed)
    return stream_checkpoint(None if kind == "shipped" else what, preset)
