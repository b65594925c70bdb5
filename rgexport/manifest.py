"""`manifest.json`: what an artifact is, how to drive it, and whether it passed validation.

The JSON Schema ships as rgexport/schemas/manifest.schema.json; `check_manifest` validates against it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

from rgexport.errors import RgexportError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, files: list[Path]) -> list[dict[str, Any]]:
    """Path (relative to root, with /), bytes and sha256 of every file; folders are walked."""
    out = []
    for f in files:
        paths = sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
        for p in paths:
            out.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def rgexport_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rgexport")
    except PackageNotFoundError:
        return "0+unknown"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def load_schema() -> dict[str, Any]:
    from rgexport.assets import schema_path

    return json.loads(schema_path("manifest.schema.json").read_text())


def check_manifest(manifest: dict[str, Any]) -> None:
    """Raises RgexportError naming the first place where `manifest` breaks the schema."""
    import jsonschema

    try:
        jsonschema.validate(manifest, load_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise RgexportError(f"manifest.json is invalid at {where}: {e.message}") from None


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Accepts an artifact folder, its manifest.json, or a file inside the folder."""
    p = Path(path)
    if p.is_file() and p.name != MANIFEST:
        p = p.parent
    folder = p.parent if p.name == MANIFEST else p
    mf = folder / MANIFEST
    if not mf.is_file():
        raise RgexportError(f"{folder} has no {MANIFEST}: is it an artifact folder written by `rgexport build`?")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise RgexportError(f"{mf} is not valid JSON: {e}") from None
    check_manifest(manifest)
    return folder, manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the artifact's files (missing, size or checksum differs), each naming the file."""
    problems = []
    for entry in manifest["artifact"]["files"]:
        p = folder / entry["path"]
        if not p.is_file():
            problems.append(f"{entry['path']}: missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']}: {p.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest (modified?)")
    return problems


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    check_manifest(manifest)
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
