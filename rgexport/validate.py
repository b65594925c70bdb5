"""Validation: run an artifact in its own runtime beside the fp32 reference step model.

Over held-out text, teacher-forced (one prefill chunk, then one decode step per token, so both entry
points are checked), for 4x the attention window by default:
  max / mean |logit error|, mean KL(reference || artifact), top-1 agreement, perplexity of both,
  and the state difference at the end where the runtime exposes state.
Then free-running greedy generation from the same prompt with each, reporting the first step where
they diverge. Pass/fail bounds are data (rgexport/thresholds.toml), per recipe.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rgexport.backends.base import Runner, last_logits, prefill_every_row
from rgexport.errors import RgexportError
from rgexport.logits import Logits, compare_logits, logits_buffer, release
from rgexport.model import Griffin


class EagerRunner(Runner):
    """Our fp32 step model behind the Runner interface: the reference, and the eager benchmark."""

    def __init__(self, model: Griffin, prefill_chunk: int):
        self.model = model.eval()
        self.prefill_chunk = prefill_chunk
        self._state = model.init_state()

    def reset(self) -> None:
        self._state = self.model.init_state()

    @torch.no_grad()
    def decode(self, token: int, position: int) -> np.ndarray:
        logits, self._state = self.model.step(torch.tensor([token]), torch.tensor([position]), self._state)
        return logits[0].numpy()

    @torch.no_grad()
    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        logits, self._state = self.model.prefill(torch.tensor([list(tokens)]), torch.tensor([position]),
                                                 self._state)
        return logits[0].numpy()

    def state(self) -> dict[str, np.ndarray]:
        return {k: v[0].numpy() if v.shape[0] == 1 else v.numpy() for k, v in self._state.items()}


def teacher_forced(runner: Runner, tokens: Sequence[int], on_token: Callable[[], None] | None = None) -> Logits:
    """Logits [n, v] for `tokens` from position 0: the first chunk by prefill, the rest by decode. An array,
    or past `rgexport.logits.IN_MEMORY_BYTES` a `SpilledLogits` (read it a slice at a time)."""
    runner.reset()
    chunk = runner.prefill_chunk
    out = None

    def put(start: int, rows: np.ndarray) -> None:
        nonlocal out
        rows = np.asarray(rows, dtype=np.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        if out is None:
            out = logits_buffer(len(tokens), rows.shape[-1])
        out[start:start + len(rows)] = rows

    start = 0
    if chunk > 1 and len(tokens) >= chunk:
        if not prefill_every_row(runner):
            # The prefill graph returns its chunk's last logits alone: the chunk's other rows come from decode
            # over the same tokens, then prefill runs the chunk from a new sequence, giving the last row and
            # the state that decode goes on from. Every row is compared, and both graphs are run.
            for i in range(chunk - 1):
                put(i, runner.decode(tokens[i], i))
            runner.reset()
        rows = np.asarray(runner.prefill(tokens[:chunk], 0))
        rows = rows.reshape(-1, rows.shape[-1])
        if len(rows) != (chunk if prefill_every_row(runner) else 1):
            raise RgexportError(f"prefill returned {len(rows)} rows of logits for a chunk of {chunk}; its manifest's "
                                "io.prefill_logits says otherwise")
        put(chunk - len(rows), rows)
        start = chunk
        if on_token:
            for _ in range(chunk):
                on_token()
    for i in range(start, len(tokens)):
        put(i, runner.decode(tokens[i], i))
        if on_token:
            on_token()
    if out is None:
        raise RgexportError("teacher-forced logits need at least one token")
    return out


def greedy(runner: Runner, prompt: Sequence[int], steps: int) -> list[int]:
    """Greedy continuation of `prompt` for `steps` tokens."""
    if prefill_every_row(runner):
        logits = teacher_forced(runner, prompt)[-1]
    else:  # the prompt's last logits alone: no decode of the first chunk's other rows
        runner.reset()
        logits = last_logits(runner, prompt)
    out = []
    for i in range(steps):
        token = int(np.argmax(logits))
        out.append(token)
        logits = runner.decode(token, len(prompt) + i)
    return out


def load_thresholds(recipe: str, quantized: bool, backend: str | None = None) -> dict[str, Any]:
    """The bounds `recipe` is judged by: its row of thresholds.toml (an earlier recipe name counts as its
    current one), overridden by the row's `backend` sub-table if it has one; `table_entry` says which."""
    from rgexport.assets import thresholds_path
    from rgexport.backends import BACKENDS, get_backend

    if backend in BACKENDS:
        recipe = get_backend(backend).recipe_aliases.get(recipe, recipe)
    table = tomllib.loads(thresholds_path().read_text())
    fallback = "quantized" if quantized else "fp32"
    entry = table.get(recipe, {})
    row = {k: v for k, v in entry.items() if not isinstance(v, dict)}
    key = recipe if row else fallback  # a recipe with backend rows only: the others take the fallback
    row = row or dict(table[fallback])
    override = entry.get(backend) if backend is not None else None
    if isinstance(override, dict):
        return row | override | {"table_entry": f"{recipe}.{backend}"}
    return row | {"table_entry": key}


