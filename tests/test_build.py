"""The build pipeline: atomic output, failures that name their stage, the manifest and its schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rgexport.backends import get_backend
from rgexport.build import BuildError, BuildOptions, build
from rgexport.errors import RgexportError
from rgexport.manifest import check_manifest, read_manifest

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "onnx-fp32"
    return build(BuildOptions(backend="onnx", recipe="fp32", out=out, validation_tokens=64))


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_manifest_is_complete_and_matches_the_schema(good):
    folder, m = read_manifest(good.out)
    assert m["backend"] == "onnx" and m["recipe"]["name"] == "fp32"
    assert m["validation"]["status"] == "passed"
    assert m["model"]["checkpoint"]["source"] == "shipped:tiny"
    names = {f["path"] for f in m["artifact"]["files"]}
    assert m["artifact"]["file"] in names and "tokenizer.model" in names
    state = m["io"]["state"]
    assert state["total_bytes"] == sum(t["bytes"] for t in state["tensors"]) > 0
    assert {"decode", "prefill"} <= set(m["io"]["methods"])
    # ONNX quantises its graphs while lowering: the torch-level stage only prepares.
    assert set(m["build"]["stages_seconds"]) >= {"load", "prepare", "export", "lower", "write", "validate"}
    assert "quantise" not in m["build"]["stages_seconds"]
    assert set(m["build"]["stages_peak_rss_bytes"]) == set(m["build"]["stages_seconds"])
    assert m["build"]["peak_rss_bytes"] == max(m["build"]["stages_peak_rss_bytes"].values()) > 0
    broken = json.loads(json.dumps(m))
    del broken["io"]["state"]["tensors"][0]["shape"]
    with pytest.raises(RgexportError, match="manifest.json is invalid at io/state/tensors/0"):
        check_manifest(broken)


def test_existing_output_needs_force(good):
    with pytest.raises(RgexportError, match="already exists"):
        build(BuildOptions(backend="onnx", recipe="fp32", out=good.out))


def test_failed_stage_is_named_and_leaves_the_old_output(good, monkeypatch):
    from rgexport.backends.onnx import OnnxBackend

    before = _snapshot(good.out)

    def broken_export(self, prepared, ctx):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(OnnxBackend, "export", broken_export)
    with pytest.raises(BuildError) as e:
        build(BuildOptions(backend="onnx", recipe="fp32", out=good.out, force=True))
    assert e.value.stage == "export" and "exporter exploded" in str(e.value) and "untouched" in str(e.value)
    assert _snapshot(good.out) == before
    assert not list(good.out.parent.glob(".onnx-fp32.partial-*"))


def test_failed_validation_fails_the_build(tmp_path, monkeypatch):
    """An artifact whose logits are off by 1e-2 must not be written (fp32 allows 1e-3)."""
    from rgexport.backends.onnx import OnnxBackend

    real_load = OnnxBackend.load

    def skewed_load(self, folder, manifest, **kw):
        runner = real_load(self, folder, manifest, **kw)
        decode, prefill = runner.decode, runner.prefill
        runner.decode = lambda t, p: decode(t, p) + np.float32(1e-2)
        runner.prefill = lambda ts, p: prefill(ts, p) + np.float32(1e-2)
        return runner

    monkeypatch.setattr(OnnxBackend, "load", skewed_load)
    out = tmp_path / "skewed"
    with pytest.raises(BuildError) as e:
        build(BuildOptions(backend="onnx", recipe="fp32", out=out, validation_tokens=32))
    assert e.value.stage == "validate" and "max_abs_logit_error" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".skewed.partial-*"))


def test_killed_build_leaves_the_earlier_output_intact(good):
    before = _snapshot(good.out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rgexport.cli", "build", "--target", "onnx", "--out", str(good.out), "--force"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(good.out.parent.glob(".onnx-fp32.partial-*")):
        time.sleep(0.2)
    assert list(good.out.parent.glob(".onnx-fp32.partial-*")), "the build never started writing"
    time.sleep(2)  # well inside export, which takes ~10 s or more
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _snapshot(good.out) == before  # the earlier output is byte for byte what it was
    folder, manifest = read_manifest(good.out)
    assert manifest["validation"]["status"] == "passed"


def test_no_validate_is_recorded(tmp_path):
    result = build(BuildOptions(backend="onnx", recipe="fp32", out=tmp_path / "nv", validate=False))
    assert result.report is None
    assert read_manifest(result.out)[1]["validation"] == {"status": "unvalidated"}


def test_large_build_copies_nothing_and_frees_the_model_before_lowering(tmp_path, monkeypatch):
    """Above `LARGE_MODEL_BYTES` (set to 0 here, so the shipped model counts as large) the build neither
    deep-copies the model nor keeps it through lowering; validation reloads the reference from its source.
    With the ONNX export streamed to disk, nothing else holds the float32 weights while lowering."""
    import copy
    import gc
    import weakref

    import rgexport.build as build_module
    import rgexport.config
    from rgexport.backends.onnx import OnnxBackend
    from rgexport.backends.onnx.export import EXPORT_SCRATCH
    from rgexport.checkpoint import load_checkpoint as real_load
    from rgexport.model import Griffin

    monkeypatch.setattr(rgexport.config, "LARGE_MODEL_BYTES", 0)
    loaded: list[weakref.ref] = []

    def load(*args, **kwargs):
        ckpt = real_load(*args, **kwargs)
        # The weights themselves, not the module: the exporter's IR once kept the parameters alive after
        # the module had gone (notes/perf.md).
        loaded.append(weakref.ref(ckpt.model.embedder.input_embedding))
        return ckpt

    monkeypatch.setattr(build_module, "load_checkpoint", load)
    real_deepcopy = copy.deepcopy

    def no_model_copies(obj, *args, **kwargs):
        assert not isinstance(obj, Griffin), "a large build deep-copied the model"
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(build_module.copy, "deepcopy", no_model_copies)
    alive_at_lower = []
    real_lower = OnnxBackend.lower

    def lower(self, exported, ctx):
        gc.collect()
        alive_at_lower.append(loaded[0]() is not None)
        return real_lower(self, exported, ctx)

    monkeypatch.setattr(OnnxBackend, "lower", lower)
    # stream_weights=false: the whole model is loaded, as for a backend that cannot export from a stream.
    result = build(BuildOptions(backend="onnx", recipe="int4", out=tmp_path / "int4", validation_tokens=40,
                                options={"stream_export": True, "stream_weights": False}))
    assert alive_at_lower == [False]  # the float32 weights were gone while lowering
    assert result.manifest["validation"]["status"] == "passed"  # against the reloaded reference
    assert result.manifest["backend_facts"]["onnx_streamed_export"] is True
    assert "onnx_streamed_weights" not in result.manifest["backend_facts"]
    assert not (result.out / EXPORT_SCRATCH).exists()


def test_large_build_never_loads_the_whole_model(tmp_path, monkeypatch):
    """Above `LARGE_MODEL_BYTES` (0 here) an ONNX build traces a model without weights and reads them from
    the checkpoint one part at a time, for the export and again for the reference: the eager loader is
    never called, and what the stream held at once was one part (counted)."""
    import rgexport.build as build_module
    import rgexport.config
    import rgexport.streaming
    from rgexport.backends.onnx.export import EXPORT_SCRATCH

    monkeypatch.setattr(rgexport.config, "LARGE_MODEL_BYTES", 0)

    def refuse(*args, **kwargs):
        raise AssertionError("a large build loaded the whole model")

    monkeypatch.setattr(build_module, "load_checkpoint", refuse)
    monkeypatch.setattr("rgexport.checkpoint.load_checkpoint", refuse)
    streams = []
    real_stream = rgexport.streaming.stream_checkpoint

    def stream_checkpoint(*args, **kwargs):
        streams.append(real_stream(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(rgexport.streaming, "stream_checkpoint", stream_checkpoint)
    result = build(BuildOptions(backend="onnx", recipe="fp32", out=tmp_path / "fp32", validation_tokens=40))
    manifest = result.manifest
    assert manifest["validation"]["status"] == "passed"
    assert manifest["validation"]["metrics"]["max_abs_logit_error"] < 1e-3  # fp32: the same model
    blocks = len(manifest["model"]["config"]["block_types"])
    assert manifest["backend_facts"]["onnx_streamed_weights"]["parts"] == blocks + 2
    assert manifest["model"]["checkpoint"]["source"] == "shipped:tiny"
    from rgexport.streaming import block_weight_bytes

    largest = max(block_weight_bytes(streams[0].config).values())
    assert len(streams) == 2  # the export's, then the streamed reference's
    assert streams[0].counter.peak == largest  # the export: one part at a time
    assert streams[1].counter.peak <= 2 * largest  # the reference: a block beside the embedding, at most
    assert not (result.out / EXPORT_SCRATCH).exists()
    # The streamed validation in its four parts, each measured on its own, none above the stage's peak.
    build_info = manifest["build"]
    assert set(build_info["parts"]) == {"validate: artifact", "validate: reference", "validate: own model",
                                        "validate: compare"}
    for part in build_info["parts"].values():
        assert 0 < part["peak_rss_bytes"] <= build_info["stages_peak_rss_bytes"]["validate"]
        assert 0 < part["seconds"] <= build_info["stages_seconds"]["validate"]


def test_stage_parts_are_measured_apart_and_keep_the_stage_peak():
    """A part resets the peak mark for its own figure, and the stage still reports the largest: a 64 MB
    buffer held only in the first part is the stage's peak, not the second part's."""
    from rgexport.memory import peak_rss_bytes
    from rgexport.progress import Stages

    stages = Stages(quiet=True)
    with pytest.raises(RuntimeError, match="outside a stage"), stages.part("x"):
        pass
    with stages.stage("validate"):
        with stages.part("big"):
            buf = np.ones(64 << 18, dtype=np.float32)  # 64 MB, touched
            del buf
        with stages.part("small"):
            pass
    if peak_rss_bytes() == 0:
        pytest.skip("no peak RSS figures on this platform")
    big, small = stages.parts["validate: big"], stages.parts["validate: small"]
    assert big["peak_rss_bytes"] >= small["peak_rss_bytes"] + (48 << 20)
    assert stages.peak_rss["validate"] == big["peak_rss_bytes"]
    assert set(stages.timings) == {"validate"}  # parts are not stages: stage times still add up


@pytest.mark.parametrize("backend", ["tflite", "coreml"])
def test_whole_model_build_that_cannot_fit_stops_before_loading(backend, tmp_path, monkeypatch):
    """TFLite and Core ML load the whole float32 model; at RecurrentGemma-2B their measured peak factor gives
    about 55-63 GB, past a 24 GiB machine: one line at once, not an OOM kill minutes later."""
    import rgexport.checkpoint

    monkeypatch.setattr(rgexport.checkpoint, "physical_memory_bytes", lambda: 24 << 30)
    monkeypatch.setattr(rgexport.checkpoint, "random_checkpoint",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    # TFLite's float flatbuffer at 2B is past what its converter writes (4 GiB), which refuses it first
    # (tests/test_backend_tflite.py); the memory check alone is under test here.
    monkeypatch.setattr(type(get_backend(backend)), "check_size", lambda *a, **k: None)
    out = tmp_path / "out"
    start = time.perf_counter()
    with pytest.raises(RgexportError, match=r"loads the whole float32 model \(10\.7 GB.*more than this "
                                            r"machine's 24\.0 GiB.*Nothing was loaded"):
        build(BuildOptions(backend=backend, preset="recurrentgemma-2b", random_weights=True, out=out))
    assert time.perf_counter() - start < 30
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_whole_model_build_that_fits_is_not_refused(tmp_path, monkeypatch):
    """The same check lets a machine with the memory go on (here: into loading, stubbed to stop there)."""
    import rgexport.checkpoint

    class Loaded(Exception):
        pass

    def loaded(*a, **k):
        raise Loaded

    monkeypatch.setattr(rgexport.checkpoint, "physical_memory_bytes", lambda: 256 << 30)
    monkeypatch.setattr(rgexport.checkpoint, "random_checkpoint", loaded)
    with pytest.raises(BuildError) as failed:
        build(BuildOptions(backend="coreml", preset="recurrentgemma-2b", random_weights=True, out=tmp_path / "o"))
    assert isinstance(failed.value.cause, Loaded)


@pytest.mark.parametrize("keep", [False, True])
def test_keep_peak_rss_lets_time_v_see_the_whole_run(keep):
    """A stage resets the kernel's one peak mark, so a parent's view of the process's maximum (getrusage, what
    `/usr/bin/time -v` prints) loses a peak from before the last reset; RGEXPORT_KEEP_PEAK_RSS=1 keeps it."""
    import os
    import subprocess
    import sys

    from rgexport.memory import KEEP_PEAK_ENV, peak_rss_bytes

    if peak_rss_bytes() == 0 or not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("no peak RSS mark on this platform")
    script = ("import numpy as np\nfrom rgexport.progress import Stages\ns = Stages(quiet=True)\n"
              "a = np.ones(512 << 17)\ndel a\nwith s.stage('after'):\n    pass\nprint(s.peak_rss['after'])\n")
    # What `/usr/bin/time -v` does, from a small parent: a process started straight from pytest would count
    # pytest's own resident set at the fork in its maximum (Linux keeps the forked copy's peak across exec).
    timer = ("import os, subprocess, sys\n"
             "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.PIPE, text=True)\n"
             "out = child.stdout.read()\n_, status, usage = os.wait4(child.pid, 0)\n"
             "assert os.waitstatus_to_exitcode(status) == 0\nprint(out.strip(), usage.ru_maxrss * 1024)\n")
    env = {**os.environ, KEEP_PEAK_ENV: "1" if keep else "0"}
    out = subprocess.run([sys.executable, "-c", timer, script], env=env, capture_output=True, text=True, check=True)
    stage_peak, process_peak = map(int, out.stdout.split())
    if keep:  # the 512 MB array, freed before the stage, still counts in both
        assert stage_peak >= 512 << 20 and process_peak >= 512 << 20
    else:  # the reset at the stage's start dropped it from both
        assert stage_peak < 512 << 20 and process_peak < 512 << 20
