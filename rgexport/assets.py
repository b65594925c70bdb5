"""Files that ship inside the package: the default model and the JSON schemas."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _package_path(*parts: str) -> Path:
    return Path(str(resources.files("rgexport").joinpath(*parts)))


def shipped_model_dir() -> Path:
    """The tiny Griffin trained by scripts/train_tiny.py, in Hugging Face format."""
    return _package_path("assets", "tiny")


def schema_path(name: str) -> Path:
    return _package_path("schemas", name)
