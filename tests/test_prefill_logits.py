"""`--prefill-logits last`: the prefill graph returns its chunk's last logits alone (the head runs on one row),
while the state, decode, validation and every consumer of a loaded artifact stay what they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rgexport.build import BuildOptions, build
from rgexport.errors import RgexportError
from rgexport.runtime import open_artifact
from rgexport.validate import EagerRunner, teacher_forced

TOKENS = 40  # one of the shipped model's 32-token chunks and a tail through decode


def test_model_last_only_is_the_last_row_with_the_same_state(small_model, small_tokens):
    tokens, position = small_tokens[:, :16], torch.tensor([0])
    state = small_model.init_state()
    with torch.no_grad():
        every, state_every = small_model.prefill(tokens, position, state)
        last, state_last = small_model.prefill(tokens, position, state, last_only=True)
    assert every.shape[1] == 16 and last.shape == (1, 1, every.shape[-1])
    torch.testing.assert_close(last, every[:, -1:], rtol=1e-5, atol=1e-5)
    assert state_every.keys() == state_last.keys()
    for name in state_every:
        assert torch.equal(state_every[name], state_last[name]), name


def test_a_bad_value_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(RgexportError, match="prefill logits 'first'.*all.*last"):
        build(BuildOptions(backend="onnx", out=tmp_path / "x", prefill_logits="first"))
    assert not (tmp_path / "x").exists()


def test_the_cli_lists_the_values():
    from rgexport.cli import app

    result = CliRunner().invoke(app, ["build", "--target", "onnx", "--prefill-logits", "first"])
    assert result.exit_code == 2
    assert "all" in result.output and "last" in result.output


@pytest.fixture(scope="module", params=[("onnx", "fp32"), ("tflite", "fp32"), ("coreml", "fp16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def last_build(request, tmp_path_factory):
    backend, recipe = request.param
    out = tmp_path_factory.mktemp("last") / f"{backend}-{recipe}"
    return build(BuildOptions(backend=backend, recipe=recipe, out=out, validation_tokens=TOKENS,
                              prefill_logits="last"))


# How far each artifact's logits may lie from float32 eager: float32 graphs, and Core ML's float16 compute.
TOLERANCE = {"fp32": 2e-3, "fp16": 0.25}
# Two builds of one graph but for the head's rows: how far their state (and fp32's last row) may differ.
SAME = {"fp32": 1e-5, "fp16": 1e-3}


def test_the_artifact_returns_the_last_row_and_validates(last_build, shipped):
    manifest = last_build.manifest
    recipe = manifest["recipe"]["name"]
    assert manifest["validation"]["status"] == "passed"  # every row compared (validate.teacher_forced)
    io = manifest["io"]
    assert io["prefill_logits"] == "last"
    vocab = shipped.config.vocab_size
    logits_out = [t for t in io["methods"]["prefill"]["outputs"] if t["name"] == "logits"]
    assert logits_out[0]["shape"] == [1, 1, vocab]

    from rgexport.tokenizer import Tokenizer
    from rgexport.validate import heldout_tokens

    tokens = heldout_tokens(Tokenizer(shipped.tokenizer_path), TOKENS)
    reference = EagerRunner(shipped.model, 32)
    want = teacher_forced(reference, tokens)
    with open_artifact(last_build.out) as art:
        chunk = art.prefill_chunk
        assert (art.prefill_logits, art.prefill_rows) == ("last", 1)
        art.reset()
        rows = art.prefill(tokens[:chunk], 0)
        assert rows.shape == (1, vocab)
        assert np.abs(rows[0] - want[chunk - 1]).max() < TOLERANCE[recipe]
        # Every token's logits: through decode, as the prefill graph has the last row only.
        every = art.feed(tokens, 0)
        assert every.shape == (len(tokens), vocab)
        assert np.abs(every - want).max() < TOLERANCE[recipe]
        # What generation reads: whole chunks through prefill, then decode.
        last = art.last_logits(tokens, 0)
        assert last.shape == (vocab,)
        assert np.abs(last - want[-1]).max() < TOLERANCE[recipe]


def _float16_steps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many float16 values lie between a and b, elementwise (float16 values held as float32)."""
    def ordered(x: np.ndarray) -> np.ndarray:
        bits = x.astype(np.float16).view(np.uint16).astype(np.int32)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)

    return np.abs(ordered(a) - ordered(b))


