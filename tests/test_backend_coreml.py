"""Core ML backend: the .mlpackage run by the MIL interpreter against eager PyTorch.

Each artifact is built once per module (conversion takes tens of seconds here). Tolerances for the fp16
programs come from fp16 arithmetic: every op rounds its result to 11 significant bits (unit roundoff
u = 2^-11 = 4.9e-4 relative). The ~300 ops between the embedding and the logits of SMALL are rounded
independently, so their errors add like a random walk: about sqrt(300) = 17 roundings of size u relative to
the activation scale, i.e. 17 * u * max|logit| (0.066 for SMALL's logits of up to ~8). Measured: ~0.025.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from rgexport.backends import BuildContext, feed, get_backend  # noqa: E402
from rgexport.errors import RgexportError  # noqa: E402
from rgexport.graphs import input_name, output_name  # noqa: E402
from rgexport.model import identifier, state_spec  # noqa: E402
from rgexport.validate import load_thresholds  # noqa: E402

CHUNK = 8
U16 = 2.0**-11


def fp16_tolerance(ref: np.ndarray) -> float:
    return 17 * U16 * float(np.abs(ref).max())


def build(model, config, work_dir: Path, recipe: str = "fp16", state_dtype: str = "float16", chunk: int = CHUNK,
          calibration_tokens: list[list[int]] | None = None, stream=None):
    """quantize -> export -> lower -> write, then load: (runner, artifact path, context, manifest). With
    `stream` (a StreamedCheckpoint), `model` is ignored: the build reads the weights from the stream, as
    `rgexport build` does for a large model."""
    backend = get_backend("coreml")
    ctx = BuildContext(config=config, recipe=recipe, work_dir=work_dir, prefill_chunk=chunk,
                       options={"state_dtype": state_dtype}, calibration_tokens=calibration_tokens, stream=stream)
    if stream is not None:
        from rgexport.streaming import fake_griffin

        assert backend.streams_weights(recipe, {"stream_weights": True})
        model = fake_griffin(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        files = backend.write(backend.lower(backend.export(backend.quantize(model, ctx), ctx), ctx), ctx)
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not [m for m in runtime if "invalid value" in m or "divide" in m], runtime
    manifest = {"artifact": {"file": files[0].name}, "io": backend.io_contract(ctx), "facts": ctx.facts}
    json.dumps(manifest)  # the contract must be JSON
    return backend.load(work_dir, manifest), files[0], ctx, manifest


def decode_all(runner, tokens) -> np.ndarray:
    runner.reset()
    return np.stack([runner.decode(t, i) for i, t in enumerate(tokens)])


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "Data" / "com.apple.CoreML" / "weights").iterdir())


@pytest.fixture(scope="module")
def eager(small_model, small_tokens):
    return small_model.score(small_tokens, chunk=1)[0].numpy()


@pytest.fixture(scope="module")
def fp16(small_model, small_config, tmp_path_factory):
    return build(small_model, small_config, tmp_path_factory.mktemp("coreml_fp16"))


@pytest.fixture(scope="module")
def fp16_decoded(fp16, small_tokens):
    return decode_all(fp16[0], small_tokens[0].tolist())


# fp16 program, fp16 states ---------------------------------------------------------------------
def test_decode_matches_eager(fp16_decoded, eager):
    err = np.abs(fp16_decoded - eager).max()
    assert err < fp16_tolerance(eager), err
    assert (fp16_decoded.argmax(-1) == eager.argmax(-1)).mean() >= 0.95


def test_prefill_chunks_then_decode_match_eager(fp16, small_tokens, eager):
    runner = fp16[0]
    runner.reset()
    tokens = small_tokens[0, :75].tolist()  # 9 prefill chunks of 8 and 3 decode steps
    out = feed(runner, tokens)
    assert out.shape == (75, eager.shape[-1])
    assert np.abs(out - eager[:75]).max() < fp16_tolerance(eager)
    assert (out.argmax(-1) == eager[:75].argmax(-1)).mean() >= 0.95


def _eager_state_from(model, tokens):
    """Eager state after `tokens` from position 0, rounded to fp16 as the program stores it."""
    with torch.no_grad():
        _, state = model.prefill(tokens[None], torch.tensor([0]), model.init_state())
    return {k: v.to(torch.float16).to(torch.float32) for k, v in state.items()}


@pytest.mark.parametrize("start", [2049, 4097 + 16 * 3 + 5, 70_001])
def test_positions_past_2048(fp16, small_model, small_tokens, start):
    """Positions that fp16 cannot hold (odd ones above 2048): masks, rotary angles and ring slots stay exact.

    The same state is placed in the program and in eager PyTorch, then both continue at `start`.
    """
    runner = fp16[0]
    tokens = small_tokens[0]
    state = _eager_state_from(small_model, tokens[:16])
    runner.load_state({k: v.numpy() for k, v in state.items()})
    with torch.no_grad():
        ref, _ = small_model.forward(tokens[16:16 + 2 * CHUNK][None], torch.tensor([start]), state)
    ref = ref[0].numpy()
    got = np.concatenate([runner.prefill(tokens[16:16 + CHUNK].tolist(), start),
                          np.stack([runner.decode(int(t), start + CHUNK + i)
                                    for i, t in enumerate(tokens[16 + CHUNK:16 + 2 * CHUNK])])])
    assert np.abs(got - ref).max() < fp16_tolerance(ref)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_new_sequence_ignores_a_dirty_state(fp16, small_tokens):
    """Position 0 clears the recurrence and the conv window and masks the cache (bug class: stale state)."""
    runner = fp16[0]
    seq = small_tokens[0, 40:52].tolist()
    runner.reset()
    fresh = np.stack([runner.decode(t, i) for i, t in enumerate(seq)])
    feed(runner, small_tokens[0, :20].tolist())  # dirty: a window and more of another sequence
    reused = np.stack([runner.decode(t, i) for i, t in enumerate(seq)])
    np.testing.assert_array_equal(fresh, reused)


def test_bench_says_when_it_times_the_interpreter_not_core_ml(fp16, small_tokens):
    """Off macOS the runner is rgexport's MIL interpreter: a speed table must not pass it off as Core ML."""
    import platform

    from rgexport.bench import markdown_report, time_runner

    runner = fp16[0]
    result = time_runner("coreml / fp16", "coreml", "fp16", 1, lambda: runner, small_tokens[0].tolist(), 8)
    report = markdown_report({"machine": {"cpu_count": 2, "torch_threads": 1, "memory_bandwidth_gbs": 10.0},
                              "decode_tokens": 8, "results": [result.to_dict() | {
                                  "speedup_vs_eager": None, "fraction_of_bandwidth_limit": 0.5}]})
    if platform.system() == "Darwin":
        assert result.stand_in == "" and "| coreml / fp16 |" in report
    else:
        assert "not Core ML" in result.stand_in
        assert "| coreml / fp16 * |" in report and "* coreml / fp16: rgexport's numpy MIL interpreter" in report


