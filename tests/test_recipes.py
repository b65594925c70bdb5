"""One recipe vocabulary: a name means the same weights and activations on every backend that has it, and
the earlier names still build (with a notice), still judge and still name their thresholds."""

from __future__ import annotations

import pytest

from rgexport.backends import BACKENDS, get_backend
from rgexport.backends.base import RECIPE_NAMES
from rgexport.build import BuildOptions, build
from rgexport.errors import RgexportError
from rgexport.validate import load_thresholds


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_recipe_name_is_in_the_vocabulary(name):
    backend = get_backend(name)
    assert set(backend.recipes) <= set(RECIPE_NAMES), set(backend.recipes) - set(RECIPE_NAMES)
    assert all(r.name == key for key, r in backend.recipes.items())
    for old, current in backend.recipe_aliases.items():
        assert current in backend.recipes and old not in backend.recipes


def test_calibrated_recipes_share_one_name():
    calibrated = {(n, r) for n in BACKENDS for r, spec in get_backend(n).recipes.items() if spec.calibrated}
    assert {r for _, r in calibrated} == {"w8a8"}
    assert {n for n, _ in calibrated} == set(BACKENDS)


def test_weight_only_recipes_are_not_called_int8_or_int4():
    """Core ML compresses weights only: under the names that mean dynamic int8 activations elsewhere it
    would be judged by the wrong row."""
    coreml = get_backend("coreml")
    assert "int8" not in coreml.recipes and "int4" not in coreml.recipes
    assert coreml.resolve_recipe("int8", notify=False) == "w8"


@pytest.mark.parametrize("backend, old, current", [("executorch", "8da4w", "int4"), ("executorch", "a8w8", "w8a8"),
                                                    ("onnx", "qdq8", "w8a8"), ("coreml", "int4", "w4")])
def test_an_earlier_name_builds_the_current_recipe_with_one_notice(backend, old, current, tmp_path, capsys):
    assert get_backend(backend).resolve_recipe(old) == current
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("notice: ") and repr(old) in err[0] and repr(current) in err[0]
    # Through build(): resolved (and noticed) before anything is written; an existing folder stops it there.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(RgexportError, match="already exists"):
        build(BuildOptions(backend=backend, recipe=old, out=tmp_path / "taken"))
    assert repr(current) in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"


def test_an_unknown_recipe_lists_the_current_names(capsys):
    with pytest.raises(RgexportError, match=r"no recipe 'int3'; expected one of \['fp32', 'int4', 'int8', 'w8a8'\]"):
        get_backend("executorch").resolve_recipe("int3")
    assert capsys.readouterr().err == ""


def test_thresholds_follow_the_backend_and_the_earlier_names():
    onnx = load_thresholds("w8a8", True, "onnx")
    assert onnx["table_entry"] == "w8a8.onnx" and onnx["min_top1_agreement"] == 0.95
    assert load_thresholds("qdq8", True, "onnx") == onnx  # a manifest written under the earlier name
    et = load_thresholds("a8w8", True, "executorch")
    assert et["table_entry"] == "w8a8.executorch" and et["max_mean_kl"] == 0.01
    coreml = load_thresholds("w8a8", True, "coreml")
    assert coreml["table_entry"] == "w8a8" and coreml["min_top1_agreement"] == 0.93
    assert not any(isinstance(v, dict) for v in coreml.values())
    # A recipe with backend rows only: the other backends fall back to [quantized], bounds and all.
    assert load_thresholds("int4", True, "onnx") == load_thresholds("palette4", True, "coreml")
    assert load_thresholds("int4", True, "tflite")["table_entry"] == "int4.tflite"
    assert load_thresholds("int4", True, "tflite")["min_top1_agreement"] == 0.85
    assert load_thresholds("int8", True, "coreml")["table_entry"] == "w8.coreml"
    assert load_thresholds("8da4w", True, "executorch")["table_entry"] == "quantized"
