"""The `rgexport` command line: a thin layer over the library (each command builds options and calls one
function). Every command runs inside one error boundary (`_friendly`): bad input prints one line,
`error: <what is wrong>; <what to do>`, and exits 1; a usage error exits 2; Ctrl-C and SIGTERM exit 130
and 143 after the build's partial folder is cleaned up; an unanticipated exception prints one line and
the file its traceback was written to (the traceback itself only with --verbose), exit 70."""

from __future__ import annotations

import contextlib
import datetime
import enum
import functools
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from rgexport.errors import RgexportError
from rgexport.profiles import profile_names
from rgexport.registry import backend_names

try:  # newer typer vendors click
    from typer._click import exceptions as _click
except ImportError:  # pragma: no cover
    from click import exceptions as _click  # type: ignore[no-redef]

_PASS_THROUGH = tuple({typer.Exit, typer.Abort, getattr(_click, "Exit", typer.Exit),
                       getattr(_click, "Abort", typer.Abort), _click.ClickException, SystemExit})
EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 70, 130, 143


class _Group(TyperGroup):
    """Usage errors (an unknown option, a value out of range) as one `error:` line too, exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except getattr(_click, "NoArgsIsHelpError", ()) as e:
            from typer import rich_utils

            rich_utils.rich_format_error(e)
            sys.exit(e.exit_code)
        except _click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            from rgexport.safety import sentence

            _error_line(f"{sentence(e.format_message())}{hint}")
            sys.exit(e.exit_code)
        except (getattr(_click, "Abort", typer.Abort), typer.Abort):
            _error_line("aborted")
            sys.exit(EXIT_ERROR)
        sys.exit(rv if isinstance(rv, int) else 0)


class _Command(TyperCommand):
    """A command whose options' help may list what is known only by importing the backends (their recipes):
    filled in when the help is shown, so that no other use of the command line imports them."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:
            fill = _LAZY_HELP.get(param.name or "")
            if fill is not None and not getattr(param, "_rgexport_filled", False):
                param.help = f"{param.help} {fill()}"
                param._rgexport_filled = True  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)


def _recipes_help() -> str:
    """Each backend's recipes, its default first, from the registry."""
    try:
        from rgexport.backends import recipe_names

        listed = "; ".join(f"{name}: {', '.join(recipes)}" for name, recipes in recipe_names().items())
    except Exception as e:  # noqa: BLE001 - help must print even where a backend module does not import
        return f"(`rgexport targets` lists them; they could not be read here: {type(e).__name__})"
    return f"Recipes (default first): {escape(listed)}."


_LAZY_HELP = {"recipe": _recipes_help}


# Built from the registry and the shipped profiles when the command line starts.
BACKENDS = backend_names()
PROFILES = profile_names()
TARGET_METAVAR = "[" + "|".join([*BACKENDS, *PROFILES, "PROFILE.toml"]) + "]"


def _target(value: str) -> str:
    """--target: a backend, a shipped profile, or a path to a profile .toml; anything else is a usage error
    that lists them."""
    if value in BACKENDS or value in PROFILES or value.endswith(".toml") or "/" in value:
        return value
    raise typer.BadParameter(f"{value!r} is not a backend ({', '.join(BACKENDS)}), a profile "
                             f"({', '.join(PROFILES)}) or a profile .toml")


def _notice(old: str, new: str) -> None:
    """One line on stderr for an old option spelling that still works for this release."""
    err.print(Text(f"note: {old} is now {new}; {old} goes away in the next release"), soft_wrap=True,
              highlight=False)


app = typer.Typer(
    help="Export Griffin / RecurrentGemma models to validated on-device artifacts.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, cls=_Group,
)
out = Console()
err = Console(stderr=True)
_verbose = False


@app.callback()
def _options(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show everything: other libraries' output, and the full traceback of an unexpected "
        "error.")] = False) -> None:
    """Export Griffin / RecurrentGemma models to validated on-device artifacts."""
    global _verbose
    _verbose = verbose


