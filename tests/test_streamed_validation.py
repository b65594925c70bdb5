"""Validation against a streamed reference (layer-major, one block in memory at a time): the same report as
against the whole float32 model, greedy divergence included, on the shipped model."""

from __future__ import annotations

import copy

import pytest
import torch

from rgexport.streaming import stream_checkpoint
from rgexport.validate import (
    EagerRunner,
    ReferenceRun,
    artifact_run,
    heldout_tokens,
    run_validation,
    streamed_reference_run,
)


@pytest.fixture(scope="module")
def perturbed(shipped):
    """A stand-in artifact: the shipped model with its weights nudged, so its greedy output parts from the
    reference's after some steps and the logits differ everywhere."""
    model = copy.deepcopy(shipped.model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(1 + 0.08 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_streamed_reference_gives_the_eager_report(shipped, perturbed, scale):
    """scale 0: the artifact is the reference itself (greedy never diverges); 1: the perturbed model."""
    from rgexport.tokenizer import Tokenizer

    chunk = 16
    ids = heldout_tokens(Tokenizer(shipped.tokenizer_path), 160, None)
    artifact = shipped.model if scale == 0.0 else perturbed
    kw = {"backend": "eager", "recipe": "fp32", "quantized": False}
    eager = run_validation(EagerRunner(artifact, chunk), shipped.model, ids, **kw)
    art = artifact_run(EagerRunner(artifact, chunk), ids)
    stream = stream_checkpoint()
    reference = streamed_reference_run(stream, chunk, ids, art.greedy)
    streamed = run_validation(art, reference, ids, **kw)
    # The reference keeps its hidden states, not [n, vocab] logits, and lets the embedding go once compared.
    assert reference.logits.hidden.shape == (len(ids) - 1, shipped.config.width)
    assert reference.logits._shared.embedder is None
    assert streamed.greedy_divergence == eager.greedy_divergence
    if scale:
        assert eager.greedy_divergence is not None  # the case is not trivial
    for key in ("top1_agreement", "mean_kl", "ppl_reference", "ppl_artifact", "max_abs_logit_error"):
        assert streamed.metrics[key] == pytest.approx(eager.metrics[key], rel=1e-4, abs=1e-5), key
    assert streamed.state_errors.keys() == eager.state_errors.keys()
    for name, err in eager.state_errors.items():
        assert streamed.state_errors[name] == pytest.approx(err, rel=1e-3, abs=1e-5), name
    # The stream never held more than one part (the largest block or the embedding) beside the embedding.
    assert stream.counter.peak <= 2 * 4 * shipped.model.embedder.input_embedding.numel()


def _ref(greedy, greedy_of, verify=None):
    return ReferenceRun([], [], (), None, {}, greedy, 16, greedy_of=greedy_of, verify=verify)


def test_divergence_against_verified_prefixes():
    """The reference's tokens hold only after prefixes of the sequence they were computed on; past it a
    second pass (`verify`) is made."""
    calls = []

    def verify(tokens):
        calls.append(list(tokens))
        return [1, 2, 9, 7]

    ref = _ref([1, 2, 9, 4], [1, 2, 3, 4], verify)  # the artifact chose 3 where the reference chose 9
    assert ref.divergence([1, 2, 3, 4]) == 2
    assert ref.divergence([1, 5, 3, 4]) == 1  # parts from the reference before the verified sequence does
    assert calls == []
    assert ref.divergence([1, 2, 9, 5]) == 3  # follows the reference past step 2: verified by a second pass
    assert calls == [[1, 2, 9, 5]]
    assert _ref([1, 2, 3], None).divergence([1, 2, 3]) is None
    assert _ref([1, 2, 3], None).divergence([1, 0, 3]) == 1