def test_the_prefill_row_is_the_all_build_s_last_row(last_build, shipped_build, shipped):
    """Against the same backend's build with every row (the session's shipped builds): the same graph but
    for the head's rows, so the same numbers."""
    manifest = last_build.manifest
    backend, recipe = manifest["backend"], manifest["recipe"]["name"]
    every = shipped_build(backend, recipe)  # built for test_parity in the same session
    from rgexport.tokenizer import Tokenizer
    from rgexport.validate import heldout_tokens

    tokens = heldout_tokens(Tokenizer(shipped.tokenizer_path), 32)[:32]
    with open_artifact(every.out) as a, open_artifact(last_build.out) as b:
        assert a.prefill_logits == "all" and a.prefill_rows == a.prefill_chunk
        rows_a = a.prefill(tokens, 0)
        rows_b = b.prefill(tokens, 0)
        if recipe == "fp16":
            # The head's float32 sums over one row and over 32 rows need not be summed in the same order (on
            # this AMD EPYC, numpy's and torch's one-row and 32-row matmuls of a random [32, 192] x [192, 4096]
            # differ by up to 2.7e-5); a sum on a float16 rounding boundary then lands one float16 value
            # away, and the soft cap's divide, tanh and multiply, each rounded to float16, can carry that one
            # value to two (measured here: 2 of 4096 logits, 2 values away). A wrong row lies thousands away.
            steps = _float16_steps(rows_b[0], rows_a[-1])
            assert steps.max() <= 2 and (steps > 0).mean() < 0.01, (steps.max(), (steps > 0).sum())
            assert _float16_steps(rows_b[0], rows_a[-2]).max() > 1000
        else:
            np.testing.assert_allclose(rows_b[0], rows_a[-1], rtol=0, atol=SAME[recipe])
        state_a, state_b = a.state(), b.state()
        assert (state_a is None) == (state_b is None)
        for name, value in (state_a or {}).items():
            np.testing.assert_allclose(state_b[name], value, rtol=0, atol=SAME[recipe], err_msg=name)


def test_a_profile_sets_it_and_refuses_a_bad_value(tmp_path):
    from rgexport.profiles import load_profile, resolve_target

    assert {resolve_target(name).prefill_logits for name in ("ios", "android", "web", "linux-arm64")} == {"last"}
    assert resolve_target("onnx").prefill_logits is None  # one backend: the build's default, all
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nprefill_logits = "first"\n[[artifacts]]\nbackend = "onnx"\n')
    with pytest.raises(RgexportError, match="prefill_logits 'first'"):
        load_profile(bad)


def test_the_device_runner_gets_every_row_from_the_manifest(last_build, shipped, tmp_path):
    """The emulated-device runner (`rgexport.emulate`'s script: a separate process with only the manifest) reads
    io.prefill_logits and gets every row as validation does, the first chunk's other rows through decode."""
    import subprocess
    import sys

    from rgexport import emulate
    from rgexport.tokenizer import Tokenizer
    from rgexport.validate import heldout_tokens

    if last_build.manifest["backend"] not in ("onnx", "tflite"):
        pytest.skip("the device runner drives ONNX Runtime and LiteRT artifacts")
    tokens = heldout_tokens(Tokenizer(shipped.tokenizer_path), TOKENS)
    with open_artifact(last_build.out) as art:
        want = np.asarray(teacher_forced(art, tokens))
        want_state = art.state()
    tok, out = tmp_path / "tokens.npy", tmp_path / "out.npz"
    np.save(tok, np.asarray(tokens, np.int32))
    proc = subprocess.run([sys.executable, str(emulate.RUNNER_SCRIPT), str(last_build.out), str(tok), str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    np.testing.assert_array_equal(got["logits"], want)
    states = emulate.states_of(got)
    for name, value in want_state.items():
        np.testing.assert_array_equal(states[name].reshape(value.shape), value)
