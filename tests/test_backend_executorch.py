"""ExecuTorch backend: the .pte in ExecuTorch's runtime against the eager model.

Each artifact is built once per module: XNNPACK lowering of the SMALL model takes one to three minutes
on a shared 2-core machine. The quantised recipes, a few minutes each, are `slow`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from rgexport.backends.base import BuildContext
from rgexport.backends.executorch import ExecuTorchBackend
from rgexport.backends.executorch import rewrites as executorch_rewrites
from rgexport.errors import RgexportError
from rgexport.model import state_bytes, state_spec

pytest.importorskip("executorch")

CHUNK = 8  # half the SMALL window: chunks start at every ring-buffer offset the schedule below reaches


def build(model, config, recipe, work_dir, chunk=CHUNK, calibration_tokens=None):
    """Runs the four stages as the pipeline does, on a copy of `model` (quantisation works in place);
    returns (manifest, ctx, what `quantize` returned)."""
    backend = ExecuTorchBackend()
    ctx = BuildContext(config=config, recipe=recipe, work_dir=work_dir, prefill_chunk=chunk,
                       calibration_tokens=calibration_tokens)
    prepared = backend.quantize(copy.deepcopy(model), ctx)
    lowered = backend.lower(backend.export(prepared, ctx), ctx)
    (path,) = backend.write(lowered, ctx)
    manifest = {"artifact": {"file": path.name}, "io": backend.io_contract(ctx)}
    return manifest, ctx, prepared


def eager_decode_logits(module, config, tokens):
    """Logits of a quantised torch-level decode module (what `export` captured), token by token."""
    names = {s.identifier for s in state_spec(config)}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in names:
                buf.zero_()
        out = [module(tokens[:, i : i + 1].to(torch.int32), torch.tensor([i], dtype=torch.int32))[0]
               for i in range(tokens.shape[1])]
    return torch.cat(out).numpy()


def run_schedule(runner, tokens):
    """Decode steps and prefill chunks interleaved at unaligned positions: chunks after decode steps,
    decode steps after chunks, and two chunks in a row. Returns logits [n, v]."""
    toks = tokens[0].tolist()
    out, i, k = [], 0, 0
    pattern = [3, "p", 1, "p", "p", 2]  # ints: that many decode steps; "p": one prefill chunk
    while i < len(toks):
        step = pattern[k % len(pattern)]
        k += 1
        if step == "p" and i + CHUNK <= len(toks):
            out.append(runner.prefill(toks[i : i + CHUNK], i))
            i += CHUNK
        else:
            for _ in range(1 if step == "p" else step):
                if i < len(toks):
                    out.append(runner.decode(toks[i], i)[None])
                    i += 1
    return np.concatenate(out)


def eager_state(model, tokens):
    state = model.init_state()
    with torch.no_grad():
        for i in range(tokens.shape[1]):
            _, state = model.step(tokens[:, i], torch.tensor([i]), state)
    return {k: v.numpy() for k, v in state.items()}


@pytest.fixture(scope="module")
def eager_logits(small_model, small_tokens):
    return small_model.score(small_tokens, chunk=1)[0].numpy()


@pytest.fixture(scope="module")
def fp32_build(small_model, small_config, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("executorch-fp32")
    manifest, ctx, _ = build(small_model, small_config, "fp32", work_dir)
    return work_dir, manifest, ctx


@pytest.fixture(scope="module")
def runner(fp32_build):
    work_dir, manifest, _ = fp32_build
    return ExecuTorchBackend().load(work_dir, manifest)


def test_fp32_matches_eager_across_window_wraps(runner, small_model, small_tokens, eager_logits):
    runner.reset()
    got = run_schedule(runner, small_tokens)
    assert got.shape == eager_logits.shape == (80, small_model.config.vocab_size)
    assert got.dtype == np.float32
    err = np.abs(got - eager_logits).max()
    assert err <= 1e-4, f"max abs logit error {err}"

    # The state the program holds after 80 tokens is the eager model's.
    state = runner.state()
    expected = eager_state(small_model, small_tokens)
    assert list(state) == list(expected)
    for name, value in expected.items():
        assert state[name].shape == value.shape, name
        assert np.abs(state[name] - value).max() <= 1e-4, name


def test_decode_and_prefill_share_the_state(runner, small_model, small_tokens, eager_logits):
    """A chunk through prefill, then decode continues it (and the other way round). Were the methods
    to keep separate state, decode after prefill would see a blank history."""
    toks = small_tokens[0].tolist()
    runner.reset()
    runner.prefill(toks[:CHUNK], 0)
    after_prefill = runner.decode(toks[CHUNK], CHUNK)
    assert np.abs(after_prefill - eager_logits[CHUNK]).max() <= 1e-4

    # The check can fail: decoding that token without the chunk's history gives other logits.
    with torch.no_grad():
        blank, _ = small_model.step(small_tokens[:, CHUNK], torch.tensor([CHUNK]), small_model.init_state())
    assert np.abs(blank[0].numpy() - eager_logits[CHUNK]).max() > 1e-2

    runner.reset()
    for i in range(5):
        runner.decode(toks[i], i)
    chunk = runner.prefill(toks[5 : 5 + CHUNK], 5)
    assert np.abs(chunk - eager_logits[5 : 5 + CHUNK]).max() <= 1e-4


def test_reset_zeroes_the_state_and_a_rerun_is_identical(runner, small_tokens):
    runner.reset()
    first = run_schedule(runner, small_tokens)
    assert max(np.abs(v).max() for v in runner.state().values()) > 0
    runner.reset()
    assert all(not v.any() for v in runner.state().values())
    second = run_schedule(runner, small_tokens)
    np.testing.assert_array_equal(first, second)


def test_position_zero_starts_a_new_sequence_without_reset(runner, small_tokens, eager_logits):
    toks = small_tokens[0].tolist()
    runner.reset()
    run_schedule(runner, small_tokens[:, 40:])  # leave a dirty state behind
    got = np.concatenate([runner.prefill(toks[:CHUNK], 0), runner.decode(toks[CHUNK], CHUNK)[None]])
    assert np.abs(got - eager_logits[: CHUNK + 1]).max() <= 1e-4


def test_two_runners_keep_separate_state(fp32_build, runner, small_tokens, eager_logits):
    work_dir, manifest, _ = fp32_build
    toks = small_tokens[0].tolist()
    other = ExecuTorchBackend().load(work_dir, manifest)
    runner.reset()
    runner.prefill(toks[:CHUNK], 0)
    other.prefill(toks[40 : 40 + CHUNK], 0)  # a different sequence in the second program
    assert np.abs(runner.decode(toks[CHUNK], CHUNK) - eager_logits[CHUNK]).max() <= 1e-4


def test_program_matches_io_contract_and_facts(fp32_build, small_config):
    from executorch.runtime import Runtime

    work_dir, manifest, ctx = fp32_build
    contract = manifest["io"]
    jsonschema = pytest.importorskip("jsonschema")
    from rgexport.assets import schema_path

    schema = json.loads(schema_path("manifest.schema.json").read_text())
    jsonschema.validate(json.loads(json.dumps(contract)), {**schema["properties"]["io"], "$defs": schema["$defs"]})
    program = Runtime.get().load_program(work_dir / manifest["artifact"]["file"])
    assert program.method_names == set(contract["methods"]) == {"decode", "prefill", "reset", "read_state"}
    dtypes = {"int32": 3, "float32": 6}  # ExecuTorch ScalarType codes (Int, Float)
    for method in ("decode", "prefill"):
        meta = program.metadata(method)
        declared = contract["methods"][method]
        assert meta.num_inputs() == len(declared["inputs"])
        assert meta.num_outputs() == len(declared["outputs"])
        for i, tensor in enumerate(declared["inputs"]):
            info = meta.input_tensor_meta(i)
            assert list(info.sizes()) == tensor["shape"], (method, tensor["name"])
            assert info.dtype() == dtypes[tensor["dtype"]], (method, tensor["name"])
        for i, tensor in enumerate(declared["outputs"]):
            info = meta.output_tensor_meta(i)
            assert list(info.sizes()) == tensor["shape"], (method, tensor["name"])
            assert info.dtype() == dtypes[tensor["dtype"]], (method, tensor["name"])

    assert contract["state"]["placement"] == "internal"
    assert contract["state"]["total_bytes"] == state_bytes(small_config)
    # Every method addresses one state arena exactly the size of the state.
    planned = ctx.facts["planned_memory_bytes"]
    assert set(planned) == set(contract["methods"])
    assert {p["state"] for p in planned.values()} == {state_bytes(small_config)}
    assert planned["prefill"]["activations"] > planned["decode"]["activations"] > 0
    for method in ("decode", "prefill"):
        d = ctx.facts["delegation"][method]
        assert d["delegated_ops"] > d["non_delegated_ops"] > 0
        assert "aten.embedding" in d["non_delegated"]  # the gather stays outside XNNPACK
    assert any("XNNPACK runs" in note for note in ctx.notes)


# Ops XNNPACK refused before `executorch_rewrites` (the shipped model's decode: 24 delegate calls, 113 ops
# outside); on SMALL, decode was 24 delegates and prefill 20.
REWRITTEN_OPS = ("aten.mean.dim", "aten.select_copy.int", "aten.unsqueeze_copy", "aten.log1p", "aten.where.self",
                 "aten.gt.Scalar", "aten.arange.start_step", "aten.cat", "aten.alias_copy")
# What is left: the embedding gather and the int32 -> int64/float32 casts of tokens and position; prefill
# also keeps the ring-buffer blend's sum over the chunk (XNNPACK has no sum; it reads positions only).
LEFT_OUTSIDE = {"aten.embedding", "dim_order_ops._to_dim_order_copy"}


# Decode also writes each K/V cache in place: the slot (position % window, cast to int64) and the row put.
IN_PLACE_WRITE = {"aten.index_put", "aten.remainder.Scalar"}


def test_rewrites_leave_only_the_gather_and_input_casts_outside_xnnpack(fp32_build):
    _, _, ctx = fp32_build
    assert ctx.facts["xnnpack_rewrites"] == list(executorch_rewrites.REWRITES)
    for method, left in (("decode", LEFT_OUTSIDE | IN_PLACE_WRITE),
                         ("prefill", LEFT_OUTSIDE | {"aten.sum.dim_IntList"})):
        d = ctx.facts["delegation"][method]
        assert not set(REWRITTEN_OPS) & set(d["non_delegated"]), (method, d["non_delegated"])
        assert set(d["non_delegated"]) <= left, (method, d["non_delegated"])
        assert d["partitions"] <= 4, (method, d["partitions"])


def test_decode_writes_the_kv_caches_in_place(fp32_build, small_config):
    """Decode puts one row into each K/V cache buffer (`index_put_`) and copies back only the recurrent state;
    before, every cache was blended over all its slots and copied back whole (notes/perf.md)."""
    _, _, ctx = fp32_build
    caches = sum(s.kind in ("keys", "values") for s in state_spec(small_config))
    assert ctx.facts["kv_cache_decode_write"] == "in place (index_put_)"
    assert ctx.facts["decode_state_writes"] == {"index_put_": caches, "copy_": len(state_spec(small_config)) - caches}


def _lower_norm(rewrites):
    """A lone RMSNorm over [1, t, d], lowered with the given rewrites: (ops outside, program output, input)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from rgexport.model.layers import RMSNorm

    norm = RMSNorm(48).eval()
    with torch.no_grad():
        norm.scale.copy_(torch.linspace(-0.5, 0.5, 48))
    x = torch.randn(1, 3, 48, generator=torch.Generator().manual_seed(0)) * 3
    exported = torch.export.export(norm, (x,), strict=False)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                       transform_passes=executorch_rewrites.edge_passes(rewrites))
    outside = [n.target.__name__ for n in edge.exported_program().graph.nodes
               if n.op == "call_function" and "call_delegate" not in str(n.target) and "getitem" not in str(n.target)]
    program = Runtime.get().load_program(edge.to_executorch().buffer)
    return outside, program.load_method("forward").execute([x])[0], norm(x)