def test_state_matches_eager(fp16, small_model, small_tokens):
    runner = fp16[0]
    runner.reset()
    feed(runner, small_tokens[0, :37].tolist())
    got = runner.state()
    with torch.no_grad():
        state = small_model.init_state()
        for i in range(37):
            _, state = small_model.step(small_tokens[:, i], torch.tensor([i]), state)
    assert set(got) == set(state)
    for name, ref in state.items():
        ref = ref.numpy()
        assert got[name].dtype == np.float32 and got[name].shape == ref.shape
        assert np.abs(got[name] - ref).max() < 17 * U16 * max(1.0, np.abs(ref).max()), name


def test_artifact_is_one_multifunction_package_sharing_weights(fp16, small_config):
    runner, path, ctx, manifest = fp16
    assert path.name == "model.mlpackage" and path.suffix == get_backend("coreml").artifact_suffix
    program = runner.program
    assert set(program.functions) == {"decode", "prefill"} and program.default_function == "decode"
    # Both functions declare the same fp16 states: one MLState serves both.
    states = {fn: {k: (t.shape, t.dtype) for k, t in f.states.items()} for fn, f in program.functions.items()}
    assert states["decode"] == states["prefill"]
    assert {dtype for _, dtype in states["decode"].values()} == {np.float16}
    # Weights are stored once (fp16) although two functions use them.
    assert weight_bytes(path) < 1.1 * 2 * small_config.num_parameters()
    assert ctx.facts["coreml"]["state_dtype"] == "float16"


def test_position_arithmetic_and_recurrence_are_float32(fp16):
    """The fp16 program keeps its float32 islands: sin/cos of rotary angles, the ring-slot floor, h."""
    program = fp16[0].program
    for fn, f in program.functions.items():
        dtypes = {}
        for o in f.ops:
            for _, t in o.outputs:
                dtypes.setdefault(o.type, set()).add(t.dtype)
        for op_type in ("sin", "cos", "floor", "sqrt"):
            assert dtypes[op_type] == {np.float32}, (fn, op_type)
        assert dtypes["linear"] == {np.float16} and dtypes["softmax"] == {np.float16}, fn
        # The recurrence h = a * h + x: additions writing the RG-LRU state are fp32 before the final cast.
        counts = fp16[2].facts["coreml"]["fp32_island_ops"][fn]
        assert counts["position"] > 0 and counts["rg_lru"] > 0


def test_residuals_past_256_do_not_overflow_the_norms(small_model, small_config, small_tokens, tmp_path):
    """Trained Gemma-family residual streams reach hundreds (a 2B checkpoint folder's: 457), where x * x
    passes fp16's 65504: RMSNorm's mean of squares must be float32, or its rsqrt is 0 and every logit equal.
    Here the embedding's scale is raised until the residual's rms is about 500."""
    model = copy.deepcopy(small_model)
    tokens = small_tokens[:, :24]
    x = model.embedder.encode(tokens)
    model.embedder.scale *= 500.0 / float(x.pow(2).mean().sqrt())
    residual = model.embedder.encode(tokens)
    assert float(residual.pow(2).mean(-1).min()) > 65504, "the test needs squares past fp16's range"
    ref = model.score(tokens, chunk=1)[0].numpy()
    runner, _, ctx, _ = build(model, small_config, tmp_path)
    got = decode_all(runner, tokens[0].tolist())
    assert np.isfinite(got).all() and got.std(-1).min() > 0.1 * ref.std(-1).min()  # not constant logits
    assert np.abs(got - ref).max() < fp16_tolerance(ref)
    norms = 2 * len(small_config.block_types) + 1  # two per block and the final norm: 4 ops each
    assert ctx.facts["coreml"]["fp32_island_ops"]["decode"]["rms_norm"] == 4 * norms


