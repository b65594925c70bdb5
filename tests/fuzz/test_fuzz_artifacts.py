"""Fuzz: broken artifacts (manifest.json fields and structure, paths that leave the folder, tampered,
truncated and garbage runtime files with their checksums updated, a manifest whose backend lies), through
`validate`, `bench`, `info PATH` and `validate --device emulated-arm64`. See fuzzing.py for what every case
asserts."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzzing import replace_file

Mutation = Callable[[dict, Path], None]


def _entry(m: dict, path: str) -> dict:
    return next(e for e in m["artifact"]["files"] if e["path"] == path)


def _rehash(m: dict, folder: Path, path: str) -> None:
    """Updates the manifest's bytes and sha256 of `path` to the file's (a tamperer who knows the format)."""
    data = (folder / path).read_bytes()
    e = _entry(m, path)
    e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()


def _set(keys: str, value: object) -> Mutation:
    def change(m: dict, folder: Path) -> None:
        *parents, last = keys.split("/")
        d = m
        for k in parents:
            d = d[int(k)] if isinstance(d, list) else d[k]
        if value is _DELETE:
            del d[last]
        elif isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
    return change


_DELETE = object()


def _replace_and_rehash(path: str, data: Callable[[bytes], bytes]) -> Mutation:
    def change(m: dict, folder: Path) -> None:
        replace_file(folder / path, data((folder / path).read_bytes()))
        _rehash(m, folder, path)
    return change


def _replace(path: str, data: Callable[[bytes], bytes]) -> Mutation:
    def change(m: dict, folder: Path) -> None:
        replace_file(folder / path, data((folder / path).read_bytes()))
    return change


def _escape_with_real_hash(target: str) -> Mutation:
    def change(m: dict, folder: Path) -> None:
        outside = folder.parent / "outside.txt"
        outside.write_text("a file outside the artifact\n")
        data = outside.read_bytes()
        m["artifact"]["files"].append({"path": target, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return change


def _external_location(location: str) -> Mutation:
    """decode.onnx's first external tensor points at `location` instead of weights.bin (rehashed)."""
    def change(m: dict, folder: Path) -> None:
        import onnx

        model = onnx.load(str(folder / "decode.onnx"), load_external_data=False)
        entry = next(e for t in model.graph.initializer for e in t.external_data if e.key == "location")
        entry.value = location
        (folder.parent / "outside.bin").write_bytes(os.urandom(1 << 20))
        replace_file(folder / "decode.onnx", model.SerializeToString())
        _rehash(m, folder, "decode.onnx")
    return change


def _symlink_out(m: dict, folder: Path) -> None:
    outside = folder.parent / "outside.onnx"
    outside.write_bytes((folder / "prefill.onnx").read_bytes())
    (folder / "prefill.onnx").unlink()
    os.symlink(outside, folder / "prefill.onnx")


def _fake_backend(backend: str, file: str, data: Callable[[], bytes]) -> Mutation:
    """The real ONNX artifact's manifest, claiming `backend`, with `file` (random bytes) as its program."""
    def change(m: dict, folder: Path) -> None:
        (folder / file).write_bytes(data())
        m["backend"] = backend
        m["artifact"]["file"] = file
        m["artifact"]["files"].append({"path": file, "bytes": 0, "sha256": "0" * 64})
        _rehash(m, folder, file)
    return change


def _state_dtype(m: dict, folder: Path) -> None:
    for t in m["io"]["state"]["tensors"]:
        t["dtype"], t["bytes"] = "float64", t["bytes"] * 2
    m["io"]["state"]["total_bytes"] *= 2


def _flip(offset: int) -> Callable[[bytes], bytes]:
    return lambda b: b[:offset] + bytes([b[offset] ^ 0xFF]) + b[offset + 1:]


