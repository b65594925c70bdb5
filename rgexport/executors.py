"""Where the cells of a matrix run: in this process one after another (the default), or as Ray tasks, on a
local Ray that rgexport starts and stops itself (`--workers N`) or on an existing cluster (`--address ADDR`,
or `RAY_ADDRESS`). Ray comes with `pip install "rgexport[cluster]"`.

A cell is one unit of work (one artifact build and its validation): a module-level function and its
arguments, the CPUs and memory it needs, and the folder it writes. An executor takes cells and yields their
results as they finish; `run_cells` drives one with a single progress display for the whole matrix, and on
Ctrl-C cancels what is outstanding and removes the partial folders of the cells that did not finish.

Faults: a cell that raises is a failed result (the others go on); on Ray, a worker process that dies
mid-cell (killed, crashed, out of memory) is retried up to `max_retries` times before its cell fails.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rgexport.errors import MissingDependencyError, RgexportError

GiB = 1024**3
DEFAULT_MAX_RETRIES = 2  # a dead worker's cell runs at most 1 + this many times
LOCAL_OBJECT_STORE_BYTES = 200 * 1024**2  # cells pass options and rows, never tensors
CONNECT_TIMEOUT_S = 5.0


@dataclasses.dataclass
class Cell:
    """One unit of work. `fn` must be importable by name (a module-level function) to run on Ray."""

    key: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Extra keyword arguments used only when the cell runs in this process (a console, an already loaded
    # checkpoint): never sent to a worker.
    local_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_cpus: float = 1
    memory: int | None = None  # bytes this cell may hold at its peak (Ray schedules on it)
    out: Path | None = None  # the folder it writes; partial folders beside it are removed on cancel


@dataclasses.dataclass
class CellResult:
    key: str
    value: Any = None
    error: str | None = None  # one line; None when the cell returned
    exception: BaseException | None = None  # the exception itself, when the cell ran in this process
    worker: str = ""
    attempts: int = 1
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def cell_resources(config: Any, backend: str, recipe: str | None = None) -> dict[str, Any]:
    """CPUs and peak memory to declare for one build of `config` (an estimate, on the safe side).

    Memory is a base for the runtime and toolchain plus the float32 weights times the copies a build holds:
    a small model is copied before quantisation (2x); a large one is not, but export and validation keep
    about half a copy more beside it (ONNX int4 at RecurrentGemma-2B peaked at 15.6 GiB with 10.7 GB of
    weights), so two 2B builds are never placed on one 24 GB machine.
    """
    from rgexport.backends import build_base_bytes
    from rgexport.config import is_small

    weights = config.num_parameters() * 4
    small = is_small(config)
    # The runtime and toolchain: each backend's own figure (`Backend.build_base_bytes`).
    memory = build_base_bytes(backend) + int(weights * (2.0 if small else 1.5))
    return {"num_cpus": 1 if small else 4, "memory": memory}


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[Any, str | None, Exception | None]:
    try:
        return fn(*args, **kwargs), None, None
    except RgexportError as e:
        return None, str(e), e
    except Exception as e:  # noqa: BLE001 - a cell's failure is its result; the matrix goes on
        return None, f"{type(e).__name__}: {e}", e


def remove_partials(out: Path) -> None:
    """Removes the hidden partial folders a build of `out` leaves when it is killed (see build.py)."""
    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(p, ignore_errors=True)


def _check_writable(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".rgexport-write-check-{socket.gethostname()}-{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()
    from rgexport.manifest import rgexport_version

    return {"host": socket.gethostname(), "rgexport": rgexport_version(), "python": platform.python_version()}


class Executor:
    """Submit cells, then iterate their results as they finish; `cancel` drops what is outstanding."""

    name = "executor"
    live = False  # whether progress is a live table (False: one line per event, stages print in between)

    def __init__(self) -> None:
        self.on_start: Callable[[str, str], None] | None = None

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Connects or starts what runs the cells; idempotent."""

    def close(self) -> None:
        """Stops what `start` started."""

    def describe(self) -> str:
        return self.name

    def check_output(self, folder: Path) -> None:
        """Raises RgexportError unless every worker can write into `folder` (created if missing)."""
        try:
            _check_writable(folder)
        except OSError as e:
            raise RgexportError(f"cannot write into {folder}: {e}") from None

    def submit(self, cell: Cell) -> None:
        raise NotImplementedError

    def results(self) -> Iterator[CellResult]:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def _started(self, key: str, worker: str) -> None:
        if self.on_start is not None:
            self.on_start(key, worker)