@pytest.mark.parametrize("state_dtype", ["float16", "float32"])
def test_runner_takes_state_names_from_the_contract(state_dtype, small_config):
    """Packages built under the older naming rule (`coreml_state`, `state_blocks_0_rg_lru`) still run."""
    from rgexport.backends.coreml.runner import _names_from_contract

    ctx = BuildContext(config=small_config, recipe="fp16", work_dir=None, prefill_chunk=CHUNK,
                       options={"state_dtype": state_dtype})
    io = get_backend("coreml").io_contract(ctx)
    new = {s.name: (identifier(input_name(s)), identifier(output_name(s))) if state_dtype == "float32"
           else (s.identifier, s.identifier) for s in state_spec(small_config)}
    assert _names_from_contract(io) == new
    old = {}
    for t in io["state"]["tensors"]:
        flat = t["name"].replace(".", "_")
        if state_dtype == "float32":
            t["input"], t["output"] = old[t["name"]] = f"state_{flat}", f"new_state_{flat}"
        else:
            del t["identifier"]
            t["coreml_state"] = flat
            old[t["name"]] = (flat, flat)
    assert _names_from_contract(io) == old


def test_io_contract(fp16, small_config):
    io = fp16[3]["io"]
    assert io["state"]["placement"] == "internal"
    assert {t["dtype"] for t in io["state"]["tensors"]} == {"float16"}
    assert io["state"]["total_bytes"] == sum(2 * math.prod(t["shape"]) for t in io["state"]["tensors"])
    program = fp16[0].program
    assert {t["identifier"] for t in io["state"]["tensors"]} == set(program.functions["decode"].states)
    assert [i["name"] for i in io["methods"]["decode"]["inputs"]] == ["token", "position"]
    assert set(program.functions["decode"].inputs) - set(program.functions["decode"].states) == {"token", "position"}
    assert set(program.functions["prefill"].inputs) - set(program.functions["prefill"].states) == {"tokens", "position"}
    assert io["prefill_chunk"] == CHUNK


def test_bad_recipe_and_option_are_refused(small_model, small_config, tmp_path):
    backend = get_backend("coreml")
    with pytest.raises(RgexportError, match="no recipe 'int3'.*expected one of"):
        backend.quantize(small_model, BuildContext(small_config, "int3", tmp_path, CHUNK))
    with pytest.raises(RgexportError, match="state_dtype.*expected one of"):
        backend.quantize(small_model, BuildContext(small_config, "fp16", tmp_path, CHUNK,
                                                   options={"state_dtype": "bfloat16"}))
    with pytest.raises(RgexportError, match="compute_units.*expected one of"):
        backend.quantize(small_model, BuildContext(small_config, "fp16", tmp_path, CHUNK,
                                                   options={"compute_units": "NPU"}))


def test_backend_attributes():
    backend = get_backend("coreml")
    assert (backend.name, backend.extra, backend.artifact_suffix) == ("coreml", "coreml", ".mlpackage")
    assert backend.default_recipe == "fp16"
    assert set(backend.recipes) == {"fp16", "w8", "w4", "palette4", "w8a8"}
    assert all(backend.recipes[r].quantized for r in ("w8", "w4", "palette4", "w8a8"))
    assert [r for r, recipe in backend.recipes.items() if recipe.calibrated] == ["w8a8"]
    assert set(backend.packages) == {"coremltools", "torch"}