def judge(metrics: dict[str, Any], thresholds: dict[str, Any]) -> list[str]:
    """Human-readable failures; empty when every bound holds."""
    failures = []
    checks = [
        ("max_abs_logit_error", "max_abs_logit_error", "<="),
        ("max_mean_kl", "mean_kl", "<="),
        ("min_top1_agreement", "top1_agreement", ">="),
        ("max_ppl_ratio", "ppl_ratio", "<="),
    ]
    for bound, metric, op in checks:
        if bound not in thresholds:
            continue
        value, limit = metrics[metric], thresholds[bound]
        ok = value <= limit if op == "<=" else value >= limit
        if not (ok and math.isfinite(value)):
            failures.append(f"{metric} = {value:.6g}, needs {op} {limit:g}")
    return failures


@dataclasses.dataclass
class ValidationReport:
    backend: str
    recipe: str
    tokens: int
    metrics: dict[str, Any]
    thresholds: dict[str, Any]
    failures: list[str]
    state_errors: dict[str, float] | None
    greedy_tokens: int
    greedy_divergence: int | None  # first step where greedy outputs differ; None if never
    notes: list[str]
    variants: dict[str, ValidationReport] = dataclasses.field(default_factory=dict)
    own_model: OwnModelCheck | None = None  # the artifact against its own quantised model
    quality_judged: bool = True  # False: the float32 comparison is reported, not judged (random weights)
    unjudged: list[str] = dataclasses.field(default_factory=list)  # the bounds it missed, when not judged

    @property
    def passed(self) -> bool:
        own = self.own_model is None or not self.own_model.failures
        return not self.failures and own and all(v.passed for v in self.variants.values())

    def to_dict(self) -> dict[str, Any]:
        metrics = {k: v for k, v in self.metrics.items() if not k.startswith("_")}
        return {
            "status": "passed" if self.passed else "failed",
            "backend": self.backend,
            "recipe": self.recipe,
            "tokens": self.tokens,
            "metrics": metrics,
            "thresholds": self.thresholds,
            "failures": self.failures,
            "state_max_abs_error": self.state_errors,
            "greedy": {"tokens": self.greedy_tokens, "first_divergence": self.greedy_divergence},
            "notes": self.notes,
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
            "own_model": self.own_model.to_dict() if self.own_model else None,
            "quality_judged": self.quality_judged,
            "quality_unjudged_failures": self.unjudged,
        }


@dataclasses.dataclass
class OwnModelCheck:
    """The artifact against its own quantised model (`Backend.quantise_part`, run in PyTorch over the same
    tokens): what the runtime adds to the recipe, so a miscompile shows whatever the weights are."""

    metrics: dict[str, Any]
    thresholds: dict[str, Any]
    failures: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": {k: v for k, v in self.metrics.items() if not k.startswith("_")},
                "thresholds": self.thresholds, "failures": self.failures}


