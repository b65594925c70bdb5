"""LiteRT backend: conversion, signature names, per-position parity past the window, recipes.

Each artifact is built once per module (the SMALL config converts in about 15-50 s on this machine);
the quantised recipes reuse the float export, as `lower` allows. The calibrated recipe (w8a8) gets it
with a representative dataset captured from the SMALL model (random weights, so random tokens: there is
no text it was trained on); the shipped model's slow test calibrates on the real calibration text.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert.interpreter")
pytest.importorskip("ai_edge_quantizer")

from rgexport.backends import BuildContext, feed, get_backend
from rgexport.backends.tflite import TFLiteBackend
from rgexport.backends.tflite import calibration as tc
from rgexport.backends.tflite.calibration import representative_dataset
from rgexport.backends.tflite.export import (
    ARTIFACT_FILE,
    TFLiteExport,
    _check_against_eager,
    _check_runs,
    _signatures,
    op_histogram,
)
from rgexport.errors import RgexportError
from rgexport.model import identifier
from rgexport.validate import load_thresholds

CHUNK = 8
# Top-1 agreement with eager fp32 over the 80 SMALL tokens, measured on this random model (perturbed
# paper init, weights x1.5, so logits are large and flat): fp16 100%, int8 97.5%, int4 (block 32)
# 62.5% (the same on AVX2 and AVX-512). The bounds sit 3 tokens under those, so a defect that costs 4 tokens
# (5 points) fails; random weights are harsher on 4-bit weights than a trained model (see notes/tflite.md
# for the shipped model).
MIN_TOP1 = {"fp16": 0.96, "int8": 0.93, "int4": 0.58}
# w8a8 on SMALL, calibrated on SMALL_CALIBRATION: 95.0% top-1 (int8: 97.5%), mean |err| 0.088 (int8:
# 0.042). Other calibration seeds gave 88.8-95.0%, 0.088-0.095. Regressions this must catch, measured on the
# same file: gate matmuls with per-channel weights 88.8% / 0.144; moving-average ranges 75.0% / 0.302;
# attention scores static too 68.8% / 0.498.
W8A8_MIN_TOP1 = 0.91  # 3 tokens under the 95.0% measured (AVX2 and AVX-512)
W8A8_MAX_MEAN_ERROR = 0.12


def _small_calibration_tokens(config) -> list[list[int]]:
    """Four sequences of three windows, as `calibrate.calibration_token_sequences` makes from text."""
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, config.vocab_size, (4, 3 * config.attention_window_size), generator=g).tolist()


def _ctx(config, recipe: str, work_dir, **options) -> BuildContext:
    return BuildContext(config=config, recipe=recipe, work_dir=work_dir, prefill_chunk=CHUNK, options=options)


def _mixed_schedule(n: int, chunk: int) -> list[tuple[str, int, int]]:
    """(method, start, length): prefill chunks and decode runs of 1, 3, 5, 2... tokens, unaligned."""
    out, i, runs = [], 0, [1, 3, 5, 2, 4]
    k = 0
    while i < n:
        if n - i >= chunk and k % 2 == 0:
            out.append(("prefill", i, chunk))
            i += chunk
        else:
            m = min(runs[k % len(runs)], n - i)
            out.append(("decode", i, m))
            i += m
        k += 1
    return out


def _run_mixed(runner, tokens: list[int]) -> np.ndarray:
    logits = []
    for method, start, length in _mixed_schedule(len(tokens), runner.prefill_chunk):
        if method == "prefill":
            logits.append(runner.prefill(tokens[start : start + length], start))
        else:
            for p in range(start, start + length):
                logits.append(runner.decode(tokens[p], p)[None])
    return np.concatenate(logits)


@pytest.fixture(scope="module")
def eager(small_model, small_tokens):
    """Token-by-token eager logits [n, v] and the final state."""
    state = small_model.init_state()
    out = []
    with torch.no_grad():
        for p in range(small_tokens.shape[1]):
            logits, state = small_model.step(small_tokens[:, p], torch.tensor([p]), state)
            out.append(logits[0])
    return torch.stack(out).numpy(), {k: v.numpy() for k, v in state.items()}


@pytest.fixture(scope="module")
def float_export(small_model, small_config, tmp_path_factory):
    backend = TFLiteBackend()
    ctx = _ctx(small_config, "fp32", tmp_path_factory.mktemp("tflite-export"))
    return backend.export(small_model, ctx), ctx


def _build(backend, exported, config, recipe, work_dir, **options):
    ctx = _ctx(config, recipe, work_dir, **options)
    files = backend.write(backend.lower(exported, ctx), ctx)
    manifest = {"artifact": {"file": files[0].name}, "io": backend.io_contract(ctx)}
    return ctx, files[0], manifest


@pytest.fixture(scope="module")
def small_dataset(small_model, small_config):
    return representative_dataset(small_model, _small_calibration_tokens(small_config), CHUNK)


@pytest.fixture(scope="module")
def artifacts(float_export, small_config, small_dataset, tmp_path_factory):
    """recipe -> (ctx, path, manifest) for every recipe, all from the one float export."""
    backend = TFLiteBackend()
    exported, _ = float_export
    return {r: _build(backend, TFLiteExport(exported, small_dataset) if backend.recipes[r].calibrated else exported,
                      small_config, r, tmp_path_factory.mktemp(f"tflite-{r}"))
            for r in backend.recipes}


def _load(artifacts, recipe):
    _, path, manifest = artifacts[recipe]
    return TFLiteBackend().load(path.parent, manifest)


# Registration and names -----------------------------------------------------------------------------
def test_backend_is_registered():
    backend = get_backend("tflite")
    assert isinstance(backend, TFLiteBackend)
    assert (backend.name, backend.extra, backend.artifact_suffix) == ("tflite", "tflite", ".tflite")
    assert set(backend.recipes) == {"fp32", "fp16", "int8", "int4", "w8a8"}
    assert not backend.recipes["fp32"].quantized and all(
        backend.recipes[r].quantized for r in ("fp16", "int8", "int4", "w8a8"))
    assert [r for r, recipe in backend.recipes.items() if recipe.calibrated] == ["w8a8"]


def test_signatures_match_the_contract(artifacts):
    """Names, shapes and dtypes of both signatures, read from the interpreter, equal the contract's."""
    from ai_edge_litert.interpreter import Interpreter

    for recipe, (_, path, manifest) in artifacts.items():
        interpreter = Interpreter(model_path=str(path))
        assert set(interpreter.get_signature_list()) == {"decode", "prefill"}, recipe
        for method, contract in manifest["io"]["methods"].items():
            runner = interpreter.get_signature_runner(contract["signature"])
            for kind, details in (("inputs", runner.get_input_details()), ("outputs", runner.get_output_details())):
                got = {n: (list(d["shape"]), np.dtype(d["dtype"]).name) for n, d in details.items()}
                want = {t["identifier"]: (t["shape"], t["dtype"]) for t in contract[kind]}
                assert got == want, (recipe, method, kind)
            first = "token" if method == "decode" else "tokens"
            assert np.dtype(runner.get_input_details()[first]["dtype"]) == np.int32
            assert np.dtype(runner.get_input_details()["position"]["dtype"]) == np.int32
        for t in manifest["io"]["state"]["tensors"]:
            assert (t["litert_input"], t["litert_output"]) == (identifier(t["input"]), identifier(t["output"]))


