"""Files that ship inside the package: the default model, JSON schemas, target profiles, texts.

`targets/` and `calibration/` sit at the top of the repository and install as the packages
`rgexport.targets` and `rgexport.calibration`, so the same code finds them in a checkout and a wheel.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
_DATA_FOLDERS = {"rgexport.targets": "targets", "rgexport.calibration": "calibration"}


def _package_path(package: str, *parts: str) -> Path:
    try:
        return Path(str(resources.files(package).joinpath(*parts)))
    except ModuleNotFoundError:
        # A checkout or an editable install: the data folder sits at the top of the repository.
        if package not in _DATA_FOLDERS:
            raise
        return _REPO_ROOT.joinpath(_DATA_FOLDERS[package], *parts)


def shipped_model_dir() -> Path:
    """The tiny Griffin trained by scripts/train_tiny.py, in Hugging Face format."""
    return _package_path("rgexport", "assets", "tiny")


def schema_path(name: str) -> Path:
    return _package_path("rgexport", "schemas", name)


def thresholds_path() -> Path:
    return _package_path("rgexport", "thresholds.toml")


def targets_dir() -> Path:
    return _package_path("rgexport.targets")


def corpus_path(name: str) -> Path:
    """calibration/corpus/<name>: heldout.txt (evaluation) or calibration.txt (quantisation)."""
    return _package_path("rgexport.calibration", "corpus", name)
