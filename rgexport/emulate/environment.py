"""The emulated aarch64 device: qemu-user, an arm64 Python root, the runtime's aarch64 wheels, per-CPU views.

Set up on first use and cached; see the package docstring (`rgexport.emulate`) for the layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.errors import RgexportError

DEVICE = "emulated-arm64"
DEVICES = ("host", DEVICE)
DEFAULT_CPU = "cortex-a76"
QEMU_CPUS = ("cortex-a76", "neoverse-n1", "cortex-a72", "cortex-a57", "cortex-a53", "cortex-a35", "a64fx", "max")
DEBIAN_PACKAGES = ("python3", "libstdc++6")  # apt resolves the rest (libc6, libpython3.X-stdlib, ...)
_READY = ".rgexport-ready.json"


def runtimes() -> dict[str, dict[str, Any]]:
    """Per backend: the distributions its runtime needs on the device and the module the runner imports
    (`Backend.device_runtime`, declared in each backend's package). Versions follow this machine's
    installed ones (the x86 runtime the artifact was validated with); the declared ones are used only where
    a runtime is not installed here."""
    from rgexport.backends import device_runtimes

    return device_runtimes()


# The Features line of /proc/cpuinfo, by HWCAP / HWCAP2 bit (linux/arch/arm64/include/uapi/asm/hwcap.h).
_HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
          "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
_HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
           "svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 "
           "smef16f32 smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16 cssc rprfm sve2p1 sme2 sme2p1 "
           "smei16i32 smebi32i32 smeb16b16 smef16f16").split()
# MIDR fields for the cpuinfo of each model (implementer, variant, part, revision).
_MIDR = {
    "cortex-a35": (0x41, 0x0, 0xD04, 2), "cortex-a53": (0x41, 0x0, 0xD03, 4),
    "cortex-a57": (0x41, 0x1, 0xD07, 1), "cortex-a72": (0x41, 0x0, 0xD08, 3),
    "cortex-a76": (0x41, 0x4, 0xD0B, 1), "neoverse-n1": (0x41, 0x4, 0xD0C, 1),
    "a64fx": (0x46, 0x1, 0x001, 0), "max": (0x41, 0x0, 0xD0C, 0),
}


def cache_root() -> Path:
    base = os.environ.get("RGEXPORT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "rgexport") / DEVICE


class _Steps:
    """Stage lines with rgexport.progress.Stages when given; a quiet no-op otherwise."""

    def __init__(self, stages: Any | None):
        self.stages = stages

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        if self.stages is None:
            yield
            return
        from rgexport.progress import StageFailed

        try:
            with self.stages.stage(name, detail):
                yield
        except StageFailed as e:  # keep our own errors' messages for the user
            raise e.cause from None

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.stages is None:
            yield lambda n=1: None
        else:
            with self.stages.bar(description, total) as advance:
                yield advance


def _run_logged(cmd: Sequence[str], log: Path, what: str, fix: str, env: dict[str, str] | None = None,
                timeout: float | None = None) -> None:
    """Runs a setup command with its output appended to `log`; a failure names the step and the log."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        start = f.tell()
        try:
            proc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout, check=False)
        except FileNotFoundError as e:
            raise RgexportError(f"{what}: {e.filename} not found. {fix}") from None
        except subprocess.TimeoutExpired:
            raise RgexportError(f"{what}: timed out after {timeout:.0f} s (log: {log}). {fix}") from None
    if proc.returncode != 0:
        with open(log, errors="replace") as f:
            f.seek(start)
            output = [line[:300] for line in f.read().strip().splitlines() if "is ignored: it is neither" not in line]
        raise RgexportError(f"{what} failed (exit {proc.returncode}). {fix}\nIts last lines (all in {log}):\n  "
                            + "\n  ".join(output[-8:]))


def _dir_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def host_version(dist: str, default: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist).split("+")[0]
    except PackageNotFoundError:
        return default


