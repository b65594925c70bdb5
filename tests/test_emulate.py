"""The standalone device runner and validation on an emulated Arm device.

Fast tests: `rgexport/emulate/device_runner.py`, run as a separate program with this Python, drives ONNX and
TFLite fp32 artifacts of the SMALL model from their manifest alone and reproduces the backends' own
runners bit for bit (so the manifest's I/O contract is enough for a third-party program); the emulated
environment's pure parts (cpuinfo, cache location, comparisons, errors) need no emulator.

Slow tests (`-m slow`): the real thing under qemu: set up (or reuse) the cached aarch64 environment and
validate the artifacts there. They need qemu-user-static, apt-get and PyPI, and take minutes the first
time (about 1 minute per runtime afterwards on the SMALL model).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rgexport import emulate
from rgexport.emulate import environment
from rgexport.emulate.device_runner import ArtifactDriver, ContractError
from rgexport.errors import RgexportError

CHUNK = 8
N_TOKENS = 40  # past two wraps of the 16-slot window, decode and prefill both used


def _build(backend: str, checkpoint: Path, out: Path, recipe: str = "fp32") -> Path:
    from rgexport.build import BuildOptions, build

    build(BuildOptions(backend=backend, recipe=recipe, checkpoint=str(checkpoint), out=out, validate=False,
                       prefill_chunk=CHUNK))
    return out


@pytest.fixture(scope="module")
def small_checkpoint(small_model, tmp_path_factory) -> Path:
    from rgexport.checkpoint import save_huggingface

    return save_huggingface(small_model, tmp_path_factory.mktemp("ckpt") / "small")


@pytest.fixture(scope="module")
def artifacts(small_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """ONNX and TFLite fp32 artifact folders (with manifest.json) of the SMALL model, where installed."""
    out = {}
    root = tmp_path_factory.mktemp("artifacts")
    for backend, modules in (("onnx", ("onnx", "onnxruntime", "onnxscript")),
                             ("tflite", ("litert_torch", "ai_edge_litert.interpreter"))):
        try:
            for m in modules:
                __import__(m)
        except ImportError:
            continue
        out[backend] = _build(backend, small_checkpoint, root / f"{backend}-fp32")
    return out


@pytest.fixture(scope="module")
def tokens(small_tokens) -> list[int]:
    return small_tokens[0, :N_TOKENS].tolist()


def _run_script(artifact: Path, tokens: list[int], tmp_path: Path, *extra: str) -> dict[str, np.ndarray]:
    tok, out = tmp_path / "tokens.npy", tmp_path / "out.npz"
    np.save(tok, np.asarray(tokens, np.int32))
    proc = subprocess.run([sys.executable, str(emulate.RUNNER_SCRIPT), str(artifact), str(tok), str(out), *extra],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_device_runner_reproduces_the_backend_runner(backend, artifacts, tokens, tmp_path):
    """A separate process with only the manifest gets the backend runner's logits, state and greedy tokens."""
    if backend not in artifacts:
        pytest.skip(f"{backend} backend not installed")
    from rgexport.backends import get_backend
    from rgexport.validate import greedy, teacher_forced

    folder = artifacts[backend]
    manifest = json.loads((folder / "manifest.json").read_text())
    runner = get_backend(backend).load(folder, manifest)
    want = teacher_forced(runner, tokens)
    want_state = runner.state()
    want_greedy = greedy(runner, tokens[:CHUNK], 8)

    got = _run_script(folder, tokens, tmp_path, "--greedy", "8", "--progress")
    assert got["logits"].shape == (N_TOKENS, manifest["io"]["methods"]["decode"]["outputs"][0]["shape"][-1])
    assert got["logits"].dtype == np.float32
    np.testing.assert_array_equal(got["logits"], want)
    assert set(emulate.states_of(got)) == set(want_state)
    for name, value in want_state.items():
        np.testing.assert_array_equal(emulate.states_of(got)[name].reshape(value.shape), value)
    assert got["greedy"].tolist() == want_greedy
    info = emulate.info_of(got)
    assert info["tokens"] == N_TOKENS and info["machine"] and info["decode_seconds_per_token"] > 0
    # CPU time of the teacher-forced decode, not of greedy's prompt (which decodes nothing).
    assert info["decode_cpu_seconds_per_token"] > 0


