"""The `rgexport` command line: a thin layer over the library (each command builds options and calls one
function). Errors a user can fix print one line and exit 1; no tracebacks."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rgexport.errors import RgexportError

app = typer.Typer(
    help="Export Griffin / RecurrentGemma models to validated on-device artifacts.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
out = Console()
err = Console(stderr=True)


def _friendly(fn):
    """Turns RgexportError into one clear line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RgexportError as e:
            report = getattr(getattr(e, "cause", None), "report", None) or getattr(e, "report", None)
            if report is not None:
                from rgexport.validate import format_report

                err.print(format_report(report), highlight=False, markup=False)
            err.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return wrapper


CheckpointOpt = Annotated[str | None, typer.Option(
    "--checkpoint", "-c", help="Hugging Face folder or DeepMind state-dict file. Default: the shipped model.")]
PresetOpt = Annotated[str | None, typer.Option(help="Preset name (needed for DeepMind state-dict files).")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, help="Run the builds as Ray tasks on a local Ray of N workers, started and stopped here "
    "(pip install \"rgexport\\[cluster]\"). With --address: at most N at a time on the cluster.")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Run the builds on an existing Ray cluster: its head's host:port (RAY_ADDRESS is "
    "honoured). --out must then be a folder every node reaches at the same path.")]


@app.command()
@_friendly
def info(
    path: Annotated[Path | None, typer.Argument(help="An artifact folder, manifest.json or .onnx file.")] = None,
    preset: PresetOpt = None,
    checkpoint: CheckpointOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Config, parameter count, the decode state layout in bytes, and a transformer's KV cache beside it."""
    if path is not None:
        _artifact_info(path, as_json)
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


def _artifact_info(path: Path, as_json: bool) -> None:
    if path.suffix == ".onnx":
        from rgexport.backends.onnx.backend import describe_onnx

        data = describe_onnx(path)
    else:
        from rgexport.manifest import read_manifest

        _, data = read_manifest(path)
    out.print_json(json.dumps(data)) if as_json or path.suffix != ".onnx" else _print_onnx(data)


def _print_onnx(data: dict) -> None:
    out.print_json(json.dumps(data))


@app.command()
@_friendly
def generate(
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.model, if the checkpoint has none.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    seed: int = 0,
) -> None:
    """Generates text eagerly with the step model, streaming it."""
    from rgexport.checkpoint import load_checkpoint
    from rgexport.generate import generate_text
    from rgexport.tokenizer import Tokenizer

    ckpt = load_checkpoint(checkpoint, preset, tokenizer)
    if ckpt.tokenizer_path is None:
        raise RgexportError("the checkpoint has no tokenizer.model; pass --tokenizer PATH")
    tok = Tokenizer(ckpt.tokenizer_path)
    sys.stdout.write(prompt)
    generate_text(ckpt.model, tok, prompt, on_piece=lambda p: (sys.stdout.write(p), sys.stdout.flush()),
                  max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
    sys.stdout.write("\n")


TARGET_HELP = ("A backend (executorch, coreml, onnx, tflite), a profile (ios, android, linux-arm64, web; "
               "see `rgexport targets`) or a profile .toml.")


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


@app.command()
@_friendly
def build(
    target: Annotated[str, typer.Option("--target", "-t", help=TARGET_HELP)],
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="Default: the backend's.")] = None,
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.model, if the checkpoint has none.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Default: rgexport-out/<target>-<recipe>")]
    = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    validate: Annotated[bool, typer.Option(help="Validate in the runtime (default).")] = True,
    prefill_chunk: Annotated[int | None, typer.Option(min=1, help="Tokens per prefill call.")] = None,
    tokens: Annotated[int | None, typer.Option(min=1, help="Validation tokens (default 4x window).")] = None,
    text: Annotated[Path | None, typer.Option(help="Validation text (default: held-out corpus).")] = None,
    calibration: Annotated[Path | None, typer.Option(help="Calibration text or JSONL (calibrated recipes).")]
    = None,
    archive: Annotated[bool, typer.Option(help="Also write the bundle as one .zip.")] = False,
    random_weights: Annotated[bool, typer.Option(help="Random weights of --preset's shape (sizing, speed).")]
    = False,
    seed: Annotated[int, typer.Option(help="Seed for --random-weights.")] = 0,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-O", help="Backend option KEY=VALUE (repeatable; VALUE is read as TOML: true, 32, \"arm\"; "
        "a bare word is a string). Unknown keys are refused with the backend's list.")] = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
) -> None:
    """Builds one artifact (--target BACKEND) or an app bundle (--target PROFILE: ios, android, ...):
    load, quantise, export, lower, write, validate, manifest."""
    from rgexport.build import BuildOptions
    from rgexport.build import build as run_build
    from rgexport.profiles import resolve_target
    from rgexport.progress import Stages
    from rgexport.validate import format_report

    profile = resolve_target(target)
    backend = profile.artifacts[0].backend if profile.source == "backend" else target
    opts = BuildOptions(backend=backend, recipe=recipe, checkpoint=checkpoint, preset=preset, tokenizer=tokenizer,
                        out=out_dir, force=force, validate=validate, prefill_chunk=prefill_chunk,
                        validation_tokens=tokens, validation_text=text, calibration=calibration,
                        random_weights=random_weights, seed=seed, options=parse_options(option or []))
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
            bundle = build_bundle(profile, opts, Stages(err), archive=archive, executor=executor)
        for art in bundle.manifest["artifacts"]:
            err.print(f"  {art['backend']} / {art['recipe']}: {art['bytes'] / 1e6:.2f} MB, {art['validation']}",
                      highlight=False, markup=False)
        out.print(f"{bundle.out}" + (f"  (archive {bundle.archive})" if bundle.archive else ""), highlight=False)
        return
    if archive:
        raise RgexportError("--archive applies to bundles (--target ios, android, ...)")
    if workers or address:
        raise RgexportError("--workers and --address apply to bundles (--target ios, android, ...) and to "
                            "`rgexport evaluate`; one artifact is one build")
    result = run_build(opts, Stages(err))
    if result.report is not None:
        err.print(format_report(result.report), highlight=False, markup=False, soft_wrap=True)
    else:
        err.print("[yellow]not validated (--no-validate): the manifest says so[/yellow]")
    size = result.manifest["artifact"]["total_bytes"]
    out.print(f"{result.out}  ({size / 1e6:.2f} MB, {result.manifest['artifact']['file']})", highlight=False)


