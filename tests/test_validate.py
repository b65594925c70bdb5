"""Validation's reference side: run once per model and text, never reused for a changed model."""

from __future__ import annotations

import copy

import torch

from rgexport.validate import EagerRunner, run_validation


def _count_calls(model):
    calls = []
    model.final_norm.register_forward_pre_hook(lambda *a: calls.append(1))  # step() calls forward directly
    return calls


def test_reference_is_reused_only_for_the_same_unchanged_model(small_model, small_config):
    model = copy.deepcopy(small_model)
    calls = _count_calls(model)
    tokens = torch.randint(0, small_config.vocab_size, (41,), generator=torch.Generator().manual_seed(5)).tolist()
    artifact = EagerRunner(copy.deepcopy(small_model), 8)

    first = run_validation(artifact, model, tokens, backend="eager", recipe="fp32", quantized=False, greedy_tokens=4)
    assert calls and first.passed and first.metrics["max_abs_logit_error"] == 0.0
    n = len(calls)
    again = run_validation(artifact, model, tokens, backend="eager", recipe="fp32", quantized=False, greedy_tokens=4)
    assert len(calls) == n, "the reference ran again for the same model and tokens"
    assert again.to_dict() == first.to_dict()

    with torch.no_grad():  # changed in place: the reference must run again and see the change
        model.blocks[0].mlp_block.ffw_down.weight.mul_(1.5)
    changed = run_validation(artifact, model, tokens, backend="eager", recipe="fp32", quantized=False,
                             greedy_tokens=4)
    assert len(calls) > n and changed.metrics["max_abs_logit_error"] > 1e-3

    other = copy.deepcopy(small_model)  # another model object, same weights: run again, same result
    calls_other = _count_calls(other)
    fresh = run_validation(artifact, other, tokens, backend="eager", recipe="fp32", quantized=False, greedy_tokens=4)
    assert calls_other and fresh.metrics["max_abs_logit_error"] == 0.0


def test_a_reference_made_ahead_validates_without_the_model(small_model, small_config):
    """What a 2B build does: run the reference, free the model, then load the artifact and compare."""
    import gc
    import weakref

    import pytest

    from rgexport.errors import RgexportError
    from rgexport.validate import reference_run

    tokens = torch.randint(0, small_config.vocab_size, (41,), generator=torch.Generator().manual_seed(6)).tolist()
    artifact = EagerRunner(copy.deepcopy(small_model), 8)
    model = copy.deepcopy(small_model)
    with torch.no_grad():  # a reference that differs from the artifact, so the comparison shows it
        model.blocks[1].mlp_block.ffw_up.weight.mul_(1.2)
    expected = run_validation(artifact, model, tokens, backend="eager", recipe="fp32", quantized=False,
                              greedy_tokens=4).to_dict()
    reference = reference_run(model, 8, tokens, greedy_tokens=4)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the reference run keeps no hold on the model
    got = run_validation(artifact, reference, tokens, backend="eager", recipe="fp32", quantized=False, greedy_tokens=4)
    assert got.to_dict() == expected and not got.passed
    with pytest.raises(RgexportError, match="other tokens"):
        run_validation(artifact, reference, tokens[:-1], backend="eager", recipe="fp32", quantized=False,
                       greedy_tokens=4)


def test_the_artifacts_checkpoint_must_be_here_and_the_same():
    """`rgexport validate` and `--device emulated-arm64` find the reference one way (artifact_checkpoint)."""
    import pytest

    from rgexport.checkpoint import SHIPPED_SOURCE
    from rgexport.errors import RgexportError
    from rgexport.validate import artifact_checkpoint

    def manifest(source, digest="0" * 64):
        return {"model": {"checkpoint": {"source": source, "sha256": digest}}}

    with pytest.raises(RgexportError, match="which is not here; pass --checkpoint"):
        artifact_checkpoint(manifest("/nonexistent/griffin"))
    with pytest.raises(RgexportError, match="is not the one the artifact was built from"):
        artifact_checkpoint(manifest(SHIPPED_SOURCE))
    from rgexport.checkpoint import load_checkpoint

    digest = load_checkpoint().digest
    assert artifact_checkpoint(manifest(SHIPPED_SOURCE, digest)).digest == digest