@pytest.mark.parametrize("recipe", ["w8", "w4", "palette4"])
def test_compression_keeps_an_all_zero_row_exactly_zero(recipe, tmp_path):
    """The padding-row bug class: coremltools gives an all-zero row scale 0 (and NaN cast to int) or a
    palette entry that is not 0; the backend makes the row dequantise to exact zeros, no scale 0."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.optimize import coreml as cto

    from rgexport.backends.coreml.mil_interpreter import Program
    from rgexport.backends.coreml.recipes import _compress, _compression_config

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 128)).astype(np.float32)
    weight[3] = 0.0

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 128))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=weight, name="y")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       skip_model_load=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        compressed = _compress(model, recipe)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    with np.errstate(invalid="ignore"):  # coremltools alone, for comparison
        raw = (cto.palettize_weights if recipe == "palette4" else cto.linear_quantize_weights)(
            model, _compression_config(recipe))

    def dense_weight(mlmodel, name):
        mlmodel.save(str(tmp_path / name))
        consts = Program.load(tmp_path / name).functions["main"].consts.values()
        (dense,) = [v for v in consts if np.shape(v) == weight.shape]
        return dense

    dense, before = dense_weight(compressed, "fixed.mlpackage"), dense_weight(raw, "raw.mlpackage")
    assert not dense[3].any() and np.isfinite(dense).all()
    others = np.arange(len(weight)) != 3
    if recipe == "palette4":
        # Only the table entry nearest 0 (which the zero row used) moved, to 0.
        moved = dense[others] != before[others]
        assert np.all(dense[others][moved] == 0)
        assert np.all(np.abs(before[others][moved]) <= np.abs(before[3]).max())
    else:
        np.testing.assert_array_equal(dense[others], before[others])
    for op in compressed._mil_program.functions["main"].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            assert (op.scale.val != 0).all()


# fp32 state passed in and out ------------------------------------------------------------------
@pytest.mark.slow
def test_float32_state_variant(small_model, small_config, small_tokens, eager, tmp_path):
    runner, path, ctx, manifest = build(small_model, small_config, tmp_path, state_dtype="float32")
    io = manifest["io"]
    assert io["state"]["placement"] == "io" and {t["dtype"] for t in io["state"]["tensors"]} == {"float32"}
    decode = runner.program.functions["decode"]
    assert not decode.states
    for spec in small_model.state_spec(1):
        name = identifier(input_name(spec))
        assert decode.inputs[name].dtype == np.float32
        assert any(i["name"] == i["identifier"] == name for i in io["methods"]["decode"]["inputs"])
    out = decode_all(runner, small_tokens[0].tolist())
    assert np.abs(out - eager).max() < fp16_tolerance(eager)
    runner.reset()
    fed = feed(runner, small_tokens[0, :75].tolist())
    assert np.abs(fed - eager[:75]).max() < fp16_tolerance(eager)
    assert runner.state()["blocks.0.rg_lru"].dtype == np.float32


# Quantised recipes -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padded_model(small_model):
    """SMALL with an all-zero padding row in the embedding, as trained models have (token 0)."""
    model = copy.deepcopy(small_model)
    with torch.no_grad():
        model.embedder.input_embedding[0] = 0.0
    return model


@pytest.mark.slow
@pytest.mark.parametrize("recipe, max_ratio, min_top1", [("w8", 0.6, 0.9), ("w4", 0.4, 0.6),
                                                         ("palette4", 0.4, 0.6)])
def test_quantized_recipe(recipe, max_ratio, min_top1, padded_model, small_config, small_tokens, fp16,
                          tmp_path):
    runner, path, ctx, _ = build(padded_model, small_config, tmp_path, recipe=recipe)
    assert weight_bytes(path) < max_ratio * weight_bytes(fp16[1])
    tokens = small_tokens[0].tolist()
    tokens[5] = 0  # the padding token itself
    ref = padded_model.score(torch.tensor([tokens]), chunk=1)[0].numpy()
    out = decode_all(runner, tokens)
    assert np.isfinite(out).all()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= min_top1
    # The padding row dequantises to exact zeros with a usable (non-zero) scale.
    embedding = [v for v in runner.program.functions["decode"].consts.values()
                 if np.shape(v) == (small_config.vocab_size, small_config.width)]
    assert embedding and all(np.isfinite(e).all() and not e[0].any() for e in embedding)
    expected = "constexpr_lut_to_dense" if recipe == "palette4" else "constexpr_blockwise_shift_scale"
    assert expected in runner.program.op_types("decode")


# From a stream ---------------------------------------------------------------------------------
def _compressed_weights(path: Path) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Every constexpr_blockwise_shift_scale's data and scale in the package, by function and weight name (the
    two paths name the op after the weight with different suffixes), read with coremltools' own loader."""
    import re

    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.models.utils import _try_get_weights_dir_path

    spec = ct.utils.load_spec(str(path))
    program = load(spec, specification_version=spec.specificationVersion,
                   file_weights_dir=_try_get_weights_dir_path(str(path)))
    out = {}
    for fname, f in program.functions.items():
        for o in f.operations:
            if o.op_type == "constexpr_blockwise_shift_scale":
                weight = re.sub(r"(_to_fp16)?_quantized(_cast_fp16)?$", "", o.name)
                out[fname, weight] = (np.asarray(o.data.val), np.asarray(o.scale.val))
    return out


@pytest.fixture(scope="module")
def shipped_w4_whole_and_streamed(shipped, tmp_path_factory):
    from rgexport.streaming import stream_checkpoint

    whole = build(shipped.model, shipped.config, tmp_path_factory.mktemp("w4_whole"), recipe="w4")
    stream = stream_checkpoint(shipped.source)
    streamed = build(None, shipped.config, tmp_path_factory.mktemp("w4_streamed"), recipe="w4", stream=stream)
    return whole, streamed, stream, stream.counter.peak, stream.counter.parts


def test_streamed_w4_compresses_every_weight_as_the_whole_model_build_does(shipped_w4_whole_and_streamed,
                                                                            shipped):
    """A large model's w4 is converted from a stand-in whose weights are read from the checkpoint as
    coremltools' pass reaches them. On the shipped model (forced with the stream) it writes the same int4
    data and scales as compressing the whole converted program, and computes the same logits bit for bit."""
    whole, streamed = shipped_w4_whole_and_streamed[:2]
    a, b = _compressed_weights(whole[1]), _compressed_weights(streamed[1])
    assert len(a) == 2 * 47 and a.keys() == b.keys()  # 47 weights, in decode and in prefill
    for key in a:
        assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a[key], b[key])), key
    assert weight_bytes(whole[1]) == weight_bytes(streamed[1])
    tokens = list(range(3, 3 + 2 * CHUNK + 5))
    for runner in (whole[0], streamed[0]):
        runner.reset()
    assert np.array_equal(feed(whole[0], tokens), feed(streamed[0], tokens))
    facts = streamed[2].facts["coreml"]["streamed_weights"]
    assert facts == {"stand_ins": 47, "compressed": 47, "parts_read": 1 + len(shipped.config.block_types)}