def test_conversion_check_catches_swapped_names(float_export, small_model, small_config):
    """The build-time check compares by name: two same-shaped state outputs swapped must fail it."""
    flatbuffer, ctx = float_export
    assert ctx.facts["conversion_check"]["max_relative_error"] < 1e-4
    signatures = _signatures(small_model, CHUNK)
    names = signatures["decode"].output_names
    a, b = names.index(identifier("new_state.blocks.0.rg_lru")), names.index(identifier("new_state.blocks.1.rg_lru"))
    names[a], names[b] = names[b], names[a]
    with pytest.raises(RgexportError, match="differs from eager"):
        _check_against_eager(flatbuffer, signatures, ctx)


def test_graph_keeps_tanh_gelu_and_has_no_scatter(artifacts):
    """Bug classes met on other backends: tanh-GELU computed exactly, scatter ops old runtimes reject."""
    from ai_edge_litert import schema_py_generated as schema

    _, path, _ = artifacts["fp32"]
    flatbuffer = path.read_bytes()
    ops = op_histogram(flatbuffer)
    assert set(ops) == {"decode", "prefill"}
    for counts in ops.values():
        assert not [op for op in counts if "SCATTER" in op or op.startswith("STABLEHLO")], counts
    # The converter fuses our written-out tanh-GELU into GELU ops; each must keep approximate=True.
    model = schema.Model.GetRootAs(flatbuffer, 0)
    gelus = []
    for i in range(model.SubgraphsLength()):
        sg = model.Subgraphs(i)
        for j in range(sg.OperatorsLength()):
            op = sg.Operators(j)
            if model.OperatorCodes(op.OpcodeIndex()).BuiltinCode() == schema.BuiltinOperator.GELU:
                options = schema.GeluOptions()
                table = op.BuiltinOptions()
                options.Init(table.Bytes, table.Pos)
                gelus.append(options.Approximate())
    assert gelus and all(gelus), gelus