class InProcessExecutor(Executor):
    """Runs cells here, one after another, in submission order (rgexport's behaviour without Ray)."""

    name = "in-process"

    def __init__(self) -> None:
        super().__init__()
        self._queue: list[Cell] = []

    def submit(self, cell: Cell) -> None:
        self._queue.append(cell)

    def results(self) -> Iterator[CellResult]:
        while self._queue:
            cell = self._queue.pop(0)
            worker = worker_name()
            self._started(cell.key, worker)
            t = time.perf_counter()
            value, error, exc = _call(cell.fn, cell.args, {**cell.kwargs, **cell.local_kwargs})
            yield CellResult(cell.key, value, error, exc, worker, 1, round(time.perf_counter() - t, 3))

    def cancel(self) -> None:
        self._queue.clear()


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError("ray", "cluster", e) from None
    return ray


def _driver_pythonpath() -> str:
    """The driver's import path beyond the interpreter's own (a source checkout, PYTHONPATH), so that local
    workers import the same rgexport as this process.

    Left out: anything inside the interpreter's own folders (the standard library, site-packages), which the
    worker finds by itself, and any folder that holds a module named like a standard one. A library may put
    its own folder on sys.path at run time (onnxruntime's ORT-format converter adds `tools/ort_format_model`, which
    holds a `types.py`): on a worker's PYTHONPATH that shadows the standard `types`, and every worker dies
    at start-up."""
    import site
    import sysconfig

    import rgexport

    own = {os.path.realpath(p) for p in sysconfig.get_paths().values()}
    own |= {os.path.realpath(p) for p in site.getsitepackages()}
    own |= {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    entries = [str(Path(rgexport.__file__).resolve().parent.parent)]
    entries += [os.path.abspath(p or os.getcwd()) for p in sys.path]
    entries += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    out: list[str] = []
    for p in entries:
        real = os.path.realpath(p)
        if not os.path.isdir(p) or p in out or _shadows_stdlib(p):
            continue
        if any(real == o or real.startswith(o.rstrip(os.sep) + os.sep) for o in own):
            continue
        out.append(p)
    return os.pathsep.join(out)


def _shadows_stdlib(folder: str) -> bool:
    """Whether `folder` holds a module or package named like a standard-library module."""
    try:
        names = os.listdir(folder)
    except OSError:
        return True
    for name in names:
        stem = name[:-3] if name.endswith(".py") else name
        if stem in sys.stdlib_module_names and stem != "__pycache__" and (
                name.endswith(".py") or os.path.isfile(os.path.join(folder, name, "__init__.py"))):
            return True
    return False


def _check_reachable(address: str) -> None:
    """Fails fast, with one clear line, when nothing listens at a cluster's host:port."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RgexportError(f"--address {address!r} is not host:port (the Ray head's GCS address, e.g. "
                            "10.0.0.5:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise RgexportError(f"no Ray cluster answers at {address} ({why}); start its head there with "
                            "`ray start --head`, or drop --address / RAY_ADDRESS to run here") from None


def _ray_cell(tracker, key: str, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]):
    """A cell, inside a Ray worker: reports its start (with the worker), runs, returns value or error."""
    import ray

    worker = worker_name()
    ray.get(tracker.started.remote(key, worker))
    t = time.perf_counter()
    value, error, _ = _call(fn, args, kwargs)
    return value, error, worker, round(time.perf_counter() - t, 3)


class _Tracker:
    """A Ray actor the cells report their start to (which cell runs on which worker, and how often)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def started(self, key: str, worker: str) -> None:
        self.events.append((key, worker))

    def drain(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events


class RayExecutor(Executor):
    """Cells as Ray tasks: on a local Ray of `workers` CPUs that this executor starts and stops, or on the
    cluster at `address` (then `workers`, if given, caps the cells in flight)."""

    name = "ray"
    live = True

    def __init__(self, workers: int | None = None, address: str | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, cancel_grace_s: float = 15.0) -> None:
        super().__init__()
        if workers is not None and workers < 1:
            raise RgexportError("--workers must be at least 1")
        self.workers = workers
        self.address = address
        self.max_retries = max_retries
        self.cancel_grace_s = cancel_grace_s
        self._ray = None
        self._owns = False
        self._tracker = None
        self._remote = None
        self._pending: list[Cell] = []
        self._refs: dict[Any, Cell] = {}
        self._cpus: dict[Any, float] = {}
        self._starts: dict[str, list[str]] = {}
        self._max_cpus = 1.0
        self._max_memory: float | None = None

    def start(self) -> None:
        if self._ray is not None:
            return
        ray = _import_ray()
        if not ray.is_initialized():
            if self.address:
                _check_reachable(self.address)
                try:
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.ERROR)
                except Exception as e:  # noqa: BLE001 - ConnectionError, auth, version mismatch: one line
                    raise RgexportError(f"cannot join the Ray cluster at {self.address}: "
                                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                                        ) from None
            else:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(address="local", num_cpus=self.workers or os.cpu_count() or 1,
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                         log_to_driver=False, logging_level=logging.ERROR,
                         runtime_env={"env_vars": {"PYTHONPATH": _driver_pythonpath()}})
            self._owns = True
        self._ray = ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self._nodes = nodes
        self._max_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=1) or 1
        self._max_memory = max((n["Resources"].get("memory", 0) for n in nodes), default=0) or None
        self._tracker = ray.remote(num_cpus=0)(_Tracker).remote()
        self._remote = ray.remote(_ray_cell)

    def close(self) -> None:
        if self._ray is None:
            return
        ray, self._ray = self._ray, None
        self._refs.clear()
        self._cpus.clear()
        self._pending.clear()
        if self._tracker is not None:
            try:
                ray.kill(self._tracker)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
            self._tracker = None
        if self._owns:
            ray.shutdown()
            self._owns = False

    def describe(self) -> str:
        nodes = len(getattr(self, "_nodes", []))
        where = f"cluster {self.address}" if self.address else f"local Ray, {self.workers or os.cpu_count()} workers"
        return f"ray ({where}, {nodes} node{'s' if nodes != 1 else ''})"

    def check_output(self, folder: Path) -> None:
        """Runs a probe on every node: it must write into `folder` and run the driver's rgexport version."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from rgexport.manifest import rgexport_version

        self.start()
        ray = self._ray
        if "://" in str(folder):
            raise RgexportError(f"--out {folder}: the cells write to a filesystem path; mount the storage on "
                                "every node and pass the mounted path")
        probe = ray.remote(_check_writable)
        refs = {}
        for n in self._nodes:
            strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            refs[n["NodeManagerAddress"]] = probe.options(num_cpus=0, max_retries=0,
                                                          scheduling_strategy=strategy).remote(folder)
        mine = rgexport_version()
        for node, ref in refs.items():
            try:
                info = ray.get(ref, timeout=120)
            except ray.exceptions.GetTimeoutError:
                raise RgexportError(f"Ray node {node} did not answer a write check of {folder} in 120 s") from None
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
                if isinstance(cause, OSError):
                    raise RgexportError(f"Ray node {node} cannot write into {folder} ({cause}); on a cluster --out "
                                        "must be a folder every node reaches at the same path (a shared "
                                        "filesystem)") from None
                raise RgexportError(f"Ray node {node} cannot run rgexport: {type(cause).__name__}: {cause}; install "
                                    "the same rgexport (with its backends) on every node") from None
            except ray.exceptions.RayError as e:
                raise RgexportError(f"Ray node {node} cannot run rgexport ({type(e).__name__}); install the same "
                                    "rgexport (with its backends) on every node") from None
            if info["rgexport"] != mine:
                raise RgexportError(f"Ray node {node} ({info['host']}) runs rgexport {info['rgexport']}, this "
                                    f"driver {mine}: install the same version on every node")

    def submit(self, cell: Cell) -> None:
        self.start()
        self._pending.append(cell)

    def _launch(self) -> None:
        """Submits queued cells while the ones in flight leave CPUs free. Ray itself would queue them, but
        a task blocked in `ray.get` (each cell reports its start) lends its CPU to a queued task, which then
        runs beside it: with no more in flight than there are CPUs, nothing is waiting to borrow one."""
        limit = self.workers if self.address and self.workers else None
        cpus = self._ray.cluster_resources().get("CPU", self._max_cpus)
        while self._pending and (limit is None or len(self._refs) < limit):
            cell = self._pending[0]
            need = min(cell.num_cpus, self._max_cpus)
            if self._refs and sum(self._cpus.values()) + need > cpus:
                break
            self._pending.pop(0)
            opts: dict[str, Any] = {"num_cpus": need, "max_retries": self.max_retries,
                                    "retry_exceptions": False, "name": f"rgexport:{cell.key}"}
            if cell.memory:
                # Larger than any node offers: it gets the largest node to itself rather than never running.
                opts["memory"] = int(min(cell.memory, self._max_memory) if self._max_memory else cell.memory)
            ref = self._remote.options(**opts).remote(self._tracker, cell.key, cell.fn, cell.args, cell.kwargs)
            self._refs[ref] = cell
            self._cpus[ref] = need

    def _drain(self) -> None:
        try:
            events = self._ray.get(self._tracker.drain.remote(), timeout=10)
        except self._ray.exceptions.RayError:
            return
        for key, worker in events:
            self._starts.setdefault(key, []).append(worker)
            self._started(key, worker)

    def results(self) -> Iterator[CellResult]:
        ray = self._ray
        self._launch()
        while self._refs:
            ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=0.5)
            self._drain()
            for ref in ready:
                cell = self._refs.pop(ref)
                self._cpus.pop(ref, None)
                starts = self._starts.pop(cell.key, [])
                try:
                    value, error, worker, seconds = ray.get(ref)
                except ray.exceptions.RayError as e:
                    value, worker, seconds = None, starts[-1] if starts else "", 0.0
                    error = self._describe(e, len(starts))
                yield CellResult(cell.key, value, error, None, worker, max(len(starts), 1), seconds)
            self._launch()

    def _describe(self, e: BaseException, attempts: int) -> str:
        ray = self._ray
        if isinstance(e, ray.exceptions.OutOfMemoryError):
            return f"worker killed for memory after {attempts} attempt(s) (Ray's memory monitor)"
        if isinstance(e, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
            return f"worker died mid-cell {attempts} time(s) (max_retries={self.max_retries})"
        if isinstance(e, ray.exceptions.TaskCancelledError):
            return "cancelled"
        first = str(e).strip().splitlines()
        return f"{type(e).__name__}: {first[-1] if first else ''}"

    def cancel(self) -> None:
        """Drops the queued cells, interrupts the running ones (they clean up their partial folders), and
        kills those still running after `cancel_grace_s`."""
        if self._ray is None:
            return
        ray = self._ray
        self._pending.clear()
        refs = list(self._refs)
        for ref in refs:
            ray.cancel(ref, force=False)
        if refs:
            _, left = ray.wait(refs, num_returns=len(refs), timeout=self.cancel_grace_s)
            for ref in left:
                ray.cancel(ref, force=True)
            if left:
                ray.wait(left, num_returns=len(left), timeout=10)
        self._refs.clear()
        self._cpus.clear()


def make_executor(workers: int | None = None, address: str | None = None) -> Executor:
    """In-process unless asked for Ray: `address` (else RAY_ADDRESS) joins a cluster, `workers` alone starts
    a local Ray with that many workers."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if workers is None and address is None:
        return InProcessExecutor()
    _import_ray()
    return RayExecutor(workers=workers, address=address)