@app.command()
@_friendly
def validate(
    path: Annotated[Path, typer.Argument(help="Artifact folder (or its manifest.json).")],
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    tokens: Annotated[int | None, typer.Option(min=1, help="Tokens to compare (default 4x window).")] = None,
    text: Annotated[Path | None, typer.Option(help="Text file (default: held-out corpus).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    device: Annotated[str | None, typer.Option(
        help="Run on another device: 'emulated-arm64' (the aarch64 runtime under qemu-user; set up and cached "
             "on first use).")] = None,
    memory: Annotated[bool, typer.Option(
        help="Also validate memory: peak RSS of a fresh process decoding N tokens must stay flat for N doubling "
             "up to --memory-multiple x the window, and the state bytes must equal the analytic figure.")] = True,
    memory_multiple: Annotated[int, typer.Option(min=1, help="Largest N of the memory check, in windows.")] = 16,
) -> None:
    """Runs an artifact in its runtime beside the fp32 reference (logits, state, greedy tokens, and memory
    against sequence length); exit 0 only if everything passes."""
    from rgexport.progress import Stages
    from rgexport.validate import format_report, validate_artifact

    if device is not None:
        if device != "emulated-arm64":
            raise RgexportError(f"Unknown device {device!r}; expected 'emulated-arm64'")
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
    if path.suffix == ".zip" or (path / "bundle.json").is_file():
        _validate_bundle(path, checkpoint, tokens, as_json)
        return
    stages = Stages(err, quiet=as_json)
    report = validate_artifact(path, checkpoint=checkpoint, preset=preset, tokens=tokens, text=text, stages=stages)
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
            out.print(f"  memory      peak {a['peak_rss_bytes'] / 1e6:.0f} MB, {verdict} the {budget} MB budget",
                      highlight=False, markup=False)
        out.print(f"bundle {result['target']}: {'PASSED' if result['passed'] else 'FAILED'}", highlight=False)
    if not result["passed"]:
        raise typer.Exit(1)


