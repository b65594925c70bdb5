"""The one runtime layer: an artifact (or a bundle's artifact) opened in its own runtime, the same way for
every backend.

    with open_artifact("rgexport-out/onnx-int8") as art:
        logits = art.last_logits(tokens, 0)       # whole chunks through prefill, the rest through decode
        logits = art.decode(next_token, len(tokens))

`open_artifact` reads the manifest, checks every file against its sha256 before anything loads, and asks
the backend registry for a `Runner`. Nothing that uses a `LoadedArtifact` needs to know which backend it
is: the facts a consumer needs (prefill chunk, vocabulary, state bytes, tokenizer, whether the runner is a
stand-in for the real runtime, memory) have one name and one schema here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.archive import BUNDLE_MANIFEST
from rgexport.errors import RgexportError
from rgexport.memory import peak_rss_bytes, rss_bytes
from rgexport.safety import first_line, sentence

# Keys of LoadedArtifact.memory(), the same for every backend.
MEMORY_KEYS = ("rss_bytes", "peak_rss_bytes", "state_bytes", "runtime_bytes", "runtime_detail")


class LoadedArtifact:
    """An artifact loaded in its runtime: numpy in, numpy out, one sequence at a time (batch 1).

    Positions are the caller's: position 0 starts a new sequence whatever the state holds; positions then
    increase by one per token, and the state carries everything before them.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], runner: Any, *, source: str,
                 bundle: dict[str, Any] | None = None, tmpdir: Path | None = None):
        self.folder = folder
        self.manifest = manifest
        self.source = source  # what was opened, for messages (the bundle and the artifact in it)
        self.bundle = bundle  # bundle.json when opened through a bundle
        self._runner = runner
        self._tmpdir = tmpdir

    # Facts -------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def recipe(self) -> str:
        return self.manifest["recipe"]["name"]

    @property
    def prefill_chunk(self) -> int:
        return int(self.manifest["io"]["prefill_chunk"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["model"]["config"]["vocab_size"])

    @property
    def state_bytes(self) -> int:
        """Bytes of the decode state as the artifact stores it (the manifest's figure, fixed at any length)."""
        return int(self.manifest["io"]["state"]["total_bytes"])

    @property
    def tokenizer_path(self) -> Path | None:
        entry = self.manifest.get("tokenizer")
        return self.folder / entry["file"] if entry else None

    @property
    def chat_template(self) -> dict[str, Any] | None:
        """The checkpoint's chat template as the manifest records it (None: the model has none)."""
        entry = self.manifest.get("tokenizer") or {}
        return entry.get("chat_template")

    @property
    def stand_in(self) -> str:
        """Non-empty where the runner is not the artifact's own runtime (Core ML off macOS): what it is."""
        return getattr(self._runner, "stand_in", "") or ""

    @property
    def runner(self) -> Any:
        """The backend's `Runner` (for code that times or inspects it directly)."""
        if self._runner is None:
            raise RgexportError(f"{self.source} was closed")
        return self._runner

    def describe(self) -> str:
        """One line: what is loaded, in which runtime."""
        line = f"{self.source}: {self.backend} / {self.recipe}"
        return line + (f" (runner: {self.stand_in})" if self.stand_in else "")

    # Running -----------------------------------------------------------------------------------------
    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        """Exactly `prefill_chunk` tokens starting at `position` -> logits [chunk, vocab] float32, or [1, vocab]
        where the artifact's prefill returns its last token's logits alone (`prefill_logits`)."""
        return self.runner.prefill(list(tokens), position)

    def decode(self, token: int, position: int) -> np.ndarray:
        """One token at `position` -> logits [vocab] float32."""
        return self.runner.decode(int(token), position)

    @property
    def prefill_rows(self) -> int:
        """Rows of logits a prefill call returns: the chunk's, or 1 (`prefill_logits` "last")."""
        return int(self.runner.prefill_rows)

    @property
    def prefill_logits(self) -> str:
        """"all" where prefill returns every token's logits, "last" where it returns the last token's alone."""
        return str(self.manifest.get("io", {}).get("prefill_logits", "all"))

    def feed(self, tokens: Sequence[int], position: int) -> np.ndarray:
        """Any number of tokens from `position` -> logits for every token [n, vocab]: whole chunks through
        prefill, the rest through decode; every token through decode where prefill returns the last logits
        alone (a prompt that only needs its next token: `last_logits`)."""
        from rgexport.backends.base import feed

        return feed(self.runner, list(tokens), position)

    def last_logits(self, tokens: Sequence[int], position: int) -> np.ndarray:
        """Any number (at least one) of tokens from `position`, whole chunks through prefill, the rest through
        decode -> the last token's logits [vocab]: what generation reads."""
        from rgexport.backends.base import last_logits

        return last_logits(self.runner, list(tokens), position)

    def state(self) -> dict[str, np.ndarray] | None:
        """The current state by name (float32) where the runtime exposes it; else None."""
        return self.runner.state()

    def reset(self) -> None:
        """Forget the current sequence."""
        self.runner.reset()

    def memory(self) -> dict[str, Any]:
        """Memory now, the same keys for every backend (`MEMORY_KEYS`): the process's resident and peak
        resident bytes, the state's bytes, the bytes the runtime reports holding (None where it reports
        nothing), and the runtime's own figures by name (`runtime_detail`)."""
        detail = {k: int(v) for k, v in (self.runner.memory() or {}).items() if not k.startswith("process_")}
        return {
            "rss_bytes": rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "state_bytes": self.state_bytes,
            "runtime_bytes": sum(detail.values()) if detail else None,
            "runtime_detail": detail,
        }

    def close(self) -> None:
        """Drops the runtime (and a bundle archive's extracted copy)."""
        self._runner = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> LoadedArtifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_artifact(path: str | Path, artifact: str | None = None) -> tuple[Path, dict[str, Any] | None, str]:
    """An artifact folder from `path`: an artifact folder (or its manifest.json), or a bundle folder whose
    artifact is `artifact` (a folder name, a backend, or backend/recipe) or its first one.

    Returns (artifact folder, bundle.json or None, a description of what was chosen)."""
    p = Path(path)
    if not p.exists():
        raise RgexportError(f"{p} does not exist: pass an artifact folder or a bundle written by `rgexport build`")
    if p.is_file() and p.name != "manifest.json":
        raise RgexportError(f"{p} is a file, not an artifact: pass an artifact folder, a bundle folder or a "
                            "bundle .zip written by `rgexport build`")
    if p.is_dir() and (p / BUNDLE_MANIFEST).is_file():
        try:
            bundle = json.loads((p / BUNDLE_MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise RgexportError(f"{p / BUNDLE_MANIFEST} is not valid JSON: {e}") from None
        arts = bundle.get("artifacts") or []
        if not arts:
            raise RgexportError(f"{p} is a bundle with no artifacts")
        names = [a["folder"] for a in arts]
        if artifact is None:
            chosen = arts[0]
            how = ("its only artifact" if len(arts) == 1
                   else f"its first artifact of {', '.join(names)}; --artifact picks another")
        else:
            matches = [a for a in arts if artifact in (a["folder"], a["backend"], f"{a['backend']}/{a['recipe']}")]
            if not matches:
                raise RgexportError(f"bundle {p} has no artifact {artifact!r}; it has {', '.join(names)}")
            chosen, how = matches[0], f"--artifact {artifact}"
        return p / chosen["folder"], bundle, f"{p}/{chosen['folder']} ({how})"
    if artifact is not None:
        raise RgexportError(f"--artifact picks an artifact inside a bundle; {p} is not a bundle")
    return p, None, str(p)


def open_artifact(path: str | Path, *, threads: int | None = None, verify: bool = True,
                  artifact: str | None = None, manifest: dict[str, Any] | None = None,
                  variant: str | None = None) -> LoadedArtifact:
    """Opens an artifact folder, a bundle folder or a bundle .zip in the artifact's runtime.

    `artifact` picks one of a bundle's artifacts (default: its first); `threads` sizes the runtime's CPU
    pool (None: its default); `verify` checks every file's size and sha256 against the manifest first.
    `manifest` describes a folder whose manifest.json is not written yet (a build validating its work
    folder); `variant` loads one of the backend's other ways to run the same files (`Backend.variants`,
    e.g. ONNX's .ort files).
    Raises RgexportError (one line) for a path that is not an artifact, a modified file or a missing runtime.
    """
    from rgexport.backends import get_backend
    from rgexport.manifest import read_manifest, verify_files

    p = Path(path)
    tmpdir = None
    try:
        if p.is_file() and p.suffix == ".zip":
            from rgexport.archive import safe_extract

            tmpdir = Path(tempfile.mkdtemp(prefix="rgexport-bundle-"))
            extracted = safe_extract(p, tmpdir)
            folder, bundle, desc = resolve_artifact(extracted, artifact)
            desc = f"{p}:{folder.name}" + desc[len(f"{extracted}/{folder.name}"):]
        elif manifest is not None:
            folder, bundle, desc = p, None, str(p)
        else:
            folder, bundle, desc = resolve_artifact(p, artifact)
        if manifest is None and verify:
            folder, manifest = checked_artifact(folder)  # paths contained, checksums, the backend's own check
        elif manifest is None:
            folder, manifest = read_manifest(folder)
        elif verify:
            problems = verify_files(folder, manifest)
            if problems:
                raise RgexportError(f"{desc}: files do not match manifest.json: " + "; ".join(problems))
        backend = get_backend(manifest["backend"])
        options = {}
        if variant is not None:
            variants = backend.variants(folder, manifest)
            if variant not in variants:
                raise RgexportError(f"{desc}: backend {backend.name} has no variant {variant!r}; it has "
                                    f"{', '.join(variants) or 'none'}")
            options, desc = variants[variant], f"{desc} ({variant})"
        runner = load_runner(backend, folder, manifest, threads=threads, **options)
    except BaseException:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return LoadedArtifact(folder, manifest, runner, source=desc, bundle=bundle, tmpdir=tmpdir)


def checked_artifact(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The folder and manifest of an artifact whose every file is inside its folder, matches its checksum,
    and passes its backend's structural check: what to call before loading it in a runtime."""
    from rgexport.backends import get_backend
    from rgexport.manifest import read_manifest, verify_files

    folder, manifest = read_manifest(path)
    problems = verify_files(folder, manifest)
    if problems:
        raise RgexportError(f"{folder}: files do not match the manifest: " + "; ".join(problems))
    get_backend(manifest["backend"]).check_artifact(folder, manifest)
    return folder, manifest

def load_runner(backend: Any, folder: Path, manifest: dict[str, Any], **kwargs: Any) -> Any:
    """`backend.load(...)` with any runtime error reading the files turned into one line naming them."""
    try:
        runner = backend.load(folder, manifest, **kwargs)
    except RgexportError:
        raise
    except Exception as e:
        raise RgexportError(f"{backend.name} could not load {Path(folder) / manifest['artifact']['file']}: "
                            f"{type(e).__name__}: {sentence(first_line(e))}; rebuild the artifact") from e
    if getattr(runner, "prefill_rows", None) is None:  # a runner that does not read it from its graph
        from rgexport.backends.base import manifest_prefill_rows

        runner.prefill_rows = manifest_prefill_rows(manifest["io"])
    return runner
