"""The cells that executors run (rgexport/executors.py): module-level functions, so that a Ray worker can
import them by name (the accuracy matrix's own cell is `rgexport.evaluate.evaluate_cell`). Each loads the
checkpoint itself unless it runs in the process that already has it."""

from __future__ import annotations

from typing import Any

from rgexport.build import BuildOptions, BuildResult, build, weights_source
from rgexport.config import is_small
from rgexport.progress import Stages

_CHECKPOINTS: dict[tuple, Any] = {}  # small checkpoints a worker process has loaded, for its next cells


def worker_checkpoint(opts: BuildOptions, with_tokenizer: bool = True):
    """The checkpoint `opts` names, loaded in this process, where a cell should reuse one; small ones are kept
    for the worker's next cell. None where `build` reads the weights itself: random weights (drawn as the
    backend needs them) and large checkpoints (streamed block by block where the backend can; loaded here
    they would be whole beside the build, and a worker idling between cells must not hold 10 GB that Ray
    does not count)."""
    from rgexport.checkpoint import load_checkpoint

    if opts.random_weights:
        return None
    key = (opts.checkpoint, opts.preset, opts.tokenizer if with_tokenizer else None)
    if key in _CHECKPOINTS:
        return _CHECKPOINTS[key]
    if not is_small(weights_source(opts).config):
        return None
    ckpt = load_checkpoint(opts.checkpoint, opts.preset, opts.tokenizer) if with_tokenizer \
        else load_checkpoint(opts.checkpoint, opts.preset)
    _CHECKPOINTS.clear()
    _CHECKPOINTS[key] = ckpt
    return ckpt


def build_cell(opts: BuildOptions, stages: Stages | None = None, checkpoint: Any = None) -> BuildResult:
    """One artifact of a bundle: `build` with the bundle's checkpoint (loaded here on a worker where it is
    reused; see `worker_checkpoint`)."""
    from rgexport.memory import release_freed

    if checkpoint is None:
        checkpoint = worker_checkpoint(opts)
    try:
        return build(opts, stages, checkpoint=checkpoint)
    finally:
        # A bundle's cells run one after another in one process (and a worker runs many): what a build freed
        # but the heap kept would sit under the next build's peak, and beside the fresh process that measures
        # each artifact's memory once the cells are done (2B ios bundle: 2.2 GiB carried from Core ML into
        # ExecuTorch's build, 4.40 GiB held during the measurement; 0.86 and 1.28 with this).
        release_freed()


__all__ = ["build_cell", "worker_checkpoint"]
