"""`rgexport build`: one checkpoint -> one validated artifact folder.

Stages, in order (each shown with progress, each timed into the manifest):
  1. load       read the checkpoint (or the shipped model) and its tokenizer
  2. model      build the export-friendly step model (fp32, eval, no grad)
  3. quantise   the recipe's torch-level quantisation (backend); "prepare" where the backend quantises
                the converted program instead (then it only checks what the recipe needs)
  4. export     capture decode and prefill graphs (backend)
  5. lower      lower/convert for the runtime, and quantise there where the backend does (backend)
  6. write      write the artifact files into a temporary folder beside the output
  7. validate   run the artifact in its runtime against the fp32 reference (unless --no-validate)
  8. manifest   write manifest.json, then move the folder into place
The output appears only when every stage has passed; an existing output is replaced only with
`force=True`, and a failure leaves it untouched. With `log_output`, what other libraries print goes to
build.log in the output folder (beside it, as <name>.failed-build.log, when the build fails); the manifest
records each stage's wall time and peak RSS.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rgexport.backends import BuildContext, get_backend
from rgexport.checkpoint import SHIPPED_SOURCE, Checkpoint, load_checkpoint
from rgexport.config import is_small, prefill_last_only
from rgexport.errors import RgexportError
from rgexport.logs import captured
from rgexport.manifest import file_entries, now, rgexport_version, write_manifest
from rgexport.memory import forget_last_export, release_freed
from rgexport.progress import StageFailed, Stages

BUILD_LOG = "build.log"


@dataclasses.dataclass
class BuildOptions:
    backend: str
    recipe: str | None = None  # None: the backend's default
    checkpoint: str | None = None  # None: the shipped model
    preset: str | None = None  # for DeepMind state-dict checkpoints
    tokenizer: str | None = None
    out: Path | None = None  # None: rgexport-out/<backend>-<recipe>
    force: bool = False
    validate: bool = True
    prefill_chunk: int | None = None
    # "last": prefill returns the chunk's last logits alone (config.PREFILL_LOGITS); None: "all", or a bundle's
    # profile's own
    prefill_logits: str | None = None
    validation_tokens: int | None = None  # None: 4x the attention window
    validation_text: Path | None = None
    calibration: Path | None = None  # text or JSONL for calibrated recipes (default: calibration corpus)
    require_pass: bool = True  # False: keep an artifact that fails validation (manifest says "failed")
    random_weights: bool = False  # build `preset`'s shape with random weights (sizing, speed)
    seed: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # backend options (target profile)
    log_output: bool = False  # other libraries' output (Python and native) into build.log, not the terminal
    # Whether agreement with float32 judges a quantised artifact (None: yes, unless the weights are random and
    # the artifact's own quantised model judges it instead; `rgexport.validate.quality_judged`).
    judge_quality: bool | None = None


@dataclasses.dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    report: Any  # ValidationReport | None


class BuildError(RgexportError):
    def __init__(self, stage: str, cause: BaseException, out: Path, log: Path | None = None):
        from rgexport.safety import sentence

        kept = f"; {out} is untouched" if out.exists() else ""
        logged = f"; the traceback and other libraries' output are in {log}" if log is not None else ""
        what = sentence(cause) if isinstance(cause, RgexportError) else f"{type(cause).__name__}: {sentence(cause)}"
        super().__init__(f"build failed at stage '{stage}': {what}{kept}{logged}")
        self.stage = stage
        self.cause = cause
        self.log = log


def default_out(backend: str, recipe: str) -> Path:
    return Path("rgexport-out") / f"{backend}-{recipe}"


def _partial_dirs(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.partial-*")) if out.parent.exists() else []


def failed_log_path(out: Path) -> Path:
    """Where a failed build's log is kept (the partial output folder itself is removed)."""
    return out.parent / f"{out.name}.failed-build.log"


@contextlib.contextmanager
def logged_output(stages: Stages, log: Path | None) -> Iterator[None]:
    """Other libraries' output into `log` (None: left on the terminal), the stage lines on the terminal."""
    with captured(log) as terminal, stages.writing_to(terminal):
        yield


def keep_failed_log(work: Path, out: Path, cause: BaseException | None = None) -> Path | None:
    """Moves a failed build's log out of its partial folder before that is removed; returns where it went.
    `cause`'s traceback goes at its end: what broke inside a library or in rgexport, for the report."""
    log = work / BUILD_LOG
    if not log.is_file():
        return None
    if cause is not None:
        import traceback

        with open(log, "a") as f:
            f.write("\n\nThe build failed here:\n" + "".join(traceback.format_exception(cause)))
    kept = failed_log_path(out)
    os.replace(log, kept)
    return kept