def own_model_run(source: Any, backend: Any, manifest: dict[str, Any], chunk: int, inputs: Sequence[int],
                  batched: bool = True):
    """The artifact's own quantised model over `inputs`, teacher-forced and layer-major: `source` (a
    `StreamedCheckpoint`, or the float32 Griffin in memory, left unchanged) a part at a time through the
    backend's `quantise_part`. A `rgexport.streaming.LayerMajorRun`, whose logits are computed a slice of
    rows at a time; None where the backend has no such model for the recipe. `batched`: in chunks of
    `validation_batch` tokens, else in the artifact's own calls (value for value, slower)."""
    from rgexport.backends import BuildContext
    from rgexport.streaming import (
        StreamedCheckpoint,
        layer_major_runs,
        quantised_stream,
        stream_model,
        validation_batch,
    )

    stream = source if isinstance(source, StreamedCheckpoint) else stream_model(source)
    ctx = BuildContext(config=stream.config, recipe=manifest["recipe"]["name"], work_dir=Path("."),
                       prefill_chunk=chunk, options=dict(manifest.get("options") or {}),
                       facts=dict(manifest.get("backend_facts") or {}))
    if backend.quantise_part(stream.final_norm(), "final_norm", ctx) is None:  # the smallest part asks
        return None
    (run,) = layer_major_runs(quantised_stream(stream, lambda part, kind: backend.quantise_part(part, kind, ctx)),
                              [list(inputs)], chunk, validation_batch(stream.config) if batched else None)
    return run


def own_model_logits(source: Any, backend: Any, manifest: dict[str, Any], chunk: int,
                     inputs: Sequence[int]) -> np.ndarray | None:
    """`own_model_run`'s logits [n, v] as one array, in the artifact's own calls (for a few tokens: a
    validation reads them by slices)."""
    run = own_model_run(source, backend, manifest, chunk, inputs, batched=False)
    return None if run is None else run.logits().numpy()


def heldout_tokens(tokenizer, n: int, text_file: Path | None = None) -> list[int]:
    """The first n tokens of the held-out text (bos first), or of `text_file`."""
    from rgexport.assets import corpus_path
    from rgexport.safety import read_text_file

    path = Path(text_file) if text_file else corpus_path("heldout.txt")
    text = read_text_file(path, "validation text")
    ids = tokenizer.encode(text)
    if len(ids) < n + 1:
        raise RgexportError(
            f"{path} gives {len(ids)} tokens, validation needs {n + 1}: give a longer text or fewer --tokens"
        )
    return ids[: n + 1]


@dataclasses.dataclass
class ReferenceRun:
    """The fp32 model's side of a validation: what an artifact is compared with."""

    objects: list[weakref.ref]  # the model and its parameters
    versions: list[int]  # the parameters' in-place version counters
    key: tuple  # chunk, inputs, greedy steps
    logits: Logits  # teacher-forced [n, v]: an array, a SpilledLogits, or a streamed LayerMajorRun
    state: dict[str, np.ndarray]  # after the teacher-forced run
    greedy: list[int]
    window: int  # the model's attention window
    # A streamed reference (`streamed_reference_run`) cannot generate on its own: its greedy tokens are the
    # reference's choice after each prefix of `greedy_of` (an artifact's greedy tokens), and `verify` gives
    # them for another artifact's tokens. None: `greedy` is the reference's own free-running continuation.
    greedy_of: list[int] | None = None
    verify: Callable[[list[int]], list[int]] | None = None

    def divergence(self, tokens: list[int]) -> int | None:
        """The first greedy step where an artifact that generated `tokens` parts from the reference."""
        if self.greedy_of is None:
            return next((i for i, (a, b) in enumerate(zip(self.greedy, tokens)) if a != b), None)
        same = next((i for i, (a, b) in enumerate(zip(self.greedy_of, tokens)) if a != b), len(tokens))
        # The reference's tokens hold after prefixes of greedy_of; `tokens` shares them up to step `same`.
        for i in range(min(same + 1, len(tokens))):
            if self.greedy[i] != tokens[i]:
                return i
        if same == len(tokens):
            return None
        return next((i for i, (a, b) in enumerate(zip(self.verify(tokens), tokens)) if a != b), None)

    def matches(self, model: Griffin, key: tuple) -> bool:
        objects = [model, *model.parameters()]
        return (key == self.key and len(objects) == len(self.objects)
                and all(r() is o for r, o in zip(self.objects, objects, strict=True))
                and [p._version for p in objects[1:]] == self.versions)


