"""Fuzz: bad flags and outputs on every command, run and chat included (unknown targets and recipes, values
out of range, sampling options, non-UTF-8 text, a bundle's artifact that is not there, an --out or --report
that is a file, impossible or an earlier output), signals during a build, and the error boundary itself (a
bug: one line and a crash file). See fuzzing.py for what every case asserts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

TOML_BAD_BACKEND = 'name = "x"\n[[artifacts]]\nbackend = "tensorrt"\n'

# (args, exit status, what the error line says). `{root}`, `{prior}`, `{file}`, `{shipped}` are filled in.
CASES = {
    "build-unknown-target": (["build", "--target", "nokia"], 2, r"'nokia' is not a backend.*ios"),
    "build-unknown-recipe": (["build", "--target", "onnx", "--recipe", "int3"], 1, r"no recipe 'int3'.*fp32"),
    "build-unknown-option": (["build", "--target", "onnx", "-O", "bad=1"], 1, r"has no option bad"),
    "build-option-no-value": (["build", "--target", "onnx", "-O", "fuse"], 1, r"--option takes KEY=VALUE"),
    "build-profile-recipe": (["build", "--target", "android", "--recipe", "int8"], 1, r"--recipe applies to one"),
    "build-profile-option": (["build", "--target", "android", "-O", "a=1"], 1, r"--option applies to one"),
    "build-archive-backend": (["build", "--target", "onnx", "--archive"], 1, r"--archive applies to bundles"),
    "build-profile-missing": (["build", "--target", "{root}/none.toml"], 1, r"Cannot read target profile"),
    "build-profile-not-toml": (["build", "--target", "{file}"], 1, r"is not valid TOML"),
    "build-profile-bad-backend": (["build", "--target", "{badtoml}"], 1, r"artifacts\[0\]\.backend is 'tensorrt'"),
    "build-random-no-preset": (["build", "--target", "onnx", "--random-weights"], 1, r"needs --preset"),
    "build-prefill-chunk-zero": (["build", "--target", "onnx", "--prefill-chunk", "0"], 2, r"--prefill-chunk"),
    "build-prefill-chunk-big": (["build", "--target", "onnx", "--prefill-chunk", "999", "--out", "{root}/o/a"], 1,
                                r"--prefill-chunk must be between 1 and the window \(128\)"),
    "build-tokens-zero": (["build", "--target", "onnx", "--tokens", "0"], 2, r"Invalid value for '--tokens'"),
    "build-out-a-file": (["build", "--target", "onnx", "--out", "{file}"], 1, r"already exists; pass --force"),
    "build-out-a-file-force": (["build", "--target", "onnx", "--out", "{file}", "--force"], 1,
                               r"exists and is not an rgexport artifact folder"),
    "build-out-under-a-file": (["build", "--target", "onnx", "--out", "{file}/sub"], 1, r"is a file, not a folder"),
    "build-out-impossible": (["build", "--target", "onnx", "--out", "/proc/rgexport-fuzz/out"], 1,
                             r"cannot create the folder that would hold --out"),
    "build-out-prior": (["build", "--target", "onnx", "--out", "{prior}"], 1, r"already exists; pass --force"),
    "build-out-prior-force-bad-ckpt": (["build", "--target", "onnx", "--out", "{prior}", "--force", "--checkpoint",
                                        "{root}/none"], 1, r"does not exist; .*prior is untouched"),
    "build-out-folder-force": (["build", "--target", "onnx", "--out", "{root}/cwd", "--force"], 1,
                               r"is not an rgexport artifact folder; refusing"),
    "build-bad-calibration": (["build", "--target", "onnx", "--recipe", "w8a8", "--calibration", "{binary}", "--out",
                               "{root}/o/b"], 1, r"calibration text .* is not UTF-8"),
    "build-bundle-out-a-file": (["build", "--target", "{goodtoml}", "--out", "{file}"], 1, r"already exists"),
    "evaluate-unknown-recipe": (["evaluate", "--recipe", "int3", "--out", "{root}/o/e1"], 1,
                                r"Unknown recipe\(s\) \['int3'\].*fp32"),
    "evaluate-recipe-of-another-backend": (["evaluate", "--target", "onnx", "--recipe", "palette4", "--out",
                                            "{root}/o/e2"], 1, r"Unknown recipe\(s\) \['palette4'\] for onnx"),
    "evaluate-alias-of-another-backend": (["evaluate", "--target", "onnx", "--recipe", "a8w8", "--out",
                                           "{root}/o/e6"], 1, r"Unknown recipe\(s\) \['a8w8'\] for onnx"),
    "evaluate-unknown-target": (["evaluate", "--target", "nokia", "--out", "{root}/o/e3"], 2,
                                r"'nokia' is not a backend"),
    "evaluate-unknown-target-old-name": (["evaluate", "--targets", "nokia", "--out", "{root}/o/e4"], 2,
                                         r"'nokia' is not a backend"),
    "evaluate-profile-bad-backend": (["evaluate", "--target", "{badtoml}", "--out", "{root}/o/e5"], 1,
                                     r"artifacts\[0\]\.backend is 'tensorrt'"),
    "evaluate-out-a-file": (["evaluate", "--out", "{file}"], 1, r"--out .* is a file, not a folder"),
    "evaluate-tokens-small": (["evaluate", "--tokens", "1"], 2, r"--tokens"),
    "bench-no-paths": (["bench"], 2, r"Missing argument"),
    "bench-missing-path": (["bench", "{root}/none", "--no-memory"], 1, r"has no manifest\.json"),
    "bench-report-a-file": (["bench", "{prior}", "--report", "{file}"], 1, r"--report .* is a file"),
    "bench-steps-small": (["bench", "{prior}", "--steps", "1"], 2, r"--steps"),
    "bench-old-tokens-small": (["bench", "{prior}", "--tokens", "1"], 2, r"--tokens"),
    "bench-threads-zero": (["bench", "{prior}", "--threads", "0"], 2, r"--threads"),
    "generate-temperature-tiny": (["generate", "--prompt", "x", "--temperature", "1e-300"], 1,
                                  r"--temperature is 1e-300; use 0 \(greedy\) or a value from 0\.001"),
    "generate-temperature-negative": (["generate", "--prompt", "x", "--temperature", "-1"], 2, r"--temperature"),
    "generate-temperature-nan": (["generate", "--prompt", "x", "--temperature", "nan"], 2, r"--temperature"),
    "generate-temperature-inf": (["generate", "--prompt", "x", "--temperature", "inf"], 1, r"--temperature is inf"),
    "generate-temperature-huge": (["generate", "--prompt", "x", "--temperature", "1000"], 1, r"--temperature is 1000"),
    "generate-top-k-above-vocab": (["generate", "--prompt", "x", "--temperature", "1", "--top-k", "99999"], 1,
                                   r"--top-k is 99999; use 0 \(all tokens\) or at most the vocabulary \(4096\)"),
    "generate-top-k-negative": (["generate", "--prompt", "x", "--top-k", "-1"], 2, r"--top-k"),
    "generate-max-tokens-zero": (["generate", "--prompt", "x", "--max-tokens", "0"], 2, r"--max-tokens"),
    "generate-non-utf8-prompt": (["generate", "--prompt", "caf\udce9 au lait"], 1,
                                 r"--prompt holds bytes that are not UTF-8 \(byte 0xe9 at character 3\)"),
    "generate-no-prompt": (["generate"], 2, r"Missing option '--prompt'"),
    "generate-checkpoint-missing": (["generate", "--prompt", "x", "--checkpoint", "{root}/none"], 1,
                                    r"does not exist"),
    "run-missing-artifact": (["run", "{root}/none", "--prompt", "x"], 1,
                             r"none does not exist: pass an artifact folder"),
    "run-a-file": (["run", "{file}", "--prompt", "x"], 1, r"a-file is a file, not an artifact"),
    "run-no-prompt": (["run", "{prior}"], 2, r"Missing option '--prompt'"),
    "run-empty-prompt": (["run", "{prior}", "--prompt", ""], 1, r"the prompt is empty"),
    "run-non-utf8-prompt": (["run", "{prior}", "--prompt", "caf\udce9"], 1, r"--prompt holds bytes that are not UTF-8"),
    "run-non-utf8-stop": (["run", "{prior}", "--prompt", "x", "--stop", "\udcff"], 1,
                          r"--stop holds bytes that are not UTF-8"),
    "run-max-tokens-zero": (["run", "{prior}", "--prompt", "x", "--max-tokens", "0"], 2, r"--max-tokens"),
    "run-temperature-nan": (["run", "{prior}", "--prompt", "x", "--temperature", "nan"], 2, r"--temperature"),
    "run-temperature-tiny": (["run", "{prior}", "--prompt", "x", "--temperature", "1e-300"], 1,
                             r"--temperature is 1e-300"),
    "run-top-k-above-vocab": (["run", "{prior}", "--prompt", "x", "--temperature", "1", "--top-k", "99999"], 1,
                              r"--top-k is 99999; use 0 \(all tokens\) or at most the vocabulary \(4096\)"),
    "run-top-p-zero": (["run", "{prior}", "--prompt", "x", "--top-p", "0"], 1, r"--top-p must be in \(0, 1\]"),
    "run-threads-zero": (["run", "{prior}", "--prompt", "x", "--threads", "0"], 2, r"--threads"),
    "run-artifact-on-an-artifact": (["run", "{prior}", "--prompt", "x", "--artifact", "onnx"], 1, r"not a bundle"),
    "run-artifact-not-in-bundle": (["run", "{bundle}", "--prompt", "x", "--artifact", "tflite"], 1, r"tflite"),
    "chat-missing-artifact": (["chat", "{root}/none"], 1, r"none does not exist: pass an artifact folder"),
    "chat-top-p-big": (["chat", "{prior}", "--top-p", "1.5"], 1, r"--top-p must be in \(0, 1\]"),
    "chat-top-k-above-vocab": (["chat", "{prior}", "--temperature", "1", "--top-k", "99999"], 1,
                               r"--top-k is 99999"),
    "chat-artifact-not-in-bundle": (["chat", "{bundle}", "--artifact", "coreml"], 1, r"coreml"),
    "info-unknown-preset": (["info", "--preset", "gpt-9"], 1, r"Unknown preset 'gpt-9'"),
    "info-missing-path": (["info", "{root}/none"], 1, r"has no manifest\.json"),
    "info-missing-onnx": (["info", "{root}/none.onnx"], 1, r"none\.onnx does not exist"),
    "targets-bad-flag": (["targets", "--bogus"], 2, r"No such option"),
    "unknown-command": (["frobnicate"], 2, r"No such command"),
    "validate-no-path": (["validate"], 2, r"Missing argument"),
    "validate-unknown-device": (["validate", "{prior}", "--device", "phone"], 2,
                                r"'phone' is not one of 'emulated-arm64', 'browser'"),
    "validate-memory-multiple-zero": (["validate", "{prior}", "--memory-multiple", "0"], 2, r"--memory-multiple"),
    "verbose-still-one-line": (["--verbose", "info", "--preset", "gpt-9"], 1, r"Unknown preset"),
}


@pytest.fixture(scope="module")
def places(sandbox) -> dict[str, str]:
    d = sandbox.case("flags")
    (d / "a-file").write_text("not an output folder\n")
    (d / "bad.toml").write_text(TOML_BAD_BACKEND)
    (d / "good.toml").write_text('name = "g"\n[[artifacts]]\nbackend = "onnx"\nrecipe = "fp32"\n')
    (d / "binary.txt").write_bytes(b"caf\xe9\xff\xfe" * 100)
    (d / "nottoml.toml").write_text("[[[ not toml\n")
    return {"root": str(sandbox.root), "prior": str(sandbox.prior), "file": str(d / "a-file"),
            "badtoml": str(d / "bad.toml"), "goodtoml": str(d / "good.toml"), "binary": str(d / "binary.txt"),
            "shipped": str(sandbox.shipped), "nottoml": str(d / "nottoml.toml"), "bundle": str(sandbox.bundle)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flag(sandbox, places, case):
    args, code, match = CASES[case]
    if case == "build-profile-not-toml":
        args = ["build", "--target", "{nottoml}"]
    filled = [a.format(**places) if "{" in a else a for a in args]
    sandbox.run(filled, code=code, match=match, check_prior="{prior}" in " ".join(args))


# Signals: a real build in a child process, stopped once its hidden partial folder exists.
@pytest.mark.isolated  # timing-sensitive under load: run in its own process (-m isolated)
@pytest.mark.parametrize("sig, code, text", [(signal.SIGTERM, 143, "error: terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_signal_during_build(sandbox, sig, code, text):
    d = sandbox.case(f"signal-{sig.name}")
    out = d / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TMPDIR": str(d)}
    proc = subprocess.Popen([sys.executable, "-m", "rgexport", "build", "--target", "onnx", "--out", str(out),
                             "--no-validate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(d.glob(".out.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(d.glob(".out.partial-*")), "the build never started writing"
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert text in stderr and "Traceback" not in stderr, stderr
    assert sum(line.startswith("error:") for line in stderr.splitlines()) == (1 if code == 143 else 0), stderr
    assert sorted(p.name for p in d.iterdir()) == [], "a partial folder or an output was left behind"


# The boundary itself: a bug is one line and a crash file (the traceback only with --verbose).
def _invoke(args: list[str], cache: Path):
    from rgexport.cli import app

    return CliRunner().invoke(app, args, env={"RGEXPORT_CACHE": str(cache)})


def test_a_bug_is_one_line_and_a_crash_file(monkeypatch, tmp_path):
    import rgexport.info

    def broken(config):
        raise ZeroDivisionError("a bug nobody anticipated")

    monkeypatch.setattr(rgexport.info, "model_info", broken)
    result = _invoke(["info", "--preset", "tiny"], tmp_path)
    assert result.exit_code == 70
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "internal error, ZeroDivisionError: a bug nobody anticipated" in errors[0]
    assert "Traceback" not in result.output
    crashes = list(tmp_path.glob("crash-*.txt"))
    assert len(crashes) == 1 and str(crashes[0]) in errors[0]
    assert "Traceback" in crashes[0].read_text() and "ZeroDivisionError" in crashes[0].read_text()

    verbose = _invoke(["--verbose", "info", "--preset", "tiny"], tmp_path)
    assert verbose.exit_code == 70 and "Traceback" in verbose.output and "ZeroDivisionError" in verbose.output


def test_ctrl_c_is_130(monkeypatch, tmp_path):
    import rgexport.info

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(rgexport.info, "model_info", interrupted)
    result = _invoke(["info", "--preset", "tiny"], tmp_path)
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    assert "KeyboardInterrupt" not in result.output


def test_an_interrupted_stage_is_not_a_failed_stage():
    """Ctrl-C inside a build stage reaches the CLI as an interruption (exit 130), not 'stage failed'."""
    from rgexport.progress import Stages

    with pytest.raises(KeyboardInterrupt), Stages(quiet=True).stage("lower"):
        raise KeyboardInterrupt


def test_a_runtime_that_aborts_is_probed_in_a_child(tmp_path):
    """What protects this process from ExecuTorch's abort on some corrupt programs."""
    from rgexport.errors import RgexportError
    from rgexport.safety import probe_in_child

    with pytest.raises(RgexportError, match="crashed the runtime .*SIGABRT|SIGABRT"):
        probe_in_child(["-c", "import os; os.abort()"], tmp_path / "model.pte", "the runtime")
    with pytest.raises(RgexportError, match="cannot load .*: ValueError: bad file"):
        probe_in_child(["-c", "raise ValueError('bad file')"], tmp_path / "model.pte", "the runtime")
    probe_in_child(["-c", "pass"], tmp_path / "model.pte", "the runtime")