def build(opts: BuildOptions, stages: Stages | None = None, checkpoint: Checkpoint | None = None) -> BuildResult:
    """Builds, validates and writes one artifact folder. Raises RgexportError (BuildError) on failure."""
    stages = stages or Stages(quiet=True)
    backend = get_backend(opts.backend)
    recipe_name = backend.resolve_recipe(opts.recipe) if opts.recipe else backend.default_recipe
    backend.check_options(opts.options)
    prefill_last_only(opts.prefill_logits or "all")  # a bad value is said before anything loads
    recipe = backend.recipes[recipe_name]
    out = Path(opts.out) if opts.out else default_out(backend.name, recipe_name)
    if out.exists() and not opts.force:
        raise RgexportError(f"{out} already exists; pass --force to replace it (or choose another --out)")
    if out.exists() and not (out / "manifest.json").is_file():
        raise RgexportError(f"{out} exists and is not an rgexport artifact folder; refusing to replace it")
    from rgexport.safety import missing_parents, remove_empty

    created = missing_parents(out.parent)
    work = make_work_dir(out)
    try:
        with logged_output(stages, work / BUILD_LOG if opts.log_output else None):
            result = _build_into(work, out, opts, backend, recipe, stages, checkpoint)
        _move_into_place(work, out)
        failed_log_path(out).unlink(missing_ok=True)  # an earlier failure's log, now superseded
        created = []
        return dataclasses.replace(result, out=out)
    except StageFailed as e:
        # A stage that broke inside a library keeps what the libraries printed; a user error (a file, an
        # option: the message says it all) leaves nothing behind.
        log = None if isinstance(e.cause, RgexportError) else keep_failed_log(work, out, e.cause)
        raise BuildError(e.stage, e.cause, out, log) from e.cause
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        remove_empty(created)  # a failed build leaves no folder it made


def make_work_dir(out: Path) -> Path:
    """The hidden temporary folder beside `out` that a build writes into (stale ones are removed first);
    an --out that cannot be created or written is one line naming it."""
    from rgexport.safety import writable_dir

    writable_dir(out.parent, "--out", "the folder that would hold --out,")
    for stale in _partial_dirs(out):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise RgexportError(f"cannot write beside --out {out}: {e.strerror or e}; choose another --out") from None


def _move_into_place(work: Path, out: Path) -> None:
    """Renames the finished folder onto `out`; an old output is swapped out first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(work, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def weights_source(opts: BuildOptions) -> Any:
    """What `opts` builds from, as a `StreamedCheckpoint` (config, tokenizer; no weights read, nothing hashed
    yet): the random draw of --preset (--random-weights), the checkpoint, or the shipped model."""
    from rgexport.streaming import stream_checkpoint, stream_random

    if opts.random_weights and (not opts.preset or opts.checkpoint):
        raise RgexportError("--random-weights needs --preset NAME and no --checkpoint")
    if opts.random_weights:
        return stream_random(opts.preset, opts.seed)
    return stream_checkpoint(opts.checkpoint, opts.preset, opts.tokenizer)


def _weights_stream(source: Any, opts: BuildOptions, backend: Any, recipe: str) -> Any:
    """`source` where the backend exports from a stream (`streams_weights`: asked for, or the model is
    large), else None (the build loads the whole model)."""
    want = backend.streams_weights(recipe, opts.options)
    if want is False:
        return None
    return source if want or not is_small(source.config) else None


def _check_whole_model_fits(config: Any, backend: Any, recipe: str) -> None:
    """Refuses, before anything is loaded, a build that loads the whole float32 model where the backend's
    measured peak (`Backend.whole_model_build_factor`) times that model exceeds this machine's memory: one
    line that says so, where the OOM killer would otherwise end the build minutes later."""
    from rgexport.checkpoint import physical_memory_bytes

    factor = backend.whole_model_build_factor
    if factor is None or is_small(config):
        return
    weights = 4 * config.num_parameters()
    need, have = factor * weights, physical_memory_bytes()
    if not have or need <= have:
        return
    raise RgexportError(
        f"{backend.name} / {recipe} loads the whole float32 model ({weights / 1e9:.1f} GB at "
        f"{config.num_parameters() / 1e9:.2f} B parameters), and its builds peaked at {factor:g}x that where "
        f"measured: about {need / 1e9:.0f} GB, more than this machine's {have / 2**30:.1f} GiB. Nothing was "
        "loaded. Build --target onnx, --target executorch --recipe int4, --target tflite --recipe int8 or --target "
        "coreml --recipe w4 (they read the weights one block at a time), or use a machine with more memory."
    )


def _chat_template(stream: Any) -> Any:
    """A Hugging Face folder's chat template, as `load_checkpoint` reads it."""
    if stream.format != "huggingface":
        return None
    from rgexport.templates import load_chat_template

    return load_chat_template(Path(stream.source))


