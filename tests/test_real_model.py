"""A real instruct model (SmolLM2-135M-Instruct) answers through the node as llama.cpp answers it.

The random-weight test models hide everything a real model shows: whether
the prompt is the model's own chat template, whether it stops at its end of
turn, whether a later turn reuses the earlier one.
"""

from __future__ import annotations

import pytest

from nodeagent.config import load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.models.gguf_meta import read_chat_facts
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor
from nodeagent.templates import template_for

from pod_factory import make_pod, wait_for

pytestmark = pytest.mark.llama

PROMPTS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse support agent for a bike shop."},
     {"role": "user", "content": "My chain keeps slipping. What should I check first?"}],
    [{"role": "user", "content": "Write one sentence about the sea."},
     {"role": "assistant", "content": "The sea is vast and deep."},
     {"role": "user", "content": "Now one about mountains."}],
]


def env_for(tmp_path):
    return {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
            "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
            "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run"), "AGENT_MACHINE_CACHE_RAM_DIR": str(tmp_path / "t1"),
            "AGENT_MACHINE_MODELS_THREADS": "2", "AGENT_MACHINE_MODELS_CONTEXT": "2048"}


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """llama.cpp's own chat completion with the model's template (llama-cpp-python)."""
    from llama_cpp import Llama

    llm = Llama(str(smollm2_path), n_ctx=2048, n_threads=2, verbose=False)
    yield llm
    llm.close()


@pytest.fixture()
def node(tmp_path, smollm2_path):
    ModelStore(tmp_path / "state").import_model(smollm2_path, "smollm2")
    n = Node(load_config(env_for(tmp_path)), executor_factory=default_executor)
    n.start()
    yield n
    n.close()


def test_the_gguf_template_renders_as_llama_cpp_renders_it(smollm2_path):
    from llama_cpp import llama_chat_format

    facts = read_chat_facts(smollm2_path)
    ours = template_for(facts.chat_template, bos_token=facts.bos_token, eos_token=facts.eos_token)
    theirs = llama_chat_format.Jinja2ChatFormatter(template=facts.chat_template, eos_token=facts.eos_token,
                                                   bos_token=facts.bos_token)
    assert ours.origin == "gguf" and ours.stability().stable
    for messages in PROMPTS:
        assert ours.render(messages) == theirs(messages=messages).prompt


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_a_chat_answer_equals_llama_cpps_own_chat_completion_at_temperature_0(node, reference, index):
    messages = PROMPTS[index]
    expected = reference.create_chat_completion(messages=messages, temperature=0.0, max_tokens=48)
    answer = node.chat_completion({"model": "smollm2", "messages": messages, "max_tokens": 48, "temperature": 0})
    assert answer["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert answer["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert answer["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]
    assert answer["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]


def test_the_model_stops_at_its_end_of_turn(node):
    answer = node.chat_completion({"model": "smollm2", "max_tokens": 200, "temperature": 0, "messages": PROMPTS[0]})
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "The capital of France is Paris."
    assert choice["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == 7
    assert "<|im_start|>" not in choice["message"]["content"] and "<|user|>" not in choice["message"]["content"]


def test_turn_2_reuses_turn_1s_prompt_and_reply_less_the_end_of_turn(node):
    pod = node.submit_pod(make_pod(model="smollm2", system="You are a helpful assistant.", max_tokens=40,
                                   turns=["What is the capital of France?", "And the capital of Italy?"]))
    assert wait_for(lambda: node.get_pod(pod.id).status.phase in (PodPhase.succeeded, PodPhase.failed), 120)
    done = node.get_pod(pod.id)
    assert done.status.phase is PodPhase.succeeded, done.status.reasons
    first, second = done.status.turns
    assert first.completion_tokens < 40  # it stopped at <|im_end|>, which is not in the context
    # The provider holds turn 1's prompt and the tokens it generated; turn 2's prompt
    # (the whole conversation through the template) extends all of it.
    assert second.cached_tokens >= first.prompt_tokens + first.completion_tokens
    assert second.cache_tier == "T0"


STORY = [{"role": "system", "content": "You are a storyteller."},
         {"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def test_a_streamed_answer_arrives_token_by_token(node):
    import time

    # The model loaded and the prompt's context warm first: this measures the streaming, not a cold load.
    whole = node.chat_completion({"model": "smollm2", "messages": STORY, "max_tokens": 64, "temperature": 0})
    began = time.monotonic()
    arrivals, text = [], []
    chunks = node.chat_completion({"model": "smollm2", "messages": STORY, "max_tokens": 64, "temperature": 0,
                                   "stream": True, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        arrivals.append(time.monotonic() - began)
        for choice in chunk["choices"]:
            text.append(choice["delta"].get("content") or "")
    total = arrivals[-1]
    content_chunks = [a for a, t in zip(arrivals, text) if t]
    assert len(content_chunks) >= 8
    assert content_chunks[0] < total / 2
    assert chunk["usage"]["completion_tokens"] == 64  # the last chunk carries the usage
    assert "".join(text) == whole["choices"][0]["message"]["content"]


def test_a_client_that_goes_away_cancels_its_generation_with_a_receipt(node, tmp_path):
    import time

    from nodeagent.receipts import LogReader, receipts_dir

    chunks = node.chat_completion({"model": "smollm2", "messages": STORY, "max_tokens": 1000, "temperature": 0,
                                   "stream": True})
    for _ in range(4):
        next(chunks)
    pod_id = next(chunks)["id"].removeprefix("chatcmpl-")
    closed = time.monotonic()
    chunks.close()
    [managed] = node.executor.pool.all()
    assert wait_for(lambda: not managed.turns.busy(), 1.0), "the provider is still busy a second later"
    assert time.monotonic() - closed < 1.0
    assert wait_for(lambda: node.get_pod(pod_id).status.phase is PodPhase.cancelled, 5)
    pod = node.get_pod(pod_id)
    assert pod.status.turns[0].finish_reason == "cancelled" and pod.status.turns[0].completion_tokens < 1000
    with LogReader(receipts_dir(tmp_path / "state")) as reader:
        [row] = [r for r in reader.rows(newest_first=False) if r.kind == "execution"
                 and reader.view(r)[0].statement.predicate.pod.run_id == f"{pod_id}-t0"]
        assert reader.view(row)[0].statement.predicate.outcome.status == "cancelled"


def test_a_retry_after_a_dropped_stream_runs_again_under_the_same_idempotency_key(node):
    from nodeagent.idempotency import IdempotencyKey

    body = {"model": "smollm2", "messages": STORY, "max_tokens": 200, "temperature": 0, "stream": True}
    key = IdempotencyKey.for_chat("acme", "retry-1", body)
    chunks = node.chat_completion(body, idempotency=key)
    first = next(chunks)
    chunks.close()  # the connection dropped
    cut = first["id"].removeprefix("chatcmpl-")
    assert wait_for(lambda: node.get_pod(cut).status.phase is PodPhase.cancelled, 10)
    retried = list(node.chat_completion(body, idempotency=key))
    assert retried[0]["id"] != first["id"]  # a new pod, not the cancelled one replayed
    assert retried[-1]["choices"][0]["finish_reason"] in ("stop", "length")