_last_reference: ReferenceRun | None = None


def reference_run(model: Griffin, chunk: int, tokens: Sequence[int], greedy_tokens: int = 64) -> ReferenceRun:
    """Runs the fp32 model for a validation on `tokens` (n + 1 ids) ahead of it. Pass the result to
    `run_validation` in place of the model, and the model can be freed before the artifact is loaded: at
    2B the float32 model (10.7 GB) and a runtime holding the artifact would otherwise be resident together.
    """
    return _reference_run(model, chunk, list(tokens[:-1]), greedy_tokens)


def _reference_run(model: Griffin, chunk: int, inputs: list[int], greedy_tokens: int) -> ReferenceRun:
    """The fp32 model's side of a validation. The last one is kept: an accuracy matrix or an artifact's
    variants (ONNX's .ort) validate many artifacts of one model on the same text, and the eager run is most
    of a validation's time. It is reused only for the same live model object with the same parameter
    objects, unchanged in place (weak references and version counters), on the same tokens."""
    global _last_reference
    key = (chunk, tuple(inputs), greedy_tokens)
    if _last_reference is None or not _last_reference.matches(model, key):
        _last_reference = None  # free the old logits first (vocab x tokens floats: 0.5 GB at 2B)
        reference = EagerRunner(model, chunk)
        logits = teacher_forced(reference, inputs)
        state = reference.state()
        params = list(model.parameters())
        _last_reference = ReferenceRun([weakref.ref(model), *(weakref.ref(p) for p in params)],
                                       [p._version for p in params], key, logits, state,
                                       greedy(reference, inputs[:chunk], greedy_tokens),
                                       model.config.attention_window_size)
    return _last_reference


@dataclasses.dataclass
class ArtifactRun:
    """An artifact's side of a validation, made before the reference (`artifact_run`): a streamed reference
    then runs after the runtime is gone, so the two are never resident together."""

    prefill_chunk: int
    inputs: list[int]
    logits: Logits  # teacher-forced [n, v]: an array, or a SpilledLogits past IN_MEMORY_BYTES
    state: dict[str, np.ndarray] | None
    greedy: list[int]


def artifact_run(runner: Runner, tokens: Sequence[int], greedy_tokens: int = 64,
                 progress: Callable[[int], None] | None = None) -> ArtifactRun:
    """Runs the artifact for a validation on `tokens` (n + 1 ids): teacher-forced logits, the state, greedy."""
    inputs = list(tokens[:-1])
    tick = (lambda: progress(1)) if progress else None
    logits = teacher_forced(runner, inputs, tick)
    state = runner.state()
    state = None if state is None else {k: np.asarray(v) for k, v in state.items()}
    return ArtifactRun(runner.prefill_chunk, inputs, logits, state,
                       greedy(runner, inputs[: runner.prefill_chunk], greedy_tokens))


