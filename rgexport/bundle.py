"""App bundles: every artifact a target profile names, built and validated, plus the tokenizer, one
manifest that ties them together with checksums, sample code generated from the manifests, and an
integration guide.

    bundle-<target>/
      bundle.json            profile, artifacts, every file with bytes and sha256, memory budget
      tokenizer.model
      INTEGRATION.md         how to drive each artifact on the platform
      <backend>-<recipe>/    one validated artifact folder each (with its own manifest.json)
      samples/               Swift (iOS) or Kotlin (Android) generated from the manifests

`validate_bundle` checks every checksum (naming a tampered or truncated file), validates every artifact
in its runtime, and checks each artifact's peak memory against the profile's budget. Archives are read
with every member's path checked: one that would land outside the folder is refused.
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

from rgexport.build import BuildError, BuildOptions, _move_into_place, _partial_dirs
from rgexport.errors import RgexportError
from rgexport.manifest import file_entries, now, rgexport_version, sha256_file
from rgexport.profiles import TargetProfile
from rgexport.progress import StageFailed, Stages

if TYPE_CHECKING:
    from rgexport.executors import Executor

BUNDLE_MANIFEST = "bundle.json"


@dataclasses.dataclass
class BundleResult:
    out: Path
    manifest: dict[str, Any]
    archive: Path | None


def build_bundle(
    profile: TargetProfile, opts: BuildOptions, stages: Stages | None = None, archive: bool = False,
    recipe_overrides: dict[str, str] | None = None, executor: Executor | None = None,
) -> BundleResult:
    """Builds every artifact of `profile` into one bundle folder, atomically (like `build`). The artifacts
    are cells on `executor` (default: in this process, one after another); the first that fails fails the
    bundle and cancels the others."""
    from rgexport.cells import build_cell
    from rgexport.checkpoint import load_checkpoint
    from rgexport.executors import Cell, InProcessExecutor, MatrixProgress, cell_resources, run_cells
    from rgexport.samples import write_samples

    executor = executor or InProcessExecutor()
    stages = stages or Stages(quiet=True)
    out = Path(opts.out) if opts.out else Path("rgexport-out") / f"bundle-{profile.name}"
    if out.exists() and not opts.force:
        raise RgexportError(f"{out} already exists; pass --force to replace it (or choose another --out)")
    if out.exists() and not (out / BUNDLE_MANIFEST).is_file():
        raise RgexportError(f"{out} exists and is not an rgexport bundle; refusing to replace it")
    if not isinstance(executor, InProcessExecutor):
        out = out.resolve()  # workers need the absolute path (on a cluster: one every node shares)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _partial_dirs(out):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with stages.stage("load", opts.checkpoint or "shipped model"):
            ckpt = load_checkpoint(opts.checkpoint, opts.preset, opts.tokenizer)
        artifacts = []
        cells = []
        for spec in profile.artifacts:
            recipe = (recipe_overrides or {}).get(spec.backend) or spec.recipe
            folder = work / f"{spec.backend}-{recipe or 'default'}"
            sub = dataclasses.replace(opts, backend=spec.backend, recipe=recipe, out=folder, force=False,
                                      options={**spec.options, **opts.options})
            key = folder.name if folder.name not in {c.key for c in cells} else f"{folder.name}#{len(cells) + 1}"
            cells.append(Cell(key, build_cell, (sub,), out=folder,
                              local_kwargs={"stages": Stages(stages.console, stages.quiet), "checkpoint": ckpt},
                              **cell_resources(ckpt.config, spec.backend, recipe)))
        executor.check_output(work)
        with MatrixProgress(stages.console, [c.key for c in cells], f"bundle {profile.name}", live=executor.live,
                            quiet=stages.quiet) as progress:
            done = run_cells(executor, cells, progress, stop_on_error=True)
        for cell in cells:
            res = done.get(cell.key)
            if res is None or not res.ok:
                failed = res or next(r for r in done.values() if not r.ok)
                if failed.exception is not None:
                    raise failed.exception
                raise RgexportError(f"bundle artifact {failed.key} failed: {failed.error}")
            result = res.value
            final = work / f"{cell.args[0].backend}-{result.manifest['recipe']['name']}"
            if final != result.out:
                os.replace(result.out, final)
            artifacts.append((final, result.manifest))
        with stages.stage("bundle", "tokenizer, samples, guide, checksums"):
            if ckpt.tokenizer_path:
                shutil.copyfile(ckpt.tokenizer_path, work / "tokenizer.model")
            samples = write_samples(work, profile, artifacts)
            manifest = _bundle_manifest(work, profile, artifacts, samples)
            (work / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(work, out)
    except StageFailed as e:
        raise BuildError(e.stage, e.cause, out) from e.cause
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    archive_path = None
    if archive:
        archive_path = out.with_suffix(".zip")
        try:
            with stages.stage("archive", str(archive_path)):
                _write_zip(out, archive_path)
        except StageFailed as e:
            raise BuildError(e.stage, e.cause, out) from e.cause
    return BundleResult(out, manifest, archive_path)


def _bundle_manifest(work: Path, profile: TargetProfile, artifacts, samples: list[Path]) -> dict[str, Any]:
    files = sorted(p for p in work.rglob("*") if p.is_file() and p.name != BUNDLE_MANIFEST)
    return {
        "format": "rgexport-bundle",
        "format_version": 1,
        "created": now(),
        "rgexport_version": rgexport_version(),
        "target": profile.to_dict(),
        "artifacts": [
            {"backend": m["backend"], "recipe": m["recipe"]["name"], "folder": folder.name,
             "file": f"{folder.name}/{m['artifact']['file']}", "bytes": m["artifact"]["total_bytes"],
             "validation": m["validation"]["status"]}
            for folder, m in artifacts
        ],
        "tokenizer": "tokenizer.model" if (work / "tokenizer.model").is_file() else None,
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


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extracts a bundle .zip into `dest`, refusing any member whose path would leave it; returns the
    bundle folder."""
    try:
        z = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise RgexportError(f"{archive} is not a zip archive: {e}") from None
    root = dest.resolve()
    with z:
        for info in z.infolist():
            name = info.filename
            target = (dest / name).resolve()
            if name.startswith(("/", "\\")) or ".." in PurePosixPath(name.replace("\\", "/")).parts \
                    or not target.is_relative_to(root):
                raise RgexportError(f"{archive}: member {name!r} would be written outside the bundle; refusing")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise RgexportError(f"{archive}: member {name!r} is a symbolic link; refusing")
        z.extractall(dest)
    found = [p.parent for p in dest.rglob(BUNDLE_MANIFEST)]
    if len(found) != 1:
        raise RgexportError(f"{archive} holds {len(found)} {BUNDLE_MANIFEST} files, expected one bundle")
    return found[0]