@app.command()
@_friendly
def targets(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Lists the target profiles (targets/*.toml) and the backends."""
    from rgexport.backends import BACKENDS, get_backend
    from rgexport.profiles import list_profiles

    profiles = list_profiles()
    if as_json:
        out.print_json(json.dumps([p.to_dict() for p in profiles]))
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
    for name in BACKENDS:
        try:
            b = get_backend(name)
        except RgexportError as e:
            backends.add_row(name, str(e), "")
            continue
        recipes = [b.default_recipe, *[r for r in b.recipes if r != b.default_recipe]]
        backends.add_row(name, ", ".join(recipes), escape(f'pip install "rgexport[{b.extra}]"'))
    out.print(backends)


@app.command()
@_friendly
def bench(
    paths: Annotated[list[Path], typer.Argument(help="Artifact folders (same checkpoint).")],
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=8, help="Decode steps to time.")] = 256,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for every runtime.")] = None,
    memory: Annotated[bool, typer.Option(help="Also profile peak memory vs tokens (fresh processes).")] = True,
    hf: Annotated[bool, typer.Option(help="Also time Hugging Face's generate.")] = True,
    eager: Annotated[bool, typer.Option(help="Also time our eager step model (--no-eager at 2B: it loads the "
                                        "float32 weights, 10.7 GB).")] = True,
    report_dir: Annotated[Path | None, typer.Option("--report", help="Write bench.md/json and PNG charts here.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Decode/prefill speed, first-token latency, load time and peak memory of artifacts, with eager
    references measured in the same run."""
    import os

    if threads:
        # Before any runtime loads: ONNX Runtime, XNNPACK, LiteRT and torch all read these.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
        import torch

        torch.set_num_threads(threads)
    from rgexport.bench import bench_artifacts, markdown_report, memory_profile, plot_memory, plot_speed
    from rgexport.progress import Stages

    stages = Stages(err, quiet=as_json)
    with stages.bar("timing", tokens * (len(paths) + 1)) as advance:
        data = bench_artifacts(paths, decode_tokens=tokens, include_hf=hf and eager, include_eager=eager,
                               advance=advance, threads=threads)
    profiles = []
    if memory:
        with stages.bar("memory (fresh process per N)", len(paths) * 8) as advance:
            profiles = [memory_profile(p, advance=advance) for p in paths]
        data["memory"] = profiles
    md = markdown_report(data) + "".join(_memory_markdown(p) for p in profiles)
    if report_dir:
        report_dir.mkdir(parents=True, exist_ok=True)
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


@app.command()
@_friendly
def evaluate(
    targets_: Annotated[list[str] | None, typer.Option("--targets", help="Backends (default: all).")] = None,
    recipes: Annotated[list[str] | None, typer.Option("--recipes", help="Recipes (default: each backend's all).")]
    = None,
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    tokens: Annotated[int | None, typer.Option(min=8, help="Held-out tokens per artifact (default 4x window).")]
    = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Artifacts and matrix.md/json/png go here.")]
    = Path("rgexport-out/evaluate"),
    reuse: Annotated[bool, typer.Option("--reuse", help="Measure artifacts already in --out from their manifests "
                                        "(same checkpoint, recipe and tokens) instead of rebuilding them.")] = False,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
) -> None:
    """The accuracy matrix: builds every backend x recipe from one checkpoint and measures each on held-out
    text; picks each backend's default recipe by rule (smallest within the quality budget)."""
    from rgexport.evaluate import evaluate as run_evaluate
    from rgexport.evaluate import markdown_table, write_reports
    from rgexport.executors import make_executor
    from rgexport.progress import Stages

    with make_executor(workers, address) as executor:
        result = run_evaluate(out_dir, backends=targets_, recipes=recipes, checkpoint=checkpoint, preset=preset,
                              tokens=tokens, stages=Stages(err), reuse=reuse, executor=executor)
    paths = write_reports(result, out_dir)
    out.print(markdown_table(result), highlight=False, markup=False, soft_wrap=True)
    out.print("reports: " + ", ".join(str(p) for p in paths.values()), highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
