"""App bundles: every artifact a target profile names, built and validated, plus the tokenizer, one
manifest that ties them together with checksums, sample code generated from the manifests, and an
integration guide.

    bundle-<target>/
      bundle.json            profile, artifacts, every file with bytes and sha256, memory budget
      bundle.sha256          the sha256 of bundle.json itself
      tokenizer.model
      INTEGRATION.md         how to drive each artifact on the platform
      <backend>-<recipe>/    one validated artifact folder each (with its own manifest.json)
      samples/               Swift (iOS) or Kotlin (Android) generated from the manifests

`validate_bundle` checks bundle.json against bundle.sha256 and every path it names against the folder
(an artifact folder, file, tokenizer or sample outside the bundle is refused before anything is opened),
then every checksum (naming a tampered or truncated file), validates every artifact from inside the bundle
in its runtime, and checks each artifact's peak memory against the profile's budget. Archives (.zip) are
read with every member's path checked: one that would land outside the folder is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from rgexport.archive import BUNDLE_MANIFEST, safe_extract
from rgexport.backends import get_backend
from rgexport.budget import MB, RecipeChoice, plan, within_quality_budget
from rgexport.build import BuildError, BuildOptions, _move_into_place, make_work_dir, weights_source
from rgexport.errors import RgexportError
from rgexport.manifest import file_entries, now, rgexport_version, sha256_file
from rgexport.profiles import TargetProfile
from rgexport.progress import StageFailed, Stages

if TYPE_CHECKING:
    from rgexport.executors import Executor

BUNDLE_DIGEST = "bundle.sha256"  # "<sha256 of bundle.json>  bundle.json": bundle.json is covered too
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")


@dataclasses.dataclass
class BundleResult:
    out: Path
    manifest: dict[str, Any]
    archive: Path | None


def build_bundle(
    profile: TargetProfile, opts: BuildOptions, stages: Stages | None = None, archive: bool = False,
    recipe_overrides: dict[str, str] | None = None, executor: Executor | None = None,
    memory_budget_mb: float | None = None,
) -> BundleResult:
    """Builds every artifact of `profile` into one bundle folder, atomically (like `build`). The artifacts
    are cells on `executor` (default: in this process, one after another); the first that fails fails the
    bundle and cancels the others. `memory_budget_mb` replaces the profile's budget (a device with more or
    less memory than the profile assumes); bundle.json records the budget used and where it came from, and
    `rgexport validate` checks the bundle against it."""
    from rgexport.executors import InProcessExecutor
    from rgexport.samples import write_samples

    budget_from = "profile"
    if memory_budget_mb is not None:
        if not _is_budget(memory_budget_mb):
            raise RgexportError(f"the memory budget is {memory_budget_mb!r} MB; give a positive number of MB")
        was = "none" if profile.memory_budget_mb is None else f"{profile.memory_budget_mb:g} MB"
        budget_from = f"--memory-budget (the profile's: {was})"
        profile = dataclasses.replace(profile, memory_budget_mb=memory_budget_mb)

    executor = executor or InProcessExecutor()
    stages = stages or Stages(quiet=True)
    out = Path(opts.out) if opts.out else Path("rgexport-out") / f"bundle-{profile.name}"
    if out.exists() and not opts.force:
        raise RgexportError(f"{out} already exists; pass --force to replace it (or choose another --out)")
    if out.exists() and not (out / BUNDLE_MANIFEST).is_file():
        raise RgexportError(f"{out} exists and is not an rgexport bundle; refusing to replace it")
    if not isinstance(executor, InProcessExecutor):
        out = out.resolve()  # workers need the absolute path (on a cluster: one every node shares)
    from rgexport.safety import missing_parents, remove_empty

    created = missing_parents(out.parent)
    work = make_work_dir(out)
    try:
        what = opts.checkpoint or (f"random weights, {opts.preset}" if opts.random_weights else "shipped model")
        with stages.stage("load", what):
            source, ckpt = _bundle_source(opts)
        artifacts, choices = _build_fitting(profile, opts, source.config, ckpt, work, stages, executor,
                                            recipe_overrides)
        with stages.stage("bundle", "tokenizer, samples, guide, checksums"):
            if source.tokenizer_path:
                shutil.copyfile(source.tokenizer_path, work / "tokenizer.model")
            samples = write_samples(work, profile, artifacts)
            manifest = _bundle_manifest(work, profile, artifacts, samples, choices, budget_from)
            (work / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            (work / BUNDLE_DIGEST).write_text(f"{sha256_file(work / BUNDLE_MANIFEST)}  {BUNDLE_MANIFEST}\n")
        _move_into_place(work, out)
        created = []
    except StageFailed as e:
        raise BuildError(e.stage, e.cause, out) from e.cause
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        remove_empty(created)
    archive_path = None
    if archive:
        archive_path = out.with_suffix(".zip")
        try:
            with stages.stage("archive", str(archive_path)):
                _write_zip(out, archive_path)
        except StageFailed as e:
            raise BuildError(e.stage, e.cause, out) from e.cause
    return BundleResult(out, manifest, archive_path)


def _bundle_source(opts: BuildOptions) -> tuple[Any, Any]:
    """(the weights' source, `build.weights_source`: config and tokenizer; the loaded checkpoint every
    artifact reuses, or None). A small model is loaded once for all artifacts; a large one is not loaded here
    at all: each artifact's build reads it as its backend does (streamed, block by block, where it can), so a
    bundle never holds the float32 model beside an artifact's build."""
    from rgexport.checkpoint import load_checkpoint, random_checkpoint
    from rgexport.config import is_small

    source = weights_source(opts)
    if not is_small(source.config):
        return source, None
    if opts.random_weights:
        return source, random_checkpoint(opts.preset, opts.seed)
    return source, load_checkpoint(opts.checkpoint, opts.preset, opts.tokenizer)