def test_mean_as_4d_moves_the_rmsnorm_mean_into_xnnpack():
    """Without the rewrite XNNPACK refuses the rank-3 mean; with it the norm is one delegate, same values."""
    outside, _, _ = _lower_norm([])
    assert any("mean" in op for op in outside), outside
    outside, got, want = _lower_norm(["mean_as_4d"])
    assert outside == []
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_unknown_rewrite_is_refused():
    with pytest.raises(RgexportError, match=r"unknown ExecuTorch rewrites \['fuse_all'\].*mean_as_4d"):
        executorch_rewrites.edge_passes(["fuse_all"])


def test_prefill_refuses_a_wrong_chunk(runner):
    with pytest.raises(RgexportError, match=f"exactly {CHUNK} tokens"):
        runner.prefill([1, 2, 3], 0)


def test_bad_recipe_lists_the_recipes(small_model, small_config, tmp_path):
    ctx = BuildContext(config=small_config, recipe="fp16", work_dir=tmp_path, prefill_chunk=CHUNK)
    with pytest.raises(RgexportError, match=r"no recipe 'fp16'.*\['fp32', 'int4', 'int8', 'w8a8'\]"):
        ExecuTorchBackend().quantize(small_model, ctx)


def test_unknown_delegate_is_refused(small_model, small_config, tmp_path):
    ctx = BuildContext(config=small_config, recipe="fp32", work_dir=tmp_path, prefill_chunk=CHUNK,
                       options={"delegate": "coreml"})
    with pytest.raises(RgexportError, match=r"delegate 'coreml'.*\['xnnpack'\]"):
        ExecuTorchBackend().quantize(copy.deepcopy(small_model), ctx)