def _error_line(message: str) -> None:
    """One line on stderr, never wrapped, never read as markup, never ending in '..'."""
    from rgexport.safety import sentence

    one = " ".join(sentence(message).split())
    err.print(Text("error: ", style="red") + Text(one), soft_wrap=True, highlight=False)


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), raised in the main thread so that `finally` blocks clean up partial output."""


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
        raise Terminated(signal.Signals(signum).name)

    old = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def crash_dir() -> Path:
    """Where crash reports go: $RGEXPORT_CACHE (as for the emulated device's cache), else ~/.cache/rgexport."""
    base = os.environ.get("RGEXPORT_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "rgexport"


def _write_crash(e: BaseException) -> Path | None:
    text = "".join(traceback.format_exception(e))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    import tempfile

    for folder in (crash_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}-{os.getpid()}.txt"
            path.write_text(f"rgexport {' '.join(sys.argv[1:])}\n\n{text}")
            return path
        except OSError:
            continue
    return None


def report_error(e: BaseException) -> int:
    """Prints what went wrong as one `error:` line and returns the exit status."""
    from rgexport.progress import StageFailed
    from rgexport.safety import first_line, sentence

    while isinstance(e, StageFailed):
        e = e.cause
    if isinstance(e, Terminated):
        _error_line(f"terminated ({e}); partial output was removed")
        return EXIT_TERMINATED
    if isinstance(e, KeyboardInterrupt):
        err.print(Text("interrupted", style="red"))
        return EXIT_INTERRUPTED
    if isinstance(e, RgexportError):
        report = getattr(getattr(e, "cause", None), "report", None) or getattr(e, "report", None)
        if report is not None:
            from rgexport.validate import format_report

            err.print(format_report(report), highlight=False, markup=False, soft_wrap=True)
        _error_line(str(e))
        return EXIT_ERROR
    if _verbose:
        err.print("".join(traceback.format_exception(e)), highlight=False, markup=False, soft_wrap=True)
    if isinstance(e, MemoryError):
        _error_line("out of memory; use a smaller model or a machine with more memory")
        return EXIT_ERROR
    if isinstance(e, OSError) and e.filename is not None:
        # The environment (a full disk, a permission, a vanished file), not the input's content.
        _error_line(f"{e.filename}: {e.strerror or sentence(first_line(e))}; check the path, its permissions and "
                    "the free space")
        return EXIT_ERROR
    where = None if _verbose else _write_crash(e)
    shown = f"the full traceback is in {where}" if where else "run with --verbose for the traceback"
    _error_line(f"internal error, {type(e).__name__}: {sentence(first_line(e))}; {shown}; please report it")
    return EXIT_BUG


def _friendly(fn):
    """The error boundary every command runs in (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _signals():
            try:
                return fn(*args, **kwargs)
            except _PASS_THROUGH:
                raise
            except BaseException as e:  # noqa: BLE001 - the boundary: everything becomes one line
                raise typer.Exit(report_error(e)) from None

    return wrapper


CheckpointOpt = Annotated[str | None, typer.Option(
    "--checkpoint", "-c", help="Hugging Face folder or DeepMind state-dict file. Default: the shipped model.")]
PresetOpt = Annotated[str | None, typer.Option(help="Preset name (needed for DeepMind state-dict files).")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, help="Run the builds as Ray tasks on a local Ray of N workers, started and stopped here "
    "(pip install \"rgexport\\[cluster]\"). With --address: at most N at a time on the cluster.")]
TOKENS_HELP = "Held-out text tokens to run and compare (default 4x the window)."
TokensOpt = Annotated[int | None, typer.Option("--tokens", min=1, help=TOKENS_HELP)]
TextOpt = Annotated[Path | None, typer.Option(help="The held-out text file (default: the shipped held-out corpus).")]


class PrefillLogits(enum.StrEnum):
    """What a built artifact's prefill call returns (`rgexport.config.PREFILL_LOGITS`)."""

    all = "all"
    last = "last"


class Device(enum.StrEnum):
    """Where `validate --device` runs an artifact besides this machine."""

    emulated_arm64 = "emulated-arm64"
    browser = "browser"


AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Run the builds on an existing Ray cluster: its head's host:port (RAY_ADDRESS is "
    "honoured). --out must then be a folder every node reaches at the same path.")]


