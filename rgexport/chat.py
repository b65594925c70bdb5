"""`rgexport chat`: a multi-turn conversation with an artifact, the fixed-size state carried from turn to
turn. Each turn feeds only its own tokens onto the state (a transformer would re-read or cache the whole
conversation; here the state is the same size at every length), so a turn's prefill time depends on the
turn, not on the conversation before it.

With a chat template (an instruction-tuned checkpoint's, recorded in the manifest), each turn's text is
what the template adds for it: rendering the conversation with and without the new message, through the
template, and feeding the difference. Without one (the shipped model), it is raw text: the first turn
starts with BOS, each later one continues the transcript on a new line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import numpy as np

from rgexport.errors import RgexportError
from rgexport.run import Generation, GenerationStats, Interrupt, check_prompt, generate_reply, open_tokenizer
from rgexport.runtime import LoadedArtifact
from rgexport.sampling import Sampler, SamplingOptions
from rgexport.templates import ChatTemplate

COMMANDS = {"/reset": "forget the conversation (new sequence at position 0)",
            "/stats": "figures of every turn so far",
            "/quit": "end the session (so does end of input)"}
RAW_SEPARATOR = "\n"  # between turns in raw-text mode


@dataclasses.dataclass
class Turn:
    """One exchange: what the user said, how many tokens it fed, and the reply's figures."""

    user: str
    ids: list[int]  # fed onto the state before the reply (last turn's pending token first)
    reply: str
    stats: GenerationStats
    refed: bool = False  # the template re-rendered earlier turns differently: the whole conversation was fed

    @property
    def fed_tokens(self) -> int:
        return len(self.ids)


class ChatSession:
    """The conversation's state: the artifact's runtime state, the next position, the messages, and every
    token fed so far (`history`, so a test can feed the whole conversation at once and compare)."""

    def __init__(self, art: LoadedArtifact, sampling: SamplingOptions | None = None, max_tokens: int = 128,
                 stop: Iterable[str] = ()):
        self.art = art
        self.tokenizer = open_tokenizer(art)
        entry = art.chat_template
        self.template = ChatTemplate.from_dict(entry) if entry else None
        self.sampler = Sampler(sampling)
        self.max_tokens = max_tokens
        self.stop = [*stop, *(self.template.stop_strings if self.template else ())]
        self.interrupt = Interrupt()
        self.reset()

    @property
    def mode(self) -> str:
        """How turns are written: the template's source, or raw text."""
        if self.template is None:
            return "raw text (the model has no chat template: each turn is fed as plain text)"
        return f"chat template from {self.template.source}"

    def reset(self) -> None:
        """Forgets the conversation; the next turn starts a new sequence at position 0."""
        self.art.reset()
        self.sampler.reseed()
        self.position = 0
        self.pending: list[int] = []
        self.history: list[int] = []  # every token fed into the state, in order
        self.messages: list[dict[str, str]] = []
        self.consumed = ""  # the rendered conversation text the state has read (template mode)
        self.turns: list[Turn] = []
        self.last_logits: np.ndarray | None = None
        self.last_reply: Generation | None = None

    def turn_ids(self, user: str) -> tuple[list[int], bool]:
        """The ids this turn feeds: tokens sampled last turn but not yet fed, then the turn's own text.
        Returns (ids, refed): refed means the conversation had to be fed again from position 0."""
        if not user.strip():
            raise RgexportError("the message is empty: type some text")
        if self.template is None:
            if not self.history:
                return self.tokenizer.encode(user), False
            return self.pending + self.tokenizer.encode(RAW_SEPARATOR + user, bos=False), False
        rendered = self.template.render([*self.messages, {"role": "user", "content": user}],
                                        add_generation_prompt=True)
        if self.history and rendered.startswith(self.consumed):
            return self.pending + self.tokenizer.encode_rendered(rendered[len(self.consumed):]), False
        if self.history:  # e.g. the template trims the reply we fed: feed the conversation as rendered
            self.art.reset()
            self.position, self.pending, self.history = 0, [], []
        return self.tokenizer.encode_rendered(rendered), bool(self.turns)

    def send(self, user: str, on_text: Callable[[str], None] | None = None) -> Turn:
        """One turn: feeds it onto the state, generates the reply (streamed through `on_text`)."""
        ids, refed = self.turn_ids(user)
        check_prompt(ids, self.position, self.max_tokens)
        with self.interrupt.catching_sigint():
            reply: Generation = generate_reply(self.art, self.tokenizer, ids, self.position, self.sampler,
                                               self.max_tokens, self.stop, on_text, self.interrupt)
        fed = reply.tokens[:len(reply.tokens) - len(reply.pending)]
        self.history += [*ids, *fed]
        self.position = reply.stats.end_position
        self.pending = list(reply.pending)
        self.last_logits = reply.logits
        self.last_reply = reply
        if self.template is not None:
            before = self.template.render([*self.messages, {"role": "user", "content": user}],
                                          add_generation_prompt=True)
            self.consumed = before + self.tokenizer.decode(reply.tokens)
            self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply.text}]
        turn = Turn(user, list(ids), reply.text, reply.stats, refed)
        self.turns.append(turn)
        return turn

    def stats(self) -> dict[str, Any]:
        """Every turn's figures, and the state (the same size whatever the position)."""
        return {"mode": self.mode, "position": self.position, "state_bytes": self.art.state_bytes,
                "turns": [{"fed_tokens": t.fed_tokens, "refed": t.refed, **t.stats.to_dict()} for t in self.turns],
                "memory": self.art.memory()}