# The environment ----------------------------------------------------------------------------------
@dataclasses.dataclass
class ArmEnvironment:
    """A ready emulated aarch64 environment for one runtime and one CPU model."""

    cache: Path
    qemu: Path
    qemu_version: str
    root: Path
    python: Path
    python_version: str
    view: Path
    cpu: str
    site: Path
    runtime: dict[str, str]  # distribution -> version installed for aarch64
    cpu_features: str
    notes: list[str] = dataclasses.field(default_factory=list)

    def command(self, args: Sequence[str]) -> list[str]:
        """argv that runs `python -S args...` as the emulated aarch64 process."""
        return [str(self.qemu), "-cpu", self.cpu, "-L", str(self.view), str(self.python), "-S", *map(str, args)]

    def env(self, threads: int = 1) -> dict[str, str]:
        stubs = self.site / STUBS_DIR
        return ({"LD_LIBRARY_PATH": str(stubs)} if stubs.is_dir() else {}) | {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(self.site),
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
            "HOME": str(self.cache),
            "OMP_NUM_THREADS": str(threads),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }

    def describe(self) -> dict[str, Any]:
        return {
            "device": DEVICE,
            "qemu": self.qemu_version,
            "cpu": self.cpu,
            "cpu_features": self.cpu_features,
            "notes": self.notes,
            "python": self.python_version,
            "runtime": self.runtime,
            "cache": str(self.cache),
        }