def _imported(nodes):
    import ast

    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add((node.module or "").split(".")[0])
    return out


def test_device_runner_imports_nothing_from_rgexport_or_torch():
    """The script must run where neither rgexport nor torch is installed."""
    import ast

    tree = ast.parse(emulate.RUNNER_SCRIPT.read_text())
    everywhere = _imported(ast.walk(tree))
    assert "rgexport" not in everywhere
    assert everywhere <= {"__future__", "argparse", "json", "platform", "sys", "time", "pathlib", "numpy",
                          "importlib"}
    # At module level only the standard library and numpy; each runtime comes with its backend's device module.
    assert _imported(tree.body) == {"__future__", "argparse", "json", "platform", "sys", "time", "pathlib", "numpy"}


def test_device_modules_are_standalone_and_dispatched_by_table():
    """Each backend's device module (from the registry) imports the standard library, numpy, the runner's
    ContractError and, inside its class only, its runtime (and torch, which ExecuTorch's bindings take)."""
    import ast

    from rgexport.backends import device_modules
    from rgexport.emulate.device_runner import default_runtimes, load_methods

    modules = device_modules()
    assert set(modules) == set(environment.runtimes()) and modules  # every device runtime has its runner
    assert default_runtimes() == modules  # the standalone script finds the same table beside itself
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        assert "rgexport" not in _imported(ast.walk(tree)), name
        assert _imported(tree.body) <= {"__future__", "pathlib", "numpy", "rgexport_device_runner"}, name
        assert "torch" not in _imported(tree.body), name
        methods = load_methods(name, path)
        assert callable(methods) and methods.runtime
    source = emulate.RUNNER_SCRIPT.read_text()
    assert all(f'"{name}"' not in source for name in modules)  # no branch on a backend's name


