"""Logits at any length: compared a slice of rows at a time, an artifact's spilled to a temporary file past
a size, with the same report as whole arrays in memory."""

from __future__ import annotations

import copy
import errno
import math

import numpy as np
import pytest
import torch

from rgexport import logits as L
from rgexport.errors import RgexportError
from rgexport.validate import EagerRunner, artifact_run, run_validation, teacher_forced


def _whole(reference: np.ndarray, artifact: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The metrics written directly over whole arrays (float64), for the slices to match."""
    ref, art = reference.astype(np.float64), artifact.astype(np.float64)
    lp_ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    lp_art = art - np.log(np.exp(art - art.max(-1, keepdims=True)).sum(-1, keepdims=True)) - art.max(-1, keepdims=True)
    kl = (np.exp(lp_ref) * (lp_ref - lp_art)).sum(-1)
    known = np.flatnonzero(targets >= 0)
    nll_ref, nll_art = -lp_ref[known, targets[known]].mean(), -lp_art[known, targets[known]].mean()
    return {"max_abs_logit_error": np.abs(ref - art).max(), "mean_abs_logit_error": np.abs(ref - art).mean(),
            "mean_kl": kl.mean(), "max_kl": kl.max(), "top1_agreement": (ref.argmax(-1) == art.argmax(-1)).mean(),
            "ppl_reference": math.exp(nll_ref), "ppl_artifact": math.exp(nll_art),
            "ppl_ratio": math.exp(nll_art - nll_ref)}


class _Counted:
    """Logits that record every slice read from them."""

    def __init__(self, a: np.ndarray):
        self.a, self.reads, self.shape = a, [], a.shape

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, rows: slice) -> np.ndarray:
        self.reads.append((rows.start, rows.stop))
        return self.a[rows]


@pytest.mark.parametrize("slice_rows", [1, 5, 64])
def test_compare_in_slices_is_the_whole_comparison(slice_rows):
    g = np.random.default_rng(0)
    ref = g.normal(size=(37, 50)).astype(np.float32) * 4
    art = ref + g.normal(size=ref.shape).astype(np.float32) * 0.5
    targets = g.integers(0, 50, size=37)
    targets[[0, 7, 36]] = -1  # unknown next tokens are left out of the perplexity
    got = L.compare_logits(_Counted(ref), _Counted(art), targets, slice_rows=slice_rows)
    want = _whole(ref, art, targets)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    np.testing.assert_allclose(got["_per_position_max_error"], np.abs(ref - art.astype(np.float64)).max(-1))
    assert 0.0 < got["top1_agreement"] < 1.0 and got["ppl_ratio"] != 1.0  # the case is not trivial


@pytest.mark.parametrize("fetch_rows", [32, 64])
def test_compare_reads_each_row_once_a_slice_at_a_time(fetch_rows):
    """Each side is read once, `fetch_bytes` of rows at a time (a whole number of slices), and compared a slice
    of rows at a time: the same figures whatever the read size."""
    g = np.random.default_rng(1)
    ref, art = (_Counted(g.normal(size=(130, 20)).astype(np.float32)) for _ in range(2))
    got = L.compare_logits(ref, art, np.zeros(130, dtype=np.int64), slice_rows=32, fetch_bytes=fetch_rows * 20 * 4)
    for side in (ref, art):
        assert side.reads == [(s, min(s + fetch_rows, 130)) for s in range(0, 130, fetch_rows)]
    want = L.compare_logits(ref.a, art.a, np.zeros(130, dtype=np.int64), slice_rows=32, fetch_bytes=1)
    for key in ("max_abs_logit_error", "mean_abs_logit_error", "mean_kl", "top1_agreement", "ppl_ratio"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    with pytest.raises(RgexportError, match="cannot be compared"):
        L.compare_logits(ref, _Counted(art.a[:129]), np.zeros(130, dtype=np.int64))
    with pytest.raises(RgexportError, match="cannot be compared"):
        L.compare_logits(ref, _Counted(art.a[:129]), np.zeros(130, dtype=np.int64))


def test_spilled_logits_read_back_what_was_written(tmp_path):
    g = np.random.default_rng(2)
    rows = g.normal(size=(9, 7)).astype(np.float32)
    spilled = L.SpilledLogits(9, 7, folder=str(tmp_path))
    spilled[0:4] = rows[:4]
    for i in range(4, 9):
        spilled[i:i + 1] = rows[i]
    assert len(spilled) == 9 and spilled.shape == (9, 7)
    np.testing.assert_array_equal(spilled[2:8], rows[2:8])
    np.testing.assert_array_equal(spilled[-1], rows[-1])
    np.testing.assert_array_equal(L.rows(spilled, 0, 9), rows)
    assert list(tmp_path.iterdir()) == []  # an unnamed file: nothing left behind, whatever happens


def test_no_room_for_spilled_logits_is_a_clear_error(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(L.os, "posix_fallocate", full)
    with pytest.raises(RgexportError, match=r"8192 x 256000 float32, 8.4 GB.*no room for it.*fewer --tokens"):
        L.SpilledLogits(8192, 256000, folder=str(tmp_path))


def test_a_long_validation_spills_the_artifact_logits_and_reports_the_same(small_model, small_config, monkeypatch):
    """Past IN_MEMORY_BYTES the artifact's logits go to a temporary file; the report is the one made in memory."""
    tokens = torch.randint(0, small_config.vocab_size, (97,), generator=torch.Generator().manual_seed(8)).tolist()
    artifact = copy.deepcopy(small_model)
    with torch.no_grad():
        artifact.blocks[0].mlp_block.ffw_up.weight.mul_(1.1)
    kw = {"backend": "eager", "recipe": "fp32", "quantized": False, "greedy_tokens": 4}
    in_memory = artifact_run(EagerRunner(artifact, 8), tokens, greedy_tokens=4)
    assert isinstance(in_memory.logits, np.ndarray)
    expected = run_validation(in_memory, small_model, tokens, **kw).to_dict()

    monkeypatch.setattr(L, "IN_MEMORY_BYTES", 0)
    spilled = artifact_run(EagerRunner(artifact, 8), tokens, greedy_tokens=4)
    assert isinstance(spilled.logits, L.SpilledLogits)
    np.testing.assert_array_equal(L.rows(spilled.logits, 0, 96), in_memory.logits)
    assert run_validation(spilled, small_model, tokens, **kw).to_dict() == expected
    assert expected["metrics"]["max_abs_logit_error"] > 1e-3  # the artifact differs, so the comparison shows it
    assert isinstance(teacher_forced(EagerRunner(artifact, 8), tokens[:20]), L.SpilledLogits)