def test_own_model_holds_the_weights_the_package_holds(shipped_w4_whole_and_streamed, shipped):
    """Validation's own quantised model (`quantise_part`, from the manifest's block sizes) holds exactly the
    values the package's constexpr ops give its program, weight by weight; both build paths record the same
    blocks."""
    whole, streamed = shipped_w4_whole_and_streamed[:2]
    blocks = whole[2].facts["coreml"]["compressed_blocks"]
    assert blocks == streamed[2].facts["coreml"]["compressed_blocks"]
    assert blocks["embedder:input_embedding"] == [1, 32]
    backend = get_backend("coreml")
    model = copy.deepcopy(shipped.model)
    backend.quantise_part(model.embedder, "embedder", whole[2])
    for block in model.blocks:
        backend.quantise_part(block, "block", whole[2])
    consts = whole[0].program.functions["decode"].consts
    compared = 0
    for name, p in model.named_parameters():
        key = "model_" + name.replace(".", "_") + "_to_fp16_quantized"
        value = consts.get(key, consts.get(key + "_exact_zeros"))
        if value is not None:
            assert np.array_equal(p.numpy(), value), name
            compared += 1
    assert compared == 47
    assert backend.quantise_part(model.final_norm, "final_norm", BuildContext(
        config=shipped.config, recipe="fp16", work_dir=Path("."), prefill_chunk=CHUNK, facts=whole[2].facts)) is None


def test_streamed_w4_holds_one_part_of_the_model_at_a_time(shipped_w4_whole_and_streamed):
    """Counted, not timed: the float32 bytes the stream handed out and that were alive at once never pass the
    largest part (the embedding) plus the small tensors the stand-in keeps real (norms, biases). Holding the
    whole model would count every part."""
    from rgexport.model import Griffin
    from rgexport.streaming import block_weight_bytes

    _, _, stream, peak, parts_read = shipped_w4_whole_and_streamed
    parts = block_weight_bytes(stream.config)
    with torch.device("meta"):
        model = Griffin(stream.config)
    kept = sum(p.numel() * 4 for p in model.parameters() if p.dim() < 2 or p.numel() <= 2048)
    kept += sum(b.numel() * 4 for b in model.buffers())
    blocks = len(stream.config.block_types)
    assert max(parts.values()) + kept < sum(parts.values())
    assert peak <= max(parts.values()) + kept
    # The stand-in reads every part once; the conversion the embedding and each block (prefill takes
    # decode's compressed weights and reads nothing).
    assert parts_read == (blocks + 2) + (blocks + 1)


def _spec_text(path: Path) -> str:
    """The package's spec as text, without the numbers of its generated `coreml_update_state_N` names:
    coremltools numbers them from a counter that lives as long as the process (the conversions before one
    move it)."""
    import re

    return re.sub(r"coreml_update_state_\d+", "coreml_update_state_N", str(ct.utils.load_spec(str(path))))


def test_conversion_checked_once_writes_the_same_package(small_model, small_config, tmp_path, monkeypatch):
    """`validated_once` (coremltools' program check once per pass pipeline instead of after every pass) changes
    nothing in the package: SMALL's streamed w4 with and without it has the same program and the same weight
    bytes. It did replace the per-pass checks."""
    import contextlib

    from rgexport.backends.coreml import backend as coreml_backend
    from rgexport.streaming import stream_model

    packages, checks = {}, {}
    for label in ("once", "every pass"):
        if label == "every pass":
            monkeypatch.setattr(coreml_backend, "validated_once", lambda: contextlib.nullcontext({}))
        (tmp_path / label).mkdir()
        _, path, ctx, _ = build(None, small_config, tmp_path / label, recipe="w4", stream=stream_model(small_model))
        packages[label], checks[label] = path, ctx.facts["coreml"]["program_checks"]
    assert _spec_text(packages["once"]) == _spec_text(packages["every pass"])
    weights = [sorted((f.name, f.read_bytes()) for f in (p / "Data" / "com.apple.CoreML" / "weights").iterdir())
               for p in packages.values()]
    assert weights[0] == weights[1] and len(weights[0][0][1]) > 100_000
    for fn in ("decode", "prefill"):
        once = checks["once"][fn]
        assert once["checks"] == 3 and once["deferred"] > 50, once  # three pipelines: frontend, main, backend
    assert checks["every pass"] == {"decode": {}, "prefill": {}}