def test_module_imports_without_executorch():
    """The backend module imports without its runtime; a stage then names the extra to install."""
    code = (
        "import sys\n"
        "for m in ('executorch', 'torchao'): sys.modules[m] = None\n"
        "from rgexport.backends import get_backend\n"
        "from rgexport.errors import MissingDependencyError\n"
        "b = get_backend('executorch')\n"
        "try:\n"
        "    b.load('.', {})\n"
        "except MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "rgexport[executorch]"' in out.stdout


# Quantised recipes ---------------------------------------------------------------------------------------
# Measured on the SMALL random model over the 80 tokens (notes/executorch.md). Against the fp32 model,
# top-1 agreement is 0.65 for int4 (torchao's own eager int4 model agrees no better: random weights with
# perturbed biases give flat logits, median top-2 margin 0.5) and 0.975 for int8. Against the torch-level
# quantised module that was exported, which checks the lowering rather than the recipe: int4 agrees on
# 0.96 of tokens (mean |error| 0.034: XNNPACK's dynamic activation quantisation rounds differently from
# torchao's reference ops); int8 on all of them (mean |error| 2e-7: PT2E's reference ops are XNNPACK's).
QUANTISED = {  # recipe: (min top-1 vs fp32 eager, min top-1 vs eager quantised, max mean |error| vs it)
    "int4": (0.55, 0.9, 0.1),
    "int8": (0.9, 0.95, 1e-3),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(QUANTISED))
def test_quantised_recipe_is_smaller_and_agrees(recipe, fp32_build, small_model, small_config, small_tokens,
                                               eager_logits, tmp_path_factory):
    min_top1_fp32, min_top1_quant, max_mean_err = QUANTISED[recipe]
    work_dir = tmp_path_factory.mktemp(f"executorch-{recipe}")
    manifest, ctx, prepared = build(small_model, small_config, recipe, work_dir)
    fp32_dir, fp32_manifest, _ = fp32_build
    size = (work_dir / manifest["artifact"]["file"]).stat().st_size
    fp32_size = (fp32_dir / fp32_manifest["artifact"]["file"]).stat().st_size
    assert size < 0.7 * fp32_size, (size, fp32_size)

    runner = ExecuTorchBackend().load(work_dir, manifest)
    runner.reset()
    got = run_schedule(runner, small_tokens)
    top1 = float((got.argmax(-1) == eager_logits.argmax(-1)).mean())
    assert top1 >= min_top1_fp32, f"{recipe}: top-1 agreement with fp32 eager {top1:.3f}"

    quantised = eager_decode_logits(prepared.modules["decode"], small_config, small_tokens)
    top1 = float((got.argmax(-1) == quantised.argmax(-1)).mean())
    mean_err = float(np.abs(got - quantised).mean())
    assert top1 >= min_top1_quant, f"{recipe}: top-1 agreement with its eager quantised model {top1:.3f}"
    assert mean_err <= max_mean_err, f"{recipe}: mean |logit error| vs its eager quantised model {mean_err}"

    # Decode writes the K/V caches in place here too: the row-put write is in the graph PT2E captures.
    assert ctx.facts["kv_cache_decode_write"] == "in place (index_put_)"
    # The recurrence and state stay float32 and finite; the state is planned once, as in fp32.
    state = runner.state()
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())
    assert {p["state"] for p in ctx.facts["planned_memory_bytes"].values()} == {state_bytes(small_config)}


# w8a8: calibrated static int8 -----------------------------------------------------------------------------
def test_calibrated_recipe_without_calibration_text_is_refused(small_model, small_config, tmp_path):
    for tokens in (None, [], [[]]):
        ctx = BuildContext(config=small_config, recipe="w8a8", work_dir=tmp_path, prefill_chunk=CHUNK,
                           calibration_tokens=tokens)
        with pytest.raises(RgexportError, match=r"w8a8 is calibrated.*calibration_tokens.*--calibration"):
            ExecuTorchBackend().quantize(copy.deepcopy(small_model), ctx)


def _small_graph(model, t):
    from rgexport.backends.executorch.calibration import capture
    from rgexport.graphs import StatefulModel

    stateful = StatefulModel(copy.deepcopy(model)).eval()
    stateful.requires_grad_(False)
    return capture(stateful, (torch.zeros(1, t, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)))