SCHEMA = {
    "no-backend": (_set("backend", _DELETE), r"invalid at \(top level\): 'backend' is a required property"),
    "unknown-backend": (_set("backend", "tensorrt"), r"invalid at backend"),
    "no-files": (_set("artifact/files", []), r"invalid at artifact/files"),
    "bad-sha": (_set("artifact/files/0/sha256", "xyz"), r"invalid at artifact/files/0/sha256"),
    "negative-bytes": (_set("artifact/files/0/bytes", -1), r"invalid at artifact/files/0/bytes"),
    "path-a-number": (_set("artifact/files/0/path", 5), r"invalid at artifact/files/0/path"),
    "chunk-zero": (_set("io/prefill_chunk", 0), r"invalid at io/prefill_chunk"),
    "shape-zero": (_set("io/state/tensors/0/shape", [0]), r"invalid at io/state/tensors/0/shape"),
    "ckpt-sha": (_set("model/checkpoint/sha256", "abc"), r"invalid at model/checkpoint/sha256"),
    "tokenizer-a-string": (_set("tokenizer", "tok"), r"invalid at tokenizer"),
    "recipe-a-string": (_set("recipe", "fp32"), r"invalid at recipe"),
    "format-version": (_set("format_version", 2), r"invalid at format_version"),
    "no-io": (_set("io", _DELETE), r"'io' is a required property"),
    "config-no-width": (_set("model/config/width", _DELETE), r"invalid at model/config"),
}
CONTAINMENT = {
    "files-dotdot-real-hash": (_escape_with_real_hash("../outside.txt"), r"points outside"),
    "files-etc-passwd": (_escape_with_real_hash("../../../../../../etc/passwd"), r"points outside"),
    "files-absolute": (_escape_with_real_hash("/etc/passwd"), r"points outside"),
    "files-backslash": (_escape_with_real_hash("..\\outside.txt"), r"points outside"),
    "artifact-file-outside": (_set("artifact/file", "../elsewhere/decode.onnx"), r"artifact\.file.*points outside"),
    "tokenizer-outside": (_set("tokenizer/file", "../../tokenizer.model"), r"tokenizer\.file.*points outside"),
    "symlink-out": (_symlink_out, r"resolves outside"),
    "main-not-listed": (_set("artifact/file", "other.onnx"), r"not among artifact\.files"),
    "tokenizer-not-listed": (_set("tokenizer/file", "vocab.model"), r"tokenizer\.file .* not among"),
}
CONTENTS = {
    "state-float64": (_state_dtype, r"dtype 'float64'"),
    "state-bytes": (_set("io/state/tensors/0/bytes", 7), r"says 7 bytes"),
    "state-total": (_set("io/state/total_bytes", 1), r"total_bytes is 1"),
    "config-vocab-float": (_set("model/config/vocab_size", 4096.7), r"model\.config: vocab_size must be"),
    "config-heads-string": (_set("model/config/num_heads", "3"), r"num_heads must be a positive integer"),
    "config-blocks-string": (_set("model/config/block_types", "rra"), r"block_types must be a list"),
    "config-huge": (_set("model/config/width", 10**9), r"width is 1,000,000,000, above"),
    "config-unknown-field": (_set("model/config/colour", "red"), r"Unknown GriffinConfig fields"),
    "chunk-above-window": (_set("io/prefill_chunk", 999), r"prefill_chunk 999 exceeds"),
}
FILES = {
    "flipped-byte": (_replace("decode.onnx", _flip(1000)), r"decode\.onnx: sha256 differs"),
    "truncated": (_replace("decode.onnx", lambda b: b[: len(b) // 2]), r"decode\.onnx: \d+ bytes.*truncated"),
    "missing": (lambda m, f: (f / "prefill.onnx").unlink(), r"prefill\.onnx: missing"),
    "garbage-rehashed": (_replace_and_rehash("decode.onnx", lambda b: os.urandom(len(b))),
                         r"decode\.onnx is not an ONNX model"),
    "truncated-rehashed": (_replace_and_rehash("decode.onnx", lambda b: b[: len(b) // 3]),
                           r"decode\.onnx is not an ONNX model"),
    "empty-rehashed": (_replace_and_rehash("decode.onnx", lambda b: b""), r"decode\.onnx is not an rgexport ONNX"),
    "prefill-garbage-rehashed": (_replace_and_rehash("prefill.onnx", lambda b: os.urandom(4096)),
                                 r"prefill\.onnx is not an ONNX model"),
    # ONNX external data names its file inside the model: ONNX Runtime would read whatever it names.
    "external-data-outside": (_external_location("../outside.bin"), r"external data for .* points outside"),
    "external-data-absolute": (_external_location("/etc/passwd"), r"external data for .* points outside"),
    "weights-truncated-rehashed": (_replace_and_rehash("weights.bin", lambda b: b[: len(b) // 2]),
                                   r"decode\.onnx: tensor .* ends at byte [\d,]+ of weights\.bin, which holds"),
    "weights-missing": (lambda m, f: (f / "weights.bin").unlink(), r"weights\.bin: missing"),
    "ort-garbage-rehashed": (_replace_and_rehash("decode.ort", lambda b: os.urandom(4096)),
                             r"decode\.ort is not an ONNX Runtime"),
    "tokenizer-garbage-rehashed": (_replace_and_rehash("tokenizer.model", lambda b: os.urandom(len(b))),
                                   r"tokenizer\.model is not a SentencePiece model"),
    "backend-lies-tflite": (_set("backend", "tflite"), r"decode\.onnx is not a LiteRT"),
    "backend-lies-executorch": (_set("backend", "executorch"), r"decode\.onnx is not an ExecuTorch program"),
    "backend-lies-coreml": (_set("backend", "coreml"), r"decode\.onnx is not a Core ML package"),
    # A random model.pte used to abort the whole process (SIGABRT in ExecuTorch's bindings).
    "random-pte": (_fake_backend("executorch", "model.pte", lambda: os.urandom(50_000)),
                   r"model\.pte is not an ExecuTorch program"),
    "pte-identifier-then-garbage": (_fake_backend("executorch", "model.pte",
                                                  lambda: os.urandom(4) + b"ET12" + os.urandom(50_000)),
                                    r"ExecuTorch's runtime cannot load .*model\.pte"),
    "random-tflite": (_fake_backend("tflite", "model.tflite", lambda: os.urandom(50_000)),
                      r"model\.tflite is not a LiteRT"),
    "tflite-identifier-then-garbage": (_fake_backend("tflite", "model.tflite",
                                                     lambda: os.urandom(4) + b"TFL3" + os.urandom(50_000)),
                                       r"tflite could not load .*model\.tflite"),
}
MANIFEST_FILES = {
    "a-list": (b"[1, 2]", r"invalid at \(top level\)"),
    "a-number": (b"3", r"invalid at \(top level\)"),
    "invalid-json": (b"{not json", r"manifest\.json is not valid JSON"),
    "empty": (b"", r"manifest\.json is not valid JSON"),
    "binary": (bytes(range(256)), r"manifest\.json is not UTF-8 JSON"),
    "deeply-nested": (b"[" * 100_000, r"manifest\.json"),
}

ARTIFACT_CASES = {**SCHEMA, **CONTAINMENT, **CONTENTS, **FILES}


def _broken(sandbox, name: str, change: Mutation) -> Path:
    art = sandbox.artifact_copy(name)
    m = json.loads((art / "manifest.json").read_text())
    change(m, art)
    replace_file(art / "manifest.json", json.dumps(m))
    return art


@pytest.mark.parametrize("case", sorted(ARTIFACT_CASES))
def test_validate(sandbox, case):
    change, match = ARTIFACT_CASES[case]
    art = _broken(sandbox, case, change)
    sandbox.run(["validate", art, "--tokens", "16", "--no-memory"], match=match)


# bench goes through the same checks as validate (rgexport.runtime.checked_artifact); the cases that load a
# second runtime library (seconds each) are left to validate.
BENCH_CASES = sorted((set(CONTAINMENT) | set(FILES) | {"state-float64", "no-backend", "config-huge"})
                     - {"pte-identifier-then-garbage", "tflite-identifier-then-garbage", "backend-lies-coreml"})


@pytest.mark.parametrize("case", BENCH_CASES)
def test_bench(sandbox, case):
    """bench verifies checksums and the backend's check before loading anything, like validate."""
    change, match = ARTIFACT_CASES[case]
    art = _broken(sandbox, f"bench-{case}", change)
    report = sandbox.root / "outputs" / f"bench-{case}"
    sandbox.run(["bench", art, "--steps", "8", "--no-memory", "--no-hf", "--no-eager", "--report", report],
                match=match, allow_changes_under=(report,))


@pytest.mark.parametrize("case", sorted(set(SCHEMA) | set(CONTAINMENT) - {"symlink-out"} | {"state-float64"}))
def test_info(sandbox, case):
    change, match = ARTIFACT_CASES[case]
    art = _broken(sandbox, f"info-{case}", change)
    sandbox.run(["info", art], match=match)


@pytest.mark.parametrize("case", ["files-etc-passwd", "flipped-byte", "random-pte", "state-float64"])
def test_emulated_device(sandbox, case):
    """The emulated device checks the artifact before it sets up (or runs) anything."""
    change, match = ARTIFACT_CASES[case]
    art = _broken(sandbox, f"emulated-{case}", change)
    sandbox.run(["validate", art, "--device", "emulated-arm64", "--tokens", "16"], match=match)


@pytest.mark.parametrize("case", sorted(MANIFEST_FILES))
def test_manifest_file(sandbox, case):
    data, match = MANIFEST_FILES[case]
    art = sandbox.artifact_copy(f"manifest-{case}")
    replace_file(art / "manifest.json", data)
    sandbox.run(["validate", art, "--no-memory"], match=match)
    sandbox.run(["info", art], match=match)


def test_wrong_sha_does_not_reveal_an_outside_file(sandbox):
    """A path outside the folder is refused before it is opened: nothing about that file is reported."""
    def change(m: dict, folder: Path) -> None:
        m["artifact"]["files"].append({"path": "../../../../../../etc/passwd", "bytes": 1, "sha256": "0" * 64})

    art = _broken(sandbox, "passwd-wrong-hash", change)
    outcome = sandbox.run(["validate", art, "--no-memory"], match=r"points outside")
    assert str(os.path.getsize("/etc/passwd")) not in outcome.error_line.split("'")[-1]
    assert "bytes" not in outcome.error_line


def test_source_checkpoint_gone(sandbox):
    def change(m: dict, folder: Path) -> None:
        m["model"]["checkpoint"]["source"] = str(folder.parent / "gone")

    art = _broken(sandbox, "source-gone", change)
    sandbox.run(["validate", art, "--tokens", "16", "--no-memory"], match=r"which is not here; pass --checkpoint")


def test_checkpoint_digest_differs(sandbox):
    art = _broken(sandbox, "digest", _set("model/checkpoint/sha256", "0" * 64))
    sandbox.run(["validate", art, "--tokens", "16", "--no-memory"], match=r"is not the one the artifact was built from")


def test_checkpoint_flag_missing(sandbox):
    art = sandbox.artifact_copy("ckpt-flag")
    sandbox.run(["validate", art, "--checkpoint", sandbox.root / "nope", "--no-memory"], match=r"does not exist")


def test_text_not_utf8(sandbox):
    art = sandbox.artifact_copy("text-binary")
    text = art.parent / "text.txt"
    text.write_bytes(b"caf\xe9 " * 200)
    sandbox.run(["validate", art, "--text", text, "--tokens", "16", "--no-memory"], match=r"not UTF-8 text")


def test_text_missing(sandbox):
    art = sandbox.artifact_copy("text-missing")
    sandbox.run(["validate", art, "--text", art.parent / "none.txt", "--no-memory"],
                match=r"cannot read validation text .*none\.txt")


def test_too_many_tokens(sandbox):
    art = sandbox.artifact_copy("tokens")
    sandbox.run(["validate", art, "--tokens", "10000000", "--no-memory"], match=r"validation needs 10000001")


def test_neither_artifact_nor_bundle(sandbox):
    empty = sandbox.case("empty")
    sandbox.run(["validate", empty], match=r"has no manifest\.json")
    sandbox.run(["validate", empty / "nothing-here"], match=r"does not exist")


def test_unknown_device(sandbox):
    sandbox.run(["validate", sandbox.artifact, "--device", "phone"], code=2,
                match=r"'phone' is not one of 'emulated-arm64', 'browser'")


@pytest.mark.parametrize("content", [b"garbage", b"", os.urandom(3000)])
def test_info_on_a_broken_onnx_file(sandbox, content):
    f = sandbox.case("info-onnx") / "model.onnx"
    f.write_bytes(content)
    sandbox.run(["info", f], match=r"model\.onnx is not an ONNX model|model\.onnx")
