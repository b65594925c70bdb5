"""The step model against itself: chunking, state reuse, the explicit state spec."""

from __future__ import annotations

import pytest
import torch

from rgexport.config import get_preset
from rgexport.errors import RgexportError
from rgexport.graphs import input_name, output_name
from rgexport.model import Griffin, dotted, identifier, init_state, state_bytes, state_spec


def test_chunked_prefill_equals_token_by_token(small_model, small_tokens):
    one = small_model.score(small_tokens, chunk=1)
    for chunk in (4, 16):
        assert (small_model.score(small_tokens, chunk=chunk) - one).abs().max() < 1e-4


def test_state_is_reusable_for_a_new_sequence(small_model, small_tokens):
    """Starting at position 0 from a dirty state equals starting from zeros (conv window cleared too)."""
    state = small_model.init_state()
    with torch.no_grad():
        _, dirty = small_model.prefill(small_tokens[:, :16], torch.tensor([0]), state)
        _, dirty = small_model.prefill(small_tokens[:, 16:32], torch.tensor([16]), dirty)
        seq = small_tokens[:, 40:56]
        fresh_logits, fresh_state = small_model.prefill(seq, torch.tensor([0]), small_model.init_state())
        reused_logits, reused_state = small_model.prefill(seq, torch.tensor([0]), dirty)
        assert torch.equal(fresh_logits, reused_logits)
        for k in fresh_state:
            assert torch.equal(fresh_state[k], reused_state[k]), k
        # Token by token as well: the conv window must be cleared at position 0 in decode too.
        a = b = None
        s1, s2 = dirty, small_model.init_state()
        for i in range(4):
            a, s1 = small_model.step(seq[:, i], torch.tensor([i]), s1)
            b, s2 = small_model.step(seq[:, i], torch.tensor([i]), s2)
        assert torch.equal(a, b)


def test_state_spec_is_exact_for_recurrentgemma_2b():
    config = get_preset("recurrentgemma-2b")
    specs = state_spec(config)
    recurrent = sum(1 for b in config.block_types if b == "recurrent")
    attention = config.num_layers - recurrent
    assert (recurrent, attention) == (18, 8)
    expected = recurrent * (2560 + 3 * 2560) * 4 + attention * 2 * 2048 * 256 * 4
    assert state_bytes(config) == expected == sum(s.nbytes for s in specs)
    assert [s.name for s in specs[:3]] == ["blocks.0.rg_lru", "blocks.0.conv1d", "blocks.1.rg_lru"]
    state = init_state(config.replace(vocab_size=8))
    assert {k: tuple(v.shape) for k, v in state.items()} == {s.name: s.shape for s in specs}


def test_identifier_reverses_to_the_contract_name(small_config):
    for s in state_spec(small_config):
        assert s.identifier == identifier(s.name) == s.name.replace(".", "__")
        for name in (s.name, input_name(s), output_name(s)):
            mapped = identifier(name)
            assert "." not in mapped and mapped.isidentifier()
            assert dotted(mapped) == name
    assert identifier("state.blocks.0.rg_lru") == "state__blocks__0__rg_lru"
    with pytest.raises(RgexportError, match="reserves"):
        identifier("state.blocks__0")
    with pytest.raises(RgexportError, match="not a Python identifier"):
        identifier("0.rg_lru")


@pytest.mark.parametrize("backend, options", [
    ("tflite", {}), ("coreml", {"state_dtype": "float32"}), ("coreml", {}), ("executorch", {}),
])
def test_every_manifest_names_tensors_by_the_one_rule(backend, options, small_config):
    """Each name a runtime that forbids dots uses is `identifier` of ONNX's (dotted) contract name, under the
    key `identifier`: method inputs and outputs where the state is passed in and out, state tensors where
    the runtime keeps it."""
    from rgexport.backends import BuildContext, get_backend

    def contract(name, options):
        ctx = BuildContext(config=small_config, recipe=get_backend(name).default_recipe, work_dir=None,
                           prefill_chunk=8, options=options)
        return get_backend(name).io_contract(ctx)

    io, onnx = contract(backend, options), contract("onnx", {})
    if io["state"]["placement"] == "io":
        for method in ("decode", "prefill"):
            for kind in ("inputs", "outputs"):
                got = [t["identifier"] for t in io["methods"][method][kind]]
                assert got == [identifier(t["name"]) for t in onnx["methods"][method][kind]], (method, kind)
    else:
        assert [t["identifier"] for t in io["state"]["tensors"]] == [s.identifier for s in state_spec(small_config)]


