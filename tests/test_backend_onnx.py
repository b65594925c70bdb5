"""ONNX backend: exported graphs against the eager model, in ONNX Runtime (.onnx and .ort), every recipe.

The SMALL model is exported once per module (decode + prefill take ~30 s here); each recipe is a pass on
those graphs. Agreement bounds for quantised recipes were measured on this seeded model and tokens (see
notes/onnx.md); they leave room for other CPUs' integer kernels while a broken recipe (near 0% top-1)
still fails.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rgexport.backends.base import BuildContext  # noqa: E402
from rgexport.backends.onnx import OnnxBackend  # noqa: E402
from rgexport.backends.onnx.export import expected_names  # noqa: E402
from rgexport.backends.onnx.graph_info import describe_onnx  # noqa: E402
from rgexport.errors import RgexportError  # noqa: E402

CHUNK = 8
RECIPES = ("fp32", "fp16", "int8", "int4", "w8a8")
# Measured on SMALL over the 80 small_tokens with run_mixed: fp16 80/80, int8 75/80, int4 59/80 (AVX2) and
# 58/80 (AVX-512), w8a8 70/80 (MinMax; Entropy 68/80, Percentile 73/80). The bounds sit 3 tokens under the
# lowest measurement (CPUs' kernels moved one token), so a defect that costs 4 tokens (5 points) fails.
MIN_TOP1 = {"fp16": 0.97, "int8": 0.90, "int4": 0.68, "w8a8": 0.83}
W8A8_OTHER_MIN_TOP1 = {"entropy": 0.75, "percentile": 0.80}


def manifest_for(chunk: int = CHUNK) -> dict:
    return {"artifact": {"file": "decode.onnx"}, "io": {"prefill_chunk": chunk}}


def run_mixed(runner, tokens: list[int]) -> np.ndarray:
    """Alternates a prefill chunk and five decode steps: both graphs hand the state to each other."""
    out, i, use_prefill = [], 0, True
    while i < len(tokens):
        if use_prefill and i + runner.prefill_chunk <= len(tokens):
            out.append(runner.prefill(tokens[i : i + runner.prefill_chunk], i))
            i += runner.prefill_chunk
        else:
            for j in range(i, min(i + 5, len(tokens))):
                out.append(runner.decode(tokens[j], j)[None])
            i = min(i + 5, len(tokens))
        use_prefill = not use_prefill
    return np.concatenate(out)


@pytest.fixture(scope="module")
def backend() -> OnnxBackend:
    return OnnxBackend()


@pytest.fixture(scope="module")
def exported(backend, small_model, small_config):
    ctx = BuildContext(config=small_config, recipe="fp32", work_dir=Path("unused"), prefill_chunk=CHUNK)
    return backend.export(backend.quantize(small_model, ctx), ctx)


@pytest.fixture(scope="module")
def calibration_tokens(small_config) -> list[list[int]]:
    """What the build gives a calibrated recipe: 4 sequences of 3 windows (SMALL is random: random tokens)."""
    g = torch.Generator().manual_seed(2)
    n = 3 * small_config.attention_window_size
    return torch.randint(0, small_config.vocab_size, (4, n), generator=g).tolist()


@pytest.fixture(scope="module")
def built(backend, exported, small_config, calibration_tokens, tmp_path_factory):
    """recipe -> (artifact dir, BuildContext, written files), every recipe built from one export, with the
    .ort files too (option ort_format), so both formats are tested."""
    out = {}
    root = tmp_path_factory.mktemp("onnx")
    for recipe in RECIPES:
        ctx = BuildContext(config=small_config, recipe=recipe, work_dir=root / recipe, prefill_chunk=CHUNK,
                           calibration_tokens=calibration_tokens, options={"ort_format": True})
        files = backend.write(backend.lower(exported, ctx), ctx)
        out[recipe] = (root / recipe, ctx, files)
    return out


@pytest.fixture(scope="module")
def eager(small_model, small_tokens):
    """Token-by-token eager logits [80, v] and the final state."""
    state = small_model.init_state()
    logits = []
    with torch.no_grad():
        for i, t in enumerate(small_tokens[0]):
            lg, state = small_model.step(t[None], torch.tensor([i]), state)
            logits.append(lg[0].numpy())
    return np.stack(logits), {k: v.numpy() for k, v in state.items()}


@pytest.fixture(scope="module")
def fp32_runs(backend, built, small_tokens):
    """Logits and final state of the fp32 artifact, .onnx and .ort."""
    out = {}
    for ort_format in (False, True):
        runner = backend.load(built["fp32"][0], manifest_for(), ort_format=ort_format, threads=1)
        out[ort_format] = (run_mixed(runner, small_tokens[0].tolist()), runner.state(), runner)
    return out


# Export and names -----------------------------------------------------------------------------------
def test_written_names_are_the_io_contract(backend, built, small_model):
    _, ctx, files = built["fp32"]
    contract = backend.io_contract(ctx)["methods"]
    assert [f.name for f in files[:2]] == ["decode.onnx", "prefill.onnx"]
    for recipe, (folder, _, _) in built.items():
        for method in ("decode", "prefill"):
            info = describe_onnx(folder / f"{method}.onnx")
            want_in = [(t["name"], t["shape"], t["dtype"]) for t in contract[method]["inputs"]]
            want_out = [(t["name"], t["shape"], t["dtype"]) for t in contract[method]["outputs"]]
            assert [(t["name"], t["shape"], t["dtype"]) for t in info["inputs"]] == want_in, (recipe, method)
            assert [(t["name"], t["shape"], t["dtype"]) for t in info["outputs"]] == want_out, (recipe, method)
            assert info["metadata"]["rgexport.recipe"] == recipe
            assert info["opsets"][""] == 21
    names_in, names_out = expected_names(small_model, "decode")
    assert names_in[2] == "state.blocks.0.rg_lru" and names_out[-1] == "new_state.blocks.5.values"


def test_exported_graphs_restate_no_initializer_shapes(exported):
    """The value_info copies of initializer shapes are what went stale in quantize_dynamic (see below)."""
    for proto in exported.values():
        inits = {t.name for t in proto.graph.initializer}
        assert inits and not inits & {vi.name for vi in proto.graph.value_info}


def ort_quantize_dynamic(proto):
    """ONNX Runtime's own dynamic quantisation with the int8 recipe's settings: the reference that
    `quantize_int8` (which reads one tensor at a time) is checked against."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(proto, out, weight_type=QuantType.QUInt8, per_channel=False)
        return onnx.load(out)


