"""The accuracy matrix: every backend x recipe built from one checkpoint and measured on held-out text.

For each artifact: size, top-1 agreement with fp32, mean KL, perplexity and its change, and the first
step where greedy generation diverges (all from the validation run in the artifact's own runtime).
Each backend's default recipe is then chosen by rule: the smallest artifact within the quality budget
([quality_budget] in rgexport/thresholds.toml).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rgexport.backends import BACKENDS, get_backend
from rgexport.build import BuildOptions
from rgexport.errors import RgexportError
from rgexport.progress import Stages

if TYPE_CHECKING:
    from rgexport.executors import Executor


def quality_budget() -> dict[str, float]:
    from rgexport.assets import thresholds_path

    return dict(tomllib.loads(thresholds_path().read_text())["quality_budget"])


def evaluate(
    out_dir: Path, backends: list[str] | None = None, recipes: list[str] | None = None,
    checkpoint: str | None = None, preset: str | None = None, tokens: int | None = None,
    stages: Stages | None = None, on_row: Callable[[dict[str, Any]], None] | None = None, reuse: bool = False,
    executor: Executor | None = None, calibration: Path | None = None,
) -> dict[str, Any]:
    """Builds and measures every backend x recipe (recipes a backend lacks are skipped).

    With `reuse`, an artifact already in `out_dir` is measured from its manifest instead of rebuilt when it
    is the same checkpoint (sha256), backend, recipe and number of validation tokens, was validated, and its
    files still match their checksums: an interrupted matrix resumes where it stopped.

    The cells run on `executor` (default: in this process, one after another; rgexport/executors.py has
    Ray); the rows come back in the same order whichever ran them, `on_row` is called as each finishes.
    """
    from rgexport.checkpoint import load_checkpoint
    from rgexport.executors import Cell, InProcessExecutor, MatrixProgress, cell_resources, run_cells

    stages = stages or Stages(quiet=True)
    backends = backends or list(BACKENDS)
    for b in backends:
        if b not in BACKENDS:
            raise RgexportError(f"Unknown backend {b!r}; expected some of {sorted(BACKENDS)}")
    known = sorted({r for b in backends for r in get_backend(b).recipes})
    accepted = set(known) | {a for b in backends for a in get_backend(b).recipe_aliases}
    unknown = [r for r in recipes or [] if r not in accepted]
    if unknown:
        raise RgexportError(f"Unknown recipe(s) {unknown} for {', '.join(backends)}; expected some of {known}")
    ckpt = load_checkpoint(checkpoint, preset)
    executor = executor or InProcessExecutor()
    if not isinstance(executor, InProcessExecutor):
        out_dir = out_dir.resolve()  # workers need the absolute path (on a cluster: one every node shares)
    rows: dict[str, dict[str, Any]] = {}
    order, cells = [], []
    for b in backends:
        backend = get_backend(b)
        asked = [backend.resolve_recipe(r) for r in recipes
                 if r in backend.recipes or r in backend.recipe_aliases] if recipes else list(backend.recipes)
        wanted = list(dict.fromkeys(asked))  # an earlier name and its current one: one row
        for r in wanted:
            folder = out_dir / f"{b}-{r}"
            key = folder.name
            order.append(key)
            n = tokens or 4 * ckpt.config.attention_window_size
            manifest = _reusable(folder, ckpt.digest, b, backend.recipes[r], n) if reuse else None
            if manifest is not None:
                rows[key] = _row(b, r, manifest) | {"reused": True}
                if not stages.quiet:
                    stages.console.print(f"[bold]{b} / {r}[/bold]: reused {folder}")
                if on_row:
                    on_row(rows[key])
            else:
                opts = BuildOptions(backend=b, recipe=r, checkpoint=checkpoint, preset=preset, out=folder,
                                    force=True, validation_tokens=tokens, calibration=calibration,
                                    require_pass=False)
                cells.append(Cell(key, evaluate_cell, (opts,), local_kwargs={"stages": stages, "checkpoint": ckpt},
                                  out=folder, **cell_resources(ckpt.config, b, r)))
    run: dict[str, Any] = {"executor": executor.describe(), "cells": {}}
    if cells:
        executor.check_output(out_dir)

        def collect(res) -> None:
            backend_name, recipe_name = res.key.split("-", 1)
            rows[res.key] = res.value if res.ok else {"backend": backend_name, "recipe": recipe_name,
                                                      "status": "error", "error": res.error}
            run["cells"][res.key] = {"worker": res.worker, "attempts": res.attempts, "seconds": res.seconds}
            if on_row:
                on_row(rows[res.key])

        progress = MatrixProgress(stages.console, [c.key for c in cells], "accuracy matrix", live=executor.live,
                                  quiet=stages.quiet)
        with progress:
            run_cells(executor, cells, progress, classify=lambda res: res.value["status"] if res.ok else "error",
                      on_result=collect)
    ordered = [rows[k] for k in order]
    budget = quality_budget()
    return {"checkpoint": ckpt.source, "quality_budget": budget, "rows": ordered,
            "defaults": choose_defaults(ordered, budget), "run": run}


def evaluate_cell(opts: BuildOptions, stages: Stages | None = None, checkpoint: Any = None) -> dict[str, Any]:
    """One row of the accuracy matrix: build and validate, then the row from the manifest. A build that
    fails is an error row; one that fails validation is a row with status "failed"."""
    from rgexport.build import build
    from rgexport.cells import worker_checkpoint

    recipe = opts.recipe or ""
    try:
        if checkpoint is None:
            checkpoint = worker_checkpoint(opts, with_tokenizer=False)
        result = build(opts, stages, checkpoint=checkpoint)
    except RgexportError as e:
        return {"backend": opts.backend, "recipe": recipe, "status": "error", "error": str(e)}
    return _row(opts.backend, recipe, result.manifest)


def _row(backend: str, recipe: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """One matrix row from a validated artifact's manifest."""
    v = manifest["validation"]
    m = v["metrics"]
    return {
        "backend": backend, "recipe": recipe, "status": v["status"],
        "bytes": manifest["artifact"]["total_bytes"], "main_file_bytes": _main_file_bytes(manifest),
        "top1_agreement": m["top1_agreement"], "mean_kl": m["mean_kl"],
        "ppl_reference": m["ppl_reference"], "ppl_artifact": m["ppl_artifact"],
        "ppl_change_pct": 100 * (m["ppl_ratio"] - 1), "max_abs_logit_error": m["max_abs_logit_error"],
        "greedy_divergence": v["greedy"]["first_divergence"], "greedy_tokens": v["greedy"]["tokens"],
        "tokens": v["tokens"], "calibrated": manifest["recipe"].get("calibrated", False),
    }