def test_chunk_longer_than_window_is_refused(small_model, small_config):
    tokens = torch.zeros(1, small_config.attention_window_size + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the attention window"):
        small_model.prefill(tokens, torch.tensor([0]), small_model.init_state())


def test_gelu_is_the_tanh_formula():
    from rgexport.model.layers import gelu_tanh

    x = torch.linspace(-6, 6, 1001)
    assert (gelu_tanh(x) - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() < 1e-6
    # Differs from exact GELU by more than the errors we test for: a backend that swaps them is caught.
    assert (gelu_tanh(x) - torch.nn.functional.gelu(x)).abs().max() > 1e-4


def test_griffin_builds_every_preset_on_meta():
    from rgexport.config import PRESETS

    for name, config in PRESETS.items():
        with torch.device("meta"):
            model = Griffin(config)
        n = sum(p.numel() for p in model.parameters())
        assert n == config.num_parameters(), name


@pytest.mark.parametrize("t", [1, 2, 3, 7, 8, 32, 33])
def test_linear_scan_is_the_recurrence(t):
    """The log-depth scan against the loop it replaces, with a reset (a = 0) inside the chunk."""
    from rgexport.model.layers import linear_scan

    g = torch.Generator().manual_seed(t)
    a = torch.rand(2, t, 5, generator=g, dtype=torch.float64)
    x = torch.randn(2, t, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    a[1, t // 2] = 0.0
    h, want = h0, []
    for i in range(t):
        h = a[:, i] * h + x[:, i]
        want.append(h)
    got = linear_scan(a, x, h0)
    torch.testing.assert_close(got, torch.stack(want, dim=1), rtol=1e-12, atol=1e-12)
    # After the reset, nothing of h0 or of the steps before it is left.
    if t > 1:
        later = linear_scan(a, x, h0 + 1.0)[1, t // 2:]
        assert torch.equal(later, got[1, t // 2:])


def test_prefill_graph_has_no_step_per_token(small_model):
    """The RG-LRU runs as a scan: a chunk of 16 exports to about the nodes of a chunk of 2, not 8x more."""
    from rgexport.graphs import PrefillIO

    def nodes(chunk: int) -> int:
        io = PrefillIO(small_model, chunk)
        ep = torch.export.export(io, io.example_inputs(), strict=False)
        return sum(n.op == "call_function" for n in ep.graph.nodes)

    assert nodes(16) < 1.5 * nodes(2)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_local_attention_is_the_dense_window_over_the_whole_history(kv_heads, small_config):
    """The ring-buffer attention, fed in chunks of uneven sizes across three wraps, against attention written
    plainly: every query at position p attends to the keys of positions p - w .. p, kept in a growing list."""
    import dataclasses

    from rgexport.model.blocks import LocalAttentionBlock

    config = dataclasses.replace(small_config, num_heads=4, num_kv_heads=kv_heads, attention_window_size=8)
    torch.manual_seed(0)
    block = LocalAttentionBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    w, hd, groups = config.attention_window_size, config.head_dim, config.num_heads // kv_heads
    total = 3 * w + 3
    x = torch.randn(1, total, config.width)
    positions = torch.arange(total, dtype=torch.float32)[None]
    with torch.no_grad():
        q = block.rope(block.proj_q(x).reshape(1, total, config.num_heads, hd), positions)
        k = block.rope(block.proj_k(x).reshape(1, total, kv_heads, hd), positions)
        v = block.proj_v(x).reshape(1, total, kv_heads, hd)
        want = torch.empty(1, total, config.num_heads, hd)
        for p in range(total):
            seen = slice(max(0, p - w), p + 1)
            for h in range(config.num_heads):
                scores = (k[0, seen, h // groups] @ q[0, p, h]) * hd**-0.5
                want[0, p, h] = torch.softmax(scores, dim=0) @ v[0, seen, h // groups]
        want = block.proj_final(want.reshape(1, total, -1))

        keys = torch.randn(1, w, kv_heads * hd)  # garbage: position 0 must mask every slot
        values = torch.randn(1, w, kv_heads * hd)
        got, at = [], 0
        for size in (1, 3, 8, 1, 1, 5, 2, 5, 1):
            out, keys, values = block(x[:, at:at + size], positions[:, at:at + size], keys, values)
            got.append(out)
            at += size
        assert at == total
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 8])
def test_the_kv_cache_is_read_where_it_lies(small_model, small_config, chunk):
    """No transpose, concat or copy of a K/V cache in the exported graphs: only views of it reach the ops
    that read it (the scores and output matmuls, the ring-buffer blend). A transposed or concatenated
    2048-slot cache cost ExecuTorch ~20 ms a step at RecurrentGemma-2B shapes (notes/perf.md)."""
    from rgexport.graphs import DecodeIO, PrefillIO

    io = DecodeIO(small_model) if chunk == 1 else PrefillIO(small_model, chunk)
    ep = torch.export.export(io, io.example_inputs(), strict=False)
    ep = ep.run_decompositions()
    state_inputs = ep.graph_signature.user_inputs[2:]  # after (token, position): the state, in spec order
    caches = {name for name, s in zip(state_inputs, state_spec(small_config)) if s.kind in ("keys", "values")}
    graph = ep.graph
    views = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
             torch.ops.aten.alias.default}
    readers = set()
    frontier = [n for n in graph.nodes if n.op == "placeholder" and n.name in caches]
    assert len(frontier) == len(caches)
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.target in views:
                frontier.append(user)
            elif user.op != "output":
                readers.add(user.target)
    assert readers <= {torch.ops.aten.bmm.default, torch.ops.aten.mul.Tensor}, readers
    assert torch.ops.aten.bmm.default in readers


def test_the_row_put_ring_buffer_write_is_the_blend():
    """What ExecuTorch exports for decode's cache write: bit for bit the blend, at the first slot, the last, and
    after wrapping."""
    from rgexport.graphs import RowPutRingBuffer
    from rgexport.model.blocks import RingBuffer

    g = torch.Generator().manual_seed(0)
    blend, put = RingBuffer(16), RowPutRingBuffer(16)
    for position in (0.0, 5.0, 15.0, 16.0, 37.0):
        args = (torch.tensor([[position]]), *(torch.randn(1, 16, 8, generator=g) for _ in range(2)),
                *(torch.randn(1, 1, 8, generator=g) for _ in range(2)))
        for i, (want, got) in enumerate(zip(blend(*args), put(*args))):
            assert torch.equal(want, got), position
            assert not torch.equal(got, args[1 + i]), position  # the row was written
