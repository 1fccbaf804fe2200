"""Clients nobody here wrote, against a served agent with a real model (SmolLM2-135M-Instruct).

The official `openai` client (sync, async, streaming, models, text completions,
JSON schema output, tools) and LangChain's `ChatOpenAI` (`invoke`, `stream`,
`bind_tools`) talk to the agent as they would to OpenAI: over its Unix socket
(where an OpenAI client's placeholder key is ignored) and over TCP with the
bearer token. One node serves both listeners, as `agent-machine serve` does.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from nodeagent.api.auth import Authenticate
from nodeagent.config import load_config
from nodeagent.credentials import CredentialSet
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor

from test_api_harness import ServedApi
from test_real_model import PROMPTS, STORY, env_for

pytestmark = pytest.mark.llama

TOKEN = "s3cret-token-for-openai-clients-0123"
MODEL = "smollm2"
FRANCE = PROMPTS[0]  # a system prompt and "What is the capital of France?"


@dataclass
class Listener:
    """Where a client reaches the agent, and the httpx transport it needs to get there."""

    name: str
    base_url: str
    api_key: str
    uds: str | None = None

    def http(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self.uds) if self.uds else None
        return httpx.Client(transport=transport, timeout=120)

    def async_http(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=self.uds) if self.uds else None
        return httpx.AsyncClient(transport=transport, timeout=120)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, http_client=self.http(), max_retries=0)

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, http_client=self.async_http(),
                                  max_retries=0)

    def langchain(self, **options) -> ChatOpenAI:
        return ChatOpenAI(model=MODEL, base_url=self.base_url, api_key=self.api_key, http_client=self.http(),
                          http_async_client=self.async_http(), max_retries=0, **options)


@pytest.fixture(scope="module")
def agent(tmp_path_factory, smollm2_path):
    """One node with SmolLM2, served on a Unix socket and on TCP with a token (as the daemon serves it)."""
    tmp_path = tmp_path_factory.mktemp("openai-clients")
    ModelStore(tmp_path / "state").import_model(smollm2_path, MODEL)
    node = Node(load_config(env_for(tmp_path)), executor_factory=default_executor)
    node.start()
    credentials = CredentialSet(None, TOKEN)
    unix = ServedApi(node, tmp_path / "run" / "api.sock",
                     guard=lambda app: Authenticate(app, credentials, token_required=False))
    tcp = ServedApi(node, tcp=True, guard=lambda app: Authenticate(app, credentials, token_required=True))
    yield {"unix": Listener("unix", "http://agent/v1", "placeholder-key-the-socket-ignores", str(unix.socket_path)),
           "tcp": Listener("tcp", f"http://127.0.0.1:{tcp.port}/v1", TOKEN)}
    unix.stop()
    tcp.stop()
    node.close()


@pytest.fixture(params=["unix", "tcp"])
def listener(agent, request) -> Listener:
    return agent[request.param]


# ------------------------------------------------------------------ openai: models and errors
def test_models_list_names_the_models_chat_accepts(listener):
    client = listener.openai()
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("smollm2:latest", "model", "agent-machine")]
    assert models[0].created > 1_600_000_000
    assert client.models.retrieve("smollm2").id == "smollm2:latest"  # the store's default tag
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert (err.value.code, err.value.param) == ("model_not_found", "model")
    assert "no-such-model" in err.value.message


def test_errors_reach_the_client_in_openais_shape_naming_the_field(listener):
    client = listener.openai()
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model=MODEL, messages=FRANCE, stop=["a", "b", "c", "d", "e"])
    assert err.value.param == "stop" and err.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hello", echo=True)
    assert (err.value.param, err.value.code) == ("echo", "unsupported_parameter")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=["one", "two"])
    assert err.value.param == "prompt" and "one prompt per request" in err.value.message


def test_a_wrong_token_over_tcp_is_an_authentication_error(agent):
    client = openai.OpenAI(base_url=agent["tcp"].base_url, api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# ------------------------------------------------------------------ openai: chat
def test_sync_chat_answers_as_the_model_does(listener):
    reply = listener.openai().chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0)
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.content == "The capital of France is Paris."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 7 and reply.usage.prompt_tokens > 0


def test_async_chat_answers_concurrent_requests_as_sequential_ones(listener):
    questions = [[FRANCE[0], {"role": "user", "content": f"What is the capital of {country}?"}]
                 for country in ("France", "Italy")]

    async def ask() -> list[str]:
        client = listener.async_openai()
        replies = await asyncio.gather(*[client.chat.completions.create(model=MODEL, messages=messages,
                                                                        max_tokens=24, temperature=0)
                                         for messages in questions])
        await client.close()
        return [reply.choices[0].message.content for reply in replies]

    answers = asyncio.run(ask())
    assert answers[0] == "The capital of France is Paris."
    sync = listener.openai()
    sequential = [sync.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                               temperature=0).choices[0].message.content for messages in questions]
    # Greedy answers agree, but not always to the last token: a prompt whose prefix is reused
    # from the KV cache (more or less of it, depending on what ran before) is computed in other
    # batch splits, which llama.cpp does not promise bit for bit; a long tail may then diverge.
    for concurrent, alone in zip(answers, sequential):
        assert concurrent.split(".")[0] == alone.split(".")[0]


def test_a_64_token_answer_streams_in_chunks_the_first_before_half_the_time(listener):
    client = listener.openai()
    began = time.monotonic()
    arrivals, text, usage = [], [], None
    stream = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=64, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                arrivals.append(time.monotonic() - began)
                text.append(choice.delta.content)
    total = time.monotonic() - began
    assert len(arrivals) >= 8, text
    assert arrivals[0] < total / 2, (arrivals[0], total)
    assert usage is not None and usage.completion_tokens == 64
    assert len("".join(text)) > 64  # 64 tokens of a story, not a few pieces


# ------------------------------------------------------------------ openai: text completions
def test_a_text_completion_continues_the_prompt_as_is(listener):
    client = listener.openai()
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert done.object == "text_completion"
    assert done.choices[0].text.startswith(" Paris")
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 8
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                         temperature=0, stream=True)
    chunks = list(streamed)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 4
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_retried_text_completion_answers_the_pod_it_made(listener):
    client = listener.openai()
    key = {"Idempotency-Key": f"completion-{listener.name}"}
    first = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                      temperature=0, extra_headers=key)
    again = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                      temperature=0, extra_headers=key)
    assert (again.id, again.created, again.choices[0].text) == (first.id, first.created, first.choices[0].text)
    streamed_key = {"Idempotency-Key": f"streamed-completion-{listener.name}"}
    streamed, replayed = (list(client.completions.create(model=MODEL, prompt="The capital of France is",
                                                         max_tokens=4, temperature=0, stream=True,
                                                         extra_headers=streamed_key)) for _ in range(2))
    assert {c.id for c in replayed} == {streamed[0].id}
    assert len(replayed) == 2  # the answer whole, then the finish reason
    assert "".join(c.choices[0].text for c in replayed) == "".join(c.choices[0].text for c in streamed)
    with pytest.raises(openai.ConflictError) as err:
        client.completions.create(model=MODEL, prompt="Another prompt", max_tokens=4, extra_headers=key)
    assert err.value.param == "Idempotency-Key"


# ------------------------------------------------------------------ openai: structured output and tools
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country", "capital"],
        "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24},
                       "capital": {"type": "boolean"}}}


def test_json_schema_output_validates_against_the_schema(listener):
    reply = listener.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a city in France as JSON."}], max_tokens=64,
        temperature=0, response_format={"type": "json_schema",
                                         "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    answer = json.loads(reply.choices[0].message.content)
    jsonschema.validate(answer, CITY)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_a_request_with_tools_is_accepted_and_answered(listener):
    # SmolLM2's template shows a model no tools; the request still runs and is answered.
    reply = listener.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
        tool_choice="auto", max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


# ------------------------------------------------------------------ LangChain
def test_langchain_invoke(listener):
    answer = listener.langchain(temperature=0, max_tokens=24).invoke(FRANCE)
    assert isinstance(answer, AIMessage)
    assert answer.content == "The capital of France is Paris."
    assert answer.usage_metadata["output_tokens"] == 7


def test_langchain_stream(listener):
    chunks = list(listener.langchain(temperature=0, max_tokens=24).stream(FRANCE))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    assert len([chunk for chunk in chunks if chunk.content]) >= 4
    assert "".join(chunk.content for chunk in chunks) == "The capital of France is Paris."


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"It is sunny in {city}."


def test_langchain_bind_tools_invoke(listener):
    model = listener.langchain(temperature=0, max_tokens=16).bind_tools([get_weather])
    answer = model.invoke("What is the weather in Paris?")
    assert isinstance(answer, AIMessage)
    assert answer.content or answer.tool_calls
    for call in answer.tool_calls:  # whatever the model chose, a call LangChain parsed names the tool
        assert call["name"] == "get_weather"
