"""The import path a local Ray hands its workers: the driver's own folders, never one that shadows the
standard library (a worker with onnxruntime's `ort_format_model/types.py` first on its path dies at start)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rgexport.executors import _driver_pythonpath

ROOT = Path(__file__).resolve().parent.parent


def test_library_folders_and_stdlib_shadows_stay_off_the_worker_path(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnxruntime.tools.ort_format_model  # noqa: F401 - appends its own folder to sys.path

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "my_cells.py").write_text("def f():\n    return 1\n")
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "types.py").write_text("")
    monkeypatch.syspath_prepend(str(shadow))
    monkeypatch.syspath_prepend(str(mine))
    assert any(p.endswith("ort_format_model") for p in sys.path)

    path = _driver_pythonpath().split(os.pathsep)
    assert str(ROOT) in path and str(mine) in path
    assert str(shadow) not in path
    assert not [p for p in path if "site-packages" in p], path

    # A fresh interpreter with exactly that PYTHONPATH starts and imports rgexport from this checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    out = subprocess.run([sys.executable, "-c", "import rgexport, my_cells, types; print(rgexport.__file__)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(ROOT)
