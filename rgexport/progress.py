"""Stage-by-stage progress on the terminal (rich), and the timings and peak memory that go into the manifest."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)


class StageFailed(Exception):
    """A build stage raised; carries the stage name and the original error."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage '{stage}' failed: {cause}")
        self.stage = stage
        self.cause = cause


class Stages:
    """Prints one line per stage with its duration; `quiet` prints nothing (library use, tests).

    Each stage's wall time and peak RSS are recorded (`timings`, `peak_rss`): the peak-RSS mark is reset as a
    stage starts, so a stage's figure is its own (Linux; elsewhere the process's peak so far). A stage can be
    split into parts (`part`), recorded as "stage: part" beside it, so a summary can say which part of a
    stage peaked (`parts`, not in `timings`: those add up to the whole).
    """

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        self.parts: dict[str, dict[str, float | int]] = {}  # "stage: part" -> seconds, peak_rss_bytes
        self._stage: str | None = None
        self._carried = 0  # the running stage's peak before its current part reset the mark

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """A part of the running stage, timed and peak-measured on its own as "stage: part" (a line under the
        stage's); the stage's own peak stays the largest of its parts'."""
        from rgexport.memory import peak_rss_bytes, reset_peak_rss

        if self._stage is None:
            raise RuntimeError("Stages.part outside a stage")
        self._carried = max(self._carried, peak_rss_bytes())
        reset_peak_rss()
        start = time.perf_counter()
        yield
        seconds, peak = time.perf_counter() - start, peak_rss_bytes()
        self._carried = max(self._carried, peak)
        key = f"{self._stage}: {name}"
        was = self.parts.get(key, {"seconds": 0.0, "peak_rss_bytes": 0})
        self.parts[key] = {"seconds": round(was["seconds"] + seconds, 3),
                           "peak_rss_bytes": max(was["peak_rss_bytes"], peak)}
        if not self.quiet:
            self.console.print(f"  [dim]· {name}  {seconds:.1f} s, peak {peak / 2**30:.2f} GiB[/dim]")

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        from rgexport.memory import peak_rss_bytes, reset_peak_rss

        reset_peak_rss()
        self._stage, self._carried = name, 0
        start = time.perf_counter()
        label = f"{name}" + (f" [dim]{detail}[/dim]" if detail else "")
        try:
            if self.quiet or not self.console.is_terminal:  # a live display off a terminal prints blank lines
                yield
            else:
                columns = (SpinnerColumn(), TextColumn("[bold]{task.description}[/bold]"), TimeElapsedColumn())
                with Progress(*columns, console=self.console, transient=True) as p:
                    p.add_task(label, total=None)
                    yield
        except StageFailed:
            raise
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            # Ctrl-C, SIGTERM (the CLI raises KeyboardInterrupt for it) and exits pass through as themselves:
            # the CLI reports them as an interruption, and `finally` blocks clean up partial output.
            if not self.quiet:
                self.console.print(f"[red]✗[/red] {label}  [red]interrupted[/red]")
            raise
        except BaseException as e:
            self._record(name, time.perf_counter() - start, max(self._carried, peak_rss_bytes()))
            if not self.quiet:
                self.console.print(f"[red]✗[/red] {label}  [red]{type(e).__name__}[/red]")
            raise StageFailed(name, e) from e
        finally:
            self._stage = None  # a part outside a stage is an error, whichever way this stage ended
        seconds, peak = time.perf_counter() - start, max(self._carried, peak_rss_bytes())
        self._record(name, seconds, peak)
        if not self.quiet:
            self.console.print(f"[green]✓[/green] {label}  [dim]{seconds:.1f} s, peak {peak / 2**30:.2f} GiB[/dim]")

    @contextlib.contextmanager
    def writing_to(self, stream: TextIO) -> Iterator[None]:
        """Within the block the stage lines go to `stream` (the terminal, while other output is captured)."""
        # The console's own setting, not `.file`: a console made with stderr=True resolves sys.stderr at each
        # write (a test runner swaps it per call), and `.file` would pin the stream of this moment.
        old = self.console._file
        self.console.file = stream
        try:
            yield
        finally:
            self.console._file = old

    def _record(self, name: str, seconds: float, peak: int) -> None:
        # A stage name can repeat (validate, then its variants): keep the sum of times and the largest peak.
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 3)
        self.peak_rss[name] = max(self.peak_rss.get(name, 0), peak)

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator:
        """A progress bar; yields `advance(n)`."""
        if self.quiet or not self.console.is_terminal:
            yield lambda n=1: None
            return
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as p:
            task = p.add_task(description, total=total)
            yield lambda n=1: p.advance(task, n)
