"""Calibration samples: real states along the fp32 trajectory, past the window, from text or JSONL."""

from __future__ import annotations

import json

import pytest
import torch

from rgexport.calibrate import calibration_texts, capture_samples
from rgexport.errors import RgexportError


@torch.no_grad()
def _stepwise_states(model, seq):
    """The state before every position, one token at a time (what a device decoding the text holds)."""
    states, state = [], model.init_state()
    for p, t in enumerate(seq):
        states.append({k: v.clone() for k, v in state.items()})
        _, state = model(torch.tensor([[t]]), torch.tensor([p], dtype=torch.int32), state)
    return states


def test_samples_are_the_states_of_the_token_by_token_trajectory(small_model, small_config):
    g = torch.Generator().manual_seed(3)
    w = small_config.attention_window_size
    seqs = [torch.randint(0, small_config.vocab_size, (3 * w,), generator=g).tolist() for _ in range(2)]
    samples = capture_samples(small_model, seqs, chunk=1, max_samples=20)
    assert len(samples) == 20
    positions = [int(s.position) for s in samples]
    assert max(positions) >= 2 * w  # past the window: every ring-buffer slot is live
    truth = [_stepwise_states(small_model, seq) for seq in seqs]
    seen = 0
    for s in samples:
        p = int(s.position)
        seen = seen + 1 if p == 0 else seen  # a new sequence starts at position 0
        expected = truth[seen - 1][p]
        assert int(s.tokens[0, 0]) == seqs[seen - 1][p]
        for name, value in expected.items():
            torch.testing.assert_close(s.state[name], value, atol=1e-5, rtol=0)
    chunks = capture_samples(small_model, seqs, chunk=8)
    assert [int(c.position) for c in chunks[:3]] == [0, 8, 16] and chunks[0].tokens.shape == (1, 8)


def test_calibration_text_formats(tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert calibration_texts(jsonl) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n')
    with pytest.raises(RgexportError, match=r"bad.jsonl:1 has no \"text\" or \"prompt\""):
        calibration_texts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(RgexportError, match="holds no text"):
        calibration_texts(tmp_path / "empty.txt")