def test_device_runner_reports_a_contract_gap(artifacts, tokens, tmp_path):
    """A manifest that does not say which file holds a method is refused with a message, exit status 2."""
    if "onnx" not in artifacts:
        pytest.skip("onnx backend not installed")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(artifacts["onnx"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["backend_facts"].pop("onnx_files")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ContractError, match="names no file for method decode"):
        ArtifactDriver(broken)
    np.save(tmp_path / "t.npy", np.asarray(tokens, np.int32))
    proc = subprocess.run([sys.executable, str(emulate.RUNNER_SCRIPT), str(broken), str(tmp_path / "t.npy"),
                           str(tmp_path / "o.npz")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "names no file" in proc.stderr


def test_cpuinfo_lists_every_core_with_the_cpus_features():
    text = emulate.cpuinfo_text("cortex-a76", hwcap=0b11 | 1 << 20, hwcap2=1 << 13, processors=3)
    blocks = [b for b in text.strip().split("\n\n")]
    assert len(blocks) == 3
    assert "Features\t: fp asimd asimddp i8mm\n" in blocks[0]
    assert "CPU implementer\t: 0x41" in text and "CPU part\t: 0xd0b" in text
    assert [b.splitlines()[0] for b in blocks] == ["processor\t: 0", "processor\t: 1", "processor\t: 2"]


def test_cache_location_follows_rgexport_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RGEXPORT_CACHE", str(tmp_path))
    assert emulate.cache_root() == tmp_path / "emulated-arm64"
    monkeypatch.delenv("RGEXPORT_CACHE")
    assert emulate.cache_root() == Path.home() / ".cache" / "rgexport" / "emulated-arm64"


def test_compare_runs_reports_where_and_how_much():
    rng = np.random.default_rng(0)
    a = {"logits": rng.normal(size=(6, 10)).astype(np.float32), "state.x": np.zeros((1, 4), np.float32),
         "greedy": np.array([1, 2, 3], np.int32)}
    b = {k: v.copy() for k, v in a.items()}
    same = emulate.compare_runs(a, b)
    assert same["bitwise_identical"] and same["max_abs_logit_difference"] == 0
    assert same["first_position_differing"] is None and same["greedy_first_divergence"] is None
    b["logits"][4, 3] += 0.5
    b["state.x"][0, 1] = 0.25
    b["greedy"][2] = 7
    diff = emulate.compare_runs(a, b)
    assert not diff["bitwise_identical"]
    assert diff["max_abs_logit_difference"] == pytest.approx(0.5, rel=1e-6)
    assert diff["positions_differing"] == 1 and diff["first_position_differing"] == 4
    assert diff["max_abs_state_difference"] == 0.25 and diff["greedy_first_divergence"] == 2


def test_missing_qemu_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("RGEXPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(environment, "find_qemu", lambda: None)
    monkeypatch.setattr(environment, "_is_root", lambda: False)
    with pytest.raises(RgexportError, match="apt-get install qemu-user-static"):
        emulate.ensure_environment("onnx")


def test_unknown_cpu_and_backend_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("RGEXPORT_CACHE", str(tmp_path))
    with pytest.raises(RgexportError, match="cortex-a76"):
        emulate.ensure_environment("onnx", cpu="pentium")
    with pytest.raises(RgexportError, match="coreml"):
        emulate.ensure_environment("coreml")


# The real emulated device ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab_checkpoint(small_config, random_model, tmp_path_factory):
    """SMALL with the shipped tokenizer's vocabulary, so validation's held-out text can be tokenised."""
    from rgexport.assets import shipped_model_dir
    from rgexport.checkpoint import save_huggingface

    model = random_model(dataclasses.replace(small_config, vocab_size=4096))
    return save_huggingface(model, tmp_path_factory.mktemp("ckpt") / "small4096",
                            tokenizer=shipped_model_dir() / "tokenizer.model")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "tflite", "executorch"])
def test_validate_on_emulated_arm64(backend, vocab_checkpoint, tmp_path):
    """The whole path on the real emulator (ExecuTorch downloads the 430 MB aarch64 torch wheel once)."""
    if environment.find_qemu() is None and not environment._is_root():
        pytest.skip("needs qemu-user-static (or root with apt-get to install it)")
    module = {"onnx": "onnxscript", "tflite": "litert_torch", "executorch": "executorch.exir"}[backend]
    pytest.importorskip(module)
    folder = _build(backend, vocab_checkpoint, tmp_path / backend)
    result = emulate.validate_emulated(folder, greedy_tokens=16)
    report = result.report
    assert result.passed, emulate.format_emulated(result)
    assert report.metrics["max_abs_logit_error"] < 1e-4
    assert report.greedy_divergence is None
    assert result.device["cpu"] == emulate.DEFAULT_CPU
    # fp32 on Arm NEON vs x86 AVX: not bitwise, but within float rounding.
    assert result.arm_vs_x86["max_abs_logit_difference"] < 1e-4
    assert result.arm_vs_x86["top1_agreement"] == 1.0
    assert result.timings["arm_decode_ms_per_token"] > 0
    text = emulate.format_emulated(result)
    assert "emulated-arm64" in text and "arm vs x86" in text
    json.dumps(result.to_dict())


def test_sme_is_off_for_max_on_qemu_7():
    """qemu 7.2's SME emulation miscomputes LiteRT's int8 kernels (measured); newer qemu keeps it."""
    cpu, notes = emulate.effective_cpu("max", "qemu-aarch64 version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)")
    assert cpu == "max,sme=off" and "SME" in notes[0]
    assert emulate.effective_cpu("max", "qemu-aarch64 version 10.0.13") == ("max", [])
    assert emulate.effective_cpu("max,sme=on", "qemu-aarch64 version 7.2.22") == ("max,sme=on", [])
    assert emulate.effective_cpu("cortex-a76", "qemu-aarch64 version 7.2.22") == ("cortex-a76", [])


def test_a_failed_setup_step_shows_its_output_and_the_fix(tmp_path):
    log = tmp_path / "setup.log"
    environment._run_logged(["sh", "-c", "echo earlier"], log, "first step", "n/a")
    with pytest.raises(RgexportError) as e:
        environment._run_logged(["sh", "-c", "echo no network >&2; exit 3"], log, "downloading arm64 packages",
                            "Check the apt sources.")
    message = str(e.value)
    assert "downloading arm64 packages failed (exit 3). Check the apt sources." in message
    assert "no network" in message and "earlier" not in message and str(log) in message
    with pytest.raises(RgexportError, match="not found. Install it"):
        environment._run_logged(["/nonexistent/tool"], log, "step", "Install it.")