def streamed_reference_run(stream: Any, chunk: int, tokens: Sequence[int], artifact_greedy: list[int],
                           greedy_tokens: int = 64) -> ReferenceRun:
    """The fp32 reference of a validation, computed layer-major from a streamed checkpoint
    (`rgexport.streaming`): one block in memory at a time instead of the whole model (10.7 GB at 2B, 34 GB
    at 9B). One pass over the weights gives the teacher-forced logits and state over `tokens` and the
    reference's next token after every prefix of the artifact's greedy continuation (prompt + those
    tokens, teacher-forced), which finds the first divergence exactly as free-running greedy would."""
    from rgexport.streaming import layer_major_runs, validation_batch

    inputs = list(tokens[:-1])
    prompt = inputs[:chunk]
    batch = validation_batch(stream.config)  # the prefill graph's values, not the decode steps' (rounding apart)

    def choices(runs: list, seqs: list[list[int]]) -> list[list[int]]:
        out = []
        for run, seq in zip(runs, seqs):
            logits = run.logits(len(prompt) - 1, len(seq)).numpy()
            out.append([int(t) for t in logits.argmax(-1)][: len(seq) - len(prompt) + 1][:greedy_tokens])
        return out

    def verify(art: list[int]) -> list[int]:
        seq = prompt + list(art[:-1])
        return choices(layer_major_runs(stream, [seq], chunk, batch), [seq])[0]

    greedy_seq = prompt + list(artifact_greedy[:-1])
    run, greedy_run = layer_major_runs(stream, [inputs, greedy_seq], chunk, batch)
    state = {k: (v[0] if v.shape[0] == 1 else v).numpy() for k, v in run.state.items()}
    ref_greedy = choices([greedy_run], [greedy_seq])[0]
    run.release()  # the embedding the greedy choices read (shared with `run`): read again when compared
    return ReferenceRun([], [], (chunk, tuple(inputs), greedy_tokens), run, state, ref_greedy,
                        stream.config.attention_window_size, greedy_of=list(artifact_greedy), verify=verify)


def quality_judged(manifest: dict[str, Any], asked: bool | None, own_logits: Logits | None) -> bool:
    """Whether the float32 comparison judges the artifact: as asked, else yes unless the weights are random
    (`--random-weights`) and the artifact's own quantised model is there to judge it instead."""
    if asked is not None:
        return asked
    return own_logits is None or manifest["model"]["checkpoint"].get("format") != "random"


