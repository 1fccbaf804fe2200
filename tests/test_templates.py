"""Chat templates: rendering, prefix stability, the per-model override and where the node uses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nodeagent.models.store import ModelStore
from nodeagent.templates import CHATML, ChatTemplate, TemplateError, check_template, model_template, template_for

# Keeps only the last user message: every turn's prompt is rewritten, so no cache can extend it.
LAST_MESSAGE_ONLY = ("{% set last = messages | selectattr('role', 'equalto', 'user') | list | last %}"
                     "<|user|>{{ last['content'] }}<|assistant|>")


def test_a_template_that_extends_earlier_turns_is_prefix_stable():
    assert template_for(CHATML).stability().stable


def test_a_template_that_rewrites_earlier_turns_says_where_it_departs():
    stability = ChatTemplate(LAST_MESSAGE_ONLY).stability()
    assert not stability.stable
    assert stability.diverges_at == len("<|user|>")
    assert "common prefix is reused" in stability.detail


def test_a_template_that_raises_is_a_template_error_naming_its_message():
    template = ChatTemplate("{{ raise_exception('Conversation roles must alternate user/assistant') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        template.render([{"role": "user", "content": "hi"}])


def test_the_sandbox_refuses_what_a_template_must_not_do():
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}").render(
            [{"role": "user", "content": "x"}])


def test_invalid_jinja_is_refused_before_it_is_stored():
    with pytest.raises(TemplateError, match="not valid Jinja"):
        check_template("{% for m in messages %}")


def test_a_model_without_a_template_is_served_chatml_and_says_so():
    served = template_for(None)
    assert served.origin == "default" and served.source == CHATML


def env_for(tmp_path):
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")},
            "HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
            "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run")}


def cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "nodeagent.cli", *args], env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60)


def test_models_template_sets_shows_and_clears_an_override(tmp_path, tiny_model_path):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    shown = json.loads(cli(tmp_path, "models", "template", "tiny", "--format", "json").stdout)
    assert shown["origin"] == "gguf" and shown["prefixStable"]

    unstable = tmp_path / "last-only.jinja"
    unstable.write_text(LAST_MESSAGE_ONLY)
    set_ = cli(tmp_path, "models", "template", "tiny", "--file", str(unstable), "--format", "json")
    assert set_.returncode == 0, set_.stderr
    assert json.loads(set_.stdout)["origin"] == "override"
    inspect = json.loads(cli(tmp_path, "models", "inspect", "tiny", "--format", "json").stdout)
    assert inspect["chatTemplate"]["origin"] == "override" and not inspect["chatTemplate"]["prefixStable"]
    store = ModelStore(tmp_path / "state")
    record = store.resolve("tiny")
    assert model_template(record.path, store.template_override(record.digest)).source == LAST_MESSAGE_ONLY

    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ oops")
    refused = cli(tmp_path, "models", "template", "tiny", "--file", str(broken))
    assert refused.returncode == 1 and "not valid Jinja" in refused.stderr
    assert json.loads(cli(tmp_path, "models", "template", "tiny", "--format", "json").stdout)["origin"] == "override"

    cleared = json.loads(cli(tmp_path, "models", "template", "tiny", "--clear", "--format", "json").stdout)
    assert cleared["origin"] == "gguf"


def test_a_pods_tools_are_private_even_where_the_template_writes_them_into_a_public_segment():
    """Qwen-style templates put the tool list inside the first system message: a public one."""
    from nodeagent.contracts.pod import ContextSegment
    from nodeagent.session import SessionContext

    template = ChatTemplate(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if loop.first and tools %}<tools>{{ tools | tojson }}</tools>{% endif %}\n{% endfor %}<|assistant|>")
    words = lambda text: [hash(w) % 50000 for w in text.replace("<", " <").split()]  # noqa: E731
    tools = [{"type": "function", "function": {"name": "secret_tool", "parameters": {"type": "object"}}}]
    session = SessionContext("sha256:" + "0" * 64, "acme", "coder", words, template, tools=tools)
    session.add_segments([ContextSegment(role="system", text="a shared public prompt", scope="public")],
                         ["a shared public prompt"])
    session.add_turn([{"role": "user", "content": "hello"}])
    public_end = next(start for start, ns in session.spans if ns.scope != "public")
    tools_at = len(words("<|system|>a shared public prompt"))  # where <tools> begins
    assert public_end <= tools_at  # the tool list starts in the private part
    assert [ns.scope for _, ns in session.spans] == ["public", "private"]