@app.command(cls=_Command)
@_friendly
def info(
    path: Annotated[Path | None, typer.Argument(help="An artifact folder, manifest.json or .onnx file.")] = None,
    preset: PresetOpt = None,
    checkpoint: CheckpointOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Config, parameter count, the decode state layout in bytes, and a transformer's KV cache beside it."""
    if path is not None:
        _artifact_info(path)
        return
    from rgexport.config import get_preset
    from rgexport.info import human_bytes, model_info

    if preset and checkpoint is None:
        config, title = get_preset(preset), f"preset {preset}"
    else:
        from rgexport.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, preset)
        config, title = ckpt.config, checkpoint or "shipped model (tiny)"
    data = model_info(config)
    if as_json:
        out.print_json(json.dumps(data))
        return
    c = config
    out.print(f"[bold]{title}[/bold]: {data['parameters'] / 1e6:,.1f} M parameters "
              f"({human_bytes(data['weights_bytes_fp32'])} in fp32), width {c.width}, {c.num_layers} blocks "
              f"({c.block_types.count('recurrent')} recurrent, {c.block_types.count('attention')} attention), "
              f"window {c.attention_window_size}, vocab {c.vocab_size}")
    table = Table(title="Decode state (fixed size, batch 1, float32)")
    for col in ("tensor", "shape", "dtype", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for s in data["state"]:
        table.add_row(s["name"], "x".join(map(str, s["shape"])), s["dtype"], f"{s['bytes']:,}")
    table.add_row("[bold]total[/bold]", "", "", f"[bold]{data['state_total_bytes']:,}[/bold]")
    out.print(table)
    by_kind = ", ".join(f"{k} {human_bytes(v)}" for k, v in data["state_by_kind"].items() if v)
    out.print(f"State total: {human_bytes(data['state_total_bytes'])} ({by_kind}), the same at every length.")
    kv = Table(title="A transformer's KV cache grows instead (float32)")
    kv.add_column("model")
    for n in ("2048", "8192", "32768"):
        kv.add_column(f"{int(n) // 1024}k tokens", justify="right")
    kv.add_row("this model's state", *[human_bytes(data["state_total_bytes"])] * 3)
    for row in data["kv_cache_comparison"]:
        kv.add_row(row["model"], *[human_bytes(v) for v in row["at_tokens"].values()])
    out.print(kv)


def _artifact_info(path: Path) -> None:
    from rgexport.info import describe_path

    out.print_json(json.dumps(describe_path(path)))  # JSON either way: a manifest or a file's summary


@app.command(cls=_Command)
@_friendly
def generate(
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.model, if the checkpoint has none.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=1 << 20)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; else at least 0.001.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k likeliest tokens (0: all).")] = 0,
    seed: int = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: the smallest set reaching p (1: all).")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the prompt and the text as JSON (nothing "
                                          "streamed).")] = False,
) -> None:
    """Generates text eagerly with the step model, streaming it (the sampler `run` and `chat` use)."""
    from rgexport.checkpoint import load_checkpoint
    from rgexport.generate import generate_text
    from rgexport.safety import utf8_argument
    from rgexport.sampling import SamplingOptions
    from rgexport.tokenizer import Tokenizer, check_tokenizer_fits

    utf8_argument(prompt, "--prompt")
    SamplingOptions(temperature, top_k, top_p, seed).check()
    ckpt = load_checkpoint(checkpoint, preset, tokenizer)
    if ckpt.tokenizer_path is None:
        raise RgexportError("the checkpoint has no tokenizer.model; pass --tokenizer PATH")
    tok = Tokenizer(ckpt.tokenizer_path)
    check_tokenizer_fits(tok, ckpt.config.vocab_size)
    SamplingOptions(temperature, top_k, top_p, seed).check(ckpt.config.vocab_size)
    if not as_json:
        sys.stdout.write(prompt)
    text = generate_text(ckpt.model, tok, prompt, on_piece=None if as_json else _write, max_tokens=max_tokens,
                         temperature=temperature, top_k=top_k, seed=seed, top_p=top_p)
    if as_json:
        out.print_json(json.dumps({"checkpoint": checkpoint, "prompt": prompt, "text": text,
                                   "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                                "seed": seed, "max_tokens": max_tokens}}))
        return
    sys.stdout.write("\n")


# run and chat: an artifact driven the way an app drives it (rgexport.runtime, rgexport.run, rgexport.chat).
ArtifactPath = Annotated[Path, typer.Argument(help="Artifact folder, bundle folder or bundle .zip.")]
ArtifactOpt = Annotated[str | None, typer.Option(
    "--artifact", help="Which of a bundle's artifacts: folder name, backend, or backend/recipe (default: first).")]
MaxTokensOpt = Annotated[int, typer.Option(min=1, help="Most tokens to generate per reply.")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="0 = greedy.")]
TopKOpt = Annotated[int, typer.Option(min=0, help="Sample from the k most likely tokens (0: all).")]
TopPOpt = Annotated[float, typer.Option(help="Sample from the smallest set reaching probability p (1: all).")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop when this text is generated (repeatable).")]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, help="The runtime's CPU threads (default: its own).")]


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@app.command(cls=_Command)
@_friendly
def run(
    path: ArtifactPath, prompt: Annotated[str, typer.Option(help="Text to continue.")], artifact: ArtifactOpt = None,
    max_tokens: MaxTokensOpt = 128, temperature: TemperatureOpt = 0.0, top_k: TopKOpt = 0, top_p: TopPOpt = 1.0,
    seed: int = 0, stop: StopOpt = None, threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print text, token ids and figures as JSON.")] = False,
) -> None:
    """Generates from an artifact in its own runtime, streaming text; figures (prompt tokens, prefill and
    decode tok/s, time to first token, state bytes) go to stderr."""
    from rgexport.logs import held_back
    from rgexport.run import Interrupt, run_prompt
    from rgexport.runtime import open_artifact
    from rgexport.safety import utf8_argument
    from rgexport.sampling import SamplingOptions

    utf8_argument(prompt, "--prompt")
    for text in stop or []:
        utf8_argument(text, "--stop")
    sampling = SamplingOptions(temperature, top_k, top_p, seed).check()
    with held_back(not _verbose):  # the runtime's own load-time lines (--verbose shows them)
        art = open_artifact(path, threads=threads, artifact=artifact)
    with art, Interrupt().catching_sigint() as stop_flag:
        sampling.check(art.vocab_size)
        if not as_json:
            err.print(art.describe(), highlight=False, markup=False, soft_wrap=True)
        gen = run_prompt(art, prompt, sampling, max_tokens, stop or [], None if as_json else _write, stop_flag)
        facts = {"artifact": art.source, "backend": art.backend, "recipe": art.recipe, "stand_in": art.stand_in}
    if as_json:
        out.print_json(json.dumps(facts | {"text": gen.text, "tokens": gen.tokens, "stats": gen.stats.to_dict()}))
        return
    sys.stdout.write("\n")
    err.print(gen.stats.summary(), highlight=False, markup=False, soft_wrap=True)


@app.command(cls=_Command)
@_friendly
def chat(
    path: ArtifactPath, artifact: ArtifactOpt = None, max_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.0, top_k: TopKOpt = 0, top_p: TopPOpt = 1.0, seed: int = 0,
    stop: StopOpt = None, threads: ThreadsOpt = None,
) -> None:
    """A multi-turn conversation with an artifact (turns from the terminal or a pipe); the fixed-size state
    carries the conversation, so each turn feeds only its own tokens. /reset, /stats, /quit; Ctrl-C stops a
    reply."""
    from rgexport.chat import ChatSession, chat_loop
    from rgexport.logs import held_back
    from rgexport.runtime import open_artifact
    from rgexport.safety import utf8_argument
    from rgexport.sampling import SamplingOptions

    for text in stop or []:
        utf8_argument(text, "--stop")
    sampling = SamplingOptions(temperature, top_k, top_p, seed).check()
    with held_back(not _verbose):  # the runtime's own load-time lines (--verbose shows them)
        art = open_artifact(path, threads=threads, artifact=artifact)
    with art:
        sampling.check(art.vocab_size)
        chat_loop(ChatSession(art, sampling, max_tokens, stop or []), sys.stdin, sys.stdout, sys.stderr)


def _validate_browser(path: Path, checkpoint: str | None, tokens: int | None, as_json: bool) -> None:
    from rgexport.browser import format_browser, validate_browser
    from rgexport.progress import Stages

    result = validate_browser(path, checkpoint=checkpoint, tokens=tokens, stages=Stages(err, quiet=as_json))
    if as_json:
        out.print_json(json.dumps(result | {"artifacts": [
            {k: (v.to_dict() if k == "report" else v) for k, v in a.items()} for a in result["artifacts"]]}))
    else:
        out.print(format_browser(result), highlight=False, markup=False, soft_wrap=True)
    if not result["passed"]:
        raise typer.Exit(1)


TARGET_HELP = ("A backend (one artifact), a target profile (an app bundle of its artifacts; `rgexport targets` "
               "lists them) or a profile .toml of your own.")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> options; each VALUE is a TOML value, or else the bare string."""
    import tomllib

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RgexportError(f"--option takes KEY=VALUE (for example quantized_gather=true), got {pair!r}")
        try:
            options[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = value.strip()
    return options


QualityOpt = Annotated[bool | None, typer.Option(
    "--judge-quality/--no-judge-quality",
    help="Whether agreement with the float32 model judges a quantised artifact. Default: yes, except for "
         "--random-weights, where the artifact's own quantised model judges it (agreement with float32 then "
         "measures the randomness and is only reported). --no-judge-quality: the same for a checkpoint "
         "folder of untrained weights.")]


@app.command(cls=_Command)
@_friendly
def build(
    target: Annotated[str, typer.Option("--target", "-t", help=TARGET_HELP, parser=_target,
                                        metavar=TARGET_METAVAR)],
    recipe: Annotated[str | None, typer.Option(
        "--recipe", "-r", help="With --target BACKEND (a profile names its own). Default: the backend's.")] = None,
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.model, if the checkpoint has none.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Default: rgexport-out/<target>-<recipe>")]
    = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    validate: Annotated[bool, typer.Option(help="Validate in the runtime (default).")] = True,
    prefill_chunk: Annotated[int | None, typer.Option(min=1, help="Tokens per prefill call.")] = None,
    prefill_logits: Annotated[PrefillLogits | None, typer.Option(
        help="What prefill returns: every token's logits (all: scoring, perplexity; a backend's default), or the "
        "chunk's last token's (last: all that generation reads; the head runs on one row, prefill is faster; the "
        "app profiles' default). With last, validation gets a chunk's other rows through decode.")] = None,
    tokens: TokensOpt = None,
    text: TextOpt = None,
    calibration: Annotated[Path | None, typer.Option(help="Calibration text or JSONL (calibrated recipes).")]
    = None,
    archive: Annotated[bool, typer.Option(help="Also write the bundle as one .zip.")] = False,
    random_weights: Annotated[bool, typer.Option(help="Random weights of --preset's shape (sizing, speed).")]
    = False,
    seed: Annotated[int, typer.Option(help="Seed for --random-weights.")] = 0,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-O", help="Backend option KEY=VALUE (repeatable; VALUE is read as TOML: true, 32, \"arm\"; "
        "a bare word is a string). Unknown keys are refused with the backend's list.")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show other libraries' output on the terminal instead of build.log.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (manifest or bundle.json) as JSON.")]
    = False,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    judge_quality: QualityOpt = None,
    memory_budget: Annotated[float | None, typer.Option(
        "--memory-budget", min=1, metavar="MB", help="With a profile: the memory budget in MB (10^6 bytes) that "
        "each artifact must fit, in place of the profile's memory_budget_mb (a device with more or less memory). "
        "Recorded in bundle.json; `rgexport validate` checks the bundle against it.")] = None,
) -> None:
    """Builds one artifact (--target BACKEND) or an app bundle (--target PROFILE: ios, android, ...):
    load, quantise, export, lower, write, validate, manifest. Other libraries' output goes to build.log."""
    from rgexport.build import BuildOptions
    from rgexport.build import build as run_build
    from rgexport.profiles import resolve_target
    from rgexport.progress import Stages
    from rgexport.validate import format_report

    profile = resolve_target(target)
    backend = profile.artifacts[0].backend if profile.source == "backend" else target
    opts = BuildOptions(backend=backend, recipe=recipe, checkpoint=checkpoint, preset=preset, tokenizer=tokenizer,
                        out=out_dir, force=force, validate=validate, prefill_chunk=prefill_chunk,
                        prefill_logits=prefill_logits.value if prefill_logits else None, validation_tokens=tokens,
                        validation_text=text, calibration=calibration,
                        random_weights=random_weights, seed=seed, options=parse_options(option or []),
                        log_output=not (verbose or _verbose), judge_quality=judge_quality)
    if profile.source != "backend":
        from rgexport.bundle import build_bundle

        if option:
            raise RgexportError("--option applies to one backend; a profile sets its artifacts' options (edit a "
                                "copy of the profile, or build the backend alone with --target BACKEND)")
        if recipe:
            raise RgexportError("--recipe applies to one backend; a profile names its recipes (edit a copy of "
                                "the profile, or build the backend alone with --target BACKEND --recipe NAME)")
        from rgexport.executors import make_executor

        with make_executor(workers, address) as executor:
            bundle = build_bundle(profile, opts, Stages(err), archive=archive, executor=executor,
                                  memory_budget_mb=memory_budget)
        if as_json:
            out.print_json(json.dumps({"out": str(bundle.out), "archive": str(bundle.archive) if bundle.archive
                                       else None, "bundle": bundle.manifest}, default=str))
            return
        for art in bundle.manifest["artifacts"]:
            err.print(f"  {art['backend']} / {art['recipe']}: {art['bytes'] / 1e6:.2f} MB, {art['validation']}",
                      highlight=False, markup=False)
        out.print(f"{bundle.out}" + (f"  (archive {bundle.archive})" if bundle.archive else ""), highlight=False)
        return
    if archive:
        raise RgexportError("--archive applies to bundles (--target ios, android, ...)")
    if memory_budget is not None:
        raise RgexportError("--memory-budget applies to bundles (--target ios, android, ...): one artifact has no "
                            "budget; `rgexport validate DIR` measures its peak memory")
    if workers or address:
        raise RgexportError("--workers and --address apply to bundles (--target ios, android, ...) and to "
                            "`rgexport evaluate`; one artifact is one build")
    result = run_build(opts, Stages(err))
    if as_json:
        out.print_json(json.dumps({"out": str(result.out), "manifest": result.manifest}, default=str))
        return
    if result.report is not None:
        err.print(format_report(result.report), highlight=False, markup=False, soft_wrap=True)
    else:
        err.print("[yellow]not validated (--no-validate): the manifest says so[/yellow]")
    summary = _build_summary(result.manifest, result.out, logged=not (verbose or _verbose))
    err.print(summary, highlight=False, markup=False)
    from rgexport.backends import get_backend

    size = result.manifest["artifact"]["total_bytes"]
    files = " + ".join(get_backend(result.manifest["backend"]).program_files(result.manifest))
    out.print(f"{result.out}  ({size / 1e6:.2f} MB, {files})", highlight=False)


def _build_summary(manifest: dict[str, Any], folder: Path, logged: bool) -> str:
    """One line: the build's peak RSS (and its stage), its wall time, and where other libraries' output went."""
    from rgexport.build import BUILD_LOG

    b = manifest["build"]
    stage, peak = max(b["stages_peak_rss_bytes"].items(), key=lambda kv: kv[1])
    # The part of that stage that reached the peak, where the stage was split into parts (validate).
    stage = next((k for k, v in b.get("parts", {}).items() if k.startswith(f"{stage}: ")
                  and v["peak_rss_bytes"] == peak), stage)
    seconds = sum(b["stages_seconds"].values())
    log = f"; log {folder / BUILD_LOG}" if logged else ""
    return f"  build       {seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB ({stage}){log}"


@app.command(cls=_Command)
@_friendly
def validate(
    path: Annotated[Path, typer.Argument(help="Artifact folder (or its manifest.json).")],
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    tokens: TokensOpt = None,
    text: TextOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    device: Annotated[Device | None, typer.Option(
        help="Run on another device: emulated-arm64 (the aarch64 runtime under qemu-user; set up and cached "
             "on first use), or browser (a web bundle in headless Chromium with onnxruntime-web).")] = None,
    memory: Annotated[bool, typer.Option(
        help="Also validate memory: peak RSS of a fresh process decoding N tokens must stay flat for N doubling "
             "up to --memory-multiple x the window, and the state bytes must equal the analytic figure.")] = True,
    memory_multiple: Annotated[int, typer.Option(min=1, help="Largest N of the memory check, in windows.")] = 16,
    judge_quality: QualityOpt = None,
) -> None:
    """Runs an artifact in its runtime beside the fp32 reference (logits, state, greedy tokens, and memory
    against sequence length); exit 0 only if everything passes."""
    from rgexport.progress import Stages
    from rgexport.validate import format_report, validate_artifact

    if device is Device.browser:
        _validate_browser(path, checkpoint, tokens, as_json)
        return
    if device is Device.emulated_arm64:
        from rgexport.emulate import format_emulated, validate_emulated

        result = validate_emulated(path, checkpoint=checkpoint, preset=preset, tokens=tokens, text=text,
                                   stages=Stages(err, quiet=as_json))
        if as_json:
            out.print_json(json.dumps(result.to_dict(), default=str))
        else:
            out.print(format_emulated(result), highlight=False, markup=False, soft_wrap=True)
        if not result.passed:
            raise typer.Exit(1)
        return
    from rgexport.bundle import ARCHIVE_SUFFIXES, BUNDLE_DIGEST, BUNDLE_MANIFEST

    if not path.exists():
        raise RgexportError(f"{path} does not exist; give an artifact folder, a bundle folder or a bundle .zip")
    if (path.is_file() and path.suffix.lower() in ARCHIVE_SUFFIXES) or (path / BUNDLE_MANIFEST).is_file() \
            or (path / BUNDLE_DIGEST).is_file():
        _validate_bundle(path, checkpoint, tokens, as_json)
        return
    stages = Stages(err, quiet=as_json)
    report = validate_artifact(path, checkpoint=checkpoint, preset=preset, tokens=tokens, text=text, stages=stages,
                               judge_quality=judge_quality)
    profile = None
    if memory:
        from rgexport.bench import memory_profile

        runs = (4 * memory_multiple).bit_length()  # N = window/4, window/2, ... up to memory_multiple x window
        with stages.bar(f"memory: a fresh process per N, up to {memory_multiple}x the window", runs) as advance:
            profile = memory_profile(path, max_multiple=memory_multiple, advance=advance)
    if as_json:
        out.print_json(json.dumps(report.to_dict() | ({"memory": profile} if profile else {})))
    else:
        out.print(format_report(report), highlight=False, markup=False, soft_wrap=True)
        if profile:
            out.print(_memory_markdown(profile), highlight=False, markup=False, soft_wrap=True)
    if not report.passed or (profile and not profile["passed"]):
        raise typer.Exit(1)


def _validate_bundle(path: Path, checkpoint: str | None, tokens: int | None, as_json: bool) -> None:
    from rgexport.bundle import validate_bundle
    from rgexport.progress import Stages
    from rgexport.validate import format_report

    result = validate_bundle(path, checkpoint=checkpoint, tokens=tokens, stages=Stages(err, quiet=as_json))
    if as_json:
        out.print_json(json.dumps(result | {"artifacts": [
            {k: (v.to_dict() if k == "report" else v) for k, v in a.items()} for a in result["artifacts"]]}))
    else:
        for a in result["artifacts"]:
            out.print(format_report(a["report"]), highlight=False, markup=False, soft_wrap=True)
            budget = a["memory_budget_mb"]
            verdict = "within" if a["within_budget"] else "OVER"
            how = "" if a["memory"] == "measured" else f" ({a['memory']})"
            whose = "" if result["memory_budget_from"] == "profile" else f" (set by {result['memory_budget_from']})"
            out.print(f"  memory      peak {a['peak_rss_bytes'] / 1e6:.0f} MB{how}, {verdict} the {budget} MB "
                      f"budget{whose}", highlight=False, markup=False)
        out.print(f"bundle {result['target']}: {'PASSED' if result['passed'] else 'FAILED'}", highlight=False)
    if not result["passed"]:
        raise typer.Exit(1)


@app.command(cls=_Command)
@_friendly
def targets(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Lists the target profiles (targets/*.toml) and the backends with their recipes."""
    from rgexport.profiles import list_profiles, targets_document

    profiles = list_profiles()
    doc = targets_document(profiles)
    if as_json:
        out.print_json(json.dumps(doc))
        return
    table = Table(title="Target profiles (--target NAME)")
    for col in ("name", "artifacts (backend / default recipe)", "minimum", "memory budget"):
        table.add_column(col)
    for p in profiles:
        arts = ", ".join(f"{a.backend} / {a.recipe or 'default'}" for a in p.artifacts)
        budget = f"{p.memory_budget_mb:g} MB" if p.memory_budget_mb else "-"
        table.add_row(f"[bold]{p.name}[/bold]\n[dim]{escape(p.description)}[/dim]", arts, p.min_runtime or "-", budget)
    out.print(table)
    backends = Table(title="Backends (--target NAME builds one artifact)")
    backends.add_column("backend")
    backends.add_column("recipes (default first)")
    backends.add_column("install")
    for b in doc["backends"]:
        if b.get("error"):
            backends.add_row(b["name"], b["error"], "")
            continue
        backends.add_row(b["name"], ", ".join(b["recipes"]), escape(f'pip install "rgexport[{b["extra"]}]"'))
    out.print(backends)


@app.command(cls=_Command)
@_friendly
def bench(
    paths: Annotated[list[Path], typer.Argument(help="Artifact folders (same checkpoint).")],
    steps: Annotated[int, typer.Option("--steps", "-n", min=8, help="Decode steps to time.")] = 256,
    old_steps: Annotated[int | None, typer.Option("--tokens", min=8, hidden=True,
                                                  help="The old name of --steps (this release only).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for every runtime.")] = None,
    memory: Annotated[bool, typer.Option(help="Also profile peak memory vs tokens (fresh processes).")] = True,
    hf: Annotated[bool, typer.Option(help="Also time Hugging Face's generate.")] = True,
    eager: Annotated[bool, typer.Option(help="Also time our eager step model (--no-eager at 2B: it loads the "
                                        "float32 weights, 10.7 GB).")] = True,
    report_dir: Annotated[Path | None, typer.Option("--report", help="Write bench.md/json and PNG charts here.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    rounds: Annotated[int, typer.Option(min=1, help="Time the artifacts in turns, ROUNDS of them each (all loaded "
                                        "at once): fairer ratios on a shared machine.")] = 1,
) -> None:
    """Decode/prefill speed, first-token latency, load time and peak memory of artifacts, with eager
    references measured in the same run."""
    import os

    if old_steps is not None:
        _notice("bench --tokens", "--steps (--tokens means held-out text tokens on every command)")
        steps = old_steps
    if threads:
        # Before any runtime loads: ONNX Runtime, XNNPACK, LiteRT and torch all read these.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
        import torch

        torch.set_num_threads(threads)
    from rgexport.bench import bench_artifacts, markdown_report, memory_profile
    from rgexport.plots import plot_memory, plot_speed
    from rgexport.progress import Stages
    from rgexport.safety import writable_dir

    if report_dir:
        writable_dir(report_dir, "--report", create=False)  # before minutes of timing, not after
    stages = Stages(err, quiet=as_json)
    with stages.bar("timing", steps * (len(paths) + 1)) as advance:
        data = bench_artifacts(paths, decode_tokens=steps, include_hf=hf and eager, include_eager=eager,
                               advance=advance, threads=threads, rounds=rounds)
    profiles = []
    if memory:
        with stages.bar("memory (fresh process per N)", len(paths) * 8) as advance:
            profiles = [memory_profile(p, advance=advance) for p in paths]
        data["memory"] = profiles
    md = markdown_report(data) + "".join(_memory_markdown(p) for p in profiles)
    if report_dir:
        writable_dir(report_dir, "--report")
        (report_dir / "bench.json").write_text(json.dumps(data, indent=1) + "\n")
        (report_dir / "bench.md").write_text(md)
        plot_speed(data, report_dir / "latency_vs_tokens.png")
        if profiles:
            plot_memory(profiles, report_dir / "memory_vs_tokens.png")
    if as_json:
        out.print_json(json.dumps(data))
    else:
        out.print(md, highlight=False, markup=False, soft_wrap=True)
    if profiles and not all(p["passed"] for p in profiles):
        raise typer.Exit(1)


def _memory_markdown(p: dict) -> str:
    rows = "".join(
        f"| {r['n']} | {r['peak_rss_bytes'] / 2**20:.1f} | {r['transformer_kv_bytes'] / 2**20:.1f} | "
        f"{r['gemma_2b_kv_bytes'] / 2**20:.1f} |\n" for r in p["rows"])
    verdict = "flat" if p["flat"] else "NOT flat"
    return (f"\nMemory, {p['backend']} / {p['recipe']}: peak RSS while decoding {verdict} (trend of "
            f"{p.get('growth_measure', 'peak RSS')} {p['peak_growth_bytes'] / 2**20:.2f} MiB over the range, "
            f"spread {p['peak_spread_bytes'] / 2**20:.2f} MiB, "
            f"tolerance {p['tolerance_bytes'] / 2**20:.0f} MiB); state {p['state_bytes_manifest']:,} bytes "
            f"({', '.join(p['state_dtypes'])}), analytic fp32 {p['state_bytes_analytic_fp32']:,}: "
            f"{'matches' if p['state_matches_analytic'] else 'DIFFERS'}.\n\n"
            "| tokens | peak RSS MiB | same-width transformer KV MiB | Gemma-2B KV MiB |\n|---|---|---|---|\n" + rows)


@app.command(cls=_Command)
@_friendly
def evaluate(
    target: Annotated[list[str] | None, typer.Option(
        "--target", "-t", parser=_target, metavar=TARGET_METAVAR,
        help="A backend, or a target profile (its artifacts' backends); repeatable. Default: every backend.")]
    = None,
    recipe: Annotated[list[str] | None, typer.Option(
        "--recipe", "-r", help="Only these recipes (repeatable). Default: each backend's all.")] = None,
    old_targets: Annotated[list[str] | None, typer.Option("--targets", parser=_target, hidden=True,
                                                          help="The old name of --target.")] = None,
    old_recipes: Annotated[list[str] | None, typer.Option("--recipes", hidden=True,
                                                          help="The old name of --recipe.")] = None,
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    tokens: Annotated[int | None, typer.Option(min=8, help=TOKENS_HELP)] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Artifacts and matrix.md/json/png go here.")]
    = Path("rgexport-out/evaluate"),
    reuse: Annotated[bool, typer.Option("--reuse", help="Measure artifacts already in --out from their manifests "
                                        "(same checkpoint, recipe and tokens) instead of rebuilding them.")] = False,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the matrix (matrix.json) instead of the table.")]
    = False,
) -> None:
    """The accuracy matrix: builds every backend x recipe from one checkpoint and measures each on held-out
    text; picks each backend's default recipe by rule (smallest within the quality budget)."""
    from rgexport.evaluate import evaluate as run_evaluate
    from rgexport.evaluate import markdown_table, write_reports
    from rgexport.executors import make_executor
    from rgexport.profiles import target_backends
    from rgexport.progress import Stages
    from rgexport.safety import writable_dir

    if old_targets:
        _notice("evaluate --targets", "--target")
        target = [*(target or []), *old_targets]
    if old_recipes:
        _notice("evaluate --recipes", "--recipe")
        recipe = [*(recipe or []), *old_recipes]
    writable_dir(out_dir, "--out", create=False)
    backends = target_backends(target) if target else None
    with make_executor(workers, address) as executor:
        result = run_evaluate(out_dir, backends=backends, recipes=recipe or None, checkpoint=checkpoint, preset=preset,
                              tokens=tokens, stages=Stages(err), reuse=reuse, executor=executor)
    paths = write_reports(result, out_dir)
    if as_json:
        out.print_json(json.dumps(result, default=str))
        return
    out.print(markdown_table(result), highlight=False, markup=False, soft_wrap=True)
    out.print("reports: " + ", ".join(str(p) for p in paths.values()), highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