def run_validation(
    runner: Runner | ArtifactRun, model: Griffin | ReferenceRun, tokens: Sequence[int], *, backend: str, recipe: str,
    quantized: bool, greedy_tokens: int = 64, progress: Callable[[int], None] | None = None,
    variant: str | None = None, own_logits: Logits | None = None, judge_quality: bool = True,
) -> ValidationReport:
    """Compares `runner` with the fp32 eager model on `tokens` (n + 1 ids: inputs and next-token targets).

    `model` is the model, or its run on the same tokens made beforehand by `reference_run`. `backend` names
    the thresholds' backend (a registered one, or a label such as "eager"); `variant` another way of loading
    the same artifact, shown beside it in the report.

    `own_logits`: the artifact's own quantised model over the same inputs (`own_model_run`), judged by
    `[own_model]`. `judge_quality=False` (random weights, where agreement with float32 measures the
    randomness) reports the float32 comparison without judging it; it needs `own_logits`, which then judges
    alone.
    """
    inputs, targets = list(tokens[:-1]), np.asarray(tokens[1:])
    tick = (lambda: progress(1)) if progress else None
    if isinstance(model, ReferenceRun):
        ref = model
        if ref.key != (runner.prefill_chunk, tuple(inputs), greedy_tokens):
            raise RgexportError("the reference run was made for other tokens, prefill chunk or greedy steps than "
                                "this validation's; make it with reference_run on the same ones")
    else:
        ref = _reference_run(model, runner.prefill_chunk, inputs, greedy_tokens)
        if tick:
            for _ in inputs:
                tick()
    art = runner if isinstance(runner, ArtifactRun) else None
    ref_logits = ref.logits
    art_logits = art.logits if art is not None else teacher_forced(runner, inputs, tick)
    metrics = compare_logits(ref_logits, art_logits, targets)
    release(ref_logits)  # a streamed reference's embedding, before the own model's is read
    window = ref.window
    per_pos = metrics["_per_position_max_error"]
    metrics["max_abs_logit_error_first_window"] = float(per_pos[:window].max())
    metrics["max_abs_logit_error_after_window"] = float(per_pos[window:].max()) if len(per_pos) > window else None

    state_errors = None
    art_state = art.state if art is not None else runner.state()
    if art_state is not None:
        state_errors = {}
        for name, expected in ref.state.items():
            if name in art_state:
                a = np.asarray(art_state[name], dtype=np.float64).reshape(expected.shape)
                state_errors[name] = float(np.abs(a - expected).max())

    prompt = inputs[: runner.prefill_chunk]
    g_art = art.greedy if art is not None else greedy(runner, prompt, greedy_tokens)
    divergence = ref.divergence(g_art)

    thresholds = load_thresholds(recipe, quantized, backend)
    failures = judge(metrics, thresholds)
    own = None
    if own_logits is not None:
        own_metrics = compare_logits(own_logits, art_logits, targets)
        release(own_logits)
        own_thresholds = load_thresholds("own_model", True)
        own = OwnModelCheck(own_metrics, own_thresholds, judge(own_metrics, own_thresholds))
    unjudged = []
    if not judge_quality:
        if own is None:
            raise RgexportError("the float32 comparison can go unjudged only beside the artifact's own quantised "
                                "model, which this backend does not give for this recipe")
        failures, unjudged = [], failures
    backend = f"{backend} ({variant})" if variant else backend
    notes = []
    if divergence is not None:
        notes.append(f"greedy outputs diverge at step {divergence} of {greedy_tokens}")
    return ValidationReport(backend, recipe, len(inputs), metrics, thresholds, failures, state_errors,
                            greedy_tokens, divergence, notes, own_model=own, quality_judged=judge_quality,
                            unjudged=unjudged)


class ValidationFailed(RgexportError):
    """An artifact missed a threshold; carries the full report."""

    def __init__(self, report: ValidationReport):
        failures = report.failures + [f"[{k}] {f}" for k, v in report.variants.items() for f in v.failures]
        super().__init__("artifact failed validation: " + "; ".join(failures))
        self.report = report


def _small(manifest: dict[str, Any]) -> bool:
    """Whether the artifact's model is small enough to validate against the whole float32 model in memory
    (`rgexport.config.is_small`); a larger one streams its reference."""
    from rgexport import config

    return 4 * int(manifest["model"]["parameters"]) < config.LARGE_MODEL_BYTES


def artifact_checkpoint(manifest: dict[str, Any], checkpoint: str | None = None, preset: str | None = None,
                        *, streamed: bool = False):
    """The checkpoint an artifact was built from: the one its manifest records (the shipped model, random
    weights of a preset, or a path that must still exist), or `checkpoint`; its digest must match.
    `streamed=True`: a `rgexport.streaming.StreamedCheckpoint` (read part by part) instead of the model."""
    from rgexport.checkpoint import RANDOM_PREFIX, SHIPPED_SOURCE, load_checkpoint, load_source
    from rgexport.streaming import stream_checkpoint, stream_source

    recorded = manifest["model"]["checkpoint"]
    if checkpoint is None:
        source = recorded["source"]
        if not (source == SHIPPED_SOURCE or source.startswith(RANDOM_PREFIX) or Path(source).exists()):
            raise RgexportError(f"the artifact was built from {source}, which is not here; pass --checkpoint PATH")
        ckpt = (stream_source if streamed else load_source)(source, preset or recorded.get("preset"))
    else:
        ckpt = (stream_checkpoint if streamed else load_checkpoint)(checkpoint, preset or recorded.get("preset"))
    if ckpt.digest != recorded["sha256"]:
        raise RgexportError(
            f"checkpoint {ckpt.source} (sha256 {ckpt.digest[:12]}…) is not the one the artifact was built "
            f"from ({recorded['source']}, sha256 {recorded['sha256'][:12]}…)"
        )
    return ckpt