def verify_bundle_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    problems = []
    listed = set()
    for entry in manifest["files"]:
        listed.add(entry["path"])
        p = folder / entry["path"]
        if not p.is_file():
            problems.append(f"{entry['path']}: missing")
        elif p.stat().st_size != entry["bytes"]:
            size = p.stat().st_size
            problems.append(f"{entry['path']}: {size} bytes, bundle.json says {entry['bytes']} (truncated?)")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from bundle.json (modified?)")
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != BUNDLE_MANIFEST and p.relative_to(folder).as_posix() not in listed)
    problems += [f"{e}: not listed in bundle.json (added?)" for e in extra]
    return problems


def peak_memory_of(artifact: Path, tokens: int) -> int:
    """Peak RSS (bytes) of a fresh process that loads the artifact and decodes `tokens` tokens: the whole
    process's peak, loading included, which is what a device's memory budget has to hold."""
    proc = subprocess.run([sys.executable, "-m", "rgexport.bench", str(artifact), str(tokens)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RgexportError(f"memory check of {artifact} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["process_peak_rss_bytes"]


def validate_bundle(path: Path, checkpoint: str | None = None, tokens: int | None = None,
                    stages: Stages | None = None) -> dict[str, Any]:
    """Checksums, every artifact's validation, and peak memory against the profile's budget."""
    from rgexport.validate import validate_artifact

    stages = stages or Stages(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = safe_extract(path, Path(tmp)) if path.is_file() else path
        mf = folder / BUNDLE_MANIFEST
        if not mf.is_file():
            raise RgexportError(f"{path} is not a bundle: no {BUNDLE_MANIFEST}")
        manifest = json.loads(mf.read_text())
        problems = verify_bundle_files(folder, manifest)
        if problems:
            raise RgexportError(f"{path}: bundle files do not match bundle.json: " + "; ".join(problems))
        budget_mb = manifest["target"].get("memory_budget_mb")
        results = []
        for art in manifest["artifacts"]:
            report = validate_artifact(folder / art["folder"], checkpoint=checkpoint, tokens=tokens, stages=stages)
            n = report.tokens
            with stages.stage("memory", f"{art['backend']} / {art['recipe']}, {n} tokens in a fresh process"):
                peak = peak_memory_of(folder / art["folder"], n)
            within = budget_mb is None or peak <= budget_mb * 1e6
            results.append({"backend": art["backend"], "recipe": art["recipe"], "report": report,
                            "peak_rss_bytes": peak, "memory_budget_mb": budget_mb, "within_budget": within})
        passed = all(r["report"].passed and r["within_budget"] for r in results)
        return {"bundle": str(path), "target": manifest["target"]["name"], "artifacts": results, "passed": passed}
