"""Generated sample code: names and shapes come from the manifest, and the code parses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rgexport.backends import BuildContext, get_backend
from rgexport.backends.coreml.app_samples import swift_coreml
from rgexport.backends.executorch.app_samples import kotlin_executorch, swift_executorch
from rgexport.backends.tflite.app_samples import kotlin_litert

tree_sitter = pytest.importorskip("tree_sitter")


def _manifest(backend_name: str, config, recipe: str | None = None) -> dict:
    """A manifest as a build writes it, with the backend's real I/O contract (no export needed)."""
    backend = get_backend(backend_name)
    ctx = BuildContext(config=config, recipe=recipe or backend.default_recipe, work_dir=None, prefill_chunk=8)
    return {
        "rgexport_version": "test", "backend": backend_name, "recipe": {"name": ctx.recipe},
        "model": {"config": config.to_dict()}, "artifact": {"file": f"model{backend.artifact_suffix}"},
        "tokenizer": {"eos_id": 1}, "io": backend.io_contract(ctx),
    }


def _parse(language: str, code: str):
    from tree_sitter import Language, Parser

    if language == "swift":
        import tree_sitter_swift as grammar
    else:
        import tree_sitter_kotlin as grammar
    tree = Parser(Language(grammar.language())).parse(code.encode())
    return tree.root_node


def _errors(node) -> list[str]:
    found = []
    stack = [node]
    while stack:
        n = stack.pop()
        if n.type == "ERROR" or n.is_missing:
            found.append(f"line {n.start_point[0] + 1}: {n.text.decode()[:60]!r}")
        stack.extend(n.children)
    return found


@pytest.mark.parametrize("backend, fn, language", [
    ("coreml", swift_coreml, "swift"),
    ("executorch", swift_executorch, "swift"),
    ("tflite", kotlin_litert, "kotlin"),
    ("executorch", kotlin_executorch, "kotlin"),
])
def test_sample_parses_and_uses_manifest_names(backend, fn, language, small_config):
    manifest = _manifest(backend, small_config)
    code = fn(f"{backend}-x", manifest)
    assert not _errors(_parse(language, code)), _errors(_parse(language, code))
    io = manifest["io"]
    # The sizes are the manifest's, as named constants (Swift `static let`, Kotlin `const val`).
    for name, value in (("prefill_?chunk", io["prefill_chunk"]), ("vocab_?size", small_config.vocab_size)):
        assert re.search(rf"(?i)(let|val) {name} = {value}\b", code), (name, value)
    if io["state"]["placement"] == "io":  # every state tensor is wired by its runtime name
        for t in io["state"]["tensors"]:
            assert t.get("litert_input", t["input"]) in code
            assert t.get("litert_output", t["output"]) in code


def test_executorch_samples_with_a_shared_table(small_config):
    """An ExecuTorch artifact whose table lives in `model.ptd` (option share_table): the Swift sample loads both
    files (`Module(filePath:dataFilePaths:)`, ExecuTorch 1.0 and later) and parses; the Kotlin one is refused with
    what to do, since ExecuTorch's Android `Module` loads a program alone."""
    from rgexport.errors import RgexportError

    manifest = _manifest("executorch", small_config, "int4")
    manifest["backend_facts"] = {"data_file": "model.ptd"}
    code = swift_executorch("executorch-int4", manifest)
    assert not _errors(_parse("swift", code)), _errors(_parse("swift", code))
    assert "Module(filePath: path, dataFilePaths: [dataPath])" in code and "`model.ptd`" in code
    with pytest.raises(RgexportError, match="share_table=false"):
        kotlin_executorch("executorch-int4", manifest)
    # The bundle's guide names both files an app ships.
    from rgexport.profiles import resolve_target
    from rgexport.samples import integration_guide

    files = [{"path": "model.pte"}, {"path": "model.ptd"}, {"path": "tokenizer.model"}]
    manifest["artifact"] |= {"total_bytes": 1, "files": files}
    manifest["tokenizer"]["file"] = "tokenizer.model"
    manifest["validation"] = {"status": "passed"}
    guide = integration_guide(resolve_target("ios"), [(Path("executorch-int4"), manifest)], [], Path("b"))
    assert "| `executorch-int4/` | executorch / int4 | `model.pte` + `model.ptd` |" in guide
    del manifest["backend_facts"]
    assert "dataFilePaths" not in swift_executorch("executorch-int4", manifest)


def test_bundles_named_before_identifier_still_read(small_config):
    """Manifests written before the `identifier` key gave LiteRT names as `litert_name`."""
    manifest = _manifest("tflite", small_config)
    old = json.loads(json.dumps(manifest))
    for method in old["io"]["methods"].values():
        for t in (*method["inputs"], *method["outputs"]):
            t["litert_name"] = t.pop("identifier")
    assert kotlin_litert("x", old) == kotlin_litert("x", manifest)


def test_a_broken_sample_is_caught():
    assert _errors(_parse("kotlin", "fun f( { val x = }"))
    assert _errors(_parse("swift", "func f( { let = }"))


@pytest.mark.parametrize("templated", [False, True])
@pytest.mark.parametrize("language", ["swift", "kotlin"])
def test_generation_loop_parses_and_carries_the_template(language, templated, small_config):
    """The shared loop (tokenize, prefill, decode, sample, detokenize) parses, with the Gemma template's
    turn strings spliced in when the manifest records one, and raw-text mode when it does not."""
    from rgexport.samples import kotlin_generation, swift_generation
    from rgexport.templates import GEMMA_CHAT_TEMPLATE, ChatTemplate

    manifest = _manifest("tflite", small_config)
    manifest["tokenizer"] = {"bos_id": 2, "eos_id": 1, "chat_template": ChatTemplate(
        GEMMA_CHAT_TEMPLATE, stop_strings=("<end_of_turn>",)).to_dict() if templated else None}
    code = (swift_generation if language == "swift" else kotlin_generation)(manifest)
    assert not _errors(_parse(language, code)), _errors(_parse(language, code))
    for name in ("Sampler", "topP", "prefillLast", "decodeLogits", "decode(", "encode("):
        assert name in code
    if templated:
        assert r'"<start_of_turn>user\n"' in code and r'"<end_of_turn>\n<start_of_turn>model\n"' in code
        assert '"<end_of_turn>"' in code and "<bos>" not in code  # the BOS goes in as its id
    else:
        assert "none: raw text" in code and "<start_of_turn>" not in code