def artifact_tokenizer(folder: Path, manifest: dict[str, Any], ckpt):
    """The artifact's own tokenizer, else the checkpoint's; an error where neither has one."""
    from rgexport.tokenizer import Tokenizer

    tok_file = manifest["tokenizer"]["file"] if manifest["tokenizer"] else None
    if tok_file is None and ckpt.tokenizer_path is None:
        raise RgexportError("no tokenizer in the artifact or the checkpoint; validation needs one")
    return Tokenizer(folder / tok_file if tok_file else ckpt.tokenizer_path)


def validate_artifact(
    path: str | Path, *, checkpoint: str | None = None, preset: str | None = None, tokens: int | None = None,
    text: Path | None = None, greedy_tokens: int = 64, stages=None, judge_quality: bool | None = None,
) -> ValidationReport:
    """Validates an artifact folder written by `rgexport build` against its checkpoint.

    The checkpoint defaults to the one recorded in the manifest (the shipped model, or the path it was
    built from); its digest must match the manifest's.
    """
    from rgexport.backends import get_backend
    from rgexport.progress import Stages
    from rgexport.runtime import checked_artifact, open_artifact

    stages = stages or Stages(quiet=True)
    folder, manifest = checked_artifact(path)  # paths, checksums, the backend's structural check
    backend = get_backend(manifest["backend"])
    recipe = manifest["recipe"]
    chunk = int(manifest["io"]["prefill_chunk"])
    if not _small(manifest):
        # Streamed: the artifact runs first, then the reference one block at a time, never the whole model.
        with stages.stage("load", "checkpoint (streamed)"):
            stream = artifact_checkpoint(manifest, checkpoint, preset, streamed=True)
            tokenizer = artifact_tokenizer(folder, manifest, stream)
        n = tokens or 4 * stream.config.attention_window_size
        ids = heldout_tokens(tokenizer, n, text)
        with stages.stage("validate", f"{n} tokens, reference streamed"), stages.bar("validating", 2 * n) as advance:
            runner = open_artifact(folder, manifest=manifest, verify=False)  # the files were verified above
            art = artifact_run(runner, ids, greedy_tokens, progress=advance)
            runner = None
            reference = streamed_reference_run(stream, chunk, ids, art.greedy, greedy_tokens)
            own = own_model_run(stream, backend, manifest, chunk, ids[:-1])
            advance(n)
            report = run_validation(art, reference, ids, backend=manifest["backend"], recipe=recipe["name"],
                                    quantized=recipe["quantized"], greedy_tokens=greedy_tokens, own_logits=own,
                                    judge_quality=quality_judged(manifest, judge_quality, own))
        validate_variants(report, backend, folder, manifest, reference, ids, stages)
        return report
    with stages.stage("load", "checkpoint"):
        ckpt = artifact_checkpoint(manifest, checkpoint, preset)
        tokenizer = artifact_tokenizer(folder, manifest, ckpt)
    n = tokens or 4 * ckpt.config.attention_window_size
    ids = heldout_tokens(tokenizer, n, text)
    with stages.stage("validate", f"{n} tokens"), stages.bar("validating", 2 * n) as advance:
        # The reference runs first and the model goes before the runtime loads the artifact: the two are
        # never resident together (at 2B: 10.7 GB of float32 weights beside the artifact's).
        reference = reference_run(ckpt.model, chunk, ids, greedy_tokens)
        own = own_model_run(ckpt.model, backend, manifest, chunk, ids[:-1])
        ckpt = None
        advance(n)
        runner = open_artifact(folder, manifest=manifest, verify=False)  # the files were verified above
        report = run_validation(runner, reference, ids, backend=manifest["backend"], recipe=recipe["name"],
                                quantized=recipe["quantized"], greedy_tokens=greedy_tokens, progress=advance,
                                own_logits=own, judge_quality=quality_judged(manifest, judge_quality, own))
    runner = None
    validate_variants(report, backend, folder, manifest, reference, ids, stages)
    return report


