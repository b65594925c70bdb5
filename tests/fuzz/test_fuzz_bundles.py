"""Fuzz: broken bundles (bundle.json structure, paths that leave the bundle, bundle.json itself tampered,
files tampered, added or truncated) and archives (path escapes, links, garbage, tar), through `validate`.
See fuzzing.py for what every case asserts."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzzing import link_tree, replace_file


def _write(bundle: Path, data: object, *, raw: bytes | None = None, digest: bool = True) -> None:
    body = raw if raw is not None else (json.dumps(data, indent=2) + "\n").encode()
    replace_file(bundle / "bundle.json", body)
    if digest:  # a tamperer who also updates bundle.sha256
        replace_file(bundle / "bundle.sha256", f"{hashlib.sha256(body).hexdigest()}  bundle.json\n")


def _outside_artifact(bundle: Path) -> str:
    """A real, valid artifact placed outside the bundle; returns the relative path that reaches it."""
    link_tree(bundle / "onnx-fp32", bundle.parent.parent / "elsewhere")
    return "../../elsewhere"


def _edit(change: Callable[[dict, Path], None]) -> Callable[[Path], None]:
    def apply(bundle: Path) -> None:
        data = json.loads((bundle / "bundle.json").read_text())
        change(data, bundle)
        _write(bundle, data)
    return apply


def _set_art(key: str, value: object) -> Callable[[dict, Path], None]:
    def change(d: dict, bundle: Path) -> None:
        d["artifacts"][0][key] = value
    return change


def _outside(d: dict, bundle: Path) -> None:
    d["artifacts"][0]["folder"] = _outside_artifact(bundle)


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # The bundle that pointed outside itself: validate used to run ../../elsewhere and print "bundle PASSED".
    "artifact-folder-outside": (_edit(_outside),
                                r"artifacts\[0\]\.folder is '\.\./\.\./elsewhere', which points outside"),
    "artifact-folder-absolute": (_edit(_set_art("folder", "/tmp")), r"points outside"),
    "artifact-folder-itself": (_edit(_set_art("folder", ".")), r"is the bundle itself"),
    "artifact-folder-a-file": (_edit(_set_art("folder", "tokenizer.model")), r"has no manifest\.json among"),
    "artifact-folder-samples": (_edit(_set_art("folder", "samples")), r"has no manifest\.json among"),
    "artifact-folder-number": (_edit(_set_art("folder", 7)), r"artifacts\[0\]\.folder is 7"),
    "artifact-a-string": (_edit(lambda d, b: d.__setitem__("artifacts", ["onnx-fp32"])), r"artifacts\[0\] is"),
    "no-artifacts": (_edit(lambda d, b: d.__setitem__("artifacts", [])), r"lists no artifacts"),
    "artifacts-missing": (_edit(lambda d, b: d.pop("artifacts")), r"'artifacts' is None, expected list"),
    "files-missing": (_edit(lambda d, b: d.pop("files")), r"'files' is None, expected list"),
    "files-escape": (_edit(lambda d, b: d["files"].append({"path": "../../x", "bytes": 1, "sha256": "0" * 64})),
                     r"files\[\d+\]\.path is '\.\./\.\./x', which points outside"),
    "files-a-string": (_edit(lambda d, b: d["files"].append("tokenizer.model")), r"files\[\d+\] is 'tokenizer"),
    "files-bytes-string": (_edit(lambda d, b: d["files"][0].__setitem__("bytes", "12")), r"needs integer 'bytes'"),
    "tokenizer-escape": (_edit(lambda d, b: d.__setitem__("tokenizer", "../../tokenizer.model")),
                         r"tokenizer is '\.\./\.\./tokenizer\.model', which points outside"),
    "sample-absolute": (_edit(lambda d, b: d["samples"].append("/etc/passwd")), r"samples\[\d+\].*points outside"),
    "budget-a-string": (_edit(lambda d, b: d["target"].__setitem__("memory_budget_mb", "lots")),
                        r"memory_budget_mb' is 'lots'"),
    "no-target": (_edit(lambda d, b: d.pop("target")), r"'target' is None, expected dict"),
    "wrong-format": (_edit(lambda d, b: d.__setitem__("format", "zip")), r"format 'zip', expected 'rgexport-bundle'"),
    "invalid-json": (lambda b: _write(b, None, raw=b"{not json"), r"bundle\.json is not valid JSON"),
    "binary-json": (lambda b: _write(b, None, raw=os.urandom(512)), r"bundle\.json is not valid JSON"),
    "an-array": (lambda b: _write(b, [1, 2]), r"holds a JSON list, expected an object"),
    "no-digest": (lambda b: (b / "bundle.sha256").unlink(), r"has no bundle\.sha256"),
    "digest-stale": (lambda b: _write(b, {**json.loads((b / "bundle.json").read_text()), "artifacts": []},
                                      digest=False), r"does not match the sha256 in bundle\.sha256"),
    "no-bundle-json": (lambda b: (b / "bundle.json").unlink(), r"has no bundle\.json"),
    "tampered-file": (lambda b: replace_file(b / "INTEGRATION.md", "changed\n"),
                      r"INTEGRATION\.md: (sha256 differs|\d+ bytes)"),
    "tampered-artifact-manifest": (lambda b: replace_file(b / "onnx-fp32/manifest.json",
                                                          (b / "onnx-fp32/manifest.json").read_text() + " "),
                                   r"onnx-fp32/manifest\.json: \d+ bytes"),
    "truncated-artifact": (lambda b: replace_file(b / "onnx-fp32/decode.onnx",
                                                  (b / "onnx-fp32/decode.onnx").read_bytes()[:1000]),
                           r"decode\.onnx: 1000 bytes"),
    "added-file": (lambda b: (b / "extra.bin").write_bytes(b"x"), r"extra\.bin: not listed"),
    "added-link-out": (lambda b: os.symlink("/etc/passwd", b / "passwd"), r"passwd: not listed"),
    "missing-file": (lambda b: (b / "INTEGRATION.md").unlink(), r"INTEGRATION\.md: missing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bundle(sandbox, case):
    change, match = CASES[case]
    bundle = sandbox.bundle_copy(case)
    change(bundle)
    sandbox.run(["validate", bundle, "--tokens", "16"], match=match)


def _zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, target)
    return path


def _bundle_zip(sandbox, folder: Path, path: Path, extra: dict[str, bytes] | None = None) -> Path:
    members = {f"bundle-fuzz/{p.relative_to(folder).as_posix()}": p.read_bytes()
               for p in sorted(folder.rglob("*")) if p.is_file()}
    return _zip(path, {**members, **(extra or {})})


ARCHIVES: dict[str, tuple[Callable, str]] = {
    "member-dotdot": (lambda s, d: _zip(d / "b.zip", {"../../evil.txt": b"x"}), r"would be written outside"),
    "member-absolute": (lambda s, d: _zip(d / "b.zip", {"/tmp/evil.txt": b"x"}), r"would be written outside"),
    "member-link": (lambda s, d: _zip(d / "b.zip", {"a.txt": b"x"}, {"link": "/etc/passwd"}), r"symbolic link"),
    "garbage": (lambda s, d: (d / "b.zip").write_bytes(os.urandom(2000)) and d / "b.zip", r"is not a zip archive"),
    "empty-zip": (lambda s, d: _zip(d / "b.zip", {}), r"holds 0 bundle\.json files"),
    "two-bundles": (lambda s, d: _zip(d / "b.zip", {"a/bundle.json": b"{}", "b/bundle.json": b"{}"}),
                    r"holds 2 bundle\.json files"),
    "bundle-pointing-outside": (None, r"points outside"),
    "tampered-in-zip": (None, r"INTEGRATION\.md: (sha256 differs|\d+ bytes)"),
}


@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_archive(sandbox, case):
    make, match = ARCHIVES[case]
    d = sandbox.case(f"zip-{case}")
    if case == "bundle-pointing-outside":
        bundle = sandbox.bundle_copy("zip-src-outside")
        data = json.loads((bundle / "bundle.json").read_text())
        data["artifacts"][0]["folder"] = "../../elsewhere"
        _write(bundle, data)
        path = _bundle_zip(sandbox, bundle, d / "b.zip")
    elif case == "tampered-in-zip":
        bundle = sandbox.bundle_copy("zip-src-tampered")
        replace_file(bundle / "INTEGRATION.md", "changed\n")
        path = _bundle_zip(sandbox, bundle, d / "b.zip")
    else:
        path = make(sandbox, d)
    sandbox.run(["validate", path, "--tokens", "16"], match=match)
    assert not (sandbox.root / "evil.txt").exists()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_tar_is_said_to_be_unsupported(sandbox, suffix):
    d = sandbox.case(f"tar{suffix}")
    path = d / f"bundle{suffix}"
    with tarfile.open(path, "w:gz" if "gz" in suffix else "w") as t:
        for name in ("bundle.json", "bundle.sha256", "INTEGRATION.md"):
            t.add(sandbox.bundle / name, arcname=f"bundle-fuzz/{name}")
    sandbox.run(["validate", path], match=r"tar archive, which rgexport does not read")


def test_the_intact_bundle_passes(sandbox):
    """The positive control: the bundle every case above corrupts validates (from its .zip: extraction,
    checksums, the artifact in its runtime, memory against the budget)."""
    bundle = sandbox.bundle_copy("intact")
    path = _bundle_zip(sandbox, bundle, bundle.parent / "intact.zip")
    # ONNX Runtime keeps a device id under the user's cache folder, and a probe process leaves tmp/.ses:
    # the runtimes' own files, written on success too, not rgexport's.
    outcome = sandbox.run(["validate", path, "--tokens", "32"], code=0,
                          allow_changes_under=(sandbox.root / "cache" / "Microsoft", sandbox.root / "tmp" / ".ses"))
    assert "bundle fuzz-edge: PASSED" in outcome.output
