"""The README's library example runs as printed (in a fresh interpreter, from an empty folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_library_example_runs(tmp_path):
    pytest.importorskip("onnxruntime")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    example = next(b for b in blocks if "build(BuildOptions(" in b)
    (tmp_path / "example.py").write_text(example)
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-3  # the fp32 artifact's max |logit error|
    assert (tmp_path / "out" / "onnx" / "manifest.json").is_file()
