"""A profile's memory budget decides the recipes of its bundle: a recipe whose weights alone exceed it is
passed over before anything is built, one whose measured peak exceeds it is rebuilt smaller, and a bundle
whose every candidate is over the budget is not written at all (what `rgexport build` writes, `rgexport
validate` passes, budget included)."""

from __future__ import annotations

import pytest

from rgexport.backends import BACKENDS, get_backend
from rgexport.backends.base import RECIPE_BITS, RECIPE_NAMES
from rgexport.budget import RecipeChoice, fallbacks, parameter_count, plan, weights_lower_bound
from rgexport.build import BuildOptions
from rgexport.bundle import build_bundle
from rgexport.checkpoint import load_checkpoint
from rgexport.errors import RgexportError
from rgexport.profiles import load_profile


def _profile(tmp_path, budget_mb, backend="onnx", recipe="int8"):
    (tmp_path / "p.toml").write_text(f'name = "tight"\ndescription = "a tight budget, for tests"\n'
                                     f'platform = "linux"\nmemory_budget_mb = {budget_mb}\n\n'
                                     f'[[artifacts]]\nbackend = "{backend}"\nrecipe = "{recipe}"\n')
    return load_profile(tmp_path / "p.toml")


def test_every_recipe_name_has_its_bits():
    assert set(RECIPE_BITS) == set(RECIPE_NAMES)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_fallbacks_have_fewer_bits_most_precise_first(name):
    backend = get_backend(name)
    for asked in backend.recipes:
        order = fallbacks(backend, asked)
        bits = [RECIPE_BITS[r] for r in order]
        assert all(b < RECIPE_BITS[asked] for b in bits) and bits == sorted(bits, reverse=True)


def test_the_lower_bound_passes_over_what_cannot_fit():
    config = load_checkpoint().config
    n = parameter_count(config)
    assert n == 3_533_792 and weights_lower_bound(config, "fp16") == 2 * n
    choice = RecipeChoice("coreml", "fp16")
    budget = 5.0  # MB: fp16 needs 7.07 at least, w8 3.53
    assert plan(get_backend("coreml"), "fp16", config, budget, choice) == ["w8", "w8a8", "w4", "palette4"]
    assert choice.passed_over == ["fp16: its weights alone take at least 7 MB, over the 5 MB budget"]
    assert plan(get_backend("coreml"), "fp16", config, None, RecipeChoice("coreml", "fp16")) == ["fp16"]


def test_nothing_fits_stops_before_building(tmp_path, capsys):
    profile = _profile(tmp_path, 1)
    with pytest.raises(RgexportError, match=r"no onnx recipe fits the 1 MB memory budget: the smallest, int4, "
                                             r"needs at least 2 MB"):
        build_bundle(profile, BuildOptions(backend="onnx", out=tmp_path / "b"))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial-*"))


def test_every_candidate_over_the_measured_budget_writes_no_bundle(tmp_path):
    """20 MB holds int8's and int4's weights (3.5 and 1.8 MB at least) but no process that runs them: both
    are built, measured in a fresh process (as `rgexport validate` does), and passed over."""
    profile = _profile(tmp_path, 20)
    with pytest.raises(RgexportError) as e:
        build_bundle(profile, BuildOptions(backend="onnx", out=tmp_path / "b", validation_tokens=64))
    msg = str(e.value)
    assert "no onnx recipe of profile tight fits its memory and quality budgets" in msg
    assert "int8: peaked at" in msg and "int4: peaked at" in msg and "over the 20 MB budget" in msg
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial-*"))
