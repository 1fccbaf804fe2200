"""The official `openai` Python client against the agent's OpenAI-compatible routes.

Request validation is the API's own and is tested now. Running a completion
needs `Node.chat_completion` (a one-turn pod on a real provider with the tiny
test model); those tests skip, saying so, while the node lacks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import shutil

import httpx
import pytest

openai = pytest.importorskip("openai")

from nodeagent.config import load_config  # noqa: E402
from nodeagent.daemon import default_node  # noqa: E402
from nodeagent.node import Node  # noqa: E402

from test_api_harness import ServedApi, WithoutMethod, env_for, make_node  # noqa: E402

needs_chat = pytest.mark.skipif(not hasattr(Node, "chat_completion"),
                                reason="Node.chat_completion is not wired yet (the lead adds it); "
                                       "the route answers 501 until then")


def openai_client(api: ServedApi, prefix: str = "/openai/v1") -> "openai.OpenAI":
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(api.socket_path)), timeout=120)
    return openai.OpenAI(base_url=f"http://agent{prefix}", api_key="unused-on-the-unix-socket",
                         http_client=http, max_retries=0)


@pytest.fixture()
def served(tmp_path):
    node = make_node(tmp_path)
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    yield api
    api.stop()
    node.close()


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_unknown_fields_are_refused_by_name(served, prefix):
    client = openai_client(served, prefix)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"temprature": 0.5})
    assert err.value.status_code == 422
    assert err.value.body["param"] == "temprature"
    assert "temprature" in err.value.message


def test_out_of_range_values_name_the_field(served):
    client = openai_client(served)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="tiny", messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.body["param"] == "messages[0].role"


def test_without_the_node_method_the_client_sees_501(served, tmp_path):
    bare = ServedApi(WithoutMethod(served.node, "chat_completion"), tmp_path / "bare" / "agent-machine" / "api.sock")
    client = openai_client(bare)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    bare.stop()
    assert err.value.status_code == 501
    assert "chat_completion()" in err.value.message


# ------------------------------------------------------------------ with a real provider
@pytest.fixture()
def real_node(tmp_path, tiny_model_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")}, **env_for(tmp_path)}
    cli = [shutil.which("agent-machine") or sys.executable, *([] if shutil.which("agent-machine") else
                                                              ["-m", "nodeagent.cli"])]
    imported = subprocess.run([*cli, "models", "import", str(tiny_model_path), "--name", "tiny"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    node = default_node(load_config(env_for(tmp_path)))  # what `agent-machine serve` runs
    node.start()
    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    yield api
    api.stop()
    node.close()


@needs_chat
@pytest.mark.llama
def test_chat_completion_runs_as_a_one_turn_pod(real_node):
    client = openai_client(real_node)
    models = [m.id for m in client.models.list().data]
    assert any(name.startswith("tiny") for name in models)
    reply = client.chat.completions.create(model="tiny", messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}], max_tokens=8)
    assert reply.object == "chat.completion"
    assert isinstance(reply.choices[0].message.content, str)
    assert 1 <= reply.usage.completion_tokens <= 8
    pods = real_node.node.list_pods()
    assert len(pods) == 1 and pods[0].status.phase.value == "Succeeded"


@needs_chat
@pytest.mark.llama
def test_chat_completion_streams(real_node):
    client = openai_client(real_node, "/v1")
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count."}],
                                                 max_tokens=6, stream=True))
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)


@needs_chat
@pytest.mark.llama
def test_unknown_model_is_a_client_error(real_node):
    client = openai_client(real_node)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert 400 <= err.value.status_code < 500
    assert "no-such-model" in err.value.message
