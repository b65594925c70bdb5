"""`rgexport run` and `rgexport chat` on real artifacts (LiteRT and ONNX Runtime, fp32, the shipped model):
greedy parity with eager generation, seeded sampling, the Gemma chat template, the state carried across
turns, the runtime layer, and bad input."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rgexport.cli import app
from rgexport.errors import RgexportError
from rgexport.sampling import Sampler, SamplingOptions
from rgexport.templates import GEMMA_CHAT_TEMPLATE

cli = CliRunner()
HELDOUT = Path(__file__).parents[1] / "calibration" / "corpus" / "heldout.txt"


def _build(tmp_path_factory, backend: str, checkpoint: str | None = None) -> Path:
    pytest.importorskip({"onnx": "onnxruntime", "tflite": "ai_edge_litert"}[backend])
    from rgexport.build import BuildOptions, build

    out = tmp_path_factory.mktemp(f"run-{backend}") / f"{backend}-fp32"
    return build(BuildOptions(backend=backend, recipe="fp32", checkpoint=checkpoint, out=out, validate=False)).out


@pytest.fixture(scope="module")
def templated_checkpoint(tmp_path_factory) -> Path:
    """The shipped model saved as an instruction-tuned Hugging Face folder would be: its weights, config and
    tokenizer, and a tokenizer_config.json carrying Gemma's chat template."""
    from rgexport.assets import shipped_model_dir

    folder = tmp_path_factory.mktemp("gemma-it") / "tiny-it"
    shutil.copytree(shipped_model_dir(), folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": GEMMA_CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def tflite_art(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tflite")


@pytest.fixture(scope="module")
def onnx_it_art(tmp_path_factory, templated_checkpoint) -> Path:
    return _build(tmp_path_factory, "onnx", str(templated_checkpoint))


@pytest.fixture(scope="module")
def prompt() -> str:
    """Held-out text longer than one prefill chunk (32), so the prefill graph runs, then decode."""
    return HELDOUT.read_text()[:200]


# The sampler ------------------------------------------------------------------------------------------
def test_sampler_filters_and_seeds():
    logits = np.random.default_rng(0).normal(size=64).astype(np.float32) * 3
    assert Sampler().sample(logits) == int(np.argmax(logits))
    top3 = set(np.argsort(-logits)[:3].tolist())
    p = Sampler(SamplingOptions(temperature=1.0, top_k=3)).probabilities(logits)
    assert set(np.flatnonzero(p).tolist()) == top3 and p.sum() == pytest.approx(1.0)
    full = Sampler(SamplingOptions(temperature=1.0)).probabilities(logits)
    nucleus = Sampler(SamplingOptions(temperature=1.0, top_p=0.5)).probabilities(logits)
    kept = np.flatnonzero(nucleus)
    assert full[kept].sum() >= 0.5 and full[kept].sum() - full[kept].min() < 0.5  # smallest set reaching 0.5
    s1, s2 = Sampler(SamplingOptions(temperature=1.0, seed=7)), Sampler(SamplingOptions(temperature=1.0, seed=7))
    assert [s1.sample(logits) for _ in range(50)] == [s2.sample(logits) for _ in range(50)]
    for bad in (SamplingOptions(temperature=-1), SamplingOptions(top_p=0.0), SamplingOptions(top_k=-2)):
        with pytest.raises(RgexportError):
            Sampler(bad)


# run -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tflite_art", "onnx_it_art"])
def test_greedy_run_equals_eager_generate(which, request, shipped, prompt):
    """Greedy tokens through an fp32 artifact (prefill graph in chunks, then decode) equal eager generation."""
    from rgexport.generate import generate_tokens
    from rgexport.run import run_prompt
    from rgexport.runtime import open_artifact
    from rgexport.tokenizer import Tokenizer

    eager = list(generate_tokens(shipped.model, Tokenizer(shipped.tokenizer_path), prompt, max_tokens=48))
    with open_artifact(request.getfixturevalue(which)) as art:
        gen = run_prompt(art, prompt, max_tokens=48)
    assert gen.stats.prompt_tokens > art.prefill_chunk  # the prefill graph ran
    assert gen.tokens == eager
    assert gen.stats.generated_tokens == 48 and gen.stats.stop_reason == "max_tokens"


