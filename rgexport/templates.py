"""Chat templates: the Jinja template an instruction-tuned checkpoint carries (`tokenizer_config.json`'s
`chat_template`, or `chat_template.jinja`), rendered the way Hugging Face's `apply_chat_template` renders
it: jinja2's `ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks`, loop controls and the
same globals (`raise_exception`, `strftime_now`, `bos_token`, `eos_token`). Templates are untrusted text
from a model hub, so they are never rendered outside the sandbox and never assembled by hand.

Gemma's turn format (RecurrentGemma-2B-IT and -9B-IT):

    <bos><start_of_turn>user
    {message}<end_of_turn>
    <start_of_turn>model
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from rgexport.errors import RgexportError

# What Gemma IT checkpoints carry in tokenizer_config.json (google/gemma-2b-it, recurrentgemma-2b-it).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special-token strings it refers to."""

    template: str
    bos_token: str = "<bos>"
    eos_token: str = "<eos>"
    stop_strings: tuple[str, ...] = ()  # a reply ends where one of these would be generated
    source: str = "tokenizer_config.json"

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model reads it (`apply_chat_template(..., tokenize=False)`)."""
        import jinja2

        try:
            return _compile(self.template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise RgexportError(f"the chat template refused the conversation: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `tokenizer.chat_template` entry."""
        return {"template": self.template, "bos_token": self.bos_token, "eos_token": self.eos_token,
                "stop_strings": list(self.stop_strings), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatTemplate:
        """From a manifest entry (`to_dict`)."""
        return cls(d["template"], d.get("bos_token", "<bos>"), d.get("eos_token", "<eos>"),
                   tuple(d.get("stop_strings", ())), d.get("source", "manifest"))

    def turn_format(self) -> dict[str, str]:
        """The template reduced to three strings an app can splice text into (for sample code in languages
        without a Jinja engine): `first` + message + `reply` starts the first turn, `next` + message +
        `reply` every later one (after the model's reply). Derived by rendering the template itself with
        placeholder messages; raises RgexportError if the template is not of that shape."""
        a, b, c = "\x00USER-A\x00", "\x00MODEL-B\x00", "\x00USER-C\x00"
        one = self.render([{"role": "user", "content": a}], add_generation_prompt=True)
        three = self.render([{"role": "user", "content": a}, {"role": "assistant", "content": b},
                             {"role": "user", "content": c}], add_generation_prompt=True)
        first, _, reply = one.partition(a)
        head, _, rest = three.partition(b)
        between, _, tail = rest.partition(c)
        if not (reply and one.count(a) == 1 and three.startswith(one) and head == one and tail == reply):
            raise RgexportError("the chat template does not reduce to fixed strings around each message")
        return {"first": first, "reply": reply, "next": between}

    def end_of_reply(self) -> tuple[str, ...]:
        """What the template writes after a model reply (Gemma: `<end_of_turn>`), where generation should
        stop; () if it writes nothing there (then only </s> ends a reply)."""
        b = "\x00MODEL-B\x00"
        try:
            rendered = self.render([{"role": "user", "content": "\x00USER-A\x00"},
                                    {"role": "assistant", "content": b}], add_generation_prompt=False)
        except RgexportError:
            return ()
        end = rendered.partition(b)[2].strip()
        return (end,) if end and end != self.eos_token else ()


@lru_cache(maxsize=8)
def _compile(template: str):
    """Compiles `template` in the sandbox, configured as transformers' `apply_chat_template` does."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise RgexportError(f"the chat template is not valid Jinja: {e}") from None


def load_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The chat template a Hugging Face folder carries (`chat_template.jinja`, or `chat_template` in
    `tokenizer_config.json`, a string or a list of named templates of which "default" is used); None if
    it has none."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise RgexportError(f"{config_path} is not valid JSON: {e}") from None
    template, source = None, "tokenizer_config.json"
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        template, source = jinja_file.read_text(), "chat_template.jinja"
    else:
        value = config.get("chat_template")
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        template = value if isinstance(value, str) else None
    if not template:
        return None
    _compile(template)  # a broken template is an error now, not at the first turn
    found = ChatTemplate(template, _token_text(config.get("bos_token")) or "<bos>",
                         _token_text(config.get("eos_token")) or "<eos>", (), source)
    return dataclasses.replace(found, stop_strings=found.end_of_reply())