def _reusable(folder: Path, digest: str, backend: str, recipe: Any, tokens: int) -> dict[str, Any] | None:
    """The manifest of an earlier build in `folder` that measured the same thing, else None."""
    import dataclasses

    from rgexport.manifest import read_manifest, verify_files

    try:
        folder, manifest = read_manifest(folder)
    except RgexportError:
        return None
    same = (manifest["model"]["checkpoint"]["sha256"] == digest and manifest["backend"] == backend
            and manifest["recipe"] == dataclasses.asdict(recipe)
            and manifest["validation"].get("status") in ("passed", "failed")
            and manifest["validation"].get("tokens") == tokens)
    return manifest if same and not verify_files(folder, manifest) else None


def _main_file_bytes(manifest: dict[str, Any]) -> int:
    """The decode program's bytes: its main file with the data files it refers to (ONNX: weights.bin)."""
    files = set(get_backend(manifest["backend"]).program_files(manifest))
    return sum(f["bytes"] for f in manifest["artifact"]["files"] if f["path"] in files)


def choose_defaults(rows: list[dict[str, Any]], budget: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per backend: the smallest artifact (main file) within the quality budget that passed validation."""
    out = {}
    for b in sorted({r["backend"] for r in rows}):
        ok = [r for r in rows if r["backend"] == b and r["status"] == "passed"
              and r["ppl_artifact"] / r["ppl_reference"] <= budget["max_ppl_ratio"]
              and r["top1_agreement"] >= budget["min_top1_agreement"]]
        if ok:
            best = min(ok, key=lambda r: r["main_file_bytes"])
            out[b] = {"recipe": best["recipe"], "bytes": best["main_file_bytes"],
                      "why": f"smallest of {len(ok)} recipe(s) within the budget"}
        else:
            out[b] = {"recipe": None, "why": "no recipe within the budget"}
    return out


def markdown_table(result: dict[str, Any]) -> str:
    b = result["quality_budget"]
    lines = [
        "| backend | recipe | MB (decode program) | top-1 vs fp32 | mean KL | perplexity | change "
        "| greedy diverges at | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["status"] == "error":
            lines.append(f"| {r['backend']} | {r['recipe']} | | | | | | | error: {r['error'][:80]} |")
            continue
        div = "never" if r["greedy_divergence"] is None else f"step {r['greedy_divergence']}"
        lines.append(
            f"| {r['backend']} | {r['recipe']}{' (calibrated)' if r.get('calibrated') else ''} | "
            f"{r['main_file_bytes'] / 1e6:.2f} | {100 * r['top1_agreement']:.1f}% | "
            f"{r['mean_kl']:.4f} | {r['ppl_artifact']:.3f} | {r['ppl_change_pct']:+.2f}% | {div} | {r['status']} |")
    lines += ["", f"Defaults (smallest within perplexity x{b['max_ppl_ratio']} and top-1 >= "
                  f"{100 * b['min_top1_agreement']:.0f}%): " +
              ", ".join(f"{k}: {v['recipe']}" for k, v in result["defaults"].items())]
    return "\n".join(lines) + "\n"


def write_reports(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "matrix.json", "markdown": out_dir / "matrix.md"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["markdown"].write_text(markdown_table(result))
    from rgexport.plots import plot_matrix

    png = plot_matrix(result, out_dir / "matrix.png")
    if png:
        paths["png"] = png
    return paths


__all__ = ["choose_defaults", "evaluate", "markdown_table", "write_reports"]