def test_op_groups_of_the_captured_graph(small_model, small_config):
    """The groups the w8a8 recipe and its study are stated in: every linear in its kind, every state buffer
    read and written by `state` ops, masks and angles in `positions`."""
    from rgexport.backends.executorch.calibration import kind, node_groups

    gm = _small_graph(small_model, 1)
    groups = node_groups(gm)
    linears = collections.Counter(kind(g) for n, g in groups.items() if n.target == torch.ops.aten.linear.default)
    recurrent = sum(t == "recurrent" for t in small_config.block_types)
    attention = len(small_config.block_types) - recurrent
    assert linears == {"recurrent_proj": 3 * recurrent, "attention_proj": 4 * attention,
                       "mlp": 3 * len(small_config.block_types), "head": 1}
    bmm = {g for n, g in groups.items() if n.target == torch.ops.aten.bmm.default}
    assert {kind(g) for g in bmm} == {"rglru", "attention"}  # RG-LRU gates; the ring-buffer write
    assert {kind(g) for n, g in groups.items() if n.target == torch.ops.aten.softmax.int} == {"attention"}
    kinds = collections.Counter(kind(g) for g in groups.values())
    assert kinds["positions"] > 0 and kinds["norm"] > 0 and kinds["conv1d"] > 0 and kinds["residual"] > 0
    names = {s.identifier for s in state_spec(small_config)}
    state_reads = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target in names for u in n.users]
    assert len(state_reads) >= 2 * len(names)  # read once, written back once (copy_)
    assert {groups[u] for u in state_reads} == {"state"}


@pytest.fixture(scope="module")
def w8a8_build(small_model, small_config, tmp_path_factory):
    """SMALL's w8a8 program, calibrated on random token sequences (the model is random too) of three
    windows each, so calibration sees the ring buffer wrap."""
    g = torch.Generator().manual_seed(2)
    tokens = [torch.randint(0, small_config.vocab_size, (3 * small_config.attention_window_size,),
                            generator=g).tolist() for _ in range(4)]
    work_dir = tmp_path_factory.mktemp("executorch-w8a8")
    manifest, ctx, prepared = build(small_model, small_config, "w8a8", work_dir, calibration_tokens=tokens)
    return work_dir, manifest, ctx, prepared


def _is(node, name):
    return node.op == "call_function" and name in str(node.target)


def _is_quantize(node):
    qd = torch.ops.quantized_decomposed
    return node.op == "call_function" and node.target in (
        qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor, qd.quantize_per_channel.default)


@pytest.mark.slow
def test_w8a8_quantises_the_linears_only_and_keeps_the_state_float(w8a8_build, small_config):
    from rgexport.backends.executorch.calibration import W8A8_KINDS, integer_ops, kind, node_groups, qdq_groups

    _, _, ctx, prepared = w8a8_build
    names = {s.identifier for s in state_spec(small_config)}
    blocks = len(small_config.block_types)
    recurrent = sum(t == "recurrent" for t in small_config.block_types)
    static = {"attention_proj": 4 * (blocks - recurrent), "mlp": 3 * blocks, "recurrent_proj": 3 * recurrent}
    for method in ("decode", "prefill"):
        gm = prepared.modules[method]
        groups = node_groups(gm)
        linears = [n for n in groups if n.target == torch.ops.aten.linear.default]
        assert len(linears) == sum(static.values()) + 1
        for n in linears:
            x, w = n.args[:2]
            # int8 per-channel weights everywhere, folded into int8 constants.
            assert _is(w, "dequantize_per_channel") and w.args[0].op == "get_attr", (method, n.name, w)
            assert getattr(gm, w.args[0].target).dtype == torch.int8
            assert _is(x, "dequantize_per_tensor"), (method, n.name, x)
            if kind(groups[n]) in W8A8_KINDS:  # static: calibrated scales, int8 out
                assert n.users and all(_is_quantize(u) for u in n.users), (method, n.name)
                assert x.target == torch.ops.quantized_decomposed.dequantize_per_tensor.default
            else:  # the tied head: activation scales computed per call, float logits
                assert groups[n] == "head"
                assert x.target == torch.ops.quantized_decomposed.dequantize_per_tensor.tensor
                assert not any(_is_quantize(u) for u in n.users)
        # The static linears are the only int8 kernels: nothing else sits between a dequantize and a quantize.
        assert integer_ops(gm) == static == ctx.facts["w8a8"][method]["integer_ops_by_kind"]
        # Every Q/DQ node borders a quantised linear; none touches the RG-LRU, the soft-cap or the state ops.
        touched = qdq_groups(gm)
        assert touched and all(any(kind(g) in (*W8A8_KINDS, "head") for g in t) for t in touched.values())
        assert not {kind(g) for t in touched.values() for g in t} & {"rglru", "softcap", "state", "positions"}
        # The state: buffers stay float32, feed no quantize, and are written from float ops.
        for n in gm.graph.nodes:
            if n.op == "get_attr" and n.target in names:
                assert getattr(gm, n.target).dtype == torch.float32
                assert not any(_is_quantize(u) for u in n.users), (method, n.target)
            if _is(n, "copy_"):
                assert not _is(n.args[1], "dequantize"), (method, n.name)
        facts = ctx.facts["w8a8"][method]
        assert facts["calibration_samples"] == (4 * 48 if method == "decode" else 4 * 48 // CHUNK)
        assert facts["positions"][1] >= small_config.attention_window_size
        assert facts["positions_past_window"] > 0
    assert set(ctx.facts["w8a8"]["float_kinds"]) >= {"rglru", "conv1d", "attention", "norm", "state"}
    caches = sum(s.kind in ("keys", "values") for s in state_spec(small_config))
    assert ctx.facts["decode_state_writes"]["index_put_"] == caches  # the cache writes stay float, in place
    assert any(note.startswith("w8a8:") for note in ctx.notes)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "open: the XNNPACK w8a8 program's decode steps drift from its converted PT2E graph in eager torch "
    "(step 0 agrees to 1e-7, top-1 >= 0.95, but mean |logit error| 0.058 over 80 steps against the 1e-3 "
    "bound), while the artifact passes validation against fp32; cause not found (notes/executorch.md)"))