def validate_variants(report: ValidationReport, backend, folder: Path, manifest: dict[str, Any],
                      model: Griffin | ReferenceRun, ids: Sequence[int], stages, greedy_tokens: int = 64) -> None:
    """Validates each of the backend's other ways of loading the artifact into `report.variants`."""
    from rgexport.runtime import open_artifact

    recipe = manifest["recipe"]
    for name in backend.variants(folder, manifest):
        with stages.stage("validate", f"variant {name}"):
            runner = open_artifact(folder, manifest=manifest, verify=False, variant=name)
            report.variants[name] = run_validation(
                runner, model, ids, backend=manifest["backend"], variant=name, recipe=recipe["name"],
                quantized=recipe["quantized"], greedy_tokens=greedy_tokens)


def format_report(report: ValidationReport) -> str:
    """A summary a person can read."""
    m = report.metrics
    status = "PASSED" if report.passed else "FAILED"
    lines = [
        (f"{report.backend} / {report.recipe}: {status} over {report.tokens} tokens "
         f"(thresholds: [{report.thresholds.get('table_entry')}] in thresholds.toml)"),
        (f"  logits      max |err| {m['max_abs_logit_error']:.3g}  mean |err| {m['mean_abs_logit_error']:.3g}"
         f"  (first window {m['max_abs_logit_error_first_window']:.3g}"
         + (f", after {m['max_abs_logit_error_after_window']:.3g})" if m.get("max_abs_logit_error_after_window")
            is not None else ")")),
        f"  agreement   top-1 {100 * m['top1_agreement']:.2f}%   mean KL {m['mean_kl']:.3g} nats",
        (f"  perplexity  reference {m['ppl_reference']:.3f}   artifact {m['ppl_artifact']:.3f}"
         f"   ratio {m['ppl_ratio']:.4f}"),
        "  greedy      " + (f"identical for all {report.greedy_tokens} tokens" if report.greedy_divergence is None
                             else f"diverges at step {report.greedy_divergence} of {report.greedy_tokens}"),
    ]
    if report.state_errors:
        worst = max(report.state_errors, key=report.state_errors.get)
        lines.append(f"  state       max |err| {report.state_errors[worst]:.3g} ({worst}), "
                     f"{len(report.state_errors)} tensors compared")
    else:
        lines.append("  state       not exposed by this runtime")
    for f in report.failures:
        lines.append(f"  FAIL        {f}")
    if not report.quality_judged:
        lines.append("  quality     against float32 reported, not judged (random weights: it measures the randomness)"
                     + (f"; it would miss {len(report.unjudged)} bound(s)" if report.unjudged else ""))
    own = report.own_model
    if own is not None:
        om = own.metrics
        lines.append(f"  own model   {'passed' if not own.failures else 'FAILED'}: the artifact against its recipe's "
                     f"quantised model in PyTorch: top-1 {100 * om['top1_agreement']:.2f}%, mean KL "
                     f"{om['mean_kl']:.3g}, max |err| {om['max_abs_logit_error']:.3g}")
        lines += [f"  FAIL        [own model] {f}" for f in own.failures]
    for name, v in report.variants.items():
        vm = v.metrics
        verdict = "passed" if v.passed else "FAILED"
        lines.append(f"  variant {name}: {verdict}: max |err| {vm['max_abs_logit_error']:.3g}, "
                     f"top-1 {100 * vm['top1_agreement']:.2f}%, perplexity ratio {vm['ppl_ratio']:.4f}")
        lines += [f"  FAIL        [{name}] {f}" for f in v.failures]
    return "\n".join(lines)