def test_compressed_weights_stay_compressed_in_the_interpreter(shipped_w4_whole_and_streamed, monkeypatch):
    """The interpreter keeps a large blockwise-quantised weight as its int data and scales (a 2B model's int4
    weights would take 10.7 GB as float32), one object for decode and prefill; `gather` dequantises the rows
    it takes, `linear` a slice of rows at a time into PyTorch's fp16 GEMM. The logits agree with the dense
    path's within the fp16 tolerance above (the sums run in another order, so single fp16 roundings differ and
    travel through the recurrence), whatever the slice."""
    from rgexport.backends.coreml import mil_interpreter as mil

    whole = shipped_w4_whole_and_streamed[0]
    path, manifest = whole[1], whole[3]
    tokens = list(range(3, 3 + CHUNK + 4))
    dense = get_backend("coreml").load(path.parent, manifest)
    expected = feed(dense, tokens)
    assert not any(isinstance(v, mil.CompressedWeight) for f in dense.program.functions.values()
                   for v in f.consts.values())

    monkeypatch.setattr(mil, "COMPRESSED_MIN_ELEMENTS", 1)
    for rows in (1 << 30, 3000):
        monkeypatch.setattr(mil, "_ROWS_PER_SLICE", rows)
        runner = get_backend("coreml").load(path.parent, manifest)
        kept = [v for f in runner.program.functions.values() for v in f.consts.values()
                if isinstance(v, mil.CompressedWeight)]
        assert len(kept) == 2 * 47 and len({id(v) for v in kept}) == 47  # one object for both functions
        got = feed(runner, tokens)
        assert np.abs(got - expected).max() < fp16_tolerance(expected)
        assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_compressed_linear_is_the_dense_linear_rounded_once():
    """One `linear` on a compressed weight against the dense path on the same values: the fp16 result of
    float32 sums, so equal but for a rare last-bit difference from the order of the sums; in PyTorch's fp16
    GEMM (5 rows, one token) and in its float32 GEMM on the fp16 values (a 32-token prefill's rows)."""
    from rgexport.backends.coreml import mil_interpreter as mil

    rng = np.random.default_rng(0)
    data = rng.integers(-8, 8, (300, 256)).astype(np.int8)
    scale = (rng.random((300, 8)) * 0.02).astype(np.float16).astype(np.float32)
    weight = mil.CompressedWeight(data, scale, None, np.float16)
    bias = rng.standard_normal(300).astype(np.float16).astype(np.float32)
    dense = np.asarray(weight)
    assert np.array_equal(dense, mil._round(mil._blockwise_shift_scale(data, scale), mil.TensorType(np.float16, ())))
    assert mil._FLOAT32_GEMM_ROWS <= 32
    for shape in ((5, 256), (1, 1, 256), (1, 32, 256)):  # and as decode and prefill give x
        x = rng.standard_normal(shape).astype(np.float16).astype(np.float32)
        ref = mil._round(x @ dense.T + bias, mil.TensorType(np.float16, ()))
        got = mil._linear(x, weight, bias)
        assert got.shape == ref.shape and (got == ref).mean() > 0.99
        assert np.abs(got - ref).max() <= 2 * U16 * np.abs(ref).max()
    rows = np.array([[3, 299], [0, 3]])
    assert np.array_equal(mil._gather(weight, rows), dense[rows])


# The shipped model -----------------------------------------------------------------------------
SHIPPED_CHUNK = 64


@pytest.fixture(scope="module")
def heldout_512(shipped):
    from rgexport.tokenizer import Tokenizer

    text = (Path(__file__).parents[1] / "calibration" / "corpus" / "heldout.txt").read_text()
    tokens = Tokenizer(shipped.tokenizer_path).encode(text)[:512]
    logits = shipped.model.score(torch.tensor([tokens]), chunk=128)[0].numpy()
    return tokens, logits


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    lp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), -1)
    return float(torch.exp(-lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].mean()))


@pytest.fixture(scope="module")
def shipped_fp16(shipped, tmp_path_factory):
    return build(shipped.model, shipped.config, tmp_path_factory.mktemp("shipped_fp16"), chunk=SHIPPED_CHUNK)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, max_ratio", [("fp16", 1.0), ("w8", 0.55), ("w4", 0.32), ("palette4", 0.30)])
def test_shipped_model_recipe(recipe, max_ratio, shipped, heldout_512, shipped_fp16, tmp_path):
    """Every recipe builds from the shipped model and holds up on 512 heldout tokens (8 prefill chunks), by
    the bounds `rgexport validate` judges it by (thresholds.toml).

    Measured (notes/coreml.md): fp16 top-1 99.8 %, perplexity ratio 1.000; w8 99.2 %, 0.999;
    w4 92.0 %, 1.020; palette4 87.5 %, 1.019; weights 0.51 / 0.29 / 0.26 of fp16.
    """
    tokens, ref = heldout_512
    if recipe == "fp16":
        runner, path = shipped_fp16[:2]
    else:
        runner, path, _, _ = build(shipped.model, shipped.config, tmp_path, recipe=recipe, chunk=SHIPPED_CHUNK)
    assert weight_bytes(path) <= max_ratio * weight_bytes(shipped_fp16[1])
    runner.reset()
    out = feed(runner, tokens)
    assert np.isfinite(out).all()
    if recipe == "fp16":
        assert np.abs(out - ref).max() < fp16_tolerance(ref)
    bounds = load_thresholds(recipe, get_backend("coreml").recipes[recipe].quantized, "coreml")
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= bounds["min_top1_agreement"]
    assert perplexity(out, tokens) <= bounds["max_ppl_ratio"] * perplexity(ref, tokens)


# w8a8: calibrated int8 activations -------------------------------------------------------------------
def test_w8a8_without_calibration_tokens_is_refused(small_model, small_config, tmp_path):
    backend = get_backend("coreml")
    for tokens in (None, [], [[]]):
        ctx = BuildContext(small_config, "w8a8", tmp_path, CHUNK, calibration_tokens=tokens)
        with pytest.raises(RgexportError, match="w8a8 is calibrated.*calibration token sequences"):
            backend.quantize(small_model, ctx)