# fp32 parity --------------------------------------------------------------------------------------
def test_fp32_matches_eager_at_every_position(artifacts, eager, small_tokens, small_config):
    """Prefill chunks and decode runs mixed over five windows; checked position by position.

    A .tflite whose mask or head grouping was miscompiled was exact at position 0 and ~1.0 off after
    it, so the maximum over all positions is not enough: every position must pass, including those
    after the ring buffer has wrapped.
    """
    runner = _load(artifacts, "fp32")
    tokens = small_tokens[0].tolist()
    got = _run_mixed(runner, tokens)
    ref_logits, ref_state = eager
    assert got.shape == ref_logits.shape == (len(tokens), small_config.vocab_size)
    per_position = np.abs(got - ref_logits).max(axis=1)
    bad = {p: float(e) for p, e in enumerate(per_position) if not e <= 1e-4}
    assert not bad, f"positions over 1e-4: {bad}"
    assert len(tokens) > 4 * small_config.attention_window_size  # the window wrapped
    state = runner.state()
    assert set(state) == set(ref_state)
    for name, want in ref_state.items():
        np.testing.assert_allclose(state[name], want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_feed_runs_whole_chunks_then_decode(artifacts, eager, small_tokens):
    runner = _load(artifacts, "fp32")
    got = feed(runner, small_tokens[0, :29].tolist())  # 3 chunks of 8, then 5 decode steps
    assert np.abs(got - eager[0][:29]).max() <= 1e-4


def test_runner_state_is_owned_and_reusable(artifacts, small_tokens):
    """Outputs fed back must not alias interpreter memory; position 0 starts afresh from any state."""
    runner = _load(artifacts, "fp32")
    tokens = small_tokens[0].tolist()
    first = runner.prefill(tokens[:CHUNK], 0)
    snapshot = runner.state()
    held = dict(runner._state)  # the arrays the runner will feed back next
    copies = {k: v.copy() for k, v in held.items()}
    runner.decode(tokens[CHUNK], CHUNK)
    runner.prefill(tokens[CHUNK + 1 : 2 * CHUNK + 1], CHUNK + 1)
    for k, v in held.items():
        assert np.array_equal(v, copies[k]), f"{k} changed after later calls: it aliases interpreter memory"
    assert any(not np.array_equal(snapshot[k], v) for k, v in runner.state().items())
    again = runner.prefill(tokens[:CHUNK], 0)  # dirty state, position 0
    np.testing.assert_array_equal(again, first)
    runner.reset()
    assert all(not v.any() for v in runner.state().values())
    mem = runner.memory()
    assert mem["model_bytes"] == artifacts["fp32"][1].stat().st_size
    assert mem["state_bytes"] == artifacts["fp32"][2]["io"]["state"]["total_bytes"]


def test_builtin_kernels_without_xnnpack_match_too(artifacts, eager, small_tokens):
    """delegate="none" runs LiteRT's own kernels: a second opinion that the graph, not XNNPACK, is right."""
    _, path, manifest = artifacts["fp32"]
    manifest = {**manifest, "backend_facts": {"runtime_options": {"delegate": "none", "num_threads": 1}}}
    got = _run_mixed(TFLiteBackend().load(path.parent, manifest), small_tokens[0].tolist())
    assert np.abs(got - eager[0]).max(axis=1).max() <= 1e-4


def test_runner_refuses_bad_calls(artifacts, small_config):
    runner = _load(artifacts, "fp32")
    with pytest.raises(RgexportError, match="exactly"):
        runner.prefill([1, 2, 3], 0)
    with pytest.raises(RgexportError, match="Token ids"):
        runner.decode(small_config.vocab_size, 0)


def test_load_checks_the_manifest(artifacts):
    _, path, manifest = artifacts["fp32"]
    broken = {**manifest, "io": {**manifest["io"], "methods": {**manifest["io"]["methods"]}}}
    decode = dict(broken["io"]["methods"]["decode"])
    decode["inputs"] = [dict(t) for t in decode["inputs"]]
    decode["inputs"][2]["shape"] = [1, 999]
    broken["io"]["methods"]["decode"] = decode
    with pytest.raises(RgexportError, match="do not match the manifest"):
        TFLiteBackend().load(path.parent, broken)
    with pytest.raises(RgexportError, match="does not exist"):
        TFLiteBackend().load(path.parent, {**manifest, "artifact": {"file": "missing.tflite"}})


# Recipes ------------------------------------------------------------------------------------------
def test_quantised_recipes_shrink_in_order(artifacts):
    size = {r: path.stat().st_size for r, (_, path, _) in artifacts.items()}
    assert size["int4"] < size["int8"] < size["fp16"] < size["fp32"], size
    # w8a8 holds the same int8 weights as int8, plus the activations' quantisation parameters.
    assert size["int8"] < size["w8a8"] < size["fp16"], size
    assert artifacts["int4"][0].facts["recipe"]["int4_block_size"] == 32


@pytest.mark.parametrize("recipe", ["fp16", "int8", "int4"])
def test_quantised_recipe_agrees_on_top1(recipe, artifacts, eager, small_tokens):
    runner = _load(artifacts, recipe)
    got = _run_mixed(runner, small_tokens[0].tolist())
    ref = eager[0]
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    assert top1 >= MIN_TOP1[recipe], f"{recipe} top-1 agreement {top1:.3f}"
    # Quantisation must actually have happened (and not silently fallen back to float32).
    assert np.abs(got - ref).max() > 1e-4


# The calibrated recipe -------------------------------------------------------------------------------
def test_representative_dataset_is_real_inputs_past_the_window(small_dataset, artifacts, small_config):
    """Samples carry every signature input with the contract's shape and dtype, cover positions past
    the window, and hold the states the fp32 model reached (not zeros)."""
    _, _, manifest = artifacts["w8a8"]
    window = small_config.attention_window_size
    for sig, rows in small_dataset.items():
        contract = {t["identifier"]: (t["shape"], t["dtype"]) for t in manifest["io"]["methods"][sig]["inputs"]}
        for row in rows:
            assert {n: (list(a.shape), a.dtype.name) for n, a in row.items()} == contract, sig
        positions = [int(r["position"][0]) for r in rows]
        assert min(positions) == 0 and max(positions) >= 2 * window, (sig, positions)
        late = [r for r in rows if int(r["position"][0]) >= window]
        assert late and all(np.abs(r[identifier("state.blocks.0.rg_lru")]).max() > 0 for r in late)
        assert all(np.abs(r[identifier("state.blocks.2.keys")]).min() != 0 for r in late)  # every slot live
    assert len(small_dataset["decode"]) == 4 * 3 * window  # every decode step of the four sequences
    assert len(small_dataset["prefill"]) == 4 * 3 * window // CHUNK


def test_w8a8_has_integer_activations_where_it_says(artifacts, float_export):
    """Read from the file: the projections, MLPs and RG-LRU gates compute on int8 activations with int8
    weights (gate matmul weights per tensor), and every op of the recurrence, Conv1D, attention scores,
    norms, residual stream, soft-cap and position arithmetic stays float32, as do the head's
    activations and the state."""
    ctx, path, _ = artifacts["w8a8"]
    ops = tc.op_groups(path.read_bytes())
    float_ops = tc.op_groups(float_export[0])
    for sig in ("decode", "prefill"):
        mine = [op for op in ops if op.subgraph == sig]
        # Every matmul of the static groups is int8 in, int8 weights, int8 out.
        want_fc = sum(1 for op in float_ops if op.subgraph == sig and op.op_type == "FULLY_CONNECTED"
                      and op.kind in tc.W8A8_STATIC_KINDS)
        fcs = [op for op in mine if op.op_type == "FULLY_CONNECTED" and op.kind in tc.W8A8_STATIC_KINDS]
        assert len(fcs) == want_fc and want_fc >= 4 * 3 + 2 * 4 + 6 * 3, (sig, len(fcs), want_fc)
        for op in fcs + [op for op in mine if op.kind == "rglru_gates" and op.op_type == "BATCH_MATMUL"]:
            assert op.inputs[:2] == ("int8", "int8") and op.outputs == ("int8",), (sig, op)
        gates = [op for op in mine if op.kind == "rglru_gates" and op.op_type in ("BATCH_MATMUL", "LOGISTIC")]
        assert len(gates) == 4 * 4 and all(op.inputs[0] == "int8" for op in gates), sig
        # The MLPs are int8 from their first matmul to their last: GELU and the gating multiply too.
        assert all(op.inputs[0] == "int8" for op in mine if op.kind == "mlp" and op.op_type in ("GELU", "MUL"))
        # What stays float holds no int8 tensor at all (QUANTIZE/DEQUANTIZE at the borders aside).
        for op in mine:
            if op.kind in tc.W8A8_FLOAT_KINDS and op.kind != "embed" and op.op_type not in ("QUANTIZE", "DEQUANTIZE"):
                if op.kind == "head" and op.op_type == "FULLY_CONNECTED":
                    assert op.inputs == ("float32", "int8") and op.outputs == ("float32",), op  # dynamic int8
                else:
                    assert "int8" not in op.inputs + op.outputs, (sig, op)
        assert {op.kind for op in mine if "int8" in op.inputs and op.op_type != "DEQUANTIZE"} <= {
            *tc.W8A8_STATIC_KINDS, "head", "embed"}
    integer = ctx.facts["w8a8"]["integer_activation_ops"]
    assert set(integer) == {"decode", "prefill"}
    assert all(set(kinds) == set(tc.W8A8_STATIC_KINDS) for kinds in integer.values()), integer
    assert set(ctx.facts["w8a8"]["float_activations"]) >= {"rglru", "attention", "conv1d", "norm", "softcap"}


def test_w8a8_int32_biases_match_each_signature(artifacts, float_export):
    """Decode and prefill share weights but are calibrated separately; each int8 matmul's int32 bias
    (scale = input scale x weight scale) must dequantise to the float bias in its own signature."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    _, path, _ = artifacts["w8a8"]
    q, f = (fu.read_model(bytearray(b)) for b in (path.read_bytes(), float_export[0]))
    float_bias = {}
    for sg in f.subgraphs:
        for t in sg.tensors:
            if t.type == 0 and t.buffer > 0 and f.buffers[t.buffer].data is not None:
                float_bias[fu.get_tensor_name(t)] = np.frombuffer(bytes(f.buffers[t.buffer].data), np.float32)
    checked = 0
    for op in tc.op_groups(path.read_bytes()):
        if op.op_type != "FULLY_CONNECTED" or op.inputs != ("int8", "int8", "int32"):
            continue
        sg = next(s for s in q.subgraphs if s.name.decode() == op.subgraph)
        x, w, b = (sg.tensors[i] for i in sg.operators[op.index].inputs)
        np.testing.assert_allclose(b.quantization.scale, x.quantization.scale[0] * np.asarray(w.quantization.scale),
                                   rtol=1e-5)
        got = np.frombuffer(bytes(q.buffers[b.buffer].data), np.int32) * np.asarray(b.quantization.scale)
        want = float_bias[fu.get_tensor_name(b)]
        assert np.abs(got - want).max() <= 0.01 * np.abs(want).max() + 1e-6, (op.subgraph, op.group)
        checked += 1
    assert checked >= 2 * (4 * 3 + 2 + 6 * 3)  # both signatures: recurrent projections, proj_final, MLPs


def test_w8a8_agrees_on_top1(artifacts, eager, small_tokens):
    runner = _load(artifacts, "w8a8")
    got = _run_mixed(runner, small_tokens[0].tolist())
    ref = eager[0]
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    mean_error = float(np.abs(got - ref).mean())
    assert top1 >= W8A8_MIN_TOP1, f"w8a8 top-1 agreement {top1:.3f}"
    assert 1e-4 < mean_error <= W8A8_MAX_MEAN_ERROR, f"w8a8 mean |logit error| {mean_error:.4f}"


def test_w8a8_records_its_calibration_and_decision(artifacts, small_config):
    ctx, _, _ = artifacts["w8a8"]
    calibration = ctx.facts["calibration"]
    assert calibration["samples"] == {"decode": 4 * 3 * 16, "prefill": 4 * 3 * 16 // CHUNK}
    assert calibration["range_update"] == "min_max"
    sensitivity = ctx.facts["w8a8"]["sensitivity"]["groups"]
    assert sensitivity["attention.2"][0] < 0.95 and all(sensitivity[g][0] >= 0.98 for g in ctx.facts["w8a8"][
        "static_int8_groups"] if g in sensitivity)
    assert any("w8a8" in n and "Float32 activations" in n for n in ctx.notes)
    assert "RG-LRU recurrence" in TFLiteBackend.recipes["w8a8"].description


def test_calibrated_recipe_needs_its_data(float_export, small_model, small_config, tmp_path):
    backend = TFLiteBackend()
    with pytest.raises(RgexportError, match="calibration token sequences"):
        backend.export(small_model, _ctx(small_config, "w8a8", tmp_path))  # fails before converting
    with pytest.raises(RgexportError, match="TFLiteExport"):
        backend.lower(float_export[0], _ctx(small_config, "w8a8", tmp_path))
    with pytest.raises(RgexportError, match="no prefill sample"):
        representative_dataset(small_model, [[1, 2, 3]], CHUNK)


def test_check_runs_catches_an_unfilled_output(float_export, small_dataset):
    """The guard `lower` runs after quantising: statically quantising the decode step's `x * y`, which
    reads the new RG-LRU state, gives a file whose signature output is never written."""
    from ai_edge_quantizer import qtyping, recipe_manager

    flatbuffer = float_export[0]
    ops = tc.op_groups(flatbuffer)
    culprit = next(op for op in ops if op.subgraph == "decode" and op.group == "recurrent_proj.0"
                   and op.op_type == "MUL")
    assert culprit.touches_output and culprit not in tc.static_ops(ops, ["recurrent_proj.0"])
    rm = recipe_manager.RecipeManager()
    rm.add_static_config("^" + re.escape(culprit.scope) + "$", qtyping.TFLOperationName.MUL, 8, 8)
    qsvs = tc.calibrate(flatbuffer, {"decode": small_dataset["decode"][-8:]})
    broken = tc.quantize(flatbuffer, rm.get_quantization_recipe(), qsvs)
    with pytest.raises(RgexportError, match="does not run"):
        _check_runs(broken, {"decode": small_dataset["decode"][-1:]})
    _check_runs(flatbuffer, small_dataset)


def test_bad_recipes_and_options_raise(float_export, small_config, tmp_path):
    backend = TFLiteBackend()
    exported, _ = float_export
    with pytest.raises(RgexportError, match="no recipe 'int3'"):
        backend.lower(exported, _ctx(small_config, "int3", tmp_path))
    with pytest.raises(RgexportError, match="does not divide"):  # width 64 is not a multiple of 128
        backend.lower(exported, _ctx(small_config, "int4", tmp_path, int4_block_size=128))
    with pytest.raises(RgexportError, match="expected one of"):
        backend.lower(exported, _ctx(small_config, "int4", tmp_path, int4_block_size=48))
    with pytest.raises(RgexportError, match="delegate"):
        backend.lower(exported, _ctx(small_config, "int8", tmp_path, delegate="gpu"))
    with pytest.raises(RgexportError, match="num_threads"):
        backend.lower(exported, _ctx(small_config, "int8", tmp_path, num_threads=0))
    ctx = _ctx(small_config, "fp32", tmp_path)
    ctx.prefill_chunk = small_config.attention_window_size + 1
    with pytest.raises(RgexportError, match="prefill_chunk"):
        backend.export(None, ctx)


@pytest.mark.slow
def test_int4_block_64_builds_and_agrees(float_export, small_config, eager, small_tokens, tmp_path):
    backend = TFLiteBackend()
    ctx, path, manifest = _build(backend, float_export[0], small_config, "int4", tmp_path, int4_block_size=64)
    got = _run_mixed(backend.load(path.parent, manifest), small_tokens[0].tolist())
    assert path.name == ARTIFACT_FILE
    assert float((got.argmax(-1) == eager[0].argmax(-1)).mean()) >= MIN_TOP1["int4"]


# int8 and int4 from a stream of weights (the route of a model too large to convert in float32) -----------
@pytest.fixture(scope="module", params=["int8", "int4"])
def streamed(request, small_model, small_config, tmp_path_factory):
    """SMALL's int8 (or int4) built the way RecurrentGemma-2B's is: from a weightless model, each part read from
    transformers-format shards and quantised as it arrives, converted quantised, its DEQUANTIZEs dropped."""
    import types

    from rgexport.checkpoint import save_huggingface
    from rgexport.streaming import fake_griffin, stream_huggingface

    backend = TFLiteBackend()
    stream = stream_huggingface(save_huggingface(small_model, tmp_path_factory.mktemp("ckpt")))
    recipe = request.param
    work = tmp_path_factory.mktemp(f"tflite-streamed-{recipe}")
    ctx = BuildContext(config=small_config, recipe=recipe, work_dir=work,
                       prefill_chunk=CHUNK, options={"stream_weights": True}, stream=stream, disposable_weights=True)
    prepared = backend.quantize(fake_griffin(small_config), ctx)
    counted = types.SimpleNamespace(parts=stream.counter.parts, live=stream.counter.live, peak=stream.counter.peak)
    kept = sum(t.numel() * t.element_size() for t in [*prepared.parameters(), *prepared.buffers()]
               if type(t) in (torch.Tensor, torch.nn.Parameter))
    exported = backend.export(prepared, ctx)
    import gc

    gc.collect()
    # Real quantised tensors (torchao's int8 storage) still alive once the file is written (the table's shape).
    table = (small_config.vocab_size, small_config.width)
    left = sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)
               and o.dtype == torch.int8 and tuple(o.shape) == table)
    probe = exported.probe
    (path,) = backend.write(backend.lower(exported, ctx), ctx)
    manifest = {"backend": "tflite", "recipe": {"name": recipe}, "artifact": {"file": path.name},
                "io": backend.io_contract(ctx), "options": ctx.options, "backend_facts": ctx.facts}
    return ctx, path, manifest, counted, kept, probe, left


def test_streamed_reads_one_part_at_a_time(streamed, small_config):
    """Quantised as each part arrives: the stream never held two float parts at once (counted), and what stays
    float32 afterwards is what the recipe keeps float (the RG-LRU gates, Conv1D, norms, biases)."""
    from rgexport.streaming import block_weight_bytes

    ctx, _, _, counted, kept, _, left = streamed
    parts = block_weight_bytes(small_config)
    assert counted.parts == len(small_config.block_types) + 2
    assert counted.live == kept
    assert max(parts.values()) <= counted.peak <= max(parts.values()) + kept
    assert counted.peak < sum(parts.values()) / 2
    assert ctx.facts["quantiser"] == "torchao, streamed"
    assert not (ctx.work_dir / "converted.tflite").exists()
    # After conversion no quantised weight is left in torch: not in the model, nor in the traced graph that torch keeps
    # in a global until the next trace (the 2.7 GB that outlived the write at RecurrentGemma-2B).
    assert left == 0


def test_converted_file_holds_at_least_its_weights(streamed, small_config):
    """`converted_bytes_at_least` is a floor of what the converter writes (the check that catches its broken
    files past 4 GiB rests on it): the weights at the recipe's bits with a scale per row, the rest float32."""
    from rgexport.backends.tflite.export import converted_bytes_at_least

    ctx = streamed[0]
    floor = converted_bytes_at_least(small_config, {"int8": 8, "int4": 4}[ctx.recipe])
    assert floor > small_config.num_parameters() * {"int8": 1, "int4": 0.5}[ctx.recipe]
    assert floor <= ctx.facts["converted_bytes"]


def test_a_broken_converted_file_is_refused(streamed, tmp_path):
    """What the converter wrote at RecurrentGemma-9B int4 (a flatbuffer header over no model, the size less 2**32)
    stops the build with one line, as does a file smaller than its weights; a good file passes."""
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import Builder

    from rgexport.backends.tflite.export import check_converted

    _, path, _, *_ = streamed
    size = path.stat().st_size
    check_converted(path, size)
    with pytest.raises(RgexportError, match=r"converter wrote a broken file: .* at least .*4 GiB"):
        check_converted(path, size + 1)
    builder = Builder(64)
    builder.Finish(schema.ModelT().Pack(builder), file_identifier=b"TFL3")
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(bytes(builder.Output()) + bytes(4096))
    with pytest.raises(RgexportError, match="with 0 subgraphs"):
        check_converted(empty, 1)


def test_a_model_past_the_converters_4_gib_stops_before_loading(tmp_path):
    """RecurrentGemma-9B int4 (4.5 GB of weights in the converter's file) is refused at once, with what to build
    instead; RecurrentGemma-2B int4 and int8 are not (their files, 1.45 and 2.78 GB, were converted and ran)."""
    import time

    from rgexport.build import BuildOptions, build
    from rgexport.config import get_preset

    out = tmp_path / "tfl9b"
    start = time.perf_counter()
    with pytest.raises(RgexportError, match=r"tflite / int4 at 8.58 B parameters: .*at least 4.50 GB.*4 GiB.*"
                                            r"--target onnx or --target executorch --recipe int4"):
        build(BuildOptions(backend="tflite", recipe="int4", preset="recurrentgemma-9b", random_weights=True, out=out))
    assert time.perf_counter() - start < 60 and not out.exists() and not list(tmp_path.iterdir())
    backend = TFLiteBackend()
    for recipe in ("int4", "int8"):
        backend.check_size(get_preset("recurrentgemma-2b"), recipe, {}, streams=True)
    with pytest.raises(RgexportError, match="tflite / fp32 at 2.68 B.*or --target tflite --recipe int4"):
        backend.check_size(get_preset("recurrentgemma-2b"), "fp32", {}, streams=False)


def test_streamed_file_holds_each_weight_once_quantised(streamed, artifacts):
    """No DEQUANTIZE is left (LiteRT would keep a float32 copy of each weight it dequantises); every
    FULLY_CONNECTED with a constant weight reads a quantised one: int8 with a scale per output channel, or int4
    in LiteRT's blockwise layout (float16 scales per 32 inputs, as ai-edge-quantizer writes it); the gather and
    the head read one table; every weight lies past the flatbuffer (the layout LiteRT reads above 2 GB)."""
    from ai_edge_litert import schema_py_generated as schema

    ctx, path, *_ = streamed
    int4 = ctx.recipe == "int4"
    assert ctx.facts["dequantize_dropped"]["kept"] == 0 and ctx.facts["dequantize_dropped"]["dropped"] > 0
    ops = op_histogram(path)
    assert all("DEQUANTIZE" not in counts for counts in ops.values()), ops
    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for graph in model.subgraphs:
        weights, tables = set(), set()
        for op in graph.operators:
            name = names[max(model.operatorCodes[op.opcodeIndex].builtinCode,
                             model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)]
            t = graph.tensors[op.inputs[1]] if len(op.inputs) > 1 else None
            constant = t is not None and model.buffers[t.buffer].offset > 1
            if name in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP") and constant:  # not attention's activation FCs
                q = t.quantization
                if int4:
                    assert t.type == schema.TensorType.INT4, (name, t.name)
                    assert q.detailsType == schema.QuantizationDetails.BlockwiseQuantization
                    assert q.details.blockSize == 32
                    scales = graph.tensors[q.details.scales]
                    assert scales.type == schema.TensorType.FLOAT16
                    assert list(scales.shape) == [t.shape[0], t.shape[1] // 32]
                else:
                    assert t.type == schema.TensorType.INT8, (name, t.name)
                    assert len(q.scale) == t.shape[0] and not np.any(q.zeroPoint)
                (tables if name == "EMBEDDING_LOOKUP" else weights).add(t.buffer)
        assert len(tables) == 1 and tables <= weights  # the head's weight is the gathered table
    stored = [b for b in model.buffers if b.offset > 1]
    assert stored and all(b.data is None or len(b.data) == 0 for b in stored)
    assert sum(int(b.size) for b in stored) > 0.95 * _int8_weight_bytes(ctx.config) * (0.5 if int4 else 1)
    # The gates stay float32: at SMALL's widths that makes the file as large as ai-edge-quantizer's, which
    # stores the table twice (on the shipped model its int8 is 11 % smaller).
    assert path.stat().st_size < 1.05 * artifacts[ctx.recipe][1].stat().st_size


def _int8_weight_bytes(config) -> int:
    """Bytes of the streamed int8 recipe's weights at the least: one byte per linear or table weight."""
    from rgexport.streaming import fake_griffin

    model = fake_griffin(config)
    return config.vocab_size * config.width + sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_streamed_computes_its_own_model(streamed, small_model, small_tokens, eager):
    """Against its own model (the same quantised weights in PyTorch, inputs quantised per token as LiteRT's
    dynamic-range kernels do) the file agrees far closer than with float32; against float32 it keeps the
    recipe's top-1 bound."""
    from rgexport.validate import own_model_logits, teacher_forced

    ctx, path, manifest, *_ = streamed
    backend = TFLiteBackend()
    tokens = small_tokens[0].tolist()
    got = teacher_forced(backend.load(path.parent, manifest), tokens)
    own = own_model_logits(small_model, backend, manifest, CHUNK, tokens)
    float_err = np.abs(got - eager[0]).max()
    own_err = np.abs(got - own).max()
    assert own_err < float_err / 5, (own_err, float_err)
    assert float((got.argmax(-1) == own.argmax(-1)).mean()) >= 0.98
    assert float((got.argmax(-1) == eager[0].argmax(-1)).mean()) >= MIN_TOP1[ctx.recipe]
    assert ctx.facts["conversion_check"]["max_relative_error"] <= ctx.facts["conversion_check"]["tolerance"]
    # The in-memory route (ai-edge-quantizer) has no own model: its quantiser is not PyTorch's.
    assert own_model_logits(small_model, backend, {**manifest, "backend_facts": {"quantiser": "ai-edge-quantizer"}},
                            CHUNK, tokens) is None


def test_streamed_conversion_check_catches_swapped_names(streamed):
    """The check after the rewrite compares by name, as the float one does: two same-shaped state outputs
    swapped must fail it."""
    import copy

    from rgexport.backends.tflite.export import HYBRID_CHECK_TOLERANCE, check_probe

    ctx, path, _, _, _, probe, _ = streamed
    check_probe(path, probe, ctx, HYBRID_CHECK_TOLERANCE)
    swapped = copy.deepcopy(probe)
    a, b = identifier("new_state.blocks.0.rg_lru"), identifier("new_state.blocks.1.rg_lru")
    decode = swapped.expected["decode"]
    decode[a], decode[b] = decode[b], decode[a]
    with pytest.raises(RgexportError, match="differs from eager"):
        check_probe(path, swapped, ctx, HYBRID_CHECK_TOLERANCE)


def test_stream_weights_option():
    backend = TFLiteBackend()
    assert backend.streams_weights("int8", {}) is None  # the build decides by size
    assert backend.streams_weights("int8", {"stream_weights": True}) is True
    assert backend.streams_weights("int8", {"stream_weights": False}) is False
    assert backend.streams_weights("int4", {"stream_weights": True}) is True
    assert backend.streams_weights("fp16", {}) is False  # ai-edge-quantizer works on the float flatbuffer
    with pytest.raises(RgexportError, match="int8 and int4 only"):
        backend.streams_weights("w8a8", {"stream_weights": True})
    with pytest.raises(RgexportError, match="stream_weights"):
        backend.streams_weights("int8", {"stream_weights": "yes"})


# The shipped tiny model (slow: its conversion takes 1-2 minutes here) -------------------------------
SHIPPED_CHUNK = 32
# Measured on 1024 heldout tokens (notes/tflite.md): top-1 fp16 100%, int8 99.5%, int4 90.2%, w8a8 96.6%;
# perplexity 16.344 (eager and fp32), fp16 16.345, int8 16.361, int4 16.910, w8a8 16.394 (x1.0030; the
# attention scores static alone gave x1.063, moving-average ranges x1.060). The bounds are the ones
# `rgexport validate` judges by (thresholds.toml, LiteRT's rows).

@pytest.fixture(scope="module")
def shipped_heldout(shipped):
    from rgexport.tokenizer import Tokenizer

    text = (Path(__file__).parents[1] / "calibration" / "corpus" / "heldout.txt").read_text()
    tokens = Tokenizer(shipped.tokenizer_path).encode(text)[:1024]
    with torch.no_grad():
        ref = shipped.model.score(torch.tensor([tokens]), chunk=1)[0].numpy()
    return tokens, ref


@pytest.fixture(scope="module")
def shipped_export(shipped, tmp_path_factory):
    ctx = BuildContext(config=shipped.config, recipe="fp32", work_dir=tmp_path_factory.mktemp("tflite-tiny"),
                       prefill_chunk=SHIPPED_CHUNK)
    return TFLiteBackend().export(shipped.model, ctx)


@pytest.fixture(scope="module")
def shipped_dataset(shipped):
    """w8a8's representative dataset from the real calibration text, as `rgexport build` makes it."""
    from rgexport.calibrate import calibration_token_sequences
    from rgexport.tokenizer import Tokenizer

    sequences = calibration_token_sequences(Tokenizer(shipped.tokenizer_path), shipped.config)
    return representative_dataset(shipped.model, sequences, SHIPPED_CHUNK)


def _perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    logp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), dim=-1)
    return float(torch.exp(-logp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].mean()))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp32", "fp16", "int8", "int4", "w8a8"])
