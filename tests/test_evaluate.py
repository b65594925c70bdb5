"""The accuracy matrix: a small real run (ONNX fp32 and int8 on the shipped model) and the default rule."""

from __future__ import annotations

import json

import pytest

from rgexport.evaluate import _reusable, choose_defaults, evaluate, markdown_table, write_reports

BUDGET = {"max_ppl_ratio": 1.05, "min_top1_agreement": 0.9}


def _row(backend, recipe, size, ppl_ratio, top1, status="passed"):
    return {"backend": backend, "recipe": recipe, "main_file_bytes": size, "ppl_reference": 10.0,
            "ppl_artifact": 10.0 * ppl_ratio, "top1_agreement": top1, "status": status}


def test_default_is_the_smallest_within_budget():
    rows = [_row("x", "fp32", 100, 1.0, 1.0), _row("x", "int8", 30, 1.01, 0.97),
            _row("x", "int4", 15, 1.20, 0.80), _row("x", "tiny", 5, 1.0, 1.0, status="failed"),
            _row("y", "int4", 10, 1.5, 0.5)]
    d = choose_defaults(rows, BUDGET)
    assert d["x"]["recipe"] == "int8"  # int4 is smaller but over budget; "tiny" failed validation
    assert d["y"]["recipe"] is None


def test_small_matrix_end_to_end(tmp_path):
    pytest.importorskip("onnxruntime")
    result = evaluate(tmp_path, backends=["onnx"], recipes=["fp32", "int8"], tokens=128)
    rows = {r["recipe"]: r for r in result["rows"]}
    assert rows["fp32"]["top1_agreement"] == 1.0 and abs(rows["fp32"]["ppl_change_pct"]) < 0.1
    assert rows["int8"]["main_file_bytes"] < rows["fp32"]["main_file_bytes"] / 3
    # The decode program's bytes include the weights.bin decode.onnx points into: float32 weights, once.
    params = result["rows"][0].get("parameters") or 3_533_760
    assert 0.95 * 4 * params < rows["fp32"]["main_file_bytes"] < 1.1 * 4 * params
    assert 0.0 < rows["int8"]["mean_kl"] < 0.1
    paths = write_reports(result, tmp_path / "report")
    assert "| onnx | int8 |" in markdown_table(result) and paths["json"].is_file()
    # int8 measures within the quality budget (top-1 98.6%, perplexity +0.17% over 512 tokens), and it is the
    # smaller artifact: the rule must pick it.
    budget = result["quality_budget"]
    assert rows["int8"]["top1_agreement"] >= budget["min_top1_agreement"]
    assert rows["int8"]["ppl_artifact"] / rows["int8"]["ppl_reference"] <= budget["max_ppl_ratio"]
    assert result["defaults"]["onnx"]["recipe"] == "int8"

    # --reuse measures the artifacts already there from their manifests, without rebuilding...
    again = evaluate(tmp_path, backends=["onnx"], recipes=["fp32", "int8"], tokens=128, reuse=True)
    assert all(r.get("reused") for r in again["rows"])
    strip = lambda r: {k: v for k, v in r.items() if k != "reused"}  # noqa: E731
    assert [strip(r) for r in again["rows"]] == result["rows"]
    # ...but only when they measured the same thing and their files are intact.
    from rgexport.backends import get_backend

    recipe = get_backend("onnx").recipes["int8"]
    digest = json.loads((tmp_path / "onnx-int8" / "manifest.json").read_text())["model"]["checkpoint"]["sha256"]
    assert _reusable(tmp_path / "onnx-int8", digest, "onnx", recipe, 128) is not None
    assert _reusable(tmp_path / "onnx-int8", digest, "onnx", recipe, 256) is None  # other token count
    assert _reusable(tmp_path / "onnx-int8", "0" * 64, "onnx", recipe, 128) is None  # other checkpoint
    assert _reusable(tmp_path / "onnx-int8", digest, "onnx", get_backend("onnx").recipes["int4"], 128) is None
    with open(tmp_path / "onnx-int8" / "decode.onnx", "r+b") as f:  # a damaged file is rebuilt, not trusted
        f.seek(100)
        f.write(b"\0" * 8)
    assert _reusable(tmp_path / "onnx-int8", digest, "onnx", recipe, 128) is None
