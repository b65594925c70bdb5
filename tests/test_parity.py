"""One parity suite over every registered backend: the shipped model built, run in the backend's runtime and
judged against the fp32 step model with the bounds of thresholds.toml.

The default run covers each backend's most precise recipe; `-m slow` covers every recipe. A backend added to
the registry is covered without a line here. The same artifacts then go through `rgexport run` and `chat`'s
library functions, so that every backend's runtime is driven the way an app drives it.
"""

from __future__ import annotations

import pytest

from rgexport.backends import BACKENDS, get_backend
from rgexport.validate import load_thresholds

# Longer than one prefill chunk (32 tokens), so `run` goes through the prefill graph, then decode.
PROMPT = ("Python's built-in list type is a mutable sequence. Lists may be constructed in several ways: "
          "using a pair of square brackets to denote the empty list, using square brackets and separating "
          "items with commas, or using a list comprehension.")


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


@pytest.mark.parametrize("name, recipe", _cases(every_recipe=False) + _cases(every_recipe=True))
def test_backend_matches_the_reference(name, recipe, shipped_build):
    result = shipped_build(name, recipe)
    report, manifest = result.report, result.manifest
    spec = get_backend(name).recipes[recipe]
    bounds = load_thresholds(recipe, spec.quantized, name)
    assert report.thresholds == bounds  # judged by thresholds.toml, nothing looser
    assert report.passed, (report.failures, report.metrics)
    assert manifest["validation"]["status"] == "passed"
    assert report.tokens == shipped_build.tokens  # past the window (128): the ring buffer wraps
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


@pytest.mark.parametrize("name, recipe", _cases(every_recipe=False))
def test_run_and_chat_on_the_backend(name, recipe, shipped_build, shipped):
    """`run` (prompt through the prefill graph in chunks, then greedy decode) is the runtime layer's own
    step loop: every generated token is the argmax of the logits that feeding the same tokens in the same
    pattern gives. A float32 artifact generates exactly what the eager model generates. `chat` carries the
    state: turn 2 starts where turn 1 left off and feeds only its own tokens."""
    import numpy as np

    from rgexport.chat import ChatSession
    from rgexport.generate import generate_tokens
    from rgexport.run import open_tokenizer, run_prompt
    from rgexport.runtime import open_artifact
    from rgexport.tokenizer import Tokenizer

    result = shipped_build(name, recipe)
    prompt = PROMPT
    with open_artifact(result.out) as art:
        gen = run_prompt(art, prompt, max_tokens=12)
        assert gen.stats.prompt_tokens > art.prefill_chunk and gen.stats.generated_tokens == 12
        ids = open_tokenizer(art).encode(prompt)
        assert len(ids) == gen.stats.prompt_tokens
        art.reset()
        steps = [art.feed(ids, 0)[-1]]
        for i, token in enumerate(gen.tokens[:-1]):
            steps.append(art.feed([token], len(ids) + i)[-1])
        assert [int(np.argmax(x)) for x in steps] == gen.tokens
        if recipe == "fp32":
            eager = list(generate_tokens(shipped.model, Tokenizer(shipped.tokenizer_path), prompt, max_tokens=12))
            assert gen.tokens == eager
        art.reset()
        session = ChatSession(art, max_tokens=8)
        session.send("The list type")
        history = len(session.history)
        t2 = session.send("Dictionaries are")
        assert t2.stats.start_position == history > 0 and t2.fed_tokens < len(session.history)