def _build_into(work, out, opts, backend, recipe, stages, checkpoint) -> BuildResult:
    from rgexport.tokenizer import Tokenizer

    what = opts.checkpoint or (f"random weights, {opts.preset}" if opts.random_weights else "shipped model")
    with stages.stage("load", what):
        backend.runtime_versions()  # fails early if metadata is broken
        source = None if checkpoint is not None else weights_source(opts)
        stream = None if source is None else _weights_stream(source, opts, backend, recipe.name)
        backend.check_size((source or checkpoint).config, recipe.name, opts.options, stream is not None)
        if source is not None and stream is None:
            _check_whole_model_fits(source.config, backend, recipe.name)
        if checkpoint is not None:
            ckpt = checkpoint
        elif stream is not None:
            ckpt = Checkpoint(None, stream.config, stream.source, stream.format, stream.digest,  # type: ignore[arg-type]
                              stream.tokenizer_path, _chat_template(stream))
        elif opts.random_weights:
            from rgexport.checkpoint import random_checkpoint

            ckpt = random_checkpoint(opts.preset, opts.seed)
        else:
            ckpt = load_checkpoint(opts.checkpoint, opts.preset, opts.tokenizer)
        tokenizer = Tokenizer(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
        if tokenizer is not None and tokenizer.vocab_size > ckpt.config.vocab_size:
            raise RgexportError(
                f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                f"{ckpt.config.vocab_size}: they do not belong together"
            )
    config = ckpt.config
    chunk = opts.prefill_chunk or min(32, config.attention_window_size)
    if not 1 <= chunk <= config.attention_window_size:
        raise RgexportError(f"--prefill-chunk must be between 1 and the window ({config.attention_window_size})")
    ctx = BuildContext(config=config, recipe=recipe.name, work_dir=work, prefill_chunk=chunk,
                       options=dict(opts.options), stream=stream, prefill_logits=opts.prefill_logits or "all")
    if recipe.calibrated:
        from rgexport.calibrate import calibration_token_sequences

        if tokenizer is None:
            raise RgexportError(f"recipe {recipe.name} is calibrated on text, which needs a tokenizer")
        ctx.calibration_tokens = calibration_token_sequences(tokenizer, config, opts.calibration)

    with stages.stage("model", f"{config.num_parameters() / 1e6:.2f} M parameters"
                      + (", weights streamed block by block" if stream is not None else "")):
        if stream is not None:
            from rgexport.streaming import fake_griffin

            model = fake_griffin(config)  # shapes only: the backend reads the weights from `ctx.stream`
        else:
            model = ckpt.model.eval()
        model.requires_grad_(False)
    # Stage names say what happens: a backend that quantises its converted program does so in "lower".
    in_lower = backend.quantizes_in == "lower"
    with stages.stage("prepare" if in_lower else "quantise", recipe.name), torch.no_grad():
        # Quantisation rewrites modules in place, and validation needs the fp32 model afterwards. A small
        # model is copied; a large one is not (a second copy of 2B weights is 10 GB): validation then
        # reloads the reference from its source.
        small = is_small(config)
        copied = small and recipe.quantized and stream is None
        let_go = not small and checkpoint is None  # a large model of the build's own goes after export
        # What `quantize` returns is then the build's alone, as it is where it is a copy or streamed.
        ctx.disposable_weights = copied or stream is not None or let_go
        prepared = backend.quantize(copy.deepcopy(model) if copied else model, ctx)
        reference_intact = (small or not recipe.quantized) and stream is None
    with stages.stage("export", backend.name):
        exported = backend.export(prepared, ctx)
    if stream is not None:
        # The weights are in `exported` now. The checkpoint's memory maps go before lowering: their pages count
        # in RSS once read (5.4 GB of bf16 shards at 2B). Validation opens the checkpoint again if it needs it.
        ctx.stream = stream = None
    if let_go:
        # From here on the weights the backend needs are in `exported` (ONNX: on disk). The build's own
        # references would keep the float32 model (10.7 GB at 2B) alive through lowering and then beside
        # the reloaded reference in validation; drop them. A caller's checkpoint is the caller's to keep.
        prepared = model = None
        ckpt = dataclasses.replace(ckpt, model=None)
        reference_intact = False
        release_freed()
    with stages.stage("lower", backend.name + (f", quantise {recipe.name}" if in_lower and recipe.quantized else "")):
        lowered = backend.lower(exported, ctx)
    with stages.stage("write", str(out)):
        files = backend.write(lowered, ctx)
        if not files:
            raise RgexportError(f"backend {backend.name} wrote no files")
        tok_entry = None
        if tokenizer is not None:
            shutil.copyfile(tokenizer.path, work / "tokenizer.model")
            tok_entry = {"file": "tokenizer.model", "type": "sentencepiece", "vocab_size": tokenizer.vocab_size,
                         "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                         "chat_template": ckpt.chat_template.to_dict() if ckpt.chat_template else None}
        entries = file_entries(work, [*files, *([work / "tokenizer.model"] if tokenizer else [])])
        manifest = {
            "format": "rgexport-manifest",
            "format_version": 1,
            "created": now(),
            "rgexport_version": rgexport_version(),
            "runtime": backend.runtime_versions(),
            "backend": backend.name,
            "recipe": dataclasses.asdict(recipe),
            "model": {
                "config": config.to_dict(),
                "parameters": config.num_parameters(),
                "checkpoint": {
                    "source": SHIPPED_SOURCE if opts.checkpoint is None and checkpoint is None
                    and not opts.random_weights else ckpt.source,
                    "format": ckpt.format,
                    "sha256": ckpt.digest,
                    **({"preset": opts.preset} if opts.preset else {}),
                },
            },
            "artifact": {
                "file": files[0].relative_to(work).as_posix(),
                "files": entries,
                "total_bytes": sum(e["bytes"] for e in entries if e["path"] != "tokenizer.model"),
            },
            "tokenizer": tok_entry,
            "io": backend.io_contract(ctx),
            "backend_facts": ctx.facts,
            "options": ctx.options,  # as the backend resolved them (what validation's own model needs)
            "notes": ctx.notes,
            "build": {},
            "validation": {"status": "unvalidated"},
        }

    report = None
    if opts.validate:
        from rgexport.validate import (
            heldout_tokens,
            own_model_run,
            quality_judged,
            run_validation,
            validate_variants,
        )

        if tokenizer is None:
            raise RgexportError("validation needs a tokenizer (tokenizer.model); pass --tokenizer or --no-validate")
        n = opts.validation_tokens or 4 * config.attention_window_size
        tokens = heldout_tokens(tokenizer, n, opts.validation_text)
        with stages.stage("validate", f"{n} tokens, teacher-forced + greedy"):
            prepared = exported = lowered = None  # free graph copies of the weights before loading the artifact
            forget_last_export()  # and the trace's nodes that torch keeps until the next export
            release_freed()
            with stages.bar("validating", 2 * n) as advance:
                from rgexport.runtime import open_artifact

                if reference_intact:
                    runner = open_artifact(work, manifest=manifest, verify=False)  # written just now
                    reference = model
                    own = own_model_run(model, backend, manifest, chunk, tokens[:-1])
                else:
                    from rgexport.streaming import stream_source
                    from rgexport.validate import artifact_run, streamed_reference_run

                    # The model was let go after export. The artifact runs first, then the runtime goes and the
                    # reference streams from the checkpoint one block at a time (layer-major): never the
                    # float32 model (10.7 GB at 2B) and never beside the artifact.
                    with stages.part("artifact"):
                        runner = artifact_run(open_artifact(work, manifest=manifest, verify=False), tokens,
                                              progress=advance)
                        release_freed()
                    stream = stream_source(manifest["model"]["checkpoint"]["source"], opts.preset)
                    with stages.part("reference"):
                        reference = streamed_reference_run(stream, chunk, tokens, runner.greedy)
                        release_freed()
                    with stages.part("own model"):
                        own = own_model_run(stream, backend, manifest, chunk, tokens[:-1])
                        release_freed()
                    advance(n)
                # Streamed: the logits of the reference and the own model are computed here, a slice at a time.
                with stages.part("compare") if not reference_intact else contextlib.nullcontext():
                    report = run_validation(runner, reference, tokens, backend=backend.name, recipe=recipe.name,
                                            quantized=recipe.quantized, progress=advance, own_logits=own,
                                            judge_quality=quality_judged(manifest, opts.judge_quality, own))
            runner = None
            validate_variants(report, backend, work, manifest, reference, tokens, Stages(quiet=True))
            manifest["validation"] = report.to_dict()
            if not report.passed and opts.require_pass:
                from rgexport.validate import ValidationFailed

                raise ValidationFailed(report)
    with stages.stage("manifest"):
        manifest["build"] = {"stages_seconds": dict(stages.timings), "stages_peak_rss_bytes": dict(stages.peak_rss),
                             "parts": dict(stages.parts),
                             "peak_rss_bytes": max(stages.peak_rss.values(), default=0)}
        write_manifest(work, manifest)
    return BuildResult(out=work, manifest=manifest, report=report)