def test_quantize_dynamic_handles_gemm_once_initializer_value_info_is_dropped(tmp_path):
    """Root cause of '[ShapeInferenceError] ... differ in dimension 0: (128) vs (192)'.

    A 2-D Linear exports as Gemm(transB=1); ORT's dynamic quantiser rewrites it as MatMul by transposing
    the weight in place under the same name, so the exporter's value_info for that initializer goes stale.
    """
    from rgexport.backends.onnx.recipes import drop_initializer_value_info

    mlp = torch.nn.Sequential(torch.nn.Linear(128, 192), torch.nn.Tanh(), torch.nn.Linear(192, 128)).eval()
    proto = torch.onnx.export(mlp, (torch.zeros(1, 128),), dynamo=True, opset_version=21, verbose=False).model_proto
    assert "Gemm" in {n.op_type for n in proto.graph.node}
    drop_initializer_value_info(proto)
    quantized = ort_quantize_dynamic(proto)
    assert "MatMulInteger" in {n.op_type for n in quantized.graph.node}
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
    with torch.no_grad():
        want = mlp(torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {session.get_inputs()[0].name: x})[0] - want).max() < 0.05


def test_importing_the_backend_does_not_import_onnx():
    code = ("import sys; import rgexport.backends.onnx.backend as m; "
            "assert not {'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_recipe_raises(backend, exported, small_config, small_model, tmp_path):
    ctx = BuildContext(config=small_config, recipe="int3", work_dir=tmp_path, prefill_chunk=CHUNK)
    with pytest.raises(RgexportError, match="no recipe 'int3'.*expected one of"):
        backend.quantize(small_model, ctx)
    with pytest.raises(RgexportError, match="no recipe 'int3'"):
        backend.lower(exported, ctx)


def test_opset_below_18_is_refused(backend, small_model, small_config, tmp_path):
    ctx = BuildContext(config=small_config, recipe="fp32", work_dir=tmp_path, prefill_chunk=CHUNK,
                       options={"opset": 17})
    with pytest.raises(RgexportError, match="opset 17"):
        backend.export(small_model, ctx)


# fp32 against eager -----------------------------------------------------------------------------------
def test_fp32_matches_eager_over_five_windows(fp32_runs, eager):
    want_logits, want_state = eager
    logits, state, _ = fp32_runs[False]
    assert logits.shape == want_logits.shape == (80, 512)
    assert np.abs(logits - want_logits).max() <= 1e-4
    assert state.keys() == want_state.keys()
    for name in want_state:
        assert np.abs(state[name] - want_state[name]).max() <= 1e-4, name


def test_ort_format_file_gives_the_same_logits(fp32_runs, eager, built):
    folder, ctx, files = built["fp32"]
    assert [f.name for f in files] == ["decode.onnx", "prefill.onnx", "weights.bin", "decode.ort", "prefill.ort",
                                       "required_operators.config"]
    config = (folder / "required_operators.config").read_text()
    assert "ai.onnx;" in config and "Gemm" in config
    onnx_logits, onnx_state, _ = fp32_runs[False]
    ort_logits, ort_state, runner = fp32_runs[True]
    assert runner.paths["decode"].suffix == ".ort"
    assert np.abs(ort_logits - onnx_logits).max() <= 1e-5
    assert np.abs(ort_logits - eager[0]).max() <= 1e-4
    for name in onnx_state:
        assert np.abs(ort_state[name] - onnx_state[name]).max() <= 1e-5, name


def test_runner_reset_and_restart_at_position_zero(fp32_runs, small_tokens):
    """Position 0 starts a new sequence whatever the state; reset() zeroes it."""
    runner = fp32_runs[False][2]
    tokens = small_tokens[0, :CHUNK].tolist()
    runner.reset()
    assert all(not v.any() for v in runner.state().values())
    fresh = runner.prefill(tokens, 0)
    runner.decode(tokens[0], CHUNK)  # dirty the state
    again = runner.prefill(tokens, 0)
    np.testing.assert_array_equal(fresh, again)
    with pytest.raises(RgexportError, match="exactly 8 tokens"):
        runner.prefill(tokens[:3], 0)
    memory = runner.memory()
    assert memory["state_bytes"] == 2 * sum(v.nbytes for v in runner.state().values())
    assert memory["weights_bytes"] > 2 * 1_000_000  # two sessions, ~1.1 MB of fp32 weights each


def test_tied_head_reads_the_embedding_without_a_copy(built):
    """fp32 keeps one embedding; a Transpose of it would be folded into a second copy in the .ort file."""
    folder = built["fp32"][0]
    model = onnx.load(folder / "decode.onnx")
    emb = [t for t in model.graph.initializer if t.name.endswith("input_embedding")]
    assert len(emb) == 1
    users = [n.op_type for n in model.graph.node if emb[0].name in n.input]
    assert sorted(users) == ["Gather", "Gemm"]


def test_int8_head_reads_the_quantised_table_in_place(built, small_tokens):
    """int8 stores the tied table once in uint8 and reads it through the embedding Gather and the head's
    QGemm(transB=1): no Transpose or DequantizeLinear of the whole table runs per call (quantize_dynamic left
    both, 0.33 ms of a 0.73 ms shipped-model step, 3.3 GB copied per step at 2B)."""
    for method in ("decode", "prefill"):
        model = onnx.load(built["int8"][0] / f"{method}.onnx")
        emb = [t for t in model.graph.initializer if t.name.endswith("input_embedding_quantized")]
        assert len(emb) == 1 and emb[0].data_type == onnx.TensorProto.UINT8
        users = [n.op_type for n in model.graph.node if emb[0].name in n.input]
        assert sorted(users) == ["Gather", "QGemm"], (method, users)


def test_int8_head_rewrite_keeps_the_dequantised_heads_logits(tmp_path):
    """`int8_head_as_qgemm` on quantize_dynamic's output of a tied model: the same logits up to quantising
    the head's input (uint8, per tensor), the same argmax, and the whole-table Transpose/DequantizeLinear gone."""
    import copy

    from rgexport.backends.onnx.recipes import dequantised_tied_heads, int8_head_as_qgemm

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(512, 64) * 0.5)

        def forward(self, ids):
            x = torch.nn.functional.embedding(ids, self.table)
            return torch.tanh(x) @ self.table.T

    model = Tied().eval()
    ids = torch.arange(0, 512, 37).reshape(1, -1)
    proto = torch.onnx.export(model, (ids,), dynamo=True, opset_version=21, verbose=False).model_proto
    quantized = ort_quantize_dynamic(proto)
    assert len(dequantised_tied_heads(quantized)) == 1
    rewritten = copy.deepcopy(quantized)
    assert int8_head_as_qgemm(rewritten) == 1
    assert not dequantised_tied_heads(rewritten)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "QGemm" in ops and "Transpose" not in ops and "MatMul" not in ops

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]

    before, after = run(quantized), run(rewritten)
    assert before.shape == after.shape == (1, ids.shape[1], 512)
    scale = np.abs(before).max()
    assert 0 < np.abs(after - before).max() < 0.02 * scale  # the head's input is quantised now
    np.testing.assert_array_equal(before.argmax(-1), after.argmax(-1))


