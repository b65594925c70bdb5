"""Teacher-forced logits at any length, and their comparison a slice of rows at a time.

A validation compares [n, vocab] logits of an artifact, of the float32 reference and of the artifact's own
quantised model. At RecurrentGemma's 256000-entry vocabulary one such array over the default 8192 tokens is
8.4 GB of float32, and the comparison's float64 temporaries are twice that each. So here:

- an artifact's logits stay in memory up to `IN_MEMORY_BYTES` and past it go to a temporary file
  (`SpilledLogits`), written as the runtime produces them;
- a layer-major run (`rgexport.streaming.LayerMajorRun`) keeps its hidden states ([n, width]) and computes
  the logits of a slice of rows when asked;
- `compare_logits` reads `FETCH_BYTES` of rows from each at a time and compares them `COMPARE_ROWS` rows at
  a time, accumulating the metrics.

Anything that holds logits is a `Logits`: a numpy array [n, v], a `SpilledLogits`, or a `LayerMajorRun`; each
has `len`, `shape` and gives a slice of rows as a float32 array.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import numpy as np

from rgexport.errors import RgexportError

IN_MEMORY_BYTES = 1 << 30  # an artifact's logits past this go to a temporary file (2B: 1,048 tokens)
COMPARE_ROWS = 64  # rows compared at a time: at 256000 entries one float64 temporary is 131 MB
FETCH_BYTES = 256 << 20  # float32 logits read from each side at a time (256 rows at 256000 entries)

Logits = Any  # np.ndarray | SpilledLogits | rgexport.streaming.LayerMajorRun, each [n, v]


class SpilledLogits:
    """Logits [n, v] float32 in an unnamed temporary file (gone when this object is): rows are written in
    order as a runtime produces them and read back a slice at a time. Neither side maps the file, so the
    page cache holds what memory there is to spare and the process's resident set does not grow with n."""

    def __init__(self, n: int, v: int, folder: str | None = None):
        self.shape = (n, v)
        self._row_bytes = 4 * v
        folder = folder or tempfile.gettempdir()
        size = n * self._row_bytes
        self._file = tempfile.TemporaryFile(prefix="rgexport-logits-", dir=folder)
        try:
            # Reserve the blocks now: a disk that fills mid-validation is this error, not a short write later.
            os.posix_fallocate(self._file.fileno(), 0, size)
        except OSError as e:
            self._file.close()
            raise RgexportError(
                f"validating {n} tokens keeps their logits ({n} x {v} float32, {size / 1e9:.1f} GB) in a "
                f"temporary file, and {folder} has no room for it ({e.strerror}): free space there, set TMPDIR "
                "to a folder that has it, or pass fewer --tokens") from e

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, rows: slice, values: np.ndarray) -> None:
        start = rows.start or 0
        data = np.ascontiguousarray(values, dtype=np.float32).tobytes()
        written = os.pwrite(self._file.fileno(), data, start * self._row_bytes)
        if written != len(data):
            raise RgexportError(f"short write of validation logits ({written} of {len(data)} bytes)")

    def __getitem__(self, rows: slice | int) -> np.ndarray:
        if isinstance(rows, int):  # one row, as an array's [i] gives it
            return self[rows % self.shape[0]:rows % self.shape[0] + 1][0]
        start, stop, _ = rows.indices(self.shape[0])
        data = os.pread(self._file.fileno(), (stop - start) * self._row_bytes, start * self._row_bytes)
        return np.frombuffer(data, dtype=np.float32).reshape(stop - start, self.shape[1])


def logits_buffer(n: int, v: int) -> np.ndarray | SpilledLogits:
    """Room for n rows of v float32 logits: an array, or a `SpilledLogits` past `IN_MEMORY_BYTES`."""
    if 4 * n * v <= IN_MEMORY_BYTES:
        return np.empty((n, v), dtype=np.float32)
    return SpilledLogits(n, v)


def rows(logits: Logits, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of `logits` as a float32 array (a layer-major run computes them for the slice)."""
    return np.asarray(logits[start:stop], dtype=np.float32)


def release(logits: Logits) -> None:
    """Frees what `logits` holds only to compute its rows (a layer-major run's embedding); read again on
    next use."""
    if hasattr(logits, "release"):
        logits.release()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _slices(n: int, slice_rows: int, fetch_rows: int, reference: Logits, artifact: Logits):
    """(start, stop, reference rows, artifact rows) of each slice: read from each side `fetch_rows` at a time
    (a layer-major run computes its head once per read: the own model's quantised head is dequantised each
    time, 128 times over 8192 tokens in slices of 64), then cut into slices of `slice_rows`."""
    for f0 in range(0, n, fetch_rows):
        f1 = min(f0 + fetch_rows, n)
        ref_block, art_block = rows(reference, f0, f1), rows(artifact, f0, f1)
        for start in range(f0, f1, slice_rows):
            stop = min(start + slice_rows, f1)
            yield start, stop, ref_block[start - f0:stop - f0], art_block[start - f0:stop - f0]


def compare_logits(reference: Logits, artifact: Logits, targets: np.ndarray, slice_rows: int = COMPARE_ROWS,
                   fetch_bytes: int = FETCH_BYTES) -> dict[str, Any]:
    """Metrics over positions: reference/artifact [n, v] `Logits`; targets [n] next tokens (-1 where unknown).
    Read about `fetch_bytes` of float32 rows from each side at a time and compared `slice_rows` rows at a time,
    so memory does not grow with n."""
    targets = np.asarray(targets)
    n = len(targets)
    if len(reference) != n or len(artifact) != n:
        raise RgexportError(f"logits of {len(reference)} and {len(artifact)} tokens cannot be compared "
                            f"over {n} targets")
    fetch_rows = max(1, fetch_bytes // (4 * max(reference.shape[1], 1)) // slice_rows) * slice_rows
    abs_max = abs_sum = kl_sum = nll_ref = nll_art = 0.0
    kl_max, agree, known_count, entries = -math.inf, 0, 0, 0
    per_position = np.empty(n, dtype=np.float64)
    for start, stop, ref, art in _slices(n, slice_rows, fetch_rows, reference, artifact):
        diff = np.abs(ref.astype(np.float64) - art.astype(np.float64))
        per_position[start:stop] = diff.max(axis=-1)
        abs_max = max(abs_max, float(per_position[start:stop].max()))
        abs_sum += float(diff.sum())
        entries += diff.size
        del diff
        lp_ref, lp_art = _log_softmax(ref), _log_softmax(art)
        kl = (np.exp(lp_ref) * (lp_ref - lp_art)).sum(axis=-1)
        kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
        agree += int((ref.argmax(-1) == art.argmax(-1)).sum())
        t = targets[start:stop]
        known = np.flatnonzero(t >= 0)
        nll_ref -= float(lp_ref[known, t[known]].sum())
        nll_art -= float(lp_art[known, t[known]].sum())
        known_count += len(known)
    mean_nll_ref = nll_ref / known_count if known_count else math.nan
    mean_nll_art = nll_art / known_count if known_count else math.nan
    return {
        "max_abs_logit_error": abs_max,
        "mean_abs_logit_error": abs_sum / entries if entries else math.nan,
        "max_abs_logit_error_first_window": None,  # filled by the caller, who knows the window
        "mean_kl": kl_sum / n if n else math.nan,
        "max_kl": kl_max,
        "top1_agreement": agree / n if n else math.nan,
        "ppl_reference": math.exp(mean_nll_ref),
        "ppl_artifact": math.exp(mean_nll_art),
        "ppl_ratio": math.exp(mean_nll_art - mean_nll_ref),
        "_per_position_max_error": per_position,
    }