def test_shipped_model_recipes(recipe, shipped, shipped_export, shipped_heldout, request, tmp_path):
    """Heldout text through every recipe, prefill chunks mixed with decode: fp32 per position, the
    others on top-1 agreement and perplexity."""
    backend = TFLiteBackend()
    ctx = BuildContext(config=shipped.config, recipe=recipe, work_dir=tmp_path, prefill_chunk=SHIPPED_CHUNK)
    exported = shipped_export
    if backend.recipes[recipe].calibrated:
        exported = TFLiteExport(shipped_export, request.getfixturevalue("shipped_dataset"))
    files = backend.write(backend.lower(exported, ctx), ctx)
    runner = backend.load(tmp_path, {"artifact": {"file": files[0].name}, "io": backend.io_contract(ctx)})
    tokens, ref = shipped_heldout
    got = _run_mixed(runner, tokens)
    if recipe == "fp32":
        per_position = np.abs(got - ref).max(axis=1)
        assert (per_position <= 1e-4).all(), (int(per_position.argmax()), float(per_position.max()))
    bounds = load_thresholds(recipe, backend.recipes[recipe].quantized, "tflite")
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    assert top1 >= bounds["min_top1_agreement"], (top1, bounds)
    ratio = _perplexity(got, tokens) / _perplexity(ref, tokens)
    assert ratio <= bounds["max_ppl_ratio"], (ratio, bounds)
