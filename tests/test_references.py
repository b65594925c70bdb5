"""Parity with two independent implementations: DeepMind's recurrentgemma and Hugging Face's.

The heart of the suite: prefill and step-by-step decode over 5x the attention window (so the ring
buffer wraps four times), logits and every state tensor compared, on random weights with biases and
norm scales perturbed so that every term is exercised.
"""

from __future__ import annotations

import pytest
import torch

from rgexport.references import deepmind_griffin, deepmind_run, hf_causal_lm, hf_run

TOL = 1e-4


def _our_run(model, tokens, chunk):
    """Logits over the whole sequence and the final state, in chunks of `chunk` tokens."""
    state = model.init_state(tokens.shape[0])
    outs = []
    with torch.no_grad():
        for s in range(0, tokens.shape[1], chunk):
            logits, state = model(tokens[:, s : s + chunk], torch.full((tokens.shape[0],), s), state)
            outs.append(logits)
    return torch.cat(outs, 1), state


@pytest.fixture(scope="module")
def ours(small_model, small_tokens):
    return {chunk: _our_run(small_model, small_tokens, chunk) for chunk in (1, 16)}


@pytest.fixture(scope="module")
def deepmind(small_model, small_tokens):
    dm = deepmind_griffin(small_model)
    return {"decode": deepmind_run(dm, small_tokens, prefill=0), "prefill": deepmind_run(dm, small_tokens, prefill=24)}


@pytest.fixture(scope="module")
def hf(small_model, small_tokens):
    model = hf_causal_lm(small_model)  # window + 1: see rgexport.references
    return {"decode": hf_run(model, small_tokens, prefill=0), "prefill": hf_run(model, small_tokens, prefill=24)}


def _max_state_error(a, b):
    assert a.keys() == b.keys()
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


@pytest.mark.parametrize("chunk", [1, 16], ids=["decode", "prefill"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_matches_deepmind(ours, deepmind, chunk, mode, small_tokens, small_config):
    assert small_tokens.shape[1] >= 4 * small_config.attention_window_size
    logits, state = ours[chunk]
    ref_logits, ref_state = deepmind[mode]
    assert (logits - ref_logits).abs().max().item() <= TOL
    errors = _max_state_error(state, ref_state)
    assert max(errors.values()) <= TOL, errors
    # The comparison is not vacuous: logits are far from zero and the states are populated.
    assert ref_logits.abs().max() > 1.0 and all(v.abs().max() > 0 for v in ref_state.values())


@pytest.mark.parametrize("chunk", [1, 16], ids=["decode", "prefill"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_matches_huggingface(ours, hf, chunk, mode):
    logits, state = ours[chunk]
    ref_logits, ref_state = hf[mode]
    assert (logits - ref_logits).abs().max().item() <= TOL
    errors = _max_state_error(state, ref_state)
    assert max(errors.values()) <= TOL, errors


def test_huggingface_window_is_one_token_shorter(small_model, small_tokens, small_config, ours):
    """HF's window w sees q-w+1..q; DeepMind's sees q-w..q. Identical before position w, not after."""
    w = small_config.attention_window_size
    logits, _ = hf_run(hf_causal_lm(small_model, window=w), small_tokens)
    per_position = (ours[1][0] - logits).abs().amax(dim=(0, 2))
    assert per_position[:w].max() <= TOL
    assert per_position[w:].max() > 1e-2


def test_huggingface_does_not_reset_conv_state_between_sequences(small_model, small_tokens):
    """Token by token, HF keeps the Conv1D window across a new sequence at position 0; we clear it."""
    from transformers import DynamicCache

    hf = hf_causal_lm(small_model)
    seq_a, seq_b = small_tokens[:, :8], small_tokens[:, 8:16]
    fresh, _ = hf_run(hf, seq_b)
    hf._setup_cache(hf.config, 1, "cpu", torch.float32)
    with torch.no_grad():
        for i in range(8):
            hf(input_ids=seq_a[:, i : i + 1], position_ids=torch.tensor([[i]]),
               past_key_values=DynamicCache(config=hf.config), use_cache=True)
        cache = DynamicCache(config=hf.config)
        reused = torch.cat([hf(input_ids=seq_b[:, i : i + 1], position_ids=torch.tensor([[i]]),
                               past_key_values=cache, use_cache=True).logits for i in range(8)], 1)
    assert (fresh - reused).abs().max() > 1e-3  # HF leaks the previous sequence

    ours_fresh, _ = _our_run(small_model, seq_b, 1)
    state = small_model.init_state()
    with torch.no_grad():
        for i in range(8):
            _, state = small_model.step(seq_a[:, i], torch.tensor([i]), state)
        ours_reused = []
        for i in range(8):
            logits, state = small_model.step(seq_b[:, i], torch.tensor([i]), state)
            ours_reused.append(logits[:, None])
    assert torch.equal(ours_fresh, torch.cat(ours_reused, 1))
