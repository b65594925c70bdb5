"""One parity suite over every registered backend: the shipped model built, run in the backend's runtime and
judged against the fp32 step model with the bounds of thresholds.toml.

The default run covers each backend's most precise recipe; `-m slow` covers every recipe. A backend added to
the registry is covered without a line here.
"""

from __future__ import annotations

import pytest

from rgexport.backends import BACKENDS, get_backend
from rgexport.build import BuildOptions, build
from rgexport.validate import load_thresholds

# Past the attention window (128): the ring buffer wraps, and the mask must follow it.
TOKENS = 256


def _precise(name: str) -> str:
    recipes = get_backend(name).recipes
    return "fp32" if "fp32" in recipes else next(r for r in recipes if not recipes[r].quantized)


def _cases(every_recipe: bool) -> list:
    cases = []
    for name in sorted(BACKENDS):
        recipes = get_backend(name).recipes
        for recipe in (recipes if every_recipe else [_precise(name)]):
            if every_recipe and recipe == _precise(name):
                continue  # already in the default run
            marks = [pytest.mark.slow] if every_recipe else []
            cases.append(pytest.param(name, recipe, id=f"{name}-{recipe}", marks=marks))
    return cases


def _build(name: str, recipe: str, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / f"{name}-{recipe}"
    return build(BuildOptions(backend=name, recipe=recipe, out=out, validation_tokens=TOKENS, require_pass=False))


@pytest.mark.parametrize("name, recipe", _cases(every_recipe=False) + _cases(every_recipe=True))
def test_backend_matches_the_reference(name, recipe, tmp_path_factory):
    result = _build(name, recipe, tmp_path_factory)
    report, manifest = result.report, result.manifest
    spec = get_backend(name).recipes[recipe]
    bounds = load_thresholds(recipe, spec.quantized, name)
    assert report.thresholds == bounds  # judged by thresholds.toml, nothing looser
    assert report.passed, (report.failures, report.metrics)
    assert manifest["validation"]["status"] == "passed"
    assert report.tokens == TOKENS
    # Logits past the first window were compared too, and every state tensor the runtime exposes.
    assert report.metrics["max_abs_logit_error_after_window"] is not None
    tensors = manifest["io"]["state"]["tensors"]
    if report.state_errors:
        assert set(report.state_errors) == {t["name"] for t in tensors}
    if not spec.quantized and "max_abs_logit_error" in bounds:  # float32 arithmetic: greedy text is identical
        assert report.greedy_divergence is None


def test_every_registered_backend_is_in_the_parity_suite():
    covered = {p.values[0] for p in _cases(every_recipe=False)}
    assert covered == set(BACKENDS)
    every = {(p.values[0], p.values[1]) for p in _cases(every_recipe=False) + _cases(every_recipe=True)}
    assert every == {(n, r) for n in BACKENDS for r in get_backend(n).recipes}
