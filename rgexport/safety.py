"""Untrusted input: paths read from manifests and bundles, the artifact files themselves, and text.

Every path a manifest or a bundle names is resolved inside its folder or refused before anything is
opened (`contained`); an artifact's files are checked against their checksums and then by the backend
(`Backend.check_artifact`: magic bytes and a structural parse that cannot abort this process) before a
runtime loads them (`rgexport.runtime.checked_artifact`, `load_runner`). These are the functions any layer that opens an
artifact (validate, bench, emulation, a runtime front end) calls first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from rgexport.errors import RgexportError


def sentence(text: str) -> str:
    """`text` without trailing full stops or spaces: messages are joined with '; ' and never end in '..'."""
    return str(text).strip().rstrip(".").rstrip()


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, shortened: third-party messages can be long."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def contained(folder: Path, rel: Any, what: str) -> Path:
    """`folder / rel` for a relative path `rel` read from a file in `folder`, refusing one that is not a
    plain relative path or would resolve outside `folder` (absolute, `..`, a drive, a symbolic link out).
    Nothing is opened."""
    if not isinstance(rel, str) or not rel.strip():
        raise RgexportError(f"{what} is {rel!r}, expected a relative path inside {folder}")
    posix = PurePosixPath(rel)
    if ("\x00" in rel or "\\" in rel or posix.is_absolute() or ".." in posix.parts
            or (len(rel) > 1 and rel[1] == ":")):
        raise RgexportError(f"{what} is {rel!r}, which points outside {folder}; refusing to open it (paths in "
                            "manifests and bundles are relative to their folder)")
    root = Path(folder).resolve()
    target = (Path(folder) / rel).resolve()
    if not target.is_relative_to(root):
        raise RgexportError(f"{what} is {rel!r}, which resolves outside {folder} (a symbolic link?); refusing "
                            "to open it")
    return Path(folder) / rel


def check_magic(path: Path, magic: bytes, offset: int, what: str) -> None:
    """Raises RgexportError unless `path` holds `magic` at `offset` (a flatbuffer's file identifier)."""
    try:
        with open(path, "rb") as f:
            head = f.read(offset + len(magic))
    except OSError as e:
        raise RgexportError(f"cannot read {path}: {e.strerror or e}") from None
    if head[offset:] != magic:
        raise RgexportError(f"{path} is not {what} (its file identifier is {head[offset:]!r}, expected {magic!r}); "
                            "rebuild the artifact")


def probe_in_child(args: Sequence[str], path: Path, what: str, timeout: float = 600) -> None:
    """Runs `python args...` in a child process that loads `path` in a runtime which might abort on a
    corrupt file; a crash or failure there is an RgexportError here, never a crash of this process."""
    env = dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, errors="replace",
                              env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RgexportError(f"loading {path} in {what} did not finish within {timeout:.0f} s; rebuild the "
                            "artifact") from None
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        raise RgexportError(f"{path} crashed {what} ({name}) when a separate process loaded it: the file is corrupt; "
                            "rebuild the artifact")
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    detail = lines[-1] if lines else f"exit status {proc.returncode}"
    raise RgexportError(f"{what} cannot load {path}: {sentence(detail)[:300]}; rebuild the artifact")


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file a user named; one clear RgexportError if it cannot be read or is not UTF-8."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RgexportError(f"{what} {p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                            "give a UTF-8 text file") from None
    except OSError as e:
        raise RgexportError(f"cannot read {what} {p}: {e.strerror or e}") from None


def utf8_argument(value: str, flag: str) -> str:
    """A command-line string that must be UTF-8 (Python keeps undecodable argv bytes as surrogates)."""
    bad = next((i for i, c in enumerate(value) if 0xD800 <= ord(c) <= 0xDFFF), None)
    if bad is not None:
        byte = ord(value[bad]) - 0xDC00 if ord(value[bad]) >= 0xDC80 else ord(value[bad])
        raise RgexportError(f"{flag} holds bytes that are not UTF-8 (byte {byte:#04x} at character {bad}); "
                            "pass UTF-8 text")
    return value


def writable_dir(path: Path, flag: str, what: str = "", create: bool = True) -> Path:
    """Checks that the folder `path` can be written, creating it (and its parents) with `create`; else one
    line naming it and `flag`. Without `create` nothing is made: a command that fails later leaves nothing."""
    p = Path(path)
    name = f"{what} {p}" if what else f"{flag} {p}"
    if p.exists() and not p.is_dir():
        raise RgexportError(f"{name} is a file, not a folder; choose another {flag}")
    if not create:
        existing = next(a for a in (p, *p.parents) if a.exists() or a == Path(a.anchor or "."))
        if not existing.is_dir():
            raise RgexportError(f"{name} is inside {existing}, which is a file, not a folder; choose another {flag}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise RgexportError(f"{name} cannot be created in {existing} (not writable); choose another {flag}")
        return p
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RgexportError(f"cannot create {name}: {e.strerror or e}; choose another {flag}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise RgexportError(f"{name} is not writable; choose another {flag} or fix its permissions")
    return p


def missing_parents(path: Path) -> list[Path]:
    """The folders above `path` (and `path`) that do not exist yet, deepest first: what creating it makes."""
    p = Path(path).absolute()
    out = []
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def remove_empty(folders: list[Path]) -> None:
    """Removes each folder of `folders` (deepest first) that is empty: undoes `missing_parents`' creation."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            break