class MatrixProgress:
    """One display for a whole matrix: cells done / running / failed, and where each runs.

    With a live executor on a terminal it is a table redrawn in place; otherwise one line per event (a
    serial build prints its stages in between). A line is printed for every finished cell either way."""

    def __init__(self, console: Console, keys: list[str], title: str = "matrix", live: bool = False,
                 quiet: bool = False) -> None:
        self.console = console
        self.keys = list(keys)
        self.title = title
        self.quiet = quiet
        self.state: dict[str, dict[str, Any]] = {k: {"state": "queued", "worker": "", "attempts": 0,
                                                     "since": None, "seconds": None} for k in keys}
        self._live = Live(console=console, refresh_per_second=2, transient=True,
                          get_renderable=self._render) if live and console.is_terminal and not quiet else None

    def __enter__(self) -> MatrixProgress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def counts(self) -> dict[str, int]:
        states = [s["state"] for s in self.state.values()]
        return {"total": len(states), "done": sum(s in ("passed", "failed", "error") for s in states),
                "running": states.count("running"), "failed": sum(s in ("failed", "error") for s in states),
                "queued": states.count("queued")}

    def summary(self) -> str:
        c = self.counts()
        return f"{c['done']}/{c['total']} done, {c['running']} running, {c['failed']} failed, {c['queued']} queued"

    def started(self, key: str, worker: str) -> None:
        s = self.state.setdefault(key, {"state": "queued", "worker": "", "attempts": 0, "since": None,
                                        "seconds": None})
        s.update(state="running", worker=worker, since=time.monotonic())
        s["attempts"] += 1
        if not self.quiet and self._live is None:
            again = f" (attempt {s['attempts']})" if s["attempts"] > 1 else ""
            self.console.print(f"[bold]▶ {key}[/bold]{again} on {worker}  [dim]{self.summary()}[/dim]", highlight=False)

    def finished(self, result: CellResult, status: str) -> None:
        s = self.state.setdefault(result.key, {"attempts": 0})
        s.update(state=status, worker=result.worker or s.get("worker", ""), seconds=result.seconds,
                 attempts=max(s.get("attempts", 0), result.attempts))
        if self.quiet:
            return
        mark = {"passed": "[green]✓[/green]", "failed": "[yellow]✗[/yellow]"}.get(status, "[red]✗[/red]")
        detail = f": {result.error}" if result.error else ""
        tries = f", {s['attempts']} attempts" if s["attempts"] > 1 else ""
        self.console.print(f"{mark} {result.key} {status}{detail}  [dim]{result.worker}, {result.seconds:.0f} s"
                           f"{tries}  ({self.summary()})[/dim]", highlight=False)

    def _render(self):
        table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
        for col in ("cell", "state", "worker", "time"):
            table.add_column(col)
        now = time.monotonic()
        shown = [k for k in self.keys if self.state[k]["state"] == "running"]
        shown += [k for k in self.keys if self.state[k]["state"] in ("failed", "error")]
        for k in shown[:30]:
            s = self.state[k]
            t = s["seconds"] if s["seconds"] is not None else (now - s["since"] if s["since"] else 0)
            state = s["state"] + (f" (attempt {s['attempts']})" if s["attempts"] > 1 else "")
            table.add_row(k, state, s["worker"], f"{t:.0f} s")
        return Group(Text(f"{self.title}: {self.summary()}", style="bold"), table)