def find_qemu() -> Path | None:
    for name in ("qemu-aarch64-static", "qemu-aarch64"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def ensure_qemu(steps: _Steps, log: Path) -> Path:
    qemu = find_qemu()
    if qemu is not None:
        return qemu
    fix = "Install it with: sudo apt-get install qemu-user-static (Debian/Ubuntu), then run again."
    if platform.system() != "Linux":
        raise RgexportError(f"--device {DEVICE} needs Linux with qemu user-mode emulation (qemu-aarch64-static); "
                            f"this is {platform.system()}.")
    if not _is_root() or shutil.which("apt-get") is None:
        raise RgexportError(f"--device {DEVICE} needs qemu-aarch64-static, which is not installed. {fix}")
    with steps.stage("qemu", "apt-get install qemu-user-static"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            _run_logged(["apt-get", "install", "-y", "-q", "qemu-user-static"], log, "apt-get install", fix, env)
        except RgexportError:
            _run_logged(["apt-get", "update", "-q"], log, "apt-get update", fix, env)
            _run_logged(["apt-get", "install", "-y", "-q", "qemu-user-static"], log, "apt-get install", fix, env)
    qemu = find_qemu()
    if qemu is None:
        raise RgexportError(f"qemu-user-static installed but qemu-aarch64-static is not on PATH. {fix}")
    return qemu


def _python_in(root: Path) -> tuple[Path, str] | None:
    found = sorted(root.glob("usr/bin/python3.[0-9]*"), key=lambda p: [int(x) for x in p.name[6:].split(".")
                                                                         if x.isdigit()])
    found = [p for p in found if re.fullmatch(r"python3\.\d+", p.name)]
    return (found[-1], found[-1].name.removeprefix("python")) if found else None


def ensure_root(cache: Path, steps: _Steps, log: Path) -> tuple[Path, Path, str]:
    """The arm64 Python root: Debian's arm64 packages unpacked with dpkg -x."""
    root = cache / "root"
    ready = root / _READY
    if ready.is_file() and (py := _python_in(root)):
        return root, py[0], py[1]
    fix = ("It needs apt-get and dpkg-deb (Debian or a Debian-based system whose apt sources serve arm64 "
           "packages, e.g. deb.debian.org) and network access to them.")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RgexportError(f"Setting up {DEVICE} needs {tool}, which is not here. {fix}")
    work = Path(tempfile.mkdtemp(prefix="root.partial-", dir=cache))
    apt = work / "apt"
    for d in ("lists/partial", "cache/archives/partial"):
        (apt / d).mkdir(parents=True)
    (apt / "status").touch()
    opts = [
        "-oAPT::Architecture=arm64", "-oAPT::Architectures::=arm64",
        f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::State::status={apt / 'status'}",
        f"-oDir::Cache={apt / 'cache'}", "-oDebug::NoLocking=1", "-q",
    ]
    try:
        with steps.stage("arm64 lists", "apt-get update with arm64 options and a private state folder"):
            _run_logged(["apt-get", *opts, "update"], log, "apt-get update for arm64", fix)
        with steps.stage("arm64 packages", f"apt-get --download-only {' '.join(DEBIAN_PACKAGES)}"):
            _run_logged(["apt-get", *opts, "install", "-y", "--download-only", "--no-install-recommends",
                         *DEBIAN_PACKAGES], log, "downloading arm64 packages", fix)
        debs = sorted((apt / "cache" / "archives").glob("*.deb"))
        if not debs:
            raise RgexportError(f"apt-get downloaded no arm64 packages (log: {log}). {fix}")
        tree = work / "root"
        tree.mkdir()
        with steps.stage("arm64 root", f"dpkg-deb -x {len(debs)} packages"):
            for deb in debs:
                _run_logged(["dpkg-deb", "-x", deb, tree], log, f"unpacking {deb.name}", fix)
        py = _python_in(tree)
        if py is None:
            raise RgexportError(f"The arm64 packages hold no usr/bin/python3.X (log: {log}). {fix}")
        # Empty dist-packages folders shadow the host's (x86) ones should anything look there.
        for d in ("usr/lib/python3/dist-packages", f"usr/local/lib/python{py[1]}/dist-packages"):
            (tree / d).mkdir(parents=True, exist_ok=True)
        (tree / _READY).write_text(json.dumps({"packages": [d.name for d in debs], "created": time.time()}))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tree, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    py = _python_in(root)
    assert py is not None
    return root, py[0], py[1]


def _glibc_minor(root: Path) -> int:
    """glibc 2.N of the root (from the libc6 package it was unpacked from): wheels up to manylinux_2_N fit."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        for name in json.loads((root / _READY).read_text())["packages"]:
            if m := re.match(r"libc6_2\.(\d+)", name):
                return int(m.group(1))
    return 28


def ensure_site(
    cache: Path, root: Path, python_version: str, backend: str, steps: _Steps, log: Path,
) -> tuple[Path, dict[str, str]]:
    """aarch64 wheels of `backend`'s runtime in their own folder (pip install --target --platform)."""
    known = runtimes()
    if backend not in known:
        raise RgexportError(f"--device {DEVICE} runs {', '.join(sorted(known))} artifacts; this one is {backend}")
    spec = known[backend]
    versions = {d: host_version(d, v) for d, v in spec["dists"].items()}
    numpy_version = np.__version__
    name = "-".join(f"{d}-{v}" for d, v in versions.items()) + f"-numpy-{numpy_version}-py{python_version}"
    site = cache / "site" / name
    if (site / _READY).is_file():
        return site, versions | {"numpy": numpy_version}
    site.parent.mkdir(parents=True, exist_ok=True)
    minor = _glibc_minor(root)
    platforms = [f"manylinux_2_{m}_aarch64" for m in range(minor, 16, -1)] + ["manylinux2014_aarch64", "linux_aarch64"]
    nodot = python_version.replace(".", "")
    reqs = [f"{d}=={v}" for d, v in versions.items()] + [f"numpy=={numpy_version}"]
    extras = [f"{d}=={host_version(d, v)}" for d, v in spec.get("extras", {}).items()]
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.partial-", dir=site.parent))
    fix = (f"It needs pip and access to PyPI's aarch64 wheels of {', '.join(reqs)} for Python {python_version} "
           f"(see {log}).")
    try:
        with steps.stage("arm64 wheels", " ".join(reqs)):
            _run_logged(
                [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-warn-conflicts",
                 "--no-input", "--target", tmp, "--only-binary=:all:", "--python-version", python_version,
                 "--implementation", "cp", "--abi", f"cp{nodot}", "--abi", "abi3", "--abi", "none",
                 *[a for p in platforms for a in ("--platform", p)],
                 *(["--no-deps"] if spec.get("no_deps") else []), *reqs, *extras],
                log, f"pip install of the aarch64 {backend} runtime", fix,
            )
        if spec.get("cuda_stubs"):
            with steps.stage("cuda stubs", "aarch64 stand-ins for the CUDA libraries torch links"):
                stubs = _build_cuda_stubs(tmp, root, tmp / STUBS_DIR, log, spec["cuda_stubs"])
            (tmp / STUBS_DIR / "README").write_text(
                "Stand-ins for CUDA libraries that PyPI's aarch64 torch links but the CPU path never calls; "
                "every function returns 100 (cudaErrorNoDevice). Written by rgexport.emulate.\n" + "\n".join(stubs)
            )
        (tmp / _READY).write_text(json.dumps({"requirements": reqs + extras, "created": time.time()}))
        if site.exists():
            shutil.rmtree(site)
        os.replace(tmp, site)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return site, versions | {"numpy": numpy_version}


STUBS_DIR = "_cuda_stubs"


def _ensure_cross_binutils(log: Path) -> None:
    tools = ("readelf", "aarch64-linux-gnu-as", "aarch64-linux-gnu-ld")
    if all(shutil.which(t) for t in tools):
        return
    fix = "Install them with: sudo apt-get install binutils binutils-aarch64-linux-gnu"
    if not _is_root() or shutil.which("apt-get") is None:
        missing = [t for t in tools if not shutil.which(t)]
        raise RgexportError(f"ExecuTorch on {DEVICE} needs {', '.join(missing)} to link CUDA stand-ins. {fix}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run_logged(["apt-get", "install", "-y", "-q", "binutils", "binutils-aarch64-linux-gnu"], log,
                "apt-get install binutils-aarch64-linux-gnu", fix, env)


def _readelf(args: Sequence[str | Path]) -> str:
    return subprocess.run(["readelf", "-W", *map(str, args)], capture_output=True, text=True, check=False).stdout


def _build_cuda_stubs(site: Path, root: Path, out: Path, log: Path, spec: dict[str, Any]) -> list[str]:
    """Links an aarch64 stand-in for every library that the runtime's extensions (`spec["extensions"]`,
    globs under `site`: torch's and ExecuTorch's) need but that is not here (libcudart.so.13,
    libcublas.so.13, ...), defining the symbols they import from it with the versions they ask for.
    Returns the libraries written."""
    _ensure_cross_binutils(log)
    libdirs = [*(site / d for d in spec["lib_dirs"]), root / "lib" / "aarch64-linux-gnu",
               root / "usr" / "lib" / "aarch64-linux-gnu"]
    start = [f for pattern in spec["extensions"] for f in site.glob(pattern)]

    def find(name: str) -> Path | None:
        return next((d / name for d in libdirs if (d / name).exists()), None)

    seen: dict[str, Path] = {}
    missing: set[str] = set()
    todo = list(start)
    while todo:
        f = todo.pop()
        if str(f) in seen:
            continue
        seen[str(f)] = f
        for name in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", _readelf(["-d", f])):
            found = find(name)
            if found is None:
                missing.add(name)
            else:
                todo.append(found)
    if not missing:
        return []
    python = _python_in(root)
    defined: set[str] = set()
    symbols_of = {}
    for f in [*seen.values(), *([python[0]] if python else [])]:
        rows = [line.split() for line in _readelf(["--dyn-syms", f]).splitlines()]
        symbols_of[f] = rows = [r for r in rows if len(r) >= 8 and r[0].endswith(":")]
        defined |= {r[7].split("@")[0] for r in rows if r[6] != "UND"}
    version_file: dict[str, str] = {}
    for f in seen.values():
        current = None
        for line in _readelf(["-V", f]).splitlines():
            if m := re.search(r"File: (\S+)\s+Cnt", line):
                current = m.group(1)
            elif (m := re.search(r"Name: (\S+)\s+Flags", line)) and current:
                version_file[m.group(1)] = current
    versioned: dict[str, dict[str, dict[str, str]]] = {lib: {} for lib in missing}  # lib -> version -> sym -> type
    unversioned: dict[str, str] = {}
    for f in seen.values():
        for r in symbols_of[f]:
            if r[6] != "UND":
                continue
            name, kind, bind = r[7], r[3], r[4]
            if "@" in name:
                sym, version = name.split("@")[0], name.split("@")[-1]
                lib = version_file.get(version)
                if lib in versioned:
                    versioned[lib].setdefault(version, {})[sym] = kind
            elif bind != "WEAK" and name not in defined:
                unversioned[name] = kind  # e.g. NCCL and cuFile symbols: any stand-in may define them
    out.mkdir(parents=True, exist_ok=True)
    for lib in sorted(missing):
        symbols = dict(unversioned)
        for table in versioned[lib].values():
            symbols.update(table)
        text, data = [".text"], [".data"]
        for sym, kind in sorted(symbols.items()):
            if kind == "OBJECT":
                data += [f".globl {sym}", f".type {sym},%object", f".size {sym},64", f"{sym}:", ".zero 64"]
            else:
                text += [f".globl {sym}", f".type {sym},%function", f"{sym}:", "mov w0, #100", "ret"]
        asm, obj, vmap = out / f"{lib}.s", out / f"{lib}.o", out / f"{lib}.map"
        asm.write_text("\n".join(text + data) + "\n")
        nodes = list(versioned[lib]) or [lib]
        own = {s for t in versioned[lib].values() for s in t}
        lines = []
        for i, version in enumerate(nodes):
            names = sorted(versioned[lib].get(version, {})) + (sorted(set(unversioned) - own) if i == 0 else [])
            lines.append(f"{version} {{ global: {' '.join(n + ';' for n in names)} }};")
        vmap.write_text("\n".join(lines) + "\n")
        fix = "Check that binutils-aarch64-linux-gnu works."
        _run_logged(["aarch64-linux-gnu-as", asm, "-o", obj], log, f"assembling the {lib} stand-in", fix)
        _run_logged(["aarch64-linux-gnu-ld", "-shared", "-soname", lib, "--version-script", vmap, "-o", out / lib, obj],
                    log, f"linking the {lib} stand-in", fix)
        for p in (asm, obj, vmap):
            p.unlink()
    return sorted(missing)


def _probe_hwcaps(qemu: Path, cpu: str, root: Path, python: Path) -> tuple[int, int]:
    code = ("import ctypes;l=ctypes.CDLL(None);f=l.getauxval;f.restype=ctypes.c_ulong;f.argtypes=[ctypes.c_ulong];"
            "print(f(16),f(26))")
    proc = subprocess.run([str(qemu), "-cpu", cpu, "-L", str(root), str(python), "-S", "-c", code],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                          timeout=300, check=False)
    if proc.returncode != 0:
        raise RgexportError(f"The arm64 Python does not start under {qemu.name} -cpu {cpu}: "
                            f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    hwcap, hwcap2 = (int(x) for x in proc.stdout.split())
    return hwcap, hwcap2


def cpuinfo_text(cpu: str, hwcap: int, hwcap2: int, processors: int) -> str:
    """An aarch64 /proc/cpuinfo in Linux's format for `processors` cores of model `cpu`."""
    features = [n for i, n in enumerate(_HWCAP) if hwcap >> i & 1]
    features += [n for i, n in enumerate(_HWCAP2) if hwcap2 >> i & 1]
    implementer, variant, part, revision = _MIDR.get(cpu.split(",")[0], _MIDR["max"])
    entries = [
        f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {' '.join(features)}\n"
        f"CPU implementer\t: 0x{implementer:02x}\nCPU architecture: 8\nCPU variant\t: 0x{variant:x}\n"
        f"CPU part\t: 0x{part:03x}\nCPU revision\t: {revision}\n"
        for i in range(processors)
    ]
    return "\n".join(entries) + "\n"


def ensure_view(cache: Path, root: Path, python: Path, qemu: Path, cpu: str, steps: _Steps) -> tuple[Path, str]:
    """root/ as seen by one CPU model: symlinks to root's top folders plus an Arm proc/cpuinfo."""
    view = cache / "views" / cpu
    info = view / _READY
    if info.is_file():
        return view, json.loads(info.read_text())["features"]
    with steps.stage("arm cpuinfo", f"-cpu {cpu}"):
        hwcap, hwcap2 = _probe_hwcaps(qemu, cpu, root, python)
        processors = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        text = cpuinfo_text(cpu, hwcap, hwcap2, max(processors, 1))
        tmp = Path(tempfile.mkdtemp(prefix=f"{cpu}.partial-", dir=cache))
        try:
            for entry in root.iterdir():
                if entry.name not in ("proc", _READY):
                    os.symlink(os.path.relpath(entry, view), tmp / entry.name)
            (tmp / "proc").mkdir()
            (tmp / "proc" / "cpuinfo").write_text(text)
            features = text.split("Features\t: ", 1)[1].split("\n", 1)[0]
            (tmp / _READY).write_text(json.dumps({"cpu": cpu, "hwcap": hwcap, "hwcap2": hwcap2, "features": features}))
            view.parent.mkdir(parents=True, exist_ok=True)
            if view.exists():
                shutil.rmtree(view)
            os.replace(tmp, view)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return view, features


def effective_cpu(cpu: str, qemu_version: str) -> tuple[str, list[str]]:
    """The -cpu value to run with, and why it differs from the one asked for.

    qemu 7.2's SME emulation (its first) computes wrong results: LiteRT 2.3.0's int8 model under
    `-cpu max` was off by up to 21 in logits (top-1 77% against x86) while `max,sme=off`, every other
    model and `-cpu max` under qemu 10.0 agree with x86 to 0.16 (notes/emulate.md). So SME stays off
    for `max` on qemu < 8.
    """
    m = re.search(r"version (\d+)\.", qemu_version)
    if cpu.split(",")[0] == "max" and "sme=" not in cpu and m and int(m.group(1)) < 8:
        return cpu + ",sme=off", [f"-cpu {cpu} runs as {cpu},sme=off: the SME emulation of qemu {m.group(1)}.x "
                                  "gives wrong results (use qemu >= 8 for SME)"]
    return cpu, []


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_environment(backend: str, cpu: str = DEFAULT_CPU, stages: Any | None = None) -> ArmEnvironment:
    """Sets up (first use) or finds (cached) everything to run `backend`'s runtime on emulated aarch64."""
    if cpu.split(",")[0] not in QEMU_CPUS:
        raise RgexportError(f"Unknown emulated CPU {cpu!r}; choose one of {', '.join(QEMU_CPUS)} "
                            "(qemu options may follow, e.g. max,sve=off)")
    known = runtimes()
    if backend not in known:
        raise RgexportError(
            f"--device {DEVICE} runs {' and '.join(sorted(known))} artifacts; {backend} has no aarch64 "
            "runtime set up here (see notes/emulate.md)"
        )
    steps = _Steps(stages)
    cache = cache_root()
    with _locked(cache):
        log = cache / "setup.log"
        fresh = not (cache / "root" / _READY).is_file()
        if fresh and stages is not None and not getattr(stages, "quiet", False):
            stages.console.print(f"[bold]Setting up {DEVICE}[/bold] in {cache} (first use; cached afterwards; "
                                 f"log: {log})")
        qemu = ensure_qemu(steps, log)
        version = subprocess.run([str(qemu), "--version"], capture_output=True, text=True, check=False).stdout
        qemu_version = version.splitlines()[0].strip() if version else "unknown"
        cpu, notes = effective_cpu(cpu, qemu_version)
        root, python, python_version = ensure_root(cache, steps, log)
        site, runtime = ensure_site(cache, root, python_version, backend, steps, log)
        view, features = ensure_view(cache, root, python, qemu, cpu, steps)
        env = ArmEnvironment(cache, qemu, qemu_version, root, python, python_version, view, cpu, site, runtime,
                             features, notes)
        marker = site / f".smoke-{cpu}"
        if not marker.is_file():
            module = known[backend]["module"]
            with steps.stage("smoke test", f"import {module} on emulated {cpu}"):
                proc = subprocess.run(env.command(["-c", f"import {module}, numpy; print('ok')"]), env=env.env(),
                                      capture_output=True, text=True, timeout=600, check=False)
                if proc.returncode != 0 or "ok" not in proc.stdout:
                    raise RgexportError(
                        f"The aarch64 {module} does not load under {qemu.name} -cpu {cpu}: "
                        f"{(proc.stderr or proc.stdout).strip()[-800:]}"
                    )
            marker.touch()
    return env


def cache_report() -> dict[str, Any]:
    """Sizes of the cached parts, in bytes."""
    cache = cache_root()
    out = {"cache": str(cache)}
    if not cache.exists():
        return out
    out["root"] = _dir_bytes(cache / "root")
    for site in sorted((cache / "site").glob("*")):
        out[f"site/{site.name}"] = _dir_bytes(site)
    return out


