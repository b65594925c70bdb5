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
from typing import Any

from rgexport.archive import BUNDLE_MANIFEST, safe_extract
from rgexport.build import BuildError, BuildOptions, _move_into_place, _partial_dirs, build
from rgexport.errors import RgexportError
from rgexport.manifest import file_entries, now, rgexport_version, sha256_file
from rgexport.profiles import TargetProfile
from rgexport.progress import StageFailed, Stages


@dataclasses.dataclass
class BundleResult:
    out: Path
    manifest: dict[str, Any]
    archive: Path | None


def build_bundle(
    profile: TargetProfile, opts: BuildOptions, stages: Stages | None = None, archive: bool = False,
    recipe_overrides: dict[str, str] | None = None,
) -> BundleResult:
    """Builds every artifact of `profile` into one bundle folder, atomically (like `build`)."""
    from rgexport.checkpoint import load_checkpoint
    from rgexport.samples import write_samples

    stages = stages or Stages(quiet=True)
    out = Path(opts.out) if opts.out else Path("rgexport-out") / f"bundle-{profile.name}"
    if out.exists() and not opts.force:
        raise RgexportError(f"{out} already exists; pass --force to replace it (or choose another --out)")
    if out.exists() and not (out / BUNDLE_MANIFEST).is_file():
        raise RgexportError(f"{out} exists and is not an rgexport bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _partial_dirs(out):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with stages.stage("load", opts.checkpoint or "shipped model"):
            ckpt = load_checkpoint(opts.checkpoint, opts.preset, opts.tokenizer)
        artifacts = []
        for spec in profile.artifacts:
            recipe = (recipe_overrides or {}).get(spec.backend) or spec.recipe
            folder = work / f"{spec.backend}-{recipe or 'default'}"
            sub = dataclasses.replace(opts, backend=spec.backend, recipe=recipe, out=folder, force=False,
                                      options={**spec.options, **opts.options})
            if not stages.quiet:
                stages.console.print(f"[bold]{spec.backend}[/bold] / {recipe or 'default'}")
            result = build(sub, Stages(stages.console, stages.quiet), checkpoint=ckpt)
            final = work / f"{spec.backend}-{result.manifest['recipe']['name']}"
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