def test_w8a8_program_agrees_with_its_eager_graph_and_fp32(w8a8_build, fp32_build, small_config, small_tokens,
                                                         eager_logits):
    work_dir, manifest, ctx, prepared = w8a8_build
    fp32_dir, fp32_manifest, _ = fp32_build
    size = (work_dir / manifest["artifact"]["file"]).stat().st_size
    assert size < 0.7 * (fp32_dir / fp32_manifest["artifact"]["file"]).stat().st_size

    runner = ExecuTorchBackend().load(work_dir, manifest)
    runner.reset()
    got = run_schedule(runner, small_tokens)
    top1 = float((got.argmax(-1) == eager_logits.argmax(-1)).mean())
    # Measured: the converted decode graph in eager torch agrees with fp32 on 0.925 of the 80 tokens.
    assert top1 >= 0.85, f"w8a8: top-1 agreement with fp32 eager {top1:.3f}"
    # XNNPACK computes what the converted PT2E graph computes (the lowering check). Decode steps only: prefill
    # is its own graph with its own calibrated scales, so the schedule above is not what the decode graph does.
    quantised = eager_decode_logits(prepared.modules["decode"], small_config, small_tokens)
    runner.reset()
    decoded = np.stack([runner.decode(t, i) for i, t in enumerate(small_tokens[0].tolist())])
    assert float((decoded.argmax(-1) == quantised.argmax(-1)).mean()) >= 0.95
    assert float(np.abs(decoded - quantised).mean()) <= 1e-3
    state = runner.state()
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())
    assert {p["state"] for p in ctx.facts["planned_memory_bytes"].values()} == {state_bytes(small_config)}