def _toy_program():
    """A stateful fp16 program shaped like one Griffin step in miniature: two linears with a residual add
    between them and a recurrence on a state, h = a * h + x (the op names are what the passes select)."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(8, 16)).astype(np.float32) * 0.2

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8), dtype=types.fp16),
                             mb.StateTensorSpec(shape=(1, 8), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x, h):
        up = mb.linear(x=x, weight=w1.astype(np.float16), name="up")
        down = mb.linear(x=mb.tanh(x=up), weight=w2.astype(np.float16), name="down")
        res = mb.add(x=down, y=x, name="residual")
        new_h = mb.add(x=mb.mul(x=mb.read_state(input=h), y=np.float16(0.9)), y=res, name="recurrence")
        mb.coreml_update_state(state=h, value=new_h)
        return mb.identity(x=new_h, name="out")

    return ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                      pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True), w1, w2


def test_w8a8_ranges_and_coremltools_passes_on_a_toy_program(tmp_path):
    """The w8a8 machinery without a Griffin build: ranges over *all* samples from the interpreter (the
    widest sample is not the last: coremltools 9's own recorder keeps only the last), quantize/dequantize
    pairs only around the named ops, and the interpreter's result equal to int8 fake quantisation."""
    from rgexport.backends.coreml import calibration as cal
    from rgexport.backends.coreml.mil_interpreter import Program

    model, w1, w2 = _toy_program()
    program = Program(model.get_spec(), model.weights_dir)
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(1, 8)).astype(np.float16) * s for s in (1.0, 4.0, 0.5)]  # the widest in the middle
    feeds = [({"x": x}, {"h": np.full((1, 8), 0.25, np.float16)}) for x in xs]
    stats = cal.activation_ranges(program, "main", feeds)
    assert stats["x"]["rmax"] == max(float(x.max()) for x in xs)  # not the last sample's max
    assert stats["x"]["rmin"] == min(float(x.min()) for x in xs)

    quantized = cal.quantize_activations(model, ["up", "down"], stats)  # the adds stay float
    quantized.save(str(tmp_path / "toy.mlpackage"))
    q = Program.load(tmp_path / "toy.mlpackage")
    f = q.functions["main"]
    made_by = {name: o for o in f.ops for name, _ in o.outputs}
    linears = [o for o in f.ops if o.type == "linear"]
    assert len(linears) == 2 and all(made_by[o.inputs["x"][0][1]].type == "dequantize" for o in linears)
    adds = {o.name: o for o in f.ops if o.type == "add"}
    # The residual add reads `down` through its int8 output pair, but its other input (x) is not
    # quantised; the recurrence reads nothing quantised, and the state write takes its float result.
    assert adds["residual"].inputs["y"][0] == ("var", "x")
    assert all(made_by[b[1]].type != "dequantize" for b in (adds["recurrence"].inputs["x"][0],
                                                            adds["recurrence"].inputs["y"][0]))

    x = xs[1]
    state = {"h": np.full((1, 8), 0.25, np.float16)}
    got = q.run("main", {"x": x}, state)["out"]
    ref = program.run("main", {"x": x}, {"h": np.full((1, 8), 0.25, np.float16)})["out"]
    # int8 activations: close to the float program, not equal to it.
    assert 0 < np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    np.testing.assert_array_equal(state["h"], got.astype(np.float16))  # the state holds the float result


@pytest.fixture(scope="module")
def w8a8(small_model, small_config, tmp_path_factory):
    """SMALL through recipe w8a8, calibrated on real trajectories of random token sequences (SMALL has
    no tokenizer): two sequences of three windows, so calibration sees the ring buffer wrap."""
    g = torch.Generator().manual_seed(7)
    tokens = [torch.randint(0, small_config.vocab_size, (3 * small_config.attention_window_size,),
                            generator=g).tolist() for _ in range(2)]
    return build(small_model, small_config, tmp_path_factory.mktemp("coreml_w8a8"), recipe="w8a8",
                 calibration_tokens=tokens)


def _producers(function) -> dict[str, object]:
    return {name: o for o in function.ops for name, _ in o.outputs}


