"""The CLI: thin commands, one clear line and a non-zero exit on bad input, never a traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rgexport.cli import app

runner = CliRunner()


def test_info_prints_the_2b_state_layout_and_total():
    result = runner.invoke(app, ["info", "--preset", "recurrentgemma-2b"])
    assert result.exit_code == 0, result.output
    assert "34,291,712" in result.output  # 18 x (2560 + 3x2560) x 4 + 8 x 2 x 2048 x 256 x 4 bytes
    assert "blocks.25.conv1d" in result.output and "Gemma-2B" in result.output


def test_info_json_is_data():
    result = runner.invoke(app, ["info", "--preset", "hawk-7b", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["state_by_kind"]["keys"] == 0  # Hawk has no attention: no K/V at all
    assert data["parameters"] > 7e9


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--preset", "gpt-9"], "Unknown preset 'gpt-9'"),
        (["info", "--checkpoint", "/nonexistent/ckpt"], "does not exist"),
        (["build", "--target", "nokia"], "Unknown target 'nokia'"),
        (["validate", "/nonexistent"], "no manifest.json"),
        (["generate", "--prompt", "x", "--checkpoint", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_input_gets_one_clear_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_recipe_lists_the_recipes(monkeypatch):
    result = runner.invoke(app, ["build", "--target", "onnx", "--recipe", "int3"])
    assert result.exit_code == 1
    assert "no recipe 'int3'" in result.output and "fp32" in result.output


def test_validate_checks_memory_against_length(tmp_path):
    """`rgexport validate` runs the memory check too: a fresh process per N, flat peak, analytic state."""
    pytest.importorskip("onnxruntime")
    from rgexport.build import BuildOptions, build

    art = build(BuildOptions(backend="onnx", recipe="fp32", out=tmp_path / "onnx", validate=False)).out
    result = runner.invoke(app, ["validate", str(art), "--tokens", "32", "--memory-multiple", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["status"] == "passed"
    memory = data["memory"]
    assert [r["n"] for r in memory["rows"]] == [32, 64, 128]  # window/4 .. 1x the window (128)
    assert memory["passed"] and memory["state_matches_analytic"] and memory["flat"]
    text = runner.invoke(app, ["validate", str(art), "--tokens", "32", "--no-memory"])
    assert text.exit_code == 0 and "peak RSS" not in text.output