def _build_fitting(profile: TargetProfile, opts: BuildOptions, config: Any, ckpt: Any, work: Path,
                   stages: Stages, executor: Executor, recipe_overrides: dict[str, str] | None
                   ) -> tuple[list[tuple[Path, dict[str, Any]]], list[RecipeChoice]]:
    """Builds every artifact of `profile` into `work`, each with the most precise recipe that fits the
    memory budget (`rgexport.budget`): the profile's, or a smaller one that also passes the quality budget.
    Rounds of cells on `executor`: the first tries each artifact's first candidate, the next ones the
    artifacts whose build went over the budget."""
    from rgexport.cells import build_cell
    from rgexport.executors import Cell, MatrixProgress, cell_resources, run_cells
    from rgexport.notices import notice

    budget_mb = profile.memory_budget_mb
    plans, choices = [], []
    for spec in profile.artifacts:
        backend = get_backend(spec.backend)
        asked = (recipe_overrides or {}).get(spec.backend) or spec.recipe
        asked = backend.resolve_recipe(asked) if asked else backend.default_recipe
        choice = RecipeChoice(spec.backend, asked)
        plans.append((spec, plan(backend, asked, config, budget_mb, choice, {**spec.options, **opts.options})))
        choices.append(choice)
    done: dict[int, tuple[Path, dict[str, Any]]] = {}
    pending = list(range(len(plans)))
    while pending:
        cells, index = [], {}
        for i in pending:
            spec, tries = plans[i]
            recipe = tries[0]
            folder = work / f"{spec.backend}-{recipe}"
            sub = dataclasses.replace(opts, backend=spec.backend, recipe=recipe, out=folder, force=False,
                                      options={**spec.options, **opts.options},
                                      prefill_logits=opts.prefill_logits or profile.prefill_logits)
            key = folder.name if folder.name not in {c.key for c in cells} else f"{folder.name}#{len(cells) + 1}"
            index[key] = i
            cells.append(Cell(key, build_cell, (sub,), out=folder,
                              local_kwargs={"stages": Stages(stages.console, stages.quiet), "checkpoint": ckpt},
                              **cell_resources(config, spec.backend, recipe)))
        executor.check_output(work)
        with MatrixProgress(stages.console, [c.key for c in cells], f"bundle {profile.name}", live=executor.live,
                            quiet=stages.quiet) as progress:
            results = run_cells(executor, cells, progress, stop_on_error=True)
        pending = []
        for cell in cells:
            res = results.get(cell.key)
            if res is None or not res.ok:
                failed = res or next(r for r in results.values() if not r.ok)
                if failed.exception is not None:
                    raise failed.exception
                raise RgexportError(f"bundle artifact {failed.key} failed: {failed.error}")
            i = index[cell.key]
            spec, tries = plans[i]
            choice, recipe, result = choices[i], tries[0], res.value
            # Built with --no-validate (no report): nothing measured to judge by; the lower bound alone chose.
            judged = result.report is not None
            reason = None
            if judged and recipe != choice.asked:
                reason = smaller_recipe_quality(choice, recipe, result.report)
            if judged and reason is None and budget_mb is not None:
                with stages.stage("memory", f"{spec.backend} / {recipe}, {result.report.tokens} tokens"):
                    peak, how = memory_of(result.out, result.report.tokens)
                if peak > budget_mb * MB:
                    verb = "peaked at" if how == "measured" else "holds at least (artifact + state)"
                    reason = f"{recipe}: {verb} {peak / MB:,.0f} MB, over the {budget_mb:g} MB budget"
            if reason is None:
                choice.built = recipe
                final = work / f"{spec.backend}-{result.manifest['recipe']['name']}"
                if final != result.out:
                    os.replace(result.out, final)
                done[i] = (final, result.manifest)
                if recipe != choice.asked:
                    unjudged = "" if choice.quality_judged else " (its quality against float32 not judged)"
                    notice(f"{spec.backend}: {choice.asked} does not fit the {budget_mb:g} MB budget "
                           f"({'; '.join(choice.passed_over)}); the bundle has {recipe}{unjudged}")
                continue
            choice.passed_over.append(reason)
            shutil.rmtree(result.out, ignore_errors=True)
            if len(tries) == 1:
                raise RgexportError(f"no {spec.backend} recipe of profile {profile.name} fits its memory and "
                                    f"quality budgets: {'; '.join(choice.passed_over)}")
            plans[i] = (spec, tries[1:])
            pending.append(i)
    return [done[i] for i in range(len(plans))], choices


