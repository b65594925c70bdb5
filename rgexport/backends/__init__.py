"""Backends, one package each, imported only when asked for (their runtimes are optional extras)."""

from __future__ import annotations

import importlib
from pathlib import Path

from rgexport.backends.base import Backend, BuildContext, Recipe, Runner, feed
from rgexport.errors import RgexportError
from rgexport.registry import BACKENDS, backend_names


def get_backend(name: str) -> Backend:
    """The backend called `name`; its runtime library is imported only when a stage needs it."""
    if name not in BACKENDS:
        raise RgexportError(f"Unknown backend {name!r}; expected one of {sorted(BACKENDS)}")
    module_name, cls_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise RgexportError(f"Backend {name!r} is not implemented in this version of rgexport") from None
        raise
    return getattr(module, cls_name)()


def _available() -> dict[str, Backend]:
    out = {}
    for name in BACKENDS:
        try:
            out[name] = get_backend(name)
        except RgexportError:  # not implemented in this version
            continue
    return out


def recipe_names() -> dict[str, list[str]]:
    """Each backend's recipes, its default first (imports every backend module, not their runtimes)."""
    return {name: [b.default_recipe, *[r for r in b.recipes if r != b.default_recipe]]
            for name, b in _available().items()}


def build_base_bytes(name: str) -> int:
    """The backend's peak memory of one build beyond its weights (`Backend.build_base_bytes`); the base
    class's figure for a name that is not a backend."""
    return get_backend(name).build_base_bytes if name in BACKENDS else Backend.build_base_bytes


def device_runtimes() -> dict[str, dict]:
    """Backend -> what its runtime needs on the emulated aarch64 device (`Backend.device_runtime`), for the
    backends that have one."""
    return {name: dict(b.device_runtime) for name, b in _available().items() if b.device_runtime}


def device_modules() -> dict[str, Path]:
    """Backend -> the file of its standalone device-side runner (`Backend.device_module`), where it has one."""
    out = {}
    for name, b in _available().items():
        path = b.device_module_path()
        if path is not None:
            out[name] = path
    return out


def backend_for_file(path: Path) -> Backend | None:
    """The backend whose artifact files end like `path` (`Backend.artifact_suffix`), or None."""
    suffix = Path(path).suffix.lower()
    return next((b for b in _available().values() if b.artifact_suffix == suffix), None)


__all__ = ["BACKENDS", "Backend", "BuildContext", "Recipe", "Runner", "backend_for_file", "backend_names",
           "build_base_bytes", "device_modules", "device_runtimes", "feed", "get_backend", "recipe_names"]