def _cancel(executor: Executor, cells: list[Cell], results: dict[str, CellResult]) -> None:
    executor.cancel()
    for cell in cells:
        if cell.key not in results and cell.out is not None:
            remove_partials(cell.out)


def run_cells(executor: Executor, cells: list[Cell], progress: MatrixProgress | None = None,
              classify: Callable[[CellResult], str] | None = None,
              on_result: Callable[[CellResult], None] | None = None,
              stop_on_error: bool = False) -> dict[str, CellResult]:
    """Submits `cells`, collects every result (keyed by cell). `classify` names a result's state for the
    progress display (default: passed / error). With `stop_on_error` the first failed cell cancels the rest.
    Ctrl-C cancels every outstanding cell, removes the partial folders of those that did not finish, and
    raises KeyboardInterrupt."""
    classify = classify or (lambda r: "passed" if r.ok else "error")
    results: dict[str, CellResult] = {}
    executor.on_start = progress.started if progress else None
    try:
        for cell in cells:
            executor.submit(cell)
        for r in executor.results():
            results[r.key] = r
            if progress:
                progress.finished(r, classify(r))
            if on_result:
                on_result(r)
            if stop_on_error and not r.ok:
                _cancel(executor, cells, results)
                break
    except KeyboardInterrupt:
        _cancel(executor, cells, results)
        raise
    finally:
        executor.on_start = None
    return results


__all__ = ["Cell", "CellResult", "Executor", "InProcessExecutor", "MatrixProgress", "RayExecutor",
           "cell_resources", "make_executor", "remove_partials", "run_cells", "worker_name"]
