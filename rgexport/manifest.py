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
    """Accepts an artifact folder, its manifest.json, or a file inside the folder. The manifest must match
    the schema, name only paths inside its folder, and be consistent with itself (`check_manifest_contents`)."""
    p = Path(path)
    if p.is_file() and p.name != MANIFEST:
        p = p.parent
    folder = p.parent if p.name == MANIFEST else p
    mf = folder / MANIFEST
    if not mf.is_file():
        if (folder / "bundle.sha256").is_file() or any(folder.glob("*/manifest.json")):
            raise RgexportError(f"{folder} has no {MANIFEST} and no bundle.json: if it is a bundle, its bundle.json "
                                "is missing (rebuild it with `rgexport build --target PROFILE`)")
        raise RgexportError(f"{folder} has no {MANIFEST}: is it an artifact folder written by `rgexport build`?")
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RgexportError(f"{mf} is not UTF-8 JSON (byte {e.object[e.start]:#04x} at offset {e.start}); "
                            "rebuild the artifact") from None
    except json.JSONDecodeError as e:
        raise RgexportError(f"{mf} is not valid JSON: {e}; rebuild the artifact") from None
    except (OSError, RecursionError) as e:
        raise RgexportError(f"cannot read {mf}: {getattr(e, 'strerror', None) or e}") from None
    check_manifest(manifest)
    check_manifest_contents(folder, manifest)
    return folder, manifest


STATE_DTYPES = {"float32": 4, "float16": 2}


def check_manifest_contents(folder: Path, manifest: dict[str, Any]) -> None:
    """What the schema cannot say: every path is inside `folder` (refused before anything is opened), the
    model config is a possible one, and the state is float32/float16 with bytes that add up."""
    from rgexport.config import GriffinConfig
    from rgexport.errors import ConfigError
    from rgexport.safety import contained

    mf = folder / MANIFEST
    art = manifest["artifact"]
    listed = set()
    for i, entry in enumerate(art["files"]):
        contained(folder, entry["path"], f"{mf}: artifact.files[{i}].path")
        listed.add(entry["path"])
    main = art["file"]
    contained(folder, main, f"{mf}: artifact.file")
    if main not in listed and not any(p.startswith(main.rstrip("/") + "/") for p in listed):
        raise RgexportError(f"{mf}: artifact.file {main!r} is not among artifact.files, so no checksum covers it; "
                            "rebuild the artifact")
    if manifest["tokenizer"] is not None:
        tok = manifest["tokenizer"]["file"]
        contained(folder, tok, f"{mf}: tokenizer.file")
        if tok not in listed:
            raise RgexportError(f"{mf}: tokenizer.file {tok!r} is not among artifact.files, so no checksum covers "
                                "it; rebuild the artifact")
    try:
        config = GriffinConfig.from_dict(manifest["model"]["config"])
    except ConfigError as e:
        raise RgexportError(f"{mf}: model.config: {e}") from None
    io = manifest["io"]
    if io["prefill_chunk"] > config.attention_window_size:
        raise RgexportError(f"{mf}: io.prefill_chunk {io['prefill_chunk']} exceeds the attention window "
                            f"{config.attention_window_size}")
    total = 0
    for i, t in enumerate(io["state"]["tensors"]):
        where = f"{mf}: io.state.tensors[{i}] ({t['name']})"
        if t["dtype"] not in STATE_DTYPES:
            raise RgexportError(f"{where} has dtype {t['dtype']!r}; rgexport artifacts keep state in "
                                f"{' or '.join(STATE_DTYPES)}")
        n = 1
        for d in t["shape"]:
            n *= d
        if t["bytes"] != n * STATE_DTYPES[t["dtype"]]:
            raise RgexportError(f"{where} says {t['bytes']} bytes, but {t['shape']} x {t['dtype']} is "
                                f"{n * STATE_DTYPES[t['dtype']]}")
        total += t["bytes"]
    if io["state"]["total_bytes"] != total:
        raise RgexportError(f"{mf}: io.state.total_bytes is {io['state']['total_bytes']}, its tensors add up to "
                            f"{total}")


def verify_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the artifact's files (missing, size or checksum differs), each naming the file. A path
    outside `folder` is refused (RgexportError) before any file is looked at."""
    from rgexport.safety import contained

    paths = [contained(folder, e["path"], f"{folder / MANIFEST}: artifact.files[{i}].path")
             for i, e in enumerate(manifest["artifact"]["files"])]
    problems = []
    for entry, p in zip(manifest["artifact"]["files"], paths, strict=True):
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
