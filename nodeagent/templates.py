"""Chat templates: each model's own, rendered the way its makers render it.

A GGUF carries its chat template (``tokenizer.chat_template``, Jinja written
for Hugging Face's transformers). The node renders chat requests and pods
through it, in a sandbox, with the environment transformers and llama.cpp
give templates (``trim_blocks``, ``lstrip_blocks``, loop controls, the
``{% generation %}`` tag passed through, ``tojson`` as transformers writes it,
``raise_exception``, ``strftime_now``, ``bos_token``/``eos_token``), so the
prompt text is byte for byte what llama.cpp's own chat completion renders.

The rendered text is tokenized whole with special tokens parsed and no BOS
added (a template writes its own ``bos_token``), as llama.cpp does.

**Prefix stability.** Caching needs turn k+1's prompt to extend turn k's
prompt plus the reply. Most templates do; some do not (they drop earlier
turns' reasoning, or move the system prompt). `ChatTemplate.stability`
renders a conversation with and without its last exchange and says whether,
and where, the longer one departs; the node reuses the longest common token
prefix either way (that is what its T0 accounting measures), and
`models inspect` says which templates lose it.

Models without a template get ChatML (``origin="default"``), the format most
instruct models of this size were trained on, and say so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal, Mapping, Sequence

Origin = Literal["gguf", "override", "default"]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The template failed to render these messages (it raised, or it is not valid Jinja)."""


@dataclass(frozen=True)
class Stability:
    """Does a conversation's next prompt extend its previous prompt plus the reply?"""

    stable: bool
    diverges_at: int | None  # character of the previous prompt + reply where the next prompt departs
    detail: str


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    origin: Origin = "gguf"

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        """The prompt text for ``messages`` (OpenAI-shaped dicts: role, content, ...)."""
        template = _compile(self.source)
        try:
            return template.render(messages=[dict(m) for m in messages], bos_token=self.bos_token,
                                   eos_token=self.eos_token, add_generation_prompt=add_generation_prompt,
                                   tools=list(tools) if tools else None, raise_exception=_raise,
                                   strftime_now=_strftime_now, **extra)
        except TemplateError:
            raise
        except Exception as exc:  # a template's own bug or refusal (e.g. roles must alternate)
            raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc

    def stability(self) -> Stability:
        """Render a two-turn conversation with and without its last exchange and compare."""
        system = {"role": "system", "content": "You are a helpful assistant."}
        first = [system, {"role": "user", "content": "What is 2 + 2?"}]
        reply = "2 + 2 is 4."
        then = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "And 3 + 3?"}]
        try:
            before = self.render(first) + reply
            after = self.render(then)
        except TemplateError as exc:
            return Stability(False, 0, str(exc))
        if after.startswith(before):
            return Stability(True, None, "turn k+1's prompt extends turn k's prompt and reply")
        at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
        return Stability(False, at, f"turn k+1's prompt departs from turn k's prompt and reply at character {at} "
                                    f"({before[at:at + 24]!r} became {after[at:at + 24]!r}); the common prefix "
                                    f"is reused, the rest recomputed")


def template_for(chat_template: str | None, *, bos_token: str = "", eos_token: str = "",
                 override: str | None = None) -> ChatTemplate:
    """The template a model is served with: the store's override, else the GGUF's, else ChatML."""
    if override:
        return ChatTemplate(override, bos_token, eos_token, "override")
    if chat_template:
        return ChatTemplate(chat_template, bos_token, eos_token, "gguf")
    return ChatTemplate(CHATML, bos_token, eos_token or "<|im_end|>", "default")


def model_template(path: Any, override: str | None = None) -> ChatTemplate:
    """The template the model file at ``path`` is served with (the store's ``override`` first)."""
    from nodeagent.models.gguf_meta import read_chat_facts

    facts = read_chat_facts(path)
    return template_for(facts.chat_template, bos_token=facts.bos_token, eos_token=facts.eos_token, override=override)


def check_template(source: str) -> None:
    """Raise TemplateError unless ``source`` compiles (used before storing an override)."""
    _compile(source)


# ------------------------------------------------------------------ the sandbox
def _raise(message: str) -> None:
    raise TemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # As transformers renders it: non-ASCII kept, key order kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` marks assistant text: render it as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the chat template is not valid Jinja: {exc}") from exc