@pytest.mark.parametrize("method", ["decode", "prefill"])
def test_int8_is_quantize_dynamics_weights_and_graph_read_a_tensor_at_a_time(method, exported, tmp_path):
    """`quantize_int8` against ONNX Runtime's `quantize_dynamic` (then the same head rewrite) on SMALL's
    exported graphs: every 8-bit weight, scale and zero point byte for byte the same, the same op census
    after ONNX Runtime's own optimisation, and the same outputs. From a streamed export (weights as external
    data in a folder), read in slices that split rows, it gives the same model with its 8-bit tensors moved
    into that folder."""
    from onnx.external_data_helper import convert_model_to_external_data

    from rgexport.backends.onnx.recipes import int8_head_as_qgemm, quantize_int8

    proto = exported[method]
    want = ort_quantize_dynamic(proto)
    assert int8_head_as_qgemm(want) == 1
    got = quantize_int8(proto)

    def quantized_tensors(model):
        """Every 8-bit weight with its scale and zero point, as (dtype, shape, bytes), sorted."""
        return sorted((t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes())
                      for t in model.graph.initializer
                      if t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) or t.name.endswith("_scale"))

    got_w, want_w = quantized_tensors(got), quantized_tensors(want)
    assert len(got_w) >= 3 * (3 * 6 + 1) and got_w == want_w

    def optimised_ops_and_outputs(model):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = sorted(n.op_type for n in onnx.load(tmp_path / "optimised.onnx").graph.node)
        rng = np.random.default_rng(0)
        feeds = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            feeds[i.name] = (rng.integers(0, 500, shape).astype(np.int64) if "int64" in i.type
                             else rng.integers(0, 5, shape).astype(np.int32) if "int32" in i.type
                             else rng.standard_normal(shape).astype(np.float32))
        return ops, session.run(None, feeds)

    got_ops, got_out = optimised_ops_and_outputs(got)
    want_ops, want_out = optimised_ops_and_outputs(want)
    assert got_ops == want_ops
    for a, b in zip(got_out, want_out):
        np.testing.assert_array_equal(a, b)

    streamed = copy.deepcopy(proto)
    convert_model_to_external_data(streamed, all_tensors_to_one_file=True, location="float.bin", size_threshold=1024)
    onnx.save_model(streamed, tmp_path / "float.onnx")
    streamed = onnx.load(tmp_path / "float.onnx", load_external_data=False)
    folder_got = quantize_int8(streamed, base_dir=tmp_path, slice_bytes=1000)  # slices that split rows
    assert all(len(t.raw_data) < 1024 for t in folder_got.graph.initializer)  # every large tensor in a file
    large = [t for t in folder_got.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert large and all(onnx.external_data_helper.ExternalDataInfo(t).location.startswith("lowered-") or
                         onnx.external_data_helper.ExternalDataInfo(t).location == "float.bin" for t in large)
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(folder_got, str(tmp_path))
    for a, b in zip(optimised_ops_and_outputs(folder_got)[1], want_out):
        np.testing.assert_array_equal(a, b)


# Recipes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["fp16", "int8", "int4", "w8a8"])
def test_quantized_recipe_is_smaller_and_agrees(recipe, backend, built, eager, small_tokens):
    folder, ctx, files = built[recipe]
    fp32_bytes = describe_onnx(built["fp32"][0] / "decode.onnx")["weights"]["bytes"]
    size = describe_onnx(folder / "decode.onnx")["weights"]["bytes"]
    assert size < fp32_bytes
    if recipe == "fp16":
        assert 0.45 < size / fp32_bytes < 0.65
    runner = backend.load(folder, manifest_for(), threads=1)
    logits = run_mixed(runner, small_tokens[0].tolist())
    top1 = (logits.argmax(-1) == eager[0].argmax(-1)).mean()
    assert top1 >= MIN_TOP1[recipe], top1
    if recipe == "fp16":
        assert np.abs(logits - eager[0]).max() < 0.05  # measured 0.011
    ort_file = folder / "decode.ort"
    if recipe == "fp16" and not ort_file.exists():
        assert any("No ORT-format files for fp16" in n for n in ctx.notes)
    else:
        ort_runner = backend.load(folder, manifest_for(), ort_format=True, threads=1)
        assert np.abs(run_mixed(ort_runner, small_tokens[0, :24].tolist()) - logits[:24]).max() <= 1e-4


def test_quantized_ops_are_the_recipes(built):
    ops = {r: describe_onnx(built[r][0] / "prefill.onnx")["ops"] for r in RECIPES}
    assert "MatMulInteger" in ops["int8"] or "com.microsoft.DynamicQuantizeMatMul" in ops["int8"]
    assert ops["int4"].get("com.microsoft.MatMulNBits", 0) >= 6 * 3 + 1  # every 2-D weight and the head
    assert ops["int4"].get("com.microsoft.GatherBlockQuantized") == 1
    assert ops["w8a8"]["DequantizeLinear"] > ops["w8a8"]["QuantizeLinear"] >= W8A8_MATMULS
    assert "MatMulInteger" not in ops["w8a8"] and "Gemm" in ops["w8a8"]
    weights = describe_onnx(built["fp16"][0] / "prefill.onnx")["weights"]["by_dtype"]
    assert weights["float16"] > 4 * weights.get("float32", 0)


def test_norms_and_gelus_are_fused_in_every_recipe(built, small_config):
    """Each RMSNorm (two per block and the final one) and each tanh-GELU (one per block, in the MLP, and one
    in each recurrent block) is one node; no fragment of either formula is left."""
    blocks = small_config.num_layers
    recurrent = sum(1 for kind in small_config.block_types if kind == "recurrent")
    for recipe in RECIPES:
        for method in ("decode", "prefill"):
            ops = describe_onnx(built[recipe][0] / f"{method}.onnx")["ops"]
            assert ops.get("SimplifiedLayerNormalization") == 2 * blocks + 1, (recipe, method, ops)
            assert ops.get("Gelu") == blocks + recurrent, (recipe, method, ops)
            assert "ReduceMean" not in ops and "Reciprocal" not in ops, (recipe, method)
            assert ops.get("Tanh") == 1, (recipe, method)  # the logits' soft-cap, not a GELU


def test_fusions_compute_what_the_formulas_do(tmp_path):
    """The rules on the exporter's own output for RMSNorm and gelu_tanh: same numbers, fewer nodes; a
    different constant (GELU with 0.05 for 0.044715) is not fused."""
    import onnx_ir as ir

    from rgexport.backends.onnx.fusions import fuse_for_ort
    from rgexport.model.layers import RMSNorm, gelu_tanh

    class Block(torch.nn.Module):
        def __init__(self, cubic: float):
            super().__init__()
            self.norm, self.cubic = RMSNorm(64), cubic
            torch.nn.init.normal_(self.norm.scale)

        def forward(self, x):
            y = self.norm(x)
            z = y - 1.0  # its own input: the exporter would share GELU's `0.5 * y` between the two
            near_gelu = 0.5 * z * (1.0 + torch.tanh(0.7978845608 * (z + self.cubic * z * z * z)))
            return gelu_tanh(y) * 2.0 + near_gelu

    block, x = Block(0.05).eval(), torch.randn(1, 3, 64)
    program = torch.onnx.export(block, (x,), dynamo=True, opset_version=21, optimize=True)
    model = program.model
    before = len(model.graph)
    assert fuse_for_ort(model, 21) == {"SimplifiedLayerNormalization": 1, "Gelu": 1}
    assert len(model.graph) < before - 10
    assert [n.op_type for n in model.graph].count("Tanh") == 1  # the 0.05 variant stays as written
    ir.save(model, tmp_path / "fused.onnx")
    got = ort.InferenceSession(str(tmp_path / "fused.onnx")).run(None, {model.graph.inputs[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = block(x).numpy()
    assert np.abs(got - want).max() < 1e-5


def test_int4_matmuls_compute_in_int8_unless_asked_not_to(backend, exported, built, small_config, tmp_path):
    """accuracy_level 4 by default (2.5x faster at 2B); option int4_accuracy_level=0 keeps float32 compute,
    and a level ONNX Runtime does not have is refused."""

    def levels(proto):
        return {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
                for n in proto.graph.node if n.op_type == "MatMulNBits"}

    assert levels(onnx.load(str(built["int4"][0] / "decode.onnx"))) == {4}
    ctx = BuildContext(config=small_config, recipe="int4", work_dir=tmp_path, prefill_chunk=CHUNK,
                       options={"int4_accuracy_level": 0})
    assert levels(backend.lower(exported, ctx)["decode"]) == {0}
    with pytest.raises(RgexportError, match="int4_accuracy_level is 5"):
        backend.lower(exported, BuildContext(config=small_config, recipe="int4", work_dir=tmp_path,
                                             prefill_chunk=CHUNK, options={"int4_accuracy_level": 5}))


def test_int4_block_size_is_an_option_that_must_tile_the_widths(backend, exported, built, small_config, small_model,
                                                                tmp_path):
    """Block 32 by default; option int4_block_size sets every MatMulNBits and GatherBlockQuantized (the facts
    say which), and a size the kernels do not take, or one that does not divide the model's widths (a padded
    block would widen the tied table's gather), is refused before anything is built, naming the sizes that fit."""

    def blocks(proto):
        return {(n.op_type, next(a.i for a in n.attribute if a.name == "block_size"))
                for n in proto.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}

    assert blocks(onnx.load(str(built["int4"][0] / "decode.onnx"))) == {("MatMulNBits", 32),
                                                                         ("GatherBlockQuantized", 32)}
    assert built["int4"][1].facts["onnx_int4_block_size"] == 32
    ctx = BuildContext(config=small_config, recipe="int4", work_dir=tmp_path, prefill_chunk=CHUNK,
                       options={"int4_block_size": 64})
    assert blocks(backend.lower(exported, ctx)["decode"]) == {("MatMulNBits", 64), ("GatherBlockQuantized", 64)}
    assert ctx.facts["onnx_int4_block_size"] == 64
    for bad, match in ((48, "int4_block_size is 48; expected one of 16, 32, 64, 128"),
                       (True, "int4_block_size is True"),
                       (128, r"int4_block_size 128 does not divide \{'width': 64, 'lru_width': 64\}; block sizes "
                             "that fit this model: 16, 32, 64")):
        ctx = BuildContext(config=small_config, recipe="int4", work_dir=tmp_path, prefill_chunk=CHUNK,
                           options={"int4_block_size": bad})
        with pytest.raises(RgexportError, match=match):
            backend.quantize(small_model, ctx)  # the first stage, before the export's cost


def test_fp16_keeps_recurrence_norms_and_positions_in_float32(exported):
    from rgexport.backends.onnx.recipes import node_classes, position_only_nodes, to_fp16

    proto = exported["decode"]
    half = to_fp16(proto)
    dtype = {vi.name: vi.type.tensor_type.elem_type for vi in (*half.graph.value_info, *half.graph.output)}
    fp32_classes = ("RGLRU", "RMSNorm")
    positional = position_only_nodes(proto)
    counted = {"fp32": 0, "fp16": 0}
    for node in half.graph.node:
        floats = [dtype.get(o) for o in node.output if dtype.get(o) in (1, 10)]
        if not floats or node.op_type == "Cast":
            continue
        keep = node.name in positional or any(c in node_classes(node) for c in fp32_classes)
        assert floats == [1] * len(floats) if keep else floats == [10] * len(floats), node.name
        counted["fp32" if keep else "fp16"] += 1
    assert counted["fp16"] > counted["fp32"] > 0


def test_fp16_is_right_beyond_position_2048(backend, built, small_model, small_tokens):
    """float16 holds integers exactly only up to 2048; the mask and slot arithmetic must stay float32."""
    runner = backend.load(built["fp16"][0], manifest_for(), threads=1)
    tokens = small_tokens[0].tolist()
    start = 4099  # odd, past 2048 and not a multiple of the window
    state = small_model.init_state()
    with torch.no_grad():
        # The same state for both: prefill at 0 fills it, then both continue at large positions.
        _, state = small_model.prefill(small_tokens[:, :CHUNK], torch.tensor([0]), state)
        runner.prefill(tokens[:CHUNK], 0)
        for i, t in enumerate(tokens[CHUNK : CHUNK + 20]):
            want, state = small_model.step(torch.tensor([t]), torch.tensor([start + i]), state)
            got = runner.decode(t, start + i)
            assert np.abs(got - want[0].numpy()).max() < 0.05, start + i


# w8a8 ----------------------------------------------------------------------------------------------------
# Groups that must take no quantised input at all: the recurrence and its state, the Conv1D, attention scores
# and the ring-buffer write into the cache, the norms (the sensitivity study in notes/onnx.md).
STRICTLY_FLOAT = ("rglru", "conv1d", "attention_scores", "ring_write", "norms")
# SMALL: 4 recurrent blocks x (3 linears + 2 RG-LRU gates + 3 MLP), 2 attention blocks x (4 projections + 3 MLP),
# and the head.
W8A8_MATMULS = 4 * (3 + 2 + 3) + 2 * (4 + 3) + 1


def _qdq8_graph(built, method: str):
    graph = onnx.load(built["w8a8"][0] / f"{method}.onnx").graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    return graph, producer, consumers


@pytest.mark.parametrize("method", ["decode", "prefill"])
def test_qdq8_quantizes_the_linears_and_keeps_the_recurrence_float(method, built, exported):
    from onnx import TensorProto

    from rgexport.backends.onnx.recipes import W8A8_GROUPS, qdq_groups, tie_head_as_gemm

    reference = copy.deepcopy(exported[method])  # node names survive quantisation; the groups need metadata
    tie_head_as_gemm(reference)
    groups = qdq_groups(reference)
    graph, producer, consumers = _qdq8_graph(built, method)
    nodes = {n.name: n for n in graph.node}
    inits = {t.name: t for t in graph.initializer}

    def dequantized(name: str) -> bool:
        return name in producer and producer[name].op_type == "DequantizeLinear"

    linears = [nodes[name] for name, g in groups.items()
               if g in W8A8_GROUPS and nodes[name].op_type in ("MatMul", "Gemm")]
    assert len(linears) == W8A8_MATMULS
    for node in linears:  # DQ(x), DQ(W) -> MatMul -> Q: what ONNX Runtime fuses into integer kernels
        assert dequantized(node.input[0]) and dequantized(node.input[1]), node.name
        weight = inits[producer[node.input[1]].input[0]]
        assert weight.data_type == TensorProto.UINT8, node.name
        assert [c.op_type for c in consumers[node.output[0]]] == ["QuantizeLinear"], node.name
    activation_zero_points = {inits[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear"}
    assert activation_zero_points == {TensorProto.UINT8}

    # What stays float stays float: no quantised input into the recurrence, Conv1D, attention or norms, and the
    # state goes in and out as float32 untouched by Q/DQ.
    float_nodes = [name for name, g in groups.items() if g in STRICTLY_FLOAT]
    assert len(float_nodes) > 100
    for name in float_nodes:
        assert not any(dequantized(i) for i in nodes[name].input), (groups[name], name)
    for i in graph.input:
        if i.name.startswith("state."):
            assert consumers[i.name] and all(c.op_type != "QuantizeLinear" for c in consumers[i.name]), i.name
    for o in graph.output:
        assert producer[o.name].op_type != "DequantizeLinear", o.name

    # The tied embedding is stored once, in 8 bits, and read by both the embedding Gather and the head Gemm.
    (gather,) = [n for n in graph.node if n.op_type == "Gather" and dequantized(n.input[0])
                 and producer[n.input[0]].input[0] in inits]
    assert list(inits[producer[gather.input[0]].input[0]].dims) == [512, 64]
    (head,) = [n for n in graph.node if n.op_type == "Gemm"]
    assert gather.input[0] == head.input[1]
    assert not [t for t in graph.initializer if list(t.dims) == [512, 64] and t.data_type == TensorProto.FLOAT]


def test_qdq8_records_its_calibration(built, calibration_tokens):
    _, ctx, files = built["w8a8"]
    facts = ctx.facts["onnx_w8a8"]
    assert facts["calibration_tokens"] == sum(len(t) for t in calibration_tokens)
    assert "rglru" in facts["float_groups"]
    for method in ("decode", "prefill"):
        assert facts[method]["calibration_method"] == "minmax"
        assert facts[method]["quantized_nodes"] == W8A8_MATMULS
    # decode: one sample per position (4 x 48 <= 256); prefill: every chunk (4 x 48 / 8)
    assert facts["decode"]["calibration_samples"] == 4 * 48
    assert facts["prefill"]["calibration_samples"] == 4 * 48 // CHUNK
    assert any(n.startswith("w8a8:") and "minmax" in n for n in ctx.notes)
    assert [f.name for f in files] == ["decode.onnx", "prefill.onnx", "weights.bin", "decode.ort", "prefill.ort",
                                       "required_operators.config"]


def test_qdq8_calibration_errors_are_rgexport_errors(backend, exported, small_config, small_model,
                                                      calibration_tokens, tmp_path):
    def ctx(**kw):
        return BuildContext(config=small_config, recipe="w8a8", work_dir=tmp_path, prefill_chunk=CHUNK, **kw)

    bad = ctx(options={"calibration_method": "kmeans"}, calibration_tokens=calibration_tokens)
    with pytest.raises(RgexportError, match=r"calibration_method 'kmeans' is not one of \['minmax', 'entropy', "
                                            r"'percentile'\]"):
        backend.quantize(small_model, bad)
    with pytest.raises(RgexportError, match="kmeans"):
        backend.lower(exported, bad)
    with pytest.raises(RgexportError, match="calibration_tokens"):
        backend.quantize(small_model, ctx())
    with pytest.raises(RgexportError, match="lower\\(\\) needs export\\(\\)'s result"):
        backend.lower(dict(exported), ctx(calibration_tokens=calibration_tokens))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_qdq8_other_calibration_methods(method, backend, exported, small_config, calibration_tokens, eager,
                                        small_tokens, tmp_path):
    ctx = BuildContext(config=small_config, recipe="w8a8", work_dir=tmp_path, prefill_chunk=CHUNK,
                       options={"calibration_method": method.upper(), "ort_format": False},
                       calibration_tokens=calibration_tokens)
    backend.write(backend.lower(exported, ctx), ctx)
    assert ctx.facts["onnx_w8a8"]["decode"]["calibration_method"] == method
    logits = run_mixed(backend.load(tmp_path, manifest_for(), threads=1), small_tokens[0].tolist())
    assert (logits.argmax(-1) == eager[0].argmax(-1)).mean() >= W8A8_OTHER_MIN_TOP1[method]


# Writing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_both_graphs_share_one_weights_file(recipe, built):
    """By default decode.onnx and prefill.onnx point into one weights.bin that holds each distinct tensor
    once (plus page alignment), so the .onnx artifact is no larger than one graph's weights; the .ort
    files (option ort_format) each hold them again."""
    folder = built[recipe][0]
    decode, prefill = (describe_onnx(folder / f)["weights"] for f in ("decode.onnx", "prefill.onnx"))
    assert decode["external_files"] == prefill["external_files"] == ["weights.bin"]
    one_copy = decode["external_bytes"]
    assert one_copy > 0.75 * decode["bytes"] and prefill["external_bytes"] >= one_copy  # int4: 0.88 (scales)
    # Each distinct tensor once, on a page boundary: not the sum of both graphs' weights.
    assert one_copy <= (folder / "weights.bin").stat().st_size <= prefill["external_bytes"] + 4096 * prefill["count"]
    # Nothing but small constants (under 1 KiB: shapes, norms' epsilons, int4 scales of tiny tensors) inline.
    for f in ("decode.onnx", "prefill.onnx"):
        big = [t.name for t in onnx.load(folder / f, load_external_data=False).graph.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
        assert big == [], (f, big[:3])


def test_int4_tied_table_stored_once(built):
    """int4 quantises the tied embedding twice, as the gather's data and as the head's MatMulNBits weight,
    to the same bytes and scales: weights.bin holds them once and both initializers point there."""
    folder = built["int4"][0]
    model = onnx.load(folder / "decode.onnx", load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    where = lambda name: {e.key: e.value for e in inits[name].external_data}  # noqa: E731
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    vocab = inits[gather.input[0]].dims[0]
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                and next(a.i for a in n.attribute if a.name == "N") == vocab)
    assert list(inits[gather.input[0]].dims) != list(inits[head.input[1]].dims)  # data: two shapes, one copy
    for g, h in ((gather.input[0], head.input[1]), (gather.input[2], head.input[2])):  # data, scales
        assert where(g)["location"] == where(h)["location"] == "weights.bin"
        assert (where(g)["offset"], where(g)["length"]) == (where(h)["offset"], where(h)["length"])
    # Nothing else in weights.bin but distinct tensors, each on a page boundary.
    spans = {(int(where(n)["offset"]), int(where(n)["length"])) for n in inits
             if inits[n].data_location == onnx.TensorProto.EXTERNAL}
    prefill = onnx.load(folder / "prefill.onnx", load_external_data=False)
    spans |= {(int(e["offset"]), int(e["length"])) for e in
              ({x.key: x.value for x in t.external_data} for t in prefill.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL)}
    size = (folder / "weights.bin").stat().st_size
    assert sum(length for _, length in spans) <= size <= sum(length for _, length in spans) + 4096 * len(spans)


def _tied_table_model(vocab: int, width: int, seed: int = 0):
    """x [2, width] -> (MatMul(x, Transpose(E)), Gather(E, ids)): a tied table E [vocab, width]."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(seed).standard_normal((vocab, width)).astype(np.float32)
    table[3] = 0.0  # an all-zero row: scale 0
    nodes = [helper.make_node("Transpose", ["E"], ["E_t"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "E_t"], ["logits"], name="head"),
             helper.make_node("Gather", ["E", "ids"], ["rows"], name="embed", axis=0)]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width]),
                        helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, vocab]),
         helper.make_tensor_value_info("rows", TensorProto.FLOAT, [3, width])],
        [numpy_helper.from_array(table, "E")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), table


@pytest.mark.parametrize("external", [False, True], ids=["in_memory", "external"])
def test_tied_table_quantised_once_as_onnx_runtime_would(external, tmp_path):
    """The tied table is quantised in slices of rows (never whole in memory) to the bytes ONNX Runtime's
    MatMulNBitsQuantizer gives for the untied, transposed head; the gather reads the same bytes and scales,
    and its rows are the head's dequantised weights. Uneven slices (7 rows) and a row of zeros included."""
    from onnx import numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from rgexport.backends.onnx.recipes import quantize_tied_tables

    vocab, width = 45, 96
    model, table = _tied_table_model(vocab, width)
    base_dir = None
    if external:
        convert_model_to_external_data(model, location="float32.bin", size_threshold=0)
        onnx.save_model(model, tmp_path / "tied.onnx")  # writes float32.bin beside it
        model, base_dir = onnx.load(tmp_path / "tied.onnx", load_external_data=False), tmp_path
    assert quantize_tied_tables(model, base_dir, block_size=32, accuracy_level=4, slice_bytes=7 * 4 * width) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["MatMulNBits", "GatherBlockQuantized"] and "E" not in {t.name for t in model.graph.initializer}
    head, gather = model.graph.node
    mine = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    # ONNX Runtime's quantiser on the same table, untied by hand.
    untied, _ = _tied_table_model(vocab, width)
    untied.graph.initializer[0].CopyFrom(numpy_helper.from_array(table.T.copy(), "E_t"))
    untied.graph.node.pop(0)  # the Transpose: E_t is now the initializer
    untied.graph.node.pop()  # its gather is not what this compares
    untied.graph.output.pop()
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, quant_format=QuantFormat.QOperator,
                                          accuracy_level=4, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(untied, algo_config=config)
    quantizer.process()
    (theirs,) = quantizer.model.model.graph.node
    ref = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    assert {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute} == {
        a.name: onnx.helper.get_attribute_value(a) for a in theirs.attribute}
    for mine_name, their_name in zip(head.input[1:], theirs.input[1:]):  # weight, scales
        assert mine[mine_name].shape == ref[their_name].shape
        assert mine[mine_name].tobytes() == ref[their_name].tobytes()
    assert gather.input[2] == head.input[2]  # one scales tensor
    assert mine[gather.input[0]].tobytes() == mine[head.input[1]].tobytes()

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.eye(2, width, dtype=np.float32)
    ids = np.array([3, 0, vocab - 1], np.int64)
    logits, rows = session.run(None, {"x": x, "ids": ids})
    # x[0] = e_0, so logits[0] is element 0 of every dequantised row: the head and the gather agree.
    assert np.allclose(rows[:, 0], logits[0][ids], atol=1e-5) and np.all(rows[0] == 0)
    scale = np.abs(table[ids]).max(axis=1, keepdims=True) / 8
    assert np.all(np.abs(rows - table[ids]) <= scale * 1.01)  # 4-bit: within one step of the float rows


def test_self_contained_files_on_request(backend, exported, built, small_config, tmp_path, small_tokens):
    """external_data=false: two .onnx files that each hold every weight (the layout before one weights.bin)."""
    ctx = BuildContext(config=small_config, recipe="fp32", work_dir=tmp_path, prefill_chunk=CHUNK,
                       options={"external_data": False})
    files = backend.write(backend.lower(exported, ctx), ctx)
    assert [f.name for f in files] == ["decode.onnx", "prefill.onnx"]
    decode = describe_onnx(tmp_path / "decode.onnx")["weights"]
    assert decode["external_files"] == [] and decode["external_bytes"] == 0
    assert decode["bytes"] == describe_onnx(built["fp32"][0] / "decode.onnx")["weights"]["bytes"]
    assert (tmp_path / "decode.onnx").stat().st_size > 0.9 * decode["bytes"]
    assert ctx.facts["onnx_external_data"] is None
    tokens = small_tokens[0, :21].tolist()
    want = run_mixed(backend.load(built["fp32"][0], manifest_for(), threads=1), tokens)
    got = run_mixed(backend.load(tmp_path, manifest_for(), threads=1), tokens)
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("recipe", ["fp32", "int4"])
def test_export_from_a_stream_equals_the_in_memory_export(recipe, backend, small_model, small_config, built,
                                                          small_tokens, tmp_path):
    """Traced from a model without weights (`fake_griffin`) and given its weights from the checkpoint one part
    at a time (`fill_from_stream`), the artifact computes exactly what the in-memory export's does, and the
    stream never held two parts at once (counted)."""
    from rgexport.checkpoint import save_huggingface
    from rgexport.streaming import block_weight_bytes, fake_griffin, stream_huggingface

    stream = stream_huggingface(save_huggingface(small_model, tmp_path / "ckpt"))
    ctx = BuildContext(config=small_config, recipe=recipe, work_dir=tmp_path / "out", prefill_chunk=CHUNK,
                       stream=stream)
    backend.write(backend.lower(backend.export(backend.quantize(fake_griffin(small_config), ctx), ctx), ctx), ctx)
    facts = ctx.facts["onnx_streamed_weights"]
    assert facts["parts"] == len(small_config.block_types) + 2
    assert stream.counter.parts == facts["parts"]
    assert stream.counter.peak == max(block_weight_bytes(small_config).values())  # one part at a time
    assert not (tmp_path / "out" / "_export").exists()  # the float scratch file is not part of the artifact
    tokens = small_tokens[0, :41].tolist()
    want = run_mixed(backend.load(built[recipe][0], manifest_for(), threads=1), tokens)
    got = run_mixed(backend.load(tmp_path / "out", manifest_for(), threads=1), tokens)
    np.testing.assert_array_equal(got, want)


def test_stream_weights_option(backend):
    assert backend.streams_weights("int4", {}) is None  # the build decides by size
    assert backend.streams_weights("fp32", {"stream_weights": True}) is True
    assert backend.streams_weights("w8a8", {"stream_weights": True}) is False  # calibration runs the model
    assert backend.streams_weights("int4", {"stream_weights": False}) is False
    with pytest.raises(RgexportError, match="stream_weights"):
        backend.streams_weights("int4", {"stream_weights": "yes"})


@pytest.fixture(scope="module")
def streamed(backend, small_model, small_config, tmp_path_factory):
    """SMALL exported the way a model above 2 GiB is: graphs saved straight to disk, weights left there."""
    work = tmp_path_factory.mktemp("streamed")
    ctx = BuildContext(config=small_config, recipe="int4", work_dir=work, prefill_chunk=CHUNK,
                       options={"stream_export": True})
    return backend.export(backend.quantize(small_model, ctx), ctx), work


def _in_memory(proto) -> list[int]:
    return [len(t.raw_data) for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]


def test_streamed_export_holds_no_weights_in_memory(streamed, exported):
    from rgexport.backends.onnx.export import EXPORT_SCRATCH

    graphs, work = streamed
    assert graphs.model is None  # the build can free the torch model before lowering
    assert graphs.base_dir == work / EXPORT_SCRATCH
    for method, proto in graphs.items():
        in_memory = sum(_in_memory(exported[method]))
        assert in_memory > 1_000_000  # the in-memory export holds every weight...
        # ...the streamed one only what onnx_ir's save keeps inline: tensors of at most 256 bytes (its
        # size_threshold_bytes; larger ones go to the data file).
        assert max(_in_memory(proto)) <= 256
        # The graph itself (nodes, value_info: ~0.9 MB here) is the same; the weights are what is missing.
        assert proto.ByteSize() < exported[method].ByteSize() - 0.95 * in_memory


def test_streamed_export_lowers_to_the_same_artifacts(backend, streamed, built, small_config, small_tokens,
                                                      tmp_path):
    from rgexport.backends.onnx.export import EXPORT_SCRATCH

    graphs, work = streamed
    tokens = small_tokens[0, :21].tolist()
    ctx = BuildContext(config=small_config, recipe="int4", work_dir=tmp_path, prefill_chunk=CHUNK)
    lowered = backend.lower(graphs, ctx)
    scratch = Path(lowered.base_dir)
    for proto in lowered.values():  # int4 read the float weights from disk and put what it made there too:
        for t in proto.graph.initializer:  # neither graph's weights are held between lower and write
            if t.data_location == onnx.TensorProto.EXTERNAL:
                assert (scratch / {e.key: e.value for e in t.external_data}["location"]).is_file()
            else:
                assert onnx.numpy_helper.to_array(t).nbytes < 1024, t.name
    backend.write(lowered, ctx)
    for recipe, folder in (("int4", tmp_path), ("fp32", work)):
        if recipe == "fp32":  # written into the export's own work folder, which must lose the scratch files
            ctx = BuildContext(config=small_config, recipe="fp32", work_dir=work, prefill_chunk=CHUNK)
            backend.write(backend.lower(graphs, ctx), ctx)
            assert not (work / EXPORT_SCRATCH).exists()
        want = run_mixed(backend.load(built[recipe][0], manifest_for(), threads=1), tokens)
        got = run_mixed(backend.load(folder, manifest_for(), threads=1), tokens)
        assert np.abs(got - want).max() == 0.0, recipe


def test_describe_onnx(built):
    info = describe_onnx(built["int4"][0] / "decode.onnx")
    assert info["inputs"][0] == {"name": "token", "shape": [1], "dtype": "int32"}
    assert info["outputs"][0] == {"name": "logits", "shape": [1, 512], "dtype": "float32"}
    assert info["nodes"] == sum(info["ops"].values())
    assert info["weights"]["bytes"] == sum(info["weights"]["by_dtype"].values())
    assert info["weights"]["bytes"] < describe_onnx(built["fp32"][0] / "decode.onnx")["weights"]["bytes"] / 3
    with pytest.raises(RgexportError, match="not an ONNX model"):
        describe_onnx(built["fp32"][0] / "required_operators.config")


# Slow: the shipped model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_shipped_model_fp32_matches_eager_perplexity(backend, shipped, tmp_path):
    from rgexport.tokenizer import Tokenizer

    text = (Path(__file__).parent.parent / "calibration" / "corpus" / "heldout.txt").read_text()
    tokens = Tokenizer(shipped.tokenizer_path).encode(text[:4000])[:512]
    chunk = 32
    ctx = BuildContext(config=shipped.config, recipe="fp32", work_dir=tmp_path, prefill_chunk=chunk)
    backend.write(backend.lower(backend.export(backend.quantize(shipped.model, ctx), ctx), ctx), ctx)
    runner = backend.load(tmp_path, manifest_for(chunk), threads=1)
    logits = run_mixed(runner, tokens)
    want = shipped.model.score(torch.tensor([tokens]), chunk=chunk)[0].numpy()
    assert np.abs(logits - want).max() <= 1e-4

    def nll(lg: np.ndarray) -> float:
        lg = lg[:-1].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        return float(np.mean(lse - lg[np.arange(len(lg)), tokens[1:]]))

    assert abs(np.exp(nll(logits)) - np.exp(nll(want))) < 1e-3


@pytest.mark.slow
def test_shipped_model_qdq8_build_passes_validation(shipped, tmp_path):
    """The whole pipeline: calibration text -> w8a8 -> validation (.onnx and .ort) on 512 held-out tokens.

    Measured (x86-64 AVX2): top-1 97.46%, mean KL 0.0039, perplexity ratio 1.0053, decode.onnx 3.71 MB
    (fp32 14.2 MB). Quantising the RG-LRU too gives 94.9% / 0.0074 / 1.0095, which fails these bounds.
    """
    from rgexport.build import BuildOptions, build

    result = build(BuildOptions(backend="onnx", recipe="w8a8", out=tmp_path / "w8a8", options={"ort_format": True}),
                   checkpoint=shipped)
    report = result.report
    assert report.passed, report.failures
    assert report.tokens == 4 * shipped.config.attention_window_size
    m = report.metrics
    assert m["top1_agreement"] >= 0.96 and m["mean_kl"] <= 0.006 and m["ppl_ratio"] <= 1.01, m
    assert set(report.variants) == {"ort"} and report.variants["ort"].passed
    assert report.variants["ort"].metrics["top1_agreement"] == m["top1_agreement"]
    facts = result.manifest["backend_facts"]["onnx_w8a8"]
    assert facts["decode"]["quantized_nodes"] == facts["prefill"]["quantized_nodes"] == 6 * 3 + 4 * 5 + 2 * 4 + 1
    assert result.manifest["recipe"]["calibrated"]
    sizes = {f["path"]: f["bytes"] for f in result.manifest["artifact"]["files"]}
    assert sizes["decode.onnx"] + sizes["prefill.onnx"] + sizes["weights.bin"] < 0.3 * 14_210_945  # fp32 decode.onnx