def format_turn(turn: Turn) -> str:
    """The per-turn line: this turn's prefill (its own tokens only) and decode figures."""
    s = turn.stats
    pre = f"{s.prefill_tokens_per_second:,.0f} tok/s" if s.prefill_tokens_per_second else "-"
    dec = f"{s.decode_tokens_per_second:,.0f} tok/s" if s.decode_tokens_per_second else "-"
    note = " (template re-rendered earlier turns: the conversation was fed again)" if turn.refed else ""
    return (f"[turn {turn.fed_tokens} tokens at position {s.start_position}: prefill {s.prefill_seconds * 1e3:.1f} ms "
            f"({pre}); reply {s.generated_tokens} tokens, decode {dec}; stop: {s.stop_reason}; "
            f"state {s.state_bytes:,} bytes]{note}")


def format_stats(stats: dict[str, Any]) -> str:
    """`/stats`: one row per turn."""
    lines = [f"mode: {stats['mode']}; position {stats['position']}; state {stats['state_bytes']:,} bytes "
             f"(fixed); resident {stats['memory']['rss_bytes'] or 0:,} bytes"]
    lines += ["| turn | start position | fed tokens | prefill ms | prefill tok/s | reply tokens | decode tok/s |",
              "|---|---|---|---|---|---|---|"]
    for i, t in enumerate(stats["turns"], 1):
        pre = t["prefill_tokens_per_second"]
        dec = t["decode_tokens_per_second"]
        lines.append(f"| {i} | {t['start_position']} | {t['fed_tokens']} | {t['prefill_seconds'] * 1e3:.1f} | "
                     f"{pre:,.0f} | {t['generated_tokens']} | " + (f"{dec:,.0f} |" if dec else "- |"))
    return "\n".join(lines)


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, prompt: str = "> ") -> None:
    """Reads turns from `stdin` (a terminal or a pipe) until /quit or end of input; replies go to `stdout`,
    figures and messages to `stderr`. Ctrl-C stops a reply, not the session."""
    interactive = stdin.isatty()
    stderr.write(f"{session.art.describe()}\nmode: {session.mode}\ncommands: "
                 + ", ".join(f"{k} ({v})" for k, v in COMMANDS.items()) + "\n")
    stderr.flush()
    while True:
        if interactive:
            stderr.write(prompt)
            stderr.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # at the prompt: a new prompt, as a shell does
            stderr.write("\n")
            continue
        if not line:
            break
        line = line.rstrip("\n")
        command = line.strip()
        if not command:
            continue
        if command == "/quit":
            break
        if command == "/reset":
            session.reset()
            stderr.write("[conversation reset: the next turn starts at position 0]\n")
            continue
        if command == "/stats":
            stderr.write(format_stats(session.stats()) + "\n")
            continue
        if command.startswith("/") and command.split()[0] not in COMMANDS:
            stderr.write(f"[unknown command {command.split()[0]}; commands: {', '.join(COMMANDS)}]\n")
            continue

        def write(piece: str) -> None:
            stdout.write(piece)
            stdout.flush()

        try:
            turn = session.send(line, on_text=write)
        except RgexportError as e:
            stderr.write(f"error: {e}\n")
            continue
        stdout.write("\n")
        stdout.flush()
        if turn.stats.stop_reason == "interrupted":
            stderr.write("[reply stopped]\n")
        stderr.write(format_turn(turn) + "\n")
        stderr.flush()
