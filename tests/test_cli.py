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
        (["validate", "/nonexistent"], "does not exist"),
        (["generate", "--prompt", "x", "--checkpoint", "/nonexistent"], "does not exist"),
        (["build", "--target", "onnx", "--option", "fuse"], "--option takes KEY=VALUE"),
        (["build", "--target", "onnx", "--option", "opset=21", "--option", "quantized_gather=true"],
         "backend onnx has no option quantized_gather"),
        (["build", "--target", "executorch", "--recipe", "int4", "--option", "head_bits=3", "--out", "/nonexistent/x"],
         "option head_bits is 3; expected 4 or 8"),
        (["build", "--target", "android", "--option", "opset=21"], "--option applies to one backend"),
        (["build", "--target", "onnx", "--memory-budget", "4000"], "--memory-budget applies to bundles"),
    ],
)
def test_bad_input_gets_one_clear_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_option_values_are_toml_or_bare_strings():
    from rgexport.cli import parse_options

    assert parse_options(["quantized_gather=true", "opset = 20", "ort_target=amd64", 'calibration_method="entropy"',
                          "xnnpack_rewrites=[]"]) == {
        "quantized_gather": True, "opset": 20, "ort_target": "amd64", "calibration_method": "entropy",
        "xnnpack_rewrites": []}


def test_every_shipped_profile_sets_only_options_its_backends_have():
    from rgexport.backends import get_backend
    from rgexport.profiles import resolve_target

    for name in ("ios", "android", "linux-arm64", "web"):
        for spec in resolve_target(name).artifacts:
            get_backend(spec.backend).check_options(spec.options)


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


def test_build_json_is_the_manifest(tmp_path):
    pytest.importorskip("onnxruntime")
    result = runner.invoke(app, ["build", "--target", "onnx", "--out", str(tmp_path / "o"), "--tokens", "32",
                                 "--no-validate", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["out"] == str(tmp_path / "o") and data["manifest"]["backend"] == "onnx"
    assert data["manifest"]["build"]["peak_rss_bytes"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "--target", "nokia"], "'nokia' is not a backend (executorch, coreml, onnx, tflite), a profile "
                                         "(android, ios, linux-arm64, web) or a profile .toml"),
        (["evaluate", "--target", "nokia"], "'nokia' is not a backend"),
        (["validate", "x", "--device", "phone"], "'phone' is not one of 'emulated-arm64', 'browser'"),
    ],
)
def test_a_value_outside_a_fixed_set_is_a_usage_error_listing_them(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_help_lists_the_choices_from_the_registry_and_the_profiles():
    from rgexport.backends import recipe_names
    from rgexport.profiles import profile_names
    from rgexport.registry import backend_names

    text = " ".join(runner.invoke(app, ["build", "--help"], env={"COLUMNS": "400"}).output.split())
    for name in [*backend_names(), *profile_names()]:
        assert name in text
    for backend, recipes in recipe_names().items():
        assert f"{backend}: {', '.join(recipes)}" in text  # --recipe lists each backend's, default first
    evaluate = " ".join(runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "--target" in evaluate and "android" in evaluate and "--targets" not in evaluate  # the old name: hidden


def test_the_devices_are_the_emulators_and_browsers():
    from rgexport.cli import Device
    from rgexport.emulate import DEVICE

    assert {d.value for d in Device} == {DEVICE, "browser"}


def test_a_profile_stands_for_its_artifacts_backends():
    from rgexport.profiles import target_backends

    assert target_backends(["android", "onnx", "tflite"]) == ["tflite", "executorch", "onnx"]


def test_bench_tokens_is_the_old_name_of_steps():
    result = runner.invoke(app, ["bench", "/nonexistent", "--tokens", "8", "--no-memory"])
    assert result.exit_code == 1
    assert "note: bench --tokens is now --steps" in result.stderr and "has no manifest.json" in result.stderr
    assert result.stdout == ""
    assert runner.invoke(app, ["bench", "/nonexistent", "--steps", "4"]).exit_code == 2  # at least 8


def test_targets_json_lists_profiles_and_backends():
    result = runner.invoke(app, ["targets", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert sorted(data) == ["backends", "profiles"]
    assert {p["name"] for p in data["profiles"]} >= {"ios", "android", "linux-arm64", "web"}
    onnx = next(b for b in data["backends"] if b["name"] == "onnx")
    assert onnx["recipes"][0] == onnx["default_recipe"]


def test_generate_json_is_one_document_on_stdout():
    result = runner.invoke(app, ["generate", "--prompt", "The", "--max-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompt"] == "The" and isinstance(data["text"], str) and data["sampling"]["max_tokens"] == 4
