"""Other libraries' output goes to a log file, so the terminal shows rgexport's own lines.

The export libraries print from Python (warnings, logging, tqdm bars, print) and from C/C++ (absl, MLIR
passes, cpuinfo probes, shared-library load failures) straight to file descriptors 1 and 2. `captured`
points both descriptors at the log for the duration of a block, and hands back a stream on the real
terminal for rgexport's own lines.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def _fd_of(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def _descriptors_to(fileno: int) -> Iterator[dict[int, int]]:
    """Within the block, fds 1 and 2 write to `fileno`; yields copies of the original two, {fd: copy}.
    Python's streams are flushed on the way in and out, so nothing crosses over."""
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        for fd in (1, 2):
            os.dup2(fileno, fd)
        yield saved
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def captured(log_path: Path | None) -> Iterator[TextIO]:
    """Within the block, everything written to fds 1 and 2 (and so Python's stdout, stderr, warnings and
    logging) is appended to `log_path`. Yields a text stream on the terminal's stderr for rgexport's lines.

    `log_path` None captures nothing (`--verbose`): the stream is then plain stderr.
    """
    if log_path is None:
        yield sys.stderr
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Where stderr is not the process's descriptor 2 (a test runner's buffer), rgexport's lines keep going
    # to it; the descriptors are redirected either way, so native output still lands in the log.
    to_terminal = _fd_of(sys.stderr) == 2
    with open(log_path, "ab", buffering=0) as log, _descriptors_to(log.fileno()) as saved:
        terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1) if to_terminal else sys.stderr
        try:
            # Python's warnings and logging (its last-resort handler) write to sys.stderr, now the log.
            yield terminal
        finally:
            if terminal is not sys.stderr:
                terminal.close()


@contextlib.contextmanager
def held_back(enabled: bool = True) -> Iterator[None]:
    """Within the block, other libraries' output to fds 1 and 2 (torchao's library probes while a runtime
    loads) is held in an anonymous temporary file: dropped when the block succeeds, written to stderr when
    it raises, so a failure still shows everything. `enabled` False (`--verbose`) holds nothing back.
    Writes no file anywhere."""
    if not enabled:
        yield
        return
    import tempfile

    with tempfile.TemporaryFile() as held:
        try:
            with _descriptors_to(held.fileno()):
                yield
        except BaseException:
            held.seek(0)
            with contextlib.suppress(OSError):
                os.write(2, held.read()[-20000:])
            raise
