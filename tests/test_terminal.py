"""A build's terminal: rgexport's own lines only; what other libraries print lands in build.log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rgexport.build import BUILD_LOG, BuildOptions, build, failed_log_path

# Every line a build may print: a stage (and a part of one), the validation report, the closing summary, the
# output path.
RGEXPORT_LINE = re.compile(
    r"^(✓ |✗ |  · |tflite / fp32: (PASSED|FAILED)|  (logits|agreement|perplexity|greedy|state|build|FAIL) |"
    r"\S*tfl  \()")


def test_tflite_build_prints_only_rgexport_lines(tmp_path):
    pytest.importorskip("litert_torch")
    out = tmp_path / "tfl"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "rgexport", "build", "--target", "tflite", "--out", str(out),
                           "--tokens", "64"], capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    assert proc.returncode == 0, proc.stderr[-3000:]
    foreign = [line for line in lines if not RGEXPORT_LINE.match(line)]
    assert foreign == [], foreign
    assert len(lines) <= 20, lines
    assert [line.split()[1] for line in lines if line.startswith("✓ ")] == [
        "load", "model", "prepare", "export", "lower", "write", "validate", "manifest"]
    summary = next(line for line in lines if line.startswith("  build "))
    assert "peak RSS" in summary and str(out / BUILD_LOG) in summary
    # What the converter printed is in the log, not lost: its progress lines and Python warnings.
    log = (out / BUILD_LOG).read_text()
    assert "LiteRT-Torch Convert" in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["peak_rss_bytes"] > 100 * 2**20


def test_a_failed_build_keeps_its_log_beside_the_output(tmp_path, monkeypatch):
    """A stage that breaks inside a library: the partial folder goes, the log of what the libraries printed
    and the traceback stay beside the output and the error names it. A user error leaves nothing behind."""
    pytest.importorskip("onnxruntime")
    from rgexport.backends.onnx import OnnxBackend
    from rgexport.build import BuildError

    def broken_export(self, prepared, ctx):
        os.write(2, b"native noise from the exporter\n")
        raise RuntimeError("the exporter broke")

    monkeypatch.setattr(OnnxBackend, "export", broken_export)
    out = tmp_path / "bad"
    with pytest.raises(BuildError, match="stage 'export'.*the exporter broke.*bad.failed-build.log") as e:
        build(BuildOptions(backend="onnx", recipe="fp32", out=out, log_output=True))
    assert not out.exists() and not list(tmp_path.glob(".bad.partial-*"))
    assert e.value.log == failed_log_path(out)
    kept = failed_log_path(out).read_text()
    assert "native noise from the exporter" in kept
    # Where it broke, for the report: the traceback ends the log, down to the raising frame.
    tail = kept[kept.index("The build failed here:"):]
    assert "Traceback" in tail and "in broken_export" in tail and tail.rstrip().endswith("the exporter broke")

    other = tmp_path / "user-error"
    with pytest.raises(Exception, match="calibration"):
        build(BuildOptions(backend="onnx", recipe="w8a8", out=other, calibration=tmp_path / "missing.txt",
                           log_output=True))
    assert not failed_log_path(other).exists() and not list(tmp_path.glob(".user-error.partial-*"))


def test_native_output_goes_to_the_log(tmp_path):
    """File-descriptor level: what C code writes to fds 1 and 2 is captured, not only sys.stdout."""
    from rgexport.logs import captured

    log = tmp_path / "x.log"
    code = ("import os, sys; from pathlib import Path; from rgexport.logs import captured\n"
            f"with captured(Path({str(log)!r})) as term:\n"
            "    os.write(1, b'native out\\n'); os.write(2, b'native err\\n'); print('python out')\n"
            "    import warnings; warnings.warn('library warning')\n"
            "    term.write('rgexport line\\n')\n"
            "print('after')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "rgexport line" and proc.stdout.strip() == "after"
    text = Path(log).read_text()
    assert all(s in text for s in ("native out", "native err", "python out", "library warning"))
    with captured(None) as stream:  # --verbose: nothing captured
        assert stream is sys.stderr


def test_held_back_drops_native_output_unless_the_block_fails(capfd, tmp_path, monkeypatch):
    """run/chat hold the runtimes' load-time lines back (fds 1 and 2): gone when loading succeeds, shown
    when it fails, and no file is left anywhere."""
    import tempfile

    from rgexport.logs import held_back

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a temporary file would appear
    before = set(os.listdir(tmp_path))
    with held_back():
        os.write(1, b"native stdout line\n")
        os.write(2, b"native stderr line\n")
    out, err = capfd.readouterr()
    assert "native" not in out + err
    with pytest.raises(RuntimeError), held_back():
        os.write(2, b"what a failed load printed\n")
        raise RuntimeError("load failed")
    assert "what a failed load printed" in capfd.readouterr().err
    with held_back(enabled=False):
        os.write(1, b"verbose line\n")
    assert "verbose line" in capfd.readouterr().out
    assert set(os.listdir(tmp_path)) == before
