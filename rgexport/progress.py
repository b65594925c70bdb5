"""Stage-by-stage progress on the terminal (rich), and the timings that go into the manifest."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

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
    """Prints one line per stage with its duration; `quiet` prints nothing (library use, tests)."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        start = time.perf_counter()
        label = f"{name}" + (f" [dim]{detail}[/dim]" if detail else "")
        try:
            if self.quiet:
                yield
            else:
                with self.console.status(f"[bold]{label}[/bold] …"):
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
            self.timings[name] = round(time.perf_counter() - start, 3)
            if not self.quiet:
                self.console.print(f"[red]✗[/red] {label}  [red]{type(e).__name__}[/red]")
            raise StageFailed(name, e) from e
        self.timings[name] = round(time.perf_counter() - start, 3)
        if not self.quiet:
            self.console.print(f"[green]✓[/green] {label}  [dim]{self.timings[name]:.1f} s[/dim]")

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator:
        """A progress bar; yields `advance(n)`."""
        if self.quiet:
            yield lambda n=1: None
            return
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as p:
            task = p.add_task(description, total=total)
            yield lambda n=1: p.advance(task, n)