def smaller_recipe_quality(choice: RecipeChoice, recipe: str, report: Any) -> str | None:
    """Why `recipe`, smaller than the profile asked for, is passed over for its quality: outside the quality
    budget against float32; None where it is within, or where the build did not judge quality against float32
    (random weights, --no-judge-quality: the own quantised model judged it, and agreement with float32 measures
    the weights' randomness). `choice.quality_judged` records which, for bundle.json."""
    choice.quality_judged = report.quality_judged
    ok, figures = within_quality_budget(report)
    if ok or not report.quality_judged:
        return None
    return f"{recipe}: outside the quality budget ({figures})"


def _is_budget(value: Any) -> bool:
    """A memory budget in MB: a positive number (not a bool, which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _bundle_manifest(work: Path, profile: TargetProfile, artifacts, samples: list[Path],
                     choices: list[RecipeChoice] | None = None, budget_from: str = "profile") -> dict[str, Any]:
    files = sorted(p for p in work.rglob("*") if p.is_file() and p.relative_to(work).as_posix()
                   not in (BUNDLE_MANIFEST, BUNDLE_DIGEST))
    return {
        "format": "rgexport-bundle",
        "format_version": 1,
        "created": now(),
        "rgexport_version": rgexport_version(),
        "target": profile.to_dict(),
        "memory_budget_from": budget_from,
        "artifacts": [
            {"backend": m["backend"], "recipe": m["recipe"]["name"], "folder": folder.name,
             "file": f"{folder.name}/{m['artifact']['file']}", "bytes": m["artifact"]["total_bytes"],
             "validation": m["validation"]["status"],
             **({"recipe_choice": c.to_dict()} if c is not None and c.passed_over else {})}
            for (folder, m), c in zip(artifacts, choices or [None] * len(artifacts))
        ],
        "tokenizer": "tokenizer.model" if (work / "tokenizer.model").is_file() else None,
        "chat_template": next(((m.get("tokenizer") or {}).get("chat_template") for _, m in artifacts), None),
        "samples": [p.relative_to(work).as_posix() for p in samples],
        "files": file_entries(work, files),
    }


def _write_zip(folder: Path, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, (PurePosixPath(folder.name) / p.relative_to(folder).as_posix()).as_posix())
    os.replace(tmp, path)


def read_bundle(folder: Path, shown: Path | None = None) -> dict[str, Any]:
    """bundle.json of the bundle in `folder`, after checking it against bundle.sha256 and its structure:
    every path it names (files, artifact folders, tokenizer, samples) inside `folder`, every artifact
    folder's manifest covered by a checksum. Refused before any listed file is opened."""
    from rgexport.safety import contained

    shown = shown or folder
    mf = folder / BUNDLE_MANIFEST
    if not mf.is_file():
        raise RgexportError(f"{shown} is not a bundle: it has no {BUNDLE_MANIFEST} (a bundle is what `rgexport build "
                            "--target PROFILE` writes)")
    digest_file = folder / BUNDLE_DIGEST
    if not digest_file.is_file():
        raise RgexportError(f"{shown} has no {BUNDLE_DIGEST}, so nothing covers {BUNDLE_MANIFEST} itself; rebuild the "
                            "bundle with this version of rgexport")
    try:
        recorded = digest_file.read_bytes().decode("ascii", "replace").split()
        raw = mf.read_bytes()
    except OSError as e:
        raise RgexportError(f"cannot read {shown}: {e.strerror or e}") from None
    import hashlib

    if not recorded or recorded[0] != hashlib.sha256(raw).hexdigest():
        raise RgexportError(f"{shown}: {BUNDLE_MANIFEST} does not match the sha256 in {BUNDLE_DIGEST} (modified?); "
                            "rebuild the bundle")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RgexportError(f"{shown}: {BUNDLE_MANIFEST} is not valid JSON: {e}; rebuild the bundle") from None
    where = f"{shown}: {BUNDLE_MANIFEST}"
    if not isinstance(manifest, dict):
        raise RgexportError(f"{where} holds a JSON {type(manifest).__name__}, expected an object; rebuild the bundle")
    if manifest.get("format") != "rgexport-bundle":
        raise RgexportError(f"{where} has format {manifest.get('format')!r}, expected 'rgexport-bundle'")

    def field(key: str, kind: type | tuple[type, ...], container: dict[str, Any] = manifest,
              name: str | None = None) -> Any:
        value = container.get(key)
        if not isinstance(value, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise RgexportError(f"{where}: '{name or key}' is {value!r}, expected {expected}; rebuild the bundle")
        return value

    target = field("target", dict)
    field("name", str, target, "target.name")
    budget = target.get("memory_budget_mb")
    if budget is not None and not _is_budget(budget):
        raise RgexportError(f"{where}: 'target.memory_budget_mb' is {budget!r}, expected a positive number")
    listed = set()
    for i, entry in enumerate(field("files", list)):
        if not isinstance(entry, dict):
            raise RgexportError(f"{where}: files[{i}] is {entry!r}, expected an object; rebuild the bundle")
        contained(folder, entry.get("path"), f"{where}: files[{i}].path")
        size, sha = entry.get("bytes"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(sha, str):
            raise RgexportError(f"{where}: files[{i}] needs integer 'bytes' and string 'sha256'; rebuild the bundle")
        listed.add(entry["path"])
    arts = field("artifacts", list)
    if not arts:
        raise RgexportError(f"{where} lists no artifacts; rebuild the bundle")
    for i, art in enumerate(arts):
        if not isinstance(art, dict):
            raise RgexportError(f"{where}: artifacts[{i}] is {art!r}, expected an object; rebuild the bundle")
        sub = contained(folder, art.get("folder"), f"{where}: artifacts[{i}].folder")
        if sub.resolve() == folder.resolve():
            raise RgexportError(f"{where}: artifacts[{i}].folder is the bundle itself, expected a sub-folder")
        if f"{PurePosixPath(art['folder']).as_posix()}/manifest.json" not in listed:
            raise RgexportError(f"{where}: artifacts[{i}].folder {art['folder']!r} has no manifest.json among the "
                                "bundle's files, so no checksum covers it; rebuild the bundle")
        for key in ("backend", "recipe"):
            field(key, str, art, f"artifacts[{i}].{key}")
    tok = manifest.get("tokenizer")
    if tok is not None:
        contained(folder, tok, f"{where}: tokenizer")
    for i, sample in enumerate(manifest.get("samples") or []):
        contained(folder, sample, f"{where}: samples[{i}]")
    return manifest


def verify_bundle_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    from rgexport.safety import contained

    problems = []
    listed = set()
    for i, entry in enumerate(manifest["files"]):
        listed.add(entry["path"])
        p = contained(folder, entry["path"], f"{BUNDLE_MANIFEST}: files[{i}].path")
        if not p.is_file():
            problems.append(f"{entry['path']}: missing")
        elif p.stat().st_size != entry["bytes"]:
            size = p.stat().st_size
            problems.append(f"{entry['path']}: {size} bytes, bundle.json says {entry['bytes']} (truncated?)")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from bundle.json (modified?)")
    own = (BUNDLE_MANIFEST, BUNDLE_DIGEST)
    extra = sorted(rel for p in folder.rglob("*") if p.is_file() or p.is_symlink()
                   for rel in [p.relative_to(folder).as_posix()] if rel not in own and rel not in listed)
    problems += [f"{e}: not listed in bundle.json (added?)" for e in extra]
    return problems


def memory_of(artifact: Path, tokens: int) -> tuple[int, str]:
    """(bytes, how) for the budget check: the peak RSS of a fresh process that decodes `tokens` tokens where
    this machine has the artifact's runtime ("measured"); where only a stand-in runs it (Core ML off macOS),
    the artifact's bytes plus its state's, which its runtime holds at the least ("estimated: ..."): the
    stand-in's own memory says nothing about a device."""
    from rgexport.backends import get_backend

    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    stand_in = get_backend(manifest["backend"]).stand_in_here()
    if stand_in:
        return (int(manifest["artifact"]["total_bytes"]) + int(manifest["io"]["state"]["total_bytes"]),
                f"estimated as artifact + state bytes: this machine runs it with {stand_in}")
    return peak_memory_of(artifact, tokens), "measured"


def peak_memory_of(artifact: Path, tokens: int) -> int:
    """Peak RSS (bytes) of a fresh process that loads the artifact and decodes `tokens` tokens: the whole
    process's peak, loading included, which is what a device's memory budget has to hold."""
    proc = subprocess.run([sys.executable, "-m", "rgexport.bench", str(artifact), str(tokens)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RgexportError(f"memory check of {artifact} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["process_peak_rss_bytes"]


def validate_bundle(path: Path, checkpoint: str | None = None, tokens: int | None = None,
                    stages: Stages | None = None) -> dict[str, Any]:
    """Checksums, every artifact's validation, and peak memory against the profile's budget."""
    from rgexport.validate import validate_artifact

    stages = stages or Stages(quiet=True)
    path = Path(path)
    if not path.exists():
        raise RgexportError(f"{path} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        folder = safe_extract(path, Path(tmp)) if path.is_file() else path
        manifest = read_bundle(folder, path)
        problems = verify_bundle_files(folder, manifest)
        if problems:
            raise RgexportError(f"{path}: bundle files do not match bundle.json: " + "; ".join(problems))
        budget_mb = manifest["target"].get("memory_budget_mb")
        results = []
        for art in manifest["artifacts"]:
            sub = folder / art["folder"]
            if not (sub / "manifest.json").is_file():
                raise RgexportError(f"{path}: artifact folder {art['folder']!r} has no manifest.json; rebuild the "
                                    "bundle")
            report = validate_artifact(sub, checkpoint=checkpoint, tokens=tokens, stages=stages)
            n = report.tokens
            with stages.stage("memory", f"{art['backend']} / {art['recipe']}, {n} tokens"):
                peak, how = memory_of(sub, n)
            within = budget_mb is None or peak <= budget_mb * 1e6
            results.append({"backend": art["backend"], "recipe": art["recipe"], "report": report,
                            "peak_rss_bytes": peak, "memory": how, "memory_budget_mb": budget_mb,
                            "within_budget": within})
        passed = all(r["report"].passed and r["within_budget"] for r in results)
        return {"bundle": str(path), "target": manifest["target"]["name"], "artifacts": results, "passed": passed,
                "memory_budget_from": manifest.get("memory_budget_from", "profile")}
