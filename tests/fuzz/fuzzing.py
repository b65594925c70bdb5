"""The bad-input fuzz suite's harness. The session fixture (conftest.py) builds one real bundle, with
one real ONNX fp32 artifact inside, once per session, and a sandbox in which every case runs.

Each case makes its broken input (a corrupt copy of a real file, a mutated config, a flag) inside the
sandbox, then runs one `rgexport` command in-process and checks what issue 18 guarantees:
  - the exit status (1 for bad input, 2 for a usage error, 130/143 for signals),
  - exactly one line starting with `error:`, naming what is wrong, not ending in '..',
  - no traceback and no "internal error" (every case is anticipated bad input, not a bug),
  - nothing in the sandbox changed: no partial folder, no file written anywhere (temporary files and the
    crash-report folder are inside the sandbox too), earlier outputs byte-identical.
Large files are hard links to the fixture's (a case replaces a file, never writes into it), so a command
that wrote into an input would show in the snapshot too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

PROFILE = """
name = "fuzz-edge"
description = "one ONNX artifact, for the fuzz suite"
platform = "linux"
min_runtime = "onnxruntime 1.20"
memory_budget_mb = 4096

[[artifacts]]
backend = "onnx"
recipe = "fp32"
[artifacts.options]
ort_format = true  # the .ort files too, so that their checks are fuzzed (off by default)
"""


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under `root`: files by (size, mtime, inode), folders and links by kind."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def link_tree(src: Path, dst: Path) -> Path:
    """A copy of `src` whose files are hard links (cheap; replace a file, never write into it)."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, symlinks=True)
    return dst


def replace_file(path: Path, data: bytes | str) -> None:
    """Writes `path` as a new file (breaking any hard link), so the fixture's original is untouched."""
    path.unlink(missing_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


@dataclasses.dataclass
class Outcome:
    code: int
    output: str
    error_line: str | None


@dataclasses.dataclass
class Sandbox:
    root: Path
    bundle: Path  # a real bundle folder (one ONNX fp32 artifact, the tokenizer, samples, guide)
    artifact: Path  # the real artifact folder inside it
    prior: Path  # an earlier output that must stay byte-identical
    prior_digest: str
    shipped: Path  # the shipped Hugging Face folder
    counter: int = 0

    def case(self, name: str) -> Path:
        self.counter += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:60]
        d = self.root / "cases" / f"{self.counter:03d}-{safe}"
        d.mkdir(parents=True)
        return d

    def artifact_copy(self, name: str) -> Path:
        return link_tree(self.artifact, self.case(name) / "art")

    def bundle_copy(self, name: str) -> Path:
        return link_tree(self.bundle, self.case(name) / "bundle-fuzz")

    def hf_copy(self, name: str) -> Path:
        return link_tree(self.shipped, self.case(name) / "ckpt")

    @contextlib.contextmanager
    def _environment(self) -> Iterator[None]:
        old_tempdir, old_cwd = tempfile.tempdir, os.getcwd()
        old_env = {k: os.environ.get(k) for k in ("TMPDIR", "XDG_CACHE_HOME", "RGEXPORT_CACHE")}
        tempfile.tempdir = str(self.root / "tmp")
        os.environ["TMPDIR"] = str(self.root / "tmp")
        os.environ["XDG_CACHE_HOME"] = str(self.root / "cache")
        os.environ["RGEXPORT_CACHE"] = str(self.root / "cache" / "rgexport")  # crash reports would land here
        os.chdir(self.root / "cwd")
        try:
            yield
        finally:
            os.chdir(old_cwd)
            tempfile.tempdir = old_tempdir
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run(self, args: list[str], *, code: int = 1, match: str | None = None, check_prior: bool = False,
            allow_changes_under: tuple[Path, ...] = ()) -> Outcome:
        """Runs `rgexport ARGS` in-process and checks the guarantees in the module docstring."""
        from rgexport.cli import app

        before = snapshot(self.root)
        with self._environment():
            result = CliRunner().invoke(app, [str(a) for a in args])
        after = snapshot(self.root)
        output = result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"an exception escaped the CLI: {result.exception!r}\n{output}")
        assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{output}"
        assert "Traceback" not in output, output
        assert "internal error" not in output, output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        error_line = None
        if code in (1, 2):
            assert len(errors) == 1, f"expected one 'error:' line:\n{output}"
            error_line = errors[0]
            assert not error_line.rstrip().endswith(".."), error_line
            if match is not None:
                assert re.search(match, error_line), f"{match!r} not in {error_line!r}"
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        for allowed in allow_changes_under:
            prefix = allowed.relative_to(self.root).as_posix()
            changed = [c for c in changed if not (c == prefix or c.startswith(prefix + "/"))]
        assert not changed, f"the command changed the sandbox: {changed[:10]}"
        if check_prior:
            assert tree_digest(self.prior) == self.prior_digest, "an earlier output changed"
        return Outcome(result.exit_code, output, error_line)