def test_run_cli_streams_and_reports(tflite_art, prompt):
    result = cli.invoke(app, ["run", str(tflite_art), "--prompt", prompt, "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    for figure in ("prompt", "prefill", "decode", "tok/s", "first token", "state 143,360 bytes"):
        assert figure in result.stderr
    data = json.loads(cli.invoke(app, ["run", str(tflite_art), "--prompt", prompt, "--max-tokens", "12",
                                       "--json"]).stdout)
    assert data["text"] and data["text"] in result.stdout  # the same greedy text, streamed
    s = data["stats"]
    assert s["generated_tokens"] == 12 and s["decode_steps"] == 11 and s["prefill_tokens_per_second"] > 0
    assert s["first_token_seconds"] >= s["prefill_seconds"] and s["state_bytes"] == 143_360


def test_sampling_is_deterministic_by_seed(tflite_art, prompt):
    def tokens(seed: int) -> list[int]:
        result = cli.invoke(app, ["run", str(tflite_art), "--prompt", prompt, "--max-tokens", "24", "--json",
                                  "--temperature", "1.0", "--top-k", "50", "--top-p", "0.95", "--seed", str(seed)])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["tokens"]

    first = tokens(1)
    assert tokens(1) == first
    assert tokens(2) != first  # 24 draws at temperature 1: a different seed gives a different reply


def test_stop_string_ends_the_reply(tflite_art, prompt):
    from rgexport.run import run_prompt
    from rgexport.runtime import open_artifact

    with open_artifact(tflite_art) as art:
        full = run_prompt(art, prompt, max_tokens=40).text
        stop = full.strip().split()[2]  # a word the greedy reply does write
        cut = run_prompt(art, prompt, max_tokens=40, stop=[stop])
    assert cut.stats.stop_reason == "stop" and stop not in cut.text
    assert full.startswith(cut.text) and len(cut.text) < len(full)


# The runtime layer ------------------------------------------------------------------------------------
def test_runtime_layer_is_one_interface(tflite_art, onnx_it_art, tmp_path):
    from rgexport.runtime import MEMORY_KEYS, open_artifact

    for path in (tflite_art, onnx_it_art):
        with open_artifact(path, threads=1) as art:
            assert art.tokenizer_path.is_file() and art.vocab_size == 4096 and art.prefill_chunk == 32
            assert art.state_bytes == 143_360 and art.stand_in == ""
            art.feed(list(range(40)), 0)
            mem = art.memory()
            assert tuple(mem) == MEMORY_KEYS and mem["rss_bytes"] > 0 and mem["peak_rss_bytes"] >= mem["rss_bytes"]
            assert mem["runtime_bytes"] is None or mem["runtime_bytes"] > 0
        with pytest.raises(RgexportError, match="closed"):
            art.decode(1, 40)
    # A bundle, as a folder and as a zip: the artifact is picked by --artifact or is the first.
    bundle = tmp_path / "bundle-x"
    for p in (tflite_art, onnx_it_art):
        shutil.copytree(p, bundle / p.parent.name)
    arts = [{"backend": b, "recipe": "fp32", "folder": p.parent.name} for b, p in
            (("tflite", tflite_art), ("onnx", onnx_it_art))]
    (bundle / "bundle.json").write_text(json.dumps({"artifacts": arts}))
    with zipfile.ZipFile(tmp_path / "bundle-x.zip", "w") as z:
        for f in bundle.rglob("*"):
            z.write(f, f.relative_to(tmp_path).as_posix())
    for path in (bundle, tmp_path / "bundle-x.zip"):
        with open_artifact(path) as art:
            assert art.backend == "tflite" and "first artifact" in art.source
        with open_artifact(path, artifact="onnx") as art:
            assert art.backend == "onnx" and art.chat_template is not None
        with pytest.raises(RgexportError, match="no artifact 'coreml'"):
            open_artifact(path, artifact="coreml")
    # A modified file is caught before anything loads.
    tampered = bundle / arts[0]["folder"] / "model.tflite"
    tampered.write_bytes(tampered.read_bytes()[:-10])
    with pytest.raises(RgexportError, match="truncated"):
        open_artifact(bundle)


# Chat templates ---------------------------------------------------------------------------------------
def test_template_renders_as_transformers_does_and_is_recorded(templated_checkpoint, onnx_it_art):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    from rgexport.checkpoint import load_checkpoint
    from rgexport.manifest import read_manifest

    template = load_checkpoint(templated_checkpoint).chat_template
    conversation = [{"role": "user", "content": "What is a list? "}, {"role": "assistant", "content": "A sequence."},
                    {"role": "user", "content": "And a tuple?"}]
    ours = template.render(conversation, add_generation_prompt=True)
    theirs = render_jinja_template([conversation], chat_template=GEMMA_CHAT_TEMPLATE, add_generation_prompt=True,
                                   bos_token="<bos>", eos_token="<eos>")[0][0]
    assert ours == theirs == ("<bos><start_of_turn>user\nWhat is a list?<end_of_turn>\n<start_of_turn>model\n"
                              "A sequence.<end_of_turn>\n<start_of_turn>user\nAnd a tuple?<end_of_turn>\n"
                              "<start_of_turn>model\n")
    assert template.stop_strings == ("<end_of_turn>",)
    with pytest.raises(RgexportError, match="System role not supported"):
        template.render([{"role": "system", "content": "x"}])
    _, manifest = read_manifest(onnx_it_art)
    assert manifest["tokenizer"]["chat_template"]["template"] == GEMMA_CHAT_TEMPLATE
    assert load_checkpoint().chat_template is None  # the shipped model has none


def test_chat_with_template_feeds_only_each_turn(onnx_it_art):
    """Turn 2 feeds only what the template adds for it; the state then equals the whole conversation fed at
    once, and the reply equals the reply to the whole conversation."""
    from rgexport.chat import ChatSession
    from rgexport.run import generate_reply
    from rgexport.runtime import open_artifact

    with open_artifact(onnx_it_art) as art, open_artifact(onnx_it_art) as fresh:
        session = ChatSession(art, max_tokens=16)
        assert "tokenizer_config.json" in session.mode
        t1 = session.send("What does the list type do?")
        rendered1 = session.template.render([{"role": "user", "content": "What does the list type do?"}])
        assert t1.ids == session.tokenizer.encode_rendered(rendered1) and t1.ids[0] == session.tokenizer.bos_id
        history1, pending1 = list(session.history), list(session.last_reply.pending)
        assert history1 == t1.ids + session.last_reply.tokens[:len(session.last_reply.tokens) - len(pending1)]
        t2 = session.send("And a dict?")
        delta = "<end_of_turn>\n<start_of_turn>user\nAnd a dict?<end_of_turn>\n<start_of_turn>model\n"
        assert not t2.refed and t1.stats.stop_reason != "stop"
        assert t2.ids == pending1 + session.tokenizer.encode_rendered(delta)  # only what turn 2 adds
        assert t2.fed_tokens < len(history1) and t2.stats.start_position == len(history1)
        whole = fresh.feed(session.history, 0)[-1]
        np.testing.assert_allclose(whole, session.last_logits, atol=1e-4)
        again = generate_reply(fresh, session.tokenizer, history1 + t2.ids, 0, Sampler(), max_tokens=16)
        assert again.tokens == session.last_reply.tokens


def test_raw_chat_carries_the_state_across_turns(tflite_art):
    from rgexport.chat import ChatSession
    from rgexport.run import generate_reply
    from rgexport.runtime import open_artifact

    with open_artifact(tflite_art) as art, open_artifact(tflite_art) as fresh:
        session = ChatSession(art, max_tokens=20)
        assert session.template is None and session.mode.startswith("raw text")
        t1 = session.send("The list type")
        history1, reply1 = list(session.history), session.last_reply
        assert reply1.stats.stop_reason == "max_tokens" and reply1.pending == reply1.tokens[-1:]
        assert history1 == t1.ids + reply1.tokens[:-1]
        t2 = session.send("Dictionaries are")
        assert t2.ids == reply1.pending + session.tokenizer.encode("\nDictionaries are", bos=False)
        assert t2.stats.start_position == len(history1) and t2.fed_tokens < len(history1)
        np.testing.assert_allclose(fresh.feed(session.history, 0)[-1], session.last_logits, atol=1e-4)
        again = generate_reply(fresh, session.tokenizer, history1 + t2.ids, 0, Sampler(), max_tokens=20)
        assert again.tokens == session.last_reply.tokens
        session.reset()
        assert session.send("The list type").reply == t1.reply  # a new sequence at position 0


def test_ctrl_c_stops_the_reply_not_the_conversation(tflite_art):
    """SIGINT during a reply ends it between two tokens; the state and the position stay in step, so the
    next turn goes on from there, as if the shorter reply had been the whole reply."""
    import os
    import signal

    from rgexport.chat import ChatSession
    from rgexport.runtime import open_artifact

    pieces = []

    def press_ctrl_c_at_the_third_piece(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with open_artifact(tflite_art) as art, open_artifact(tflite_art) as fresh:
        session = ChatSession(art, max_tokens=40)
        session.send("The list type", on_text=press_ctrl_c_at_the_third_piece)
        cut = session.last_reply
        assert cut.stats.stop_reason == "interrupted" and len(cut.tokens) < 40
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Ctrl-C again
        fed = len(session.history)
        assert cut.pending == cut.tokens[-1:]  # sampled, not yet fed: the next turn feeds it first
        assert fed == session.position == len(session.turns[0].ids) + len(cut.tokens) - 1
        t2 = session.send("Dictionaries are")
        assert t2.stats.start_position == fed and t2.ids[:1] == cut.pending
        assert session.last_reply.stats.stop_reason == "max_tokens"
        np.testing.assert_allclose(fresh.feed(session.history, 0)[-1], session.last_logits, atol=1e-4)


def test_chat_from_a_pipe(tflite_art):
    turns = "The list type\n/stats\nDictionaries are\n/bogus\n/reset\nThe list type\n/quit\nnever read\n"
    result = cli.invoke(app, ["chat", str(tflite_art), "--max-tokens", "8"], input=turns)
    assert result.exit_code == 0, result.output
    assert "raw text" in result.stderr and "unknown command /bogus" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[turn ")]
    assert len(lines) == 3 and "at position 0" in lines[0] and "at position 0" not in lines[1]
    assert "at position 0" in lines[2]  # after /reset
    assert "| 1 | 0 |" in result.stderr  # /stats table
    from rgexport.chat import ChatSession
    from rgexport.runtime import open_artifact

    with open_artifact(tflite_art) as art:
        first = ChatSession(art, max_tokens=8).send("The list type").reply
    assert result.stdout.startswith(first + "\n")
    assert result.stdout.endswith("\n" + first + "\n")  # the same greedy reply after /reset
    assert "never read" not in result.output


# Bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["run", "/nonexistent/artifact", "--prompt", "x"], "does not exist"),
    (["chat", "/nonexistent/artifact"], "does not exist"),
    (["run", "{art}", "--prompt", ""], "the prompt is empty"),
    (["run", "{art}", "--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["run", "{art}", "--prompt", "x", "--artifact", "onnx"], "not a bundle"),
])
def test_bad_input_gets_one_line(args, message, tflite_art):
    result = cli.invoke(app, [a.format(art=tflite_art) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_positions_past_int32_are_refused():
    from rgexport.run import MAX_POSITION, check_prompt

    check_prompt([1, 2], MAX_POSITION - 10, 8)
    with pytest.raises(RgexportError, match="int32"):
        check_prompt([1, 2], MAX_POSITION - 5, 8)