@pytest.mark.slow  # the SMALL w8a8 build takes 4-7 min on this machine
def test_w8a8_quantizes_the_linears_and_nothing_on_the_state_path(w8a8, small_config):
    """Every linear reads a dequantized int8 tensor; no quantize reads a float32 island (positions, the
    RG-LRU recurrence, the Conv1D) and no state write is fed through a dequantize."""
    runner, path, ctx, manifest = w8a8
    for fn, f in runner.program.functions.items():
        made_by = _producers(f)
        linears = [o for o in f.ops if o.type == "linear"]
        assert linears and all(made_by[o.inputs["x"][0][1]].type == "dequantize" for o in linears), fn
        quantizes = [o for o in f.ops if o.type == "quantize"]
        assert quantizes and {f.var_types[o.inputs["input"][0][1]].dtype for o in quantizes} == {np.float16}
        assert all(f.var_types[o.outputs[0][0]].dtype == np.int8 for o in quantizes)
        for o in f.ops:
            if o.type == "write_state":
                assert made_by[o.inputs["data"][0][1]].type != "dequantize", (fn, o.name)
            if o.type == "add" and f.var_types[o.outputs[0][0]].dtype == np.float32:  # an island's add
                reads = [made_by.get(b[1]) for b in (o.inputs["x"][0], o.inputs["y"][0]) if b[0] == "var"]
                assert all(r is None or r.type != "dequantize" for r in reads), (fn, o.name)
        facts = ctx.facts["coreml_w8a8"]["functions"][fn]
        assert facts["ops_int8"] == len(linears)
        assert facts["program_ops"]["linear (int8 input)"] == len(linears)
    # int8 weights too: no fp16 weight as large as a linear layer's is left.
    assert "constexpr_blockwise_shift_scale" in runner.program.op_types("decode")
    calibration = ctx.facts["coreml_w8a8"]["calibration"]
    assert calibration["samples_past_window"]["decode"] > 0 and calibration["samples_past_window"]["prefill"] > 0
    assert any("w8a8" in n for n in ctx.notes)


@pytest.mark.slow  # the SMALL w8a8 build takes 4-7 min on this machine
def test_w8a8_agrees_with_eager(w8a8, eager, small_tokens):
    """Decode and prefill+decode against eager fp32 over five windows. SMALL's random weights quantise
    worse than the trained model (measured here: top-1 ~0.9; the shipped model: notes/coreml.md)."""
    runner = w8a8[0]
    out = decode_all(runner, small_tokens[0].tolist())
    assert np.isfinite(out).all()
    assert (out.argmax(-1) == eager.argmax(-1)).mean() >= 0.85
    runner.reset()
    fed = feed(runner, small_tokens[0, :75].tolist())
    assert (fed.argmax(-1) == eager[:75].argmax(-1)).mean() >= 0.85


@pytest.mark.slow
def test_shipped_model_w8a8(shipped, heldout_512, shipped_fp16, tmp_path):
    """w8a8 from the shipped model, calibrated on the calibration corpus, holds the [w8a8] thresholds on 512
    heldout tokens. Measured (notes/coreml.md, chunk 32): top-1 94.9 %, perplexity ratio 0.996, KL 0.0045."""
    from rgexport.calibrate import calibration_token_sequences
    from rgexport.tokenizer import Tokenizer

    tokens, ref = heldout_512
    calibration = calibration_token_sequences(Tokenizer(shipped.tokenizer_path), shipped.config)
    runner, path, ctx, _ = build(shipped.model, shipped.config, tmp_path, recipe="w8a8", chunk=SHIPPED_CHUNK,
                                 calibration_tokens=calibration)
    assert weight_bytes(path) <= 0.55 * weight_bytes(shipped_fp16[1])
    runner.reset()
    out = feed(runner, tokens)
    assert np.isfinite(out).all()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.93
    assert perplexity(out, tokens) <= 1.03 * perplexity(ref, tokens)


@pytest.mark.parametrize("recipe, shape, blocks", [
    ("w4", (96, 64), [1, 32]), ("w4", (3, 64, 64), [3, 32, 1]), ("w8", (96, 64), [1, 0]), ("w8", (40, 7), [1, 0]),
])
def test_blockwise_compress_is_coremltools_arithmetic(recipe, shape, blocks):
    """rgexport's PyTorch run of coremltools' symmetric blockwise quantisation gives coremltools' int data and
    fp16 scales exactly: random weights over a wide range, an all-zero block (exact zeros over scale 1, as
    `_zero_scale_to_one` writes), and (2-D w4) values half-way between two steps."""
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    from rgexport.backends.coreml.recipes import _block_mask, _compression_config, blockwise_compress

    config = _compression_config(recipe).global_config
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * np.exp(rng.uniform(-6, 3, shape))).astype(np.float16)
    w[tuple(slice(0, b or d) for b, d in zip(blocks, shape))] = 0  # the first block: all zeros
    flat = w.reshape(-1)
    # The last 32 values: |x| < 0.4 and then +-7, so that a 2-D w4 block of 32 there has scale 14 / 14 = 1
    # and 3.5, 2.5, 0.5 lie half-way between two steps (round half to even decides them).
    flat[-32:] = rng.uniform(-0.4, 0.4, 32).astype(np.float16)
    flat[-8:] = np.array([3.5, -3.5, 2.5, -2.5, 7, -7, 0.5, -0.5], dtype=np.float16)
    ours = blockwise_compress(w, config.dtype, config.mode, blocks)
    theirs = linear_quantize_weights.blockwise_compress_by_dtype(w, config.dtype, config.mode, blocks)
    zero = theirs.scale == 0
    assert zero.any()
    data = theirs.data.copy()
    data[_block_mask(zero, data.shape)] = 0
    assert ours.data.dtype == theirs.data.dtype and ours.data.dtype.metadata == theirs.data.dtype.metadata
    assert np.array_equal(ours.data, data)
    assert ours.scale.dtype == theirs.scale.dtype == np.float16
    assert np.array_equal(ours.scale, np.where(zero, 1, theirs.scale))
    if blocks == [1, 32]:
        assert theirs.scale[-1, -1] == 1 and list(data.reshape(-1)[-8:]) == [4, -4, 2, -2, 7, -7, 0, 0]