@pytest.mark.slow
@pytest.mark.parametrize("head_bits,op", [(8, "embedding_byte"), (4, "embedding_4bit")])
def test_8da4w_quantized_gather_reads_the_heads_table(head_bits, op, fp32_build, small_model, small_config,
                                                      small_tokens, eager_logits, tmp_path_factory):
    """Option quantized_gather: the gather reads the head's int8 (or, head_bits=4, int4) rows, the float32
    table is gone from the file, and a fresh process that only has the manifest loads and runs it."""
    work_dir = tmp_path_factory.mktemp(f"executorch-int4-gather{head_bits}")
    backend = ExecuTorchBackend()
    ctx = BuildContext(config=small_config, recipe="int4", work_dir=work_dir, prefill_chunk=CHUNK,
                       options={"quantized_gather": True, "head_bits": head_bits})
    prepared = backend.quantize(copy.deepcopy(small_model), ctx)
    files = backend.write(backend.lower(backend.export(prepared, ctx), ctx), ctx)
    manifest = {"artifact": {"file": files[0].name}, "io": backend.io_contract(ctx), "backend_facts": ctx.facts}
    assert [f.name for f in files] == ["model.pte", *(["model.ptd"] if head_bits == 4 else [])]  # the shared table
    assert any(op in o for o in ctx.facts["delegation"]["decode"]["non_delegated"])
    fp32_dir, fp32_manifest, _ = fp32_build
    # SMALL's float table is 512 x 64 x 4 = 131 KB; plain int4 is 0.48x fp32 (notes/executorch.md).
    size = sum(f.stat().st_size for f in files)
    assert size < 0.45 * (fp32_dir / fp32_manifest["artifact"]["file"]).stat().st_size
    from rgexport.budget import weights_lower_bound  # the budget's bound (the table's copies) holds

    assert weights_lower_bound(small_config, "int4", backend, ctx.options) <= size

    runner = backend.load(work_dir, manifest)
    runner.reset()
    got = run_schedule(runner, small_tokens)
    assert float((got.argmax(-1) == eager_logits.argmax(-1)).mean()) >= QUANTISED["int4"][0]
    quantised = eager_decode_logits(prepared.modules["decode"], small_config, small_tokens)
    assert float((got.argmax(-1) == quantised.argmax(-1)).mean()) >= QUANTISED["int4"][1]

    (work_dir / "manifest.json").write_text(json.dumps(manifest))
    script = ("import json, sys, pathlib; from rgexport.backends.executorch import ExecuTorchBackend; "
              "d = pathlib.Path(sys.argv[1]); m = json.loads((d / 'manifest.json').read_text()); "
              "print(ExecuTorchBackend().load(d, m).decode(5, 0).shape)")
    proc = subprocess.run([sys.executable, "-c", script, str(work_dir)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and f"({small_config.vocab_size},)" in proc.stdout, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def int4_from_stream(small_model, small_config, tmp_path_factory):
    """SMALL's int4 quantised the way a model above 2 GiB is: from a weightless model, a block at a time from
    transformers-format shards."""
    from rgexport.checkpoint import save_huggingface
    from rgexport.streaming import fake_griffin, stream_huggingface

    stream = stream_huggingface(save_huggingface(small_model, tmp_path_factory.mktemp("ckpt")))
    ctx = BuildContext(config=small_config, recipe="int4", work_dir=tmp_path_factory.mktemp("executorch-stream"),
                       prefill_chunk=CHUNK, stream=stream)
    return ExecuTorchBackend().quantize(fake_griffin(small_config), ctx), ctx, stream


def test_int4_from_a_stream_is_the_in_memory_recipe_one_block_at_a_time(int4_from_stream, small_model,
                                                                          small_config, small_tokens, tmp_path):
    """Quantised as each block arrives, the model equals the in-memory int4 (with the quantized gather, the
    streamed default) tensor for tensor, and the stream never held two parts at once (counted)."""
    from rgexport.streaming import block_weight_bytes

    prepared, ctx, stream = int4_from_stream
    parts = block_weight_bytes(small_config)
    model = prepared.modules["decode"].model
    # What the recipe keeps in float32 (the RG-LRU's gates, Conv1D, norms, biases) stays alive; the linears'
    # float weights and the float table go as soon as their quantised copies exist.
    quantised_gather = {id(model.embedder.embedding_int4), id(model.embedder.embedding_scales)}
    kept = sum(t.numel() * t.element_size() for m in (model.embedder, model.blocks, model.final_norm)
               for t in [*m.parameters(), *m.buffers()]
               if type(t) in (torch.Tensor, torch.nn.Parameter) and id(t) not in quantised_gather)
    assert stream.counter.parts == len(small_config.block_types) + 2
    assert stream.counter.live == kept
    assert max(parts.values()) <= stream.counter.peak <= max(parts.values()) + kept  # one float part at a time
    assert stream.counter.peak < sum(parts.values()) / 2
    assert ctx.options["quantized_gather"] is True and ctx.options["head_bits"] == 4
    assert ctx.facts["quantized_ops"] == ["quantized_decomposed::embedding_4bit.dtype"]

    want_ctx = BuildContext(config=small_config, recipe="int4", work_dir=tmp_path, prefill_chunk=CHUNK,
                            options={"quantized_gather": True, "head_bits": 4})
    want = ExecuTorchBackend().quantize(copy.deepcopy(small_model), want_ctx)
    got_sd, want_sd = prepared.modules["decode"].state_dict(), want.modules["decode"].state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    for name, value in want_sd.items():
        for attr in ("qdata", "scale", "zero_point"):  # torchao's quantised weights, else the tensor itself
            a, b = getattr(got_sd[name], attr, None), getattr(value, attr, None)
            if b is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}.{attr}")
        if not hasattr(value, "qdata"):
            torch.testing.assert_close(got_sd[name], value, rtol=0, atol=0, msg=name)
    tokens = small_tokens[:, :24]
    np.testing.assert_array_equal(eager_decode_logits(prepared.modules["decode"], small_config, tokens),
                                  eager_decode_logits(want.modules["decode"], small_config, tokens))


def test_stream_weights_option():
    backend = ExecuTorchBackend()
    assert backend.streams_weights("int4", {}) is None  # the build decides by size
    assert backend.streams_weights("8da4w", {"stream_weights": True}) is True
    assert backend.streams_weights("fp32", {"stream_weights": True}) is False  # PT2E / fp32 need the whole graph
    assert backend.streams_weights("int4", {"stream_weights": False}) is False
    with pytest.raises(RgexportError, match="stream_weights"):
        backend.streams_weights("int4", {"stream_weights": "yes"})


@pytest.mark.parametrize("bits", [8, 4])
def test_head_quantised_in_row_slices_is_torchaos_tensor_byte_for_byte(bits):
    """`quantize_rows_` (the head in int8 per row or int4 per group of 32, a slice at a time) gives what
    `quantize_` gives on the whole weight: uneven slices, a zero row, the same torchao tensor type and
    attributes."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    from rgexport.backends.executorch.recipes import quantize_rows_

    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int8 if bits == 8 else torch.int4,
        weight_granularity=PerAxis(0) if bits == 8 else PerGroup(32))
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(1000, 96, generator=g) * torch.rand(1000, 1, generator=g) * 4
    weight[17] = 0
    whole, sliced = nn.Linear(96, 1000, bias=False), nn.Linear(96, 1000, bias=False)
    whole.weight = nn.Parameter(weight.clone(), requires_grad=False)
    sliced.weight = nn.Parameter(weight.clone(), requires_grad=False)
    quantize_(whole, config)
    quantize_rows_(sliced, config, slice_bytes=96 * 4 * 77)  # 77 rows a slice: 13 slices, the last short
    a, b = sliced.weight, whole.weight
    assert type(a) is type(b)
    for attr in ("target_dtype", "block_size", "dtype", "activation_quantization"):
        assert getattr(a, attr) == getattr(b, attr), attr
    for attr in ("qdata", "scale", "zero_point"):
        torch.testing.assert_close(getattr(a, attr), getattr(b, attr), rtol=0, atol=0, msg=attr)
    assert a.scale.shape == (1000, 96 // (96 if bits == 8 else 32))
    x = torch.randn(3, 96, generator=g)
    torch.testing.assert_close(sliced(x), whole(x), rtol=0, atol=0)


def test_the_4bit_gather_reads_the_int4_heads_rows_exactly():
    """head_bits=4: `embedding_4bit` over the packed table gives the int4 head's own dequantised rows, bit for
    bit (nibble order, offset and group scales all matter: a swapped nibble or a per-row scale fails), in the
    eager class that slices first as in the graph's."""
    pytest.importorskip("executorch")
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401 - registers embedding_4bit
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    from rgexport.backends.executorch.recipes import (
        EagerInt4GatherEmbedder,
        Int4GatherEmbedder,
        pack_int4_rows,
        quantize_rows_,
    )

    g = torch.Generator().manual_seed(5)
    head = nn.Linear(64, 300, bias=False)
    weight = torch.randn(300, 64, generator=g) * torch.rand(300, 64, generator=g)
    head.weight = nn.Parameter(weight, requires_grad=False)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
    quantize_rows_(head, config)
    w = head.weight
    want = (w.qdata.float().reshape(300, 2, 32) * w.scale.reshape(300, 2, 1)).reshape(300, 64)
    packed = pack_int4_rows(w.qdata, slice_rows=37)
    assert packed.dtype == torch.uint8 and packed.shape == (300, 32)
    tokens = torch.tensor([[0, 299, 17, 17, 150]])
    for cls in (Int4GatherEmbedder, EagerInt4GatherEmbedder):
        embedder = nn.Module()
        embedder.register_buffer("embedding_int4", packed)
        embedder.register_buffer("embedding_scales", w.scale.clone())
        embedder.scale = 1.0
        embedder.__class__ = cls  # as `_int4_head` turns the model's embedder into one
        got = embedder.encode(tokens)
        torch.testing.assert_close(got[0], want[tokens[0]], rtol=0, atol=0)


def test_lowering_economies_write_the_same_program(fp32_build, small_model, small_config, tmp_path, monkeypatch):
    """What lowering does to save memory and time changes neither, not the program: byte for byte the same
    `.pte` with and without `preprocess_shares_weights` (XNNPACK preprocesses a copy of each partition that
    shares its weights, instead of ExecuTorch's deep copy), `serialized_weights_shared` (one serialized copy
    of a weight for every partition), `xnnpack_passes_that_apply` (XNNPACK's passes for ops the graph has not
    are skipped), `release_delegated_weights` (the delegated weights' tensors go once XNNPACK has
    serialized them), `provenance_shared` (a node's history is shared, not deep-copied, by every pass) and
    `edge_checked_once` (the edge-dialect check once after lowering, not after every pass)."""
    import contextlib

    from executorch.exir import EdgeCompileConfig
    from executorch.exir.backend.utils import is_same_node

    from rgexport.backends.executorch import backend as executorch_backend
    from rgexport.backends.executorch.export import _PASS_NEEDS

    monkeypatch.setattr(executorch_backend, "preprocess_shares_weights", contextlib.nullcontext)
    monkeypatch.setattr(executorch_backend, "serialized_weights_shared", lambda: contextlib.nullcontext({"bytes": 0}))
    monkeypatch.setattr(executorch_backend, "xnnpack_passes_that_apply", lambda: contextlib.nullcontext({}))
    monkeypatch.setattr(executorch_backend, "release_delegated_weights", lambda edge, exported: 0)
    monkeypatch.setattr(executorch_backend, "provenance_shared", lambda: contextlib.nullcontext({"nodes": 0}))
    # ExecuTorch's own checks after every pass, as without `edge_checked_once`.
    monkeypatch.setattr(executorch_backend, "edge_checked_once", EdgeCompileConfig)
    manifest, kept_ctx, _ = build(small_model, small_config, "fp32", tmp_path)
    # What ExecuTorch keeps of the lowered graphs (and through them the weights) is let go after lowering.
    assert is_same_node.cache_info().currsize == 0
    whys = [m.why for n, m in list(sys.modules.items())
            if n.startswith("executorch.backends.xnnpack.partition") and hasattr(m, "why")]
    assert len(whys) >= 4 and all(w.node is None for w in whys)
    work_dir, shared_manifest, shared_ctx = fp32_build
    # The build with both let go of the delegated weights: every linear's weight at least.
    linears = sum(m.weight.numel() * 4 for m in small_model.modules() if isinstance(m, torch.nn.Linear))
    assert shared_ctx.facts["weights_released_after_lowering_bytes"] >= linears
    assert kept_ctx.facts["weights_released_after_lowering_bytes"] == 0
    # decode's and prefill's partitions serialize the same linear weights; the second copy of each was dropped.
    assert shared_ctx.facts["serialized_duplicates_shared_bytes"] >= linears
    assert kept_ctx.facts["serialized_duplicates_shared_bytes"] == 0
    # XNNPACK's passes for ops Griffin has not were skipped in every partition (decode's and prefill's at least).
    skipped = shared_ctx.facts["xnnpack_passes_skipped"]
    assert set(skipped) == set(_PASS_NEEDS) and min(skipped.values()) >= 2
    assert kept_ctx.facts["xnnpack_passes_skipped"] == {}
    # Every pass's new nodes took their history by reference (thousands of records in SMALL's programs).
    assert shared_ctx.facts["provenance_records_shared"] > 1000
    assert kept_ctx.facts["provenance_records_shared"] == 0
    deep_copied = (tmp_path / manifest["artifact"]["file"]).read_bytes()
    assert deep_copied == (work_dir / shared_manifest["artifact"]["file"]).read_bytes()


def test_the_edge_dialect_is_checked_once_after_lowering():
    """`check_edge_dialect` is the check lowering no longer runs after every pass: it passes a program in the
    edge dialect and refuses one where an op outside a delegate is a plain ATen op."""
    from executorch.exir import to_edge
    from executorch.exir.verification.verifier import SpecViolationError

    from rgexport.backends.executorch.export import check_edge_dialect

    class AddOne(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    edge = to_edge(torch.export.export(AddOne(), (torch.ones(2),)))
    check_edge_dialect(edge)
    (add,) = [n for n in edge.exported_program().graph.nodes if "add.Tensor" in str(n.target)]
    add.target = torch.ops.aten.add.Tensor  # the ATen op the edge op wraps
    with pytest.raises(SpecViolationError, match="not an Edge operator"):
        check_edge_dialect(edge)


@pytest.fixture(scope="module")
def int4_gather4(small_config, random_model, tmp_path_factory):
    """int4 with the 4-bit head and the quantized gather, built once per (disposable_weights, share_table):
    {"files": {name: bytes}, "ctx", "decode" (the quantised module), "again" (its exported programs, for a
    second lowering), "folder", "manifest"}. Of SMALL's first three blocks (recurrent, recurrent, attention):
    lowering's time goes with the graph's length, and three builds are compared byte for byte here."""
    from rgexport.backends.executorch import export as executorch_export

    small_config = dataclasses.replace(small_config, block_types=small_config.block_types[:3])
    small_model = random_model(small_config)
    built = {}

    def get(free: bool, share: bool):
        if (free, share) not in built:
            backend = ExecuTorchBackend()
            work_dir = tmp_path_factory.mktemp(f"executorch-int4-gather4-{free}-{share}")
            ctx = BuildContext(config=small_config, recipe="int4", work_dir=work_dir, prefill_chunk=CHUNK,
                               options={"quantized_gather": True, "head_bits": 4, "share_table": share},
                               disposable_weights=free)
            prepared = backend.quantize(copy.deepcopy(small_model), ctx)
            exported = backend.export(prepared, ctx)
            again = dict(exported)  # `lower` empties the dict it is given
            trim = executorch_export.TRIM_EVERY
            executorch_export.TRIM_EVERY = 0  # the heap trimmed after every freed weight
            try:
                files = backend.write(backend.lower(exported, ctx), ctx)
            finally:
                executorch_export.TRIM_EVERY = trim
            manifest = {"artifact": {"file": files[0].name}, "io": backend.io_contract(ctx), "backend_facts": ctx.facts}
            built[free, share] = {"files": {f.name: f.read_bytes() for f in files}, "ctx": ctx, "again": again,
                                  "decode": prepared.modules["decode"], "folder": work_dir, "manifest": manifest}
        return built[free, share]

    return get


# Slow: its lowering with the weights freed is the default run's longest test (159-209 s); the freeing runs in every
# 2B ExecuTorch int4 build, and `-m slow` runs this byte-for-byte check.
@pytest.mark.slow
def test_int4_weights_freed_once_serialized_write_the_same_program(int4_gather4):
    """A build that holds the quantised model nowhere else (`disposable_weights`) frees each int8 weight as soon
    as XNNPACK has serialized it, in every program on it (the model's own torchao tensors included), and
    prefill's partitions reuse decode's serialization instead of reading the weights again. The program and its
    data are the same, byte for byte, as the build that frees nothing; lowering the freed weights again is
    refused."""
    backend = ExecuTorchBackend()
    builds = {free: int4_gather4(free, True) for free in (False, True)}
    small_config = builds[False]["ctx"].config
    out = {free: b["files"] for free, b in builds.items()}
    facts = {free: b["ctx"].facts for free, b in builds.items()}
    models = {free: b["decode"] for free, b in builds.items()}
    assert list(out[True]) == ["model.pte", "model.ptd"]
    assert out[True] == out[False]
    qdata = {free: [p.qdata for p in m.parameters() if hasattr(p, "qdata")] for free, m in models.items()}
    held = {free: sum(q.untyped_storage().nbytes() for q in qs) for free, qs in qdata.items()}
    int8_bytes = sum(q.numel() for q in qdata[False])
    assert len(qdata[False]) == len(qdata[True]) >= 2 + 5 * len(small_config.block_types)  # the head and linears
    assert held[False] == int8_bytes  # kept: nothing freed
    assert held[True] == len(qdata[True])  # one byte each: the model's own values went with the program's
    assert facts[True]["quantised_weights_freed_once_serialized_bytes"] == int8_bytes
    assert facts[False]["quantised_weights_freed_once_serialized_bytes"] == 0
    # decode's and prefill's partitions run the same quantised linears: prefill's were served from decode's.
    assert facts[True]["quantised_weights_serialized_again"] == facts[False]["quantised_weights_serialized_again"] \
        == len(qdata[True])
    ctx = builds[True]["ctx"]
    with pytest.raises(RuntimeError, match="freed by an earlier lowering"):
        backend.lower(builds[True]["again"], ctx)


def test_int4_head_and_gather_table_stored_once(int4_gather4, small_tokens, tmp_path):
    """share_table (the default with a 4-bit head and the quantized gather): the head's columns swapped in pairs
    make its packed 4-bit bytes the gather table's, and `model.ptd` holds them once. The program computes the
    same logits as the self-contained one, bit for bit; the two files together are smaller by about the table;
    the bytes a token reads are the same; a fresh process loads it from its manifest; a missing `.ptd` is named."""
    from rgexport.backends.executorch.recipes import SharedTableEmbedder
    from rgexport.backends.executorch.weights import named_data_bytes

    shared, alone = int4_gather4(False, True), int4_gather4(False, False)
    small_config = shared["ctx"].config
    assert list(alone["files"]) == ["model.pte"] and "data_file" not in alone["ctx"].facts
    assert list(shared["files"]) == ["model.pte", "model.ptd"]
    assert type(shared["decode"].model.embedder) is SharedTableEmbedder
    table = small_config.vocab_size * small_config.width // 2  # 4 bits a weight
    assert shared["ctx"].facts["shared_table_bytes"] == table
    ptd = shared["folder"] / "model.ptd"
    # The .ptd: the table once, with the head's bf16 scales (one per group of 32) and the file's own header.
    scales = small_config.vocab_size * small_config.width // 32 * 2
    assert table + scales <= named_data_bytes(ptd) < 2 * table
    sizes = {k: sum(map(len, b["files"].values())) for k, b in (("shared", shared), ("alone", alone))}
    assert sizes["alone"] - sizes["shared"] >= 0.8 * table, sizes
    # The swap is in the delegate: as many XNNPACK calls as before, with the same portable ops beside them.
    for method in ("decode", "prefill"):
        got, want = shared["ctx"].facts["delegation"][method], alone["ctx"].facts["delegation"][method]
        assert (got["partitions"], got["non_delegated"]) == (want["partitions"], want["non_delegated"]), method
        assert got["delegated_ops"] > want["delegated_ops"], method  # the swap's slices and concatenation

    backend = ExecuTorchBackend()
    logits = {}
    for key, b in (("shared", shared), ("alone", alone)):
        runner = backend.load(b["folder"], b["manifest"])
        runner.reset()
        logits[key] = run_schedule(runner, small_tokens[:, :40])
    np.testing.assert_array_equal(logits["shared"], logits["alone"])
    read = {k: backend.weights_read_per_token(b["folder"], b["manifest"]) for k, b in (("shared", shared),
                                                                                       ("alone", alone))}
    assert abs(read["shared"] - read["alone"]) <= 1024, read  # the head once either way; headers and padding differ
    assert backend.program_files(shared["manifest"]) == ["model.pte", "model.ptd"]

    (shared["folder"] / "manifest.json").write_text(json.dumps(shared["manifest"]))
    script = ("import json, sys, pathlib; from rgexport.backends.executorch import ExecuTorchBackend; "
              "d = pathlib.Path(sys.argv[1]); m = json.loads((d / 'manifest.json').read_text()); "
              "print(ExecuTorchBackend().load(d, m).decode(5, 0)[:4].tolist())")
    proc = subprocess.run([sys.executable, "-c", script, str(shared["folder"])], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    moved = tmp_path / "no-data"
    moved.mkdir()
    (moved / "model.pte").write_bytes(shared["files"]["model.pte"])
    with pytest.raises(RgexportError, match="model.ptd does not exist"):
        backend.check_artifact(moved, shared["manifest"])


def test_share_table_option_is_checked():
    backend = ExecuTorchBackend()
    with pytest.raises(RgexportError, match="option share_table is 'yes'; expected true or false"):
        backend.check_options({"share_table": "yes"})
    from rgexport.budget import weights_lower_bound
    from rgexport.config import PRESETS

    config = PRESETS["recurrentgemma-2b"]
    table = config.vocab_size * config.width // 2
    # Shared, the 4-bit table is stored once: the bound drops by the table's packed bytes.
    assert weights_lower_bound(config, "int4", backend, {"share_table": False}) - \
        weights_lower_bound(config, "int4", backend, {}) == table
    assert weights_lower_bound(config, "int4", backend, {"head_bits": 8, "share_table": True}) == \
        weights_lower_bound(config, "int4", backend, {"head_bits": 8})  # only a 4-bit head shares


def test_weight_cache_is_on_and_changes_no_logit(fp32_build, small_config, small_tokens):
    """Runners turn on XNNPACK's weight cache (one packed copy of the weights for decode and prefill; at
    RecurrentGemma-2B int4 it saves 1.66 GiB). The option reads back as set, and a program loaded with it
    computes the logits it computes without it, bit for bit."""
    from rgexport.backends.executorch.runner import set_weight_cache, share_packed_weights

    work_dir, manifest, _ = fp32_build
    toks = small_tokens[0, : CHUNK + 6].tolist()

    def logits():
        r = ExecuTorchBackend().load(work_dir, manifest)
        r.reset()
        out = [r.prefill(toks[:CHUNK], 0)]
        out += [r.decode(t, CHUNK + i)[None] for i, t in enumerate(toks[CHUNK:])]
        return np.concatenate(out)

    assert share_packed_weights()
    on = logits()
    try:
        assert set_weight_cache(False)
        off = logits()
    finally:
        assert set_weight_cache(True)
    assert on.shape == (len(toks), small_config.vocab_size)
    assert np.array_equal(on, off)
