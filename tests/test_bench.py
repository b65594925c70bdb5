"""Benchmarks print figures; these tests check their structure and the memory verdict, not timings."""

from __future__ import annotations

import pytest

from rgexport.bench import bench_artifacts, markdown_report, memory_bandwidth_gbs, memory_profile, read_bandwidth_gbs
from rgexport.build import BuildOptions, build

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "onnx-fp32"
    return build(BuildOptions(backend="onnx", recipe="fp32", out=out, validation_tokens=64)).out


def test_bench_reports_every_artifact_beside_eager(onnx_artifact):
    data = bench_artifacts([onnx_artifact], decode_tokens=16, include_hf=False)
    names = [r["name"] for r in data["results"]]
    assert names == ["eager (rgexport step model)", "onnx / fp32"]
    for r in data["results"]:
        assert r["decode_ms_median"] > 0 and r["decode_ms_p90"] >= r["decode_ms_median"]
        assert 0 < r["fraction_of_bandwidth_limit"]
    assert data["machine"]["memory_bandwidth_gbs"] > 0 and data["machine"]["copy_bandwidth_gbs"] > 0
    for r in data["results"]:  # each artifact against the read bandwidth measured just before it
        assert r["read_bandwidth_gbs"] > 0
        assert r["bandwidth_limit_ms"] == pytest.approx(r["bytes"] / r["read_bandwidth_gbs"] / 1e6)
    assert "| onnx / fp32 |" in markdown_report(data)


def test_bench_in_rounds_tells_two_artifacts_of_one_recipe_apart(onnx_artifact, tmp_path):
    """Two artifacts of one backend and recipe are named by their folders; with rounds, each is timed in
    turns (a prefill chunk and its share of the steps per turn) between reads of the bandwidth."""
    import shutil

    other = shutil.copytree(onnx_artifact, tmp_path / "onnx-fp32-other")
    data = bench_artifacts([onnx_artifact, other], decode_tokens=6, include_eager=False, include_hf=False, rounds=3)
    assert [r["name"] for r in data["results"]] == [f"onnx / fp32 ({onnx_artifact.name})",
                                                     "onnx / fp32 (onnx-fp32-other)"]
    assert data["machine"]["rounds"] == 3
    for r in data["results"]:
        assert len(r["read_bandwidth_samples_gbs"]) == 6  # before and after each of 3 turns
        assert r["read_bandwidth_gbs"] == max(r["read_bandwidth_samples_gbs"])
        assert r["prefill_tokens_per_s"] > 0 and r["decode_ms_median"] > 0


def test_memory_is_flat_and_state_matches_the_config(onnx_artifact):
    profile = memory_profile(onnx_artifact)  # 32 .. 2048 tokens (16x the window), a fresh process each
    assert [r["n"] for r in profile["rows"]] == [32, 64, 128, 256, 512, 1024, 2048]
    assert profile["state_matches_analytic"]
    assert profile["flat"], profile["peak_growth_bytes"]
    # What a transformer of the same width would have added by the last N: far above the tolerance.
    assert profile["rows"][-1]["transformer_kv_bytes"] > 2 * profile["tolerance_bytes"]


def test_flatness_ignores_load_noise_and_catches_a_growing_cache():
    """The CI failure this guards: the loaded ONNX Runtime process came out 6.6 MB larger at N=128 than at
    N=32 and 64, while decoding added nothing; a KV cache of 1 KiB per token must still fail."""
    from rgexport.bench import flatness

    def row(n, loaded, added):
        return {"n": n, "rss_after_load": loaded, "peak_rss_bytes": loaded + added, "decode_growth_bytes": added}

    noisy = [row(32, 376_958_976, 8192), row(64, 376_430_592, 0), row(128, 383_070_208, 0)]
    assert flatness(noisy)["flat"]
    assert not flatness([{**r, "decode_growth_bytes": None} for r in noisy])["flat"]  # peaks alone: fails
    ns = [32 * 2**i for i in range(7)]
    growing = [row(n, 376_000_000, 4096 * n) for n in ns]  # 4 KiB per token: 8 MiB by N=2048
    result = flatness(growing)
    assert not result["flat"] and abs(result["peak_growth_bytes"] - 4096 * (2048 - 32)) < 1


def test_bandwidth_is_plausible():
    assert 0.5 < memory_bandwidth_gbs(mbytes=64, repeats=2) < 1000
    assert 0.5 < read_bandwidth_gbs(1, mbytes=64, repeats=2) < 1000


def test_the_read_bandwidth_leaves_torch_threads_as_they_were():
    import torch

    was = torch.get_num_threads()
    read_bandwidth_gbs(1 if was > 1 else 2, mbytes=8, repeats=1)
    assert torch.get_num_threads() == was


def test_bench_without_eager_times_the_artifacts_alone(onnx_artifact):
    data = bench_artifacts([onnx_artifact], decode_tokens=8, include_hf=False, include_eager=False)
    assert [r["name"] for r in data["results"]] == ["onnx / fp32"]
    assert data["results"][0]["speedup_vs_eager"] is None
    assert "| onnx / fp32 |" in markdown_report(data)


def test_weights_read_per_token_follow_external_data_and_skip_gathered_tables(onnx_artifact, tmp_path):
    """A model above 2 GiB keeps its weights in weights.bin beside a small decode.onnx; a tensor only
    gathered from is read one row per token, not whole; the tied int4 table, which the head reads whole,
    counts in full and once."""
    import onnx

    from rgexport.backends.onnx.graph_info import describe_onnx
    from rgexport.bench import weights_read_per_token
    from rgexport.manifest import read_manifest

    folder, manifest = read_manifest(onnx_artifact)
    fp32 = describe_onnx(folder / "decode.onnx")["weights"]["bytes"]
    assert weights_read_per_token(folder, manifest) == fp32  # fp32: the Gemm head reads the whole table
    out = build(BuildOptions(backend="onnx", recipe="int4", out=tmp_path / "int4", validate=False,
                             options={"external_data": True})).out
    folder, manifest = read_manifest(out)
    info = describe_onnx(folder / "decode.onnx")
    assert info["weights"]["external_files"] == ["weights.bin"]
    assert (folder / "decode.onnx").stat().st_size < 0.1 * info["weights"]["bytes"]
    config = manifest["model"]["config"]
    table = config["vocab_size"] * config["width"]
    # The tied table is stored once: the gather's 4-bit data is a second initializer over the head's
    # MatMulNBits bytes (one offset in weights.bin) and its scales are the head's. The head reads all of it
    # every step, so only the duplicate initializer (counted twice by describe_onnx) is not read again.
    graph = onnx.load(str(folder / "decode.onnx"), load_external_data=False).graph
    offsets = {t.name: {e.key: e.value for e in t.external_data}.get("offset") for t in graph.initializer}
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.input[2] == gather.input[2])
    assert gather.input[0] != head.input[1] and offsets[gather.input[0]] == offsets[head.input[1]]
    assert weights_read_per_token(folder, manifest) == info["weights"]["bytes"] - table // 2


def test_cli_bench_without_eager(onnx_artifact):
    import json

    from typer.testing import CliRunner

    from rgexport.cli import app

    result = CliRunner().invoke(app, ["bench", str(onnx_artifact), "--steps", "8", "--no-eager", "--no-memory",
                                      "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["name"] for r in data["results"]] == ["onnx / fp32"] and data["huggingface_generate"] is None
    assert data["machine"]["runtime_threads"] == 1
