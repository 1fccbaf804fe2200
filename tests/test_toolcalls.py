"""Tools and tool calls: rendered as each model's template specifies, parsed back as OpenAI's tool_calls.

Three real templates (tests/templates: Qwen2.5, Llama 3.1, Mistral v0.3) stand
for the three tool-call families. Rendering is checked against text written
out by hand from each template and against llama.cpp's own Jinja formatter;
parsing against scripted replies in each format; the whole path (OpenAI
request -> pod -> template -> llama.cpp -> parsed tool_calls) on a
random-weight model that carries Qwen's template, with a GBNF grammar making
it write a call (grammar-constrained sampling is a real llama.cpp path).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodeagent.models.testmodel import CHAT_TEMPLATE
from nodeagent.openai_compat import chat_request_to_pod
from nodeagent.pods import PodInvalid
from nodeagent.templates import CHATML, ChatTemplate
from nodeagent.toolcalls import ReplyStream, ToolCallFormat, detect_format

TEMPLATES = Path(__file__).parent / "templates"
QWEN = (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
LLAMA31 = (TEMPLATES / "llama-3.1-instruct.jinja").read_text()
MISTRAL = (TEMPLATES / "mistral-7b-instruct-v0.3.jinja").read_text()

HERMES, LLAMA3, MISTRAL_FMT = ToolCallFormat.HERMES, ToolCallFormat.LLAMA3_JSON, ToolCallFormat.MISTRAL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", '
                '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}')
ASK = [{"role": "system", "content": "You are a weather bot."},
       {"role": "user", "content": "What's the weather in Paris?"}]


def call(name: str, arguments: str) -> tuple[str, str]:
    return name, arguments


def calls_of(parsed) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in parsed.tool_calls]


# ------------------------------------------------------------------ detection
@pytest.mark.parametrize("source, expected", [(QWEN, HERMES), (LLAMA31, LLAMA3), (MISTRAL, MISTRAL_FMT),
                                              (CHATML, None), (CHAT_TEMPLATE, None)])
def test_the_format_is_read_from_the_markup_the_template_writes(source, expected):
    assert detect_format(source) is expected


def test_smollm2s_template_has_no_tool_format(smollm2_path):
    from nodeagent.models.gguf_meta import read_chat_facts

    assert detect_format(read_chat_facts(smollm2_path).chat_template) is None


# ------------------------------------------------------------------ parsing: hermes (Qwen2.5)
def test_hermes_one_call_is_the_whole_reply():
    parsed = HERMES.parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert parsed.content is None
    assert calls_of(parsed) == [call("get_weather", '{"city": "Paris"}')]
    assert parsed.tool_calls[0].id.startswith("call_") and parsed.tool_calls[0].type == "function"


def test_hermes_several_calls_with_text_before_them():
    reply = ('Let me look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    parsed = HERMES.parse(reply)
    assert parsed.content == "Let me look both up."
    assert calls_of(parsed) == [call("get_weather", '{"city": "Paris"}'), call("get_weather", '{"city": "Oslo"}')]
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_hermes_arguments_given_as_json_text_stay_that_json():
    parsed = HERMES.parse('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert calls_of(parsed) == [call("f", '{"x": 1}')]


def test_hermes_call_without_arguments_has_empty_object_arguments():
    assert calls_of(HERMES.parse('<tool_call>{"name": "now"}</tool_call>')) == [call("now", "{}")]


@pytest.mark.parametrize("reply", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',  # bad JSON
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # ran out of tokens: unclosed
    'No tools needed: it is sunny.',
])
def test_hermes_what_is_not_a_well_formed_call_stays_content_verbatim(reply):
    parsed = HERMES.parse(reply)
    assert parsed.content == reply and parsed.tool_calls == []


def test_hermes_a_malformed_block_beside_a_good_one_keeps_its_text():
    bad = '<tool_call>{"name": oops}</tool_call>'
    parsed = HERMES.parse(f'{bad}\n<tool_call>{{"name": "f", "arguments": {{}}}}</tool_call> done')
    assert parsed.content == f"{bad}done"
    assert calls_of(parsed) == [call("f", "{}")]


# ------------------------------------------------------------------ parsing: Llama 3.x JSON
def test_llama3_json_call_is_the_whole_reply():
    parsed = LLAMA3.parse('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert parsed.content is None and calls_of(parsed) == [call("get_weather", '{"city": "Paris"}')]


def test_llama3_python_tag_with_text_before_it():
    parsed = LLAMA3.parse('Checking.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert parsed.content == "Checking." and calls_of(parsed) == [call("get_weather", '{"city": "Paris"}')]


@pytest.mark.parametrize("reply", [
    '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"n": 2}}',
    '[{"name": "a", "parameters": {}}, {"name": "b", "arguments": {"n": 2}}]',
])
def test_llama3_several_calls(reply):
    assert calls_of(LLAMA3.parse(reply)) == [call("a", "{}"), call("b", '{"n": 2}')]


@pytest.mark.parametrize("reply", [
    'The call would be {"name": "get_weather", "parameters": {"city": "Paris"}}',  # text first: an answer
    '{"name": "get_weather", "parameters": {"city": "Paris"}} and then some words',  # not only calls
    '{"name": "get_weather", "parameters": {"city": "Paris"}',  # bad JSON
    '{"temperature": 18}',  # JSON, but no call
    '<|python_tag|>brave_search.call(query="Paris weather")',  # a built-in tool's syntax, not JSON
])
def test_llama3_what_is_not_only_calls_stays_content_verbatim(reply):
    parsed = LLAMA3.parse(reply)
    assert parsed.content == reply and parsed.tool_calls == []


# ------------------------------------------------------------------ parsing: Mistral
def test_mistral_tool_calls_array():
    parsed = MISTRAL_FMT.parse('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                               '{"name": "get_weather", "arguments": {"city": "Oslo"}}]')
    assert parsed.content is None
    assert calls_of(parsed) == [call("get_weather", '{"city": "Paris"}'), call("get_weather", '{"city": "Oslo"}')]


def test_mistral_ids_are_nine_alphanumerics_as_its_template_demands():
    parsed = MISTRAL_FMT.parse('[TOOL_CALLS] [{"name": "f", "arguments": {}}, '
                               '{"name": "g", "arguments": {}, "id": "Ab3dE6gH9"}]')
    assert [c.id for c in parsed.tool_calls][1] == "Ab3dE6gH9"  # the model's own, when valid
    assert len(parsed.tool_calls[0].id) == 9 and parsed.tool_calls[0].id.isalnum()


def test_mistral_without_its_control_token_the_bare_array_is_a_call():
    # Providers detokenize without control tokens: [TOOL_CALLS] itself may not reach the text.
    parsed = MISTRAL_FMT.parse(' [{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    assert parsed.content is None and calls_of(parsed) == [call("get_weather", '{"city": "Paris"}')]


def test_mistral_text_before_the_marker_is_content():
    parsed = MISTRAL_FMT.parse('Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"a": "b"}}]')
    assert parsed.content == "Sure." and calls_of(parsed) == [call("f", '{"a": "b"}')]


@pytest.mark.parametrize("reply", ['[TOOL_CALLS] [{"name": "f", "arguments": {}', '[TOOL_CALLS] [{"nom": "f"}]',
                                   '[1] First, check the chain.'])
def test_mistral_what_is_not_a_call_stays_content_verbatim(reply):
    parsed = MISTRAL_FMT.parse(reply)
    assert parsed.content == reply and parsed.tool_calls == []


# ------------------------------------------------------------------ ids
def test_ids_derive_from_the_seed_so_a_replay_answers_the_same_ids():
    reply = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    first, again = HERMES.parse(reply, id_seed="pod-1"), HERMES.parse(reply, id_seed="pod-1")
    assert [c.id for c in first.tool_calls] == [c.id for c in again.tool_calls]
    assert first.tool_calls[0].id != first.tool_calls[1].id
    assert first.tool_calls[0].id != HERMES.parse(reply, id_seed="pod-2").tool_calls[0].id
    assert HERMES.parse(reply).tool_calls[0].id != HERMES.parse(reply).tool_calls[0].id  # unseeded: random


# ------------------------------------------------------------------ streaming
SCRIPTED = [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    (HERMES, '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}'
             '\n</tool_call>\nDone.'),
    (HERMES, 'Text with a < sign and <tool_call>{"name": broken}</tool_call> after.'),
    (HERMES, 'Plain answer, no tools at all.\n'),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (LLAMA3, 'Checking.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (LLAMA3, '{"not": "a call"}'),
    (LLAMA3, 'Sunny, 18 degrees.'),
    (MISTRAL_FMT, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    (MISTRAL_FMT, 'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {}}]'),
    (MISTRAL_FMT, 'Paris is sunny [TOOL'),
]


def streamed(fmt, pieces):
    stream = ReplyStream(fmt, id_seed="pod")
    sent = [stream.feed(piece) for piece in pieces]
    rest = stream.finish()
    return "".join(sent), rest


@pytest.mark.parametrize("fmt, reply", SCRIPTED)
def test_streamed_content_and_calls_equal_the_parsed_reply_wherever_the_pieces_split(fmt, reply):
    whole = fmt.parse(reply, id_seed="pod")
    splits = [[reply[:i], reply[i:]] for i in range(len(reply) + 1)] + [list(reply)]
    for pieces in splits:
        sent, rest = streamed(fmt, pieces)
        assert sent + (rest.content or "") == (whole.content or ""), pieces
        assert rest.tool_calls == whole.tool_calls
        if whole.tool_calls:
            assert fmt.marker not in sent and '"name"' not in sent  # no part of a call went out as text


def test_streaming_sends_text_before_a_call_as_it_comes_and_holds_the_call():
    stream = ReplyStream(HERMES)
    assert stream.feed("It is ") == "It is"  # trailing space held: it may precede a call
    assert stream.feed("sunny. <tool") == " sunny."
    assert stream.feed('_call>{"name": "f"}') == ""
    assert stream.feed("</tool_call>") == ""
    rest = stream.finish()
    assert rest.content is None and [c.function.name for c in rest.tool_calls] == ["f"]


def test_without_a_format_every_piece_goes_out_as_it_comes():
    stream = ReplyStream(None)
    assert [stream.feed(p) for p in ["<tool_call>", '{"name": "f"}', "</tool_call>"]] == \
        ["<tool_call>", '{"name": "f"}', "</tool_call>"]
    assert stream.finish().content is None and stream.finish().tool_calls == []


# ------------------------------------------------------------------ rendering through each template
def rendered(source: str, messages, tools, *, bos: str, eos: str) -> str:
    """Our rendering, after checking it equals llama.cpp's Jinja2ChatFormatter's."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    ours = ChatTemplate(source, bos_token=bos, eos_token=eos).render(messages, tools=tools)
    theirs = Jinja2ChatFormatter(template=source, bos_token=bos, eos_token=eos)(messages=messages, tools=tools).prompt
    assert ours == theirs
    return ours


def test_qwen_renders_the_tools_json_inside_the_system_message():
    expected = (
        "<|im_start|>system\nYou are a weather bot.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{WEATHER_JSON}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered(QWEN, ASK, [WEATHER], bos="", eos="<|im_end|>") == expected


def test_qwen_renders_a_call_and_its_result_as_tool_call_and_tool_response():
    from nodeagent.contracts.pod import Message

    called = Message.model_validate({"role": "assistant", "toolCalls": [
        {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]})
    result = Message(role="tool", content='{"temperature": 18}', tool_call_id="call_1")
    messages = [ASK[1], called.template_dict(), result.template_dict()]
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{WEATHER_JSON}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temperature": 18}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n")
    assert rendered(QWEN, messages, [WEATHER], bos="", eos="<|im_end|>") == expected
    # What the model is shown is what it is told to write: the parser reads it back.
    written = expected.split("<|im_start|>assistant\n")[1].removesuffix("<|im_end|>\n")
    assert calls_of(HERMES.parse(written)) == [call("get_weather", '{"city": "Paris"}')]


def test_llama31_renders_the_tools_in_the_first_user_message():
    indented = json.dumps(WEATHER, indent=4)
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a weather bot.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper "
        "arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "Do not use variables.\n\n"
        f"{indented}\n\n"
        "What's the weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert rendered(LLAMA31, ASK, [WEATHER], bos="<|begin_of_text|>", eos="<|eot_id|>") == expected


def test_mistral_renders_available_tools_before_the_last_user_message():
    first = {"role": "user", "content": "Hi"}
    reply = {"role": "assistant", "content": "Hello! How can I help?"}
    messages = [ASK[0], first, reply, ASK[1]]
    expected = (
        "<s>[INST] Hi[/INST] Hello! How can I help?</s>"
        f"[AVAILABLE_TOOLS] [{WEATHER_JSON}][/AVAILABLE_TOOLS]"
        "[INST] You are a weather bot.\n\nWhat's the weather in Paris?[/INST]")
    assert rendered(MISTRAL, messages, [WEATHER], bos="<s>", eos="</s>") == expected


def test_mistral_renders_a_call_and_its_result_with_its_nine_character_id():
    from nodeagent.contracts.pod import Message

    parsed = MISTRAL_FMT.parse('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
                               id_seed="pod")
    called = Message(role="assistant", tool_calls=parsed.tool_calls)
    ident = parsed.tool_calls[0].id
    result = Message(role="tool", content='{"temperature": 18}', tool_call_id=ident)
    messages = [ASK[1], called.template_dict(), result.template_dict()]
    expected = (
        f"<s>[AVAILABLE_TOOLS] [{WEATHER_JSON}][/AVAILABLE_TOOLS][INST] What's the weather in Paris?[/INST]"
        f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Paris"}}, "id": "{ident}"}}]</s>'
        f'[TOOL_RESULTS] {{"content": {{"temperature": 18}}, "call_id": "{ident}"}}[/TOOL_RESULTS]')
    assert rendered(MISTRAL, messages, [WEATHER], bos="<s>", eos="</s>") == expected


# ------------------------------------------------------------------ the OpenAI request -> pod mapping
def pod_for(**body):
    return chat_request_to_pod({"model": "m", "messages": [{"role": "user", "content": "Weather?"}], **body},
                               tenant="t", default_model=None)


def test_tools_become_the_pods_tools_as_the_client_wrote_them():
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    pod = pod_for(tools=[strict, {"type": "function", "function": {"name": "now"}}])
    assert [t.to_wire()["function"]["name"] for t in pod.spec.tools] == ["get_weather", "now"]
    assert pod.spec.tools[0].function.parameters == WEATHER["function"]["parameters"]


def test_tool_choice_none_shows_the_model_no_tools_and_a_named_one_only_that_tool():
    now = {"type": "function", "function": {"name": "now"}}
    assert pod_for(tools=[WEATHER, now], tool_choice="none").spec.tools is None
    named = pod_for(tools=[WEATHER, now], tool_choice={"type": "function", "function": {"name": "now"}})
    assert [t.function.name for t in named.spec.tools] == ["now"]
    for choice in ("auto", "required"):
        assert len(pod_for(tools=[WEATHER, now], tool_choice=choice).spec.tools) == 2


@pytest.mark.parametrize("body, field", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER], "grammar": "root ::= \"x\"", "response_format": {"type": "json_object"}}, "grammar"),
])
def test_tool_mistakes_are_refused_naming_the_field(body, field):
    with pytest.raises(PodInvalid) as err:
        pod_for(**body)
    assert str(err.value).startswith(f"{field}:")


def test_an_assistant_call_and_the_tool_result_become_the_pods_messages():
    pod = chat_request_to_pod({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
    ]}, tenant="t", default_model=None)
    user, assistant, tool = pod.spec.turns[0].messages
    assert assistant.content == "" and assistant.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert tool.role == "tool" and tool.tool_call_id == "call_1" and tool.content == '{"temperature": 18}'
    assert pod.spec.context[0].text == "You are a weather bot."


def test_a_tool_call_with_arguments_that_are_not_json_text_is_refused_naming_the_field():
    with pytest.raises(PodInvalid) as err:
        pod_for(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}])
    assert str(err.value).startswith("messages[1].tool_calls[0].function.arguments:")


# ------------------------------------------------------------------ end to end on llama.cpp
# What Qwen2.5 writes when it calls get_weather; the grammar makes the random model write it.
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
FORCE_CALL = "root ::= " + json.dumps(QWEN_CALL)


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory):
    """A random-weight model carrying Qwen2.5's real chat template."""
    from nodeagent.models.testmodel import create_test_model

    return create_test_model(tmp_path_factory.mktemp("models") / "qwen-tools.gguf", preset="tiny",
                             chat_template=QWEN)


@pytest.fixture()
def node(tmp_path, qwen_tiny):
    from nodeagent.config import load_config
    from nodeagent.models.store import ModelStore
    from nodeagent.node import Node, default_executor

    from test_api_harness import env_for

    store = ModelStore(tmp_path / "state")
    store.import_model(qwen_tiny, "qwen-tools")
    store.close()
    n = Node(load_config(env_for(tmp_path, AGENT_MACHINE_MODELS_THREADS="2", AGENT_MACHINE_MODELS_CONTEXT="2048")),
             executor_factory=default_executor)
    n.start()
    yield n
    n.close()


def ask(**extra):
    return {"model": "qwen-tools", "messages": ASK, "max_tokens": 120, "temperature": 0, **extra}


@pytest.mark.llama
def test_a_call_the_model_writes_comes_back_as_message_tool_calls(node):
    answer = node.chat_completion(ask(tools=[WEATHER], grammar=FORCE_CALL))
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [made] = choice["message"]["tool_calls"]
    assert made["type"] == "function" and made["id"].startswith("call_")
    assert made["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # the reply the model wrote is kept as generated (the receipt and the next turn's context see it)
    [pod] = node.list_pods()
    assert pod.status.turns[-1].output == QWEN_CALL


@pytest.mark.llama
def test_the_tools_are_in_the_prompt_unless_tool_choice_is_none(node):
    with_tools = node.chat_completion(ask(tools=[WEATHER], max_tokens=1))
    without = node.chat_completion(ask(tools=[WEATHER], tool_choice="none", max_tokens=1))
    plain = node.chat_completion(ask(max_tokens=1))
    assert without["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert with_tools["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 50


@pytest.mark.llama
def test_without_tools_the_same_text_is_content(node):
    answer = node.chat_completion(ask(grammar=FORCE_CALL))
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": QWEN_CALL}
    assert answer["choices"][0]["finish_reason"] == "stop"


@pytest.mark.llama
def test_streamed_calls_arrive_as_tool_call_deltas_and_no_call_text_as_content(node):
    chunks = list(node.chat_completion(ask(tools=[WEATHER], grammar=FORCE_CALL, stream=True)))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.llama
def test_the_official_client_calls_a_tool_and_sends_its_result_back(tmp_path, node):
    openai = pytest.importorskip("openai")
    from test_api_harness import ServedApi
    from test_api_openai import openai_client

    api = ServedApi(node, tmp_path / "run" / "agent-machine" / "api.sock")
    try:
        client = openai_client(api, "/v1")
        tool = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
        first = client.chat.completions.create(model="qwen-tools", messages=ASK, tools=[tool], tool_choice="auto",
                                               max_tokens=120, temperature=0, extra_body={"grammar": FORCE_CALL})
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls"
        assert message.tool_calls[0].function.name == "get_weather"
        assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
        # the conversation goes on: the call and its result are rendered by the template
        history = [*ASK, message,  # the SDK's own message object, as agent loops append it
                   {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 18}'}]
        second = client.chat.completions.create(model="qwen-tools", messages=history, tools=[tool],
                                                max_tokens=4, temperature=0)
        assert second.choices[0].message.tool_calls is None
        assert second.usage.prompt_tokens > first.usage.prompt_tokens
        streamed = list(client.chat.completions.create(
            model="qwen-tools", messages=ASK, tools=[tool], max_tokens=120, temperature=0, stream=True,
            extra_body={"grammar": FORCE_CALL}))
        deltas = [d for c in streamed if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.type, d.function.name, d.function.arguments) for d in deltas] == \
            [(0, "function", "get_weather", '{"city": "Paris"}')]
        assert deltas[0].id.startswith("call_")
        assert streamed[-1].choices[0].finish_reason == "tool_calls"
        with pytest.raises(openai.UnprocessableEntityError) as err:
            client.chat.completions.create(model="qwen-tools", messages=ASK, max_tokens=4,
                                           tools=[{"type": "function", "function": {"name": "x", "oops": 1}}])
        assert err.value.status_code == 422
        assert "oops" in err.value.message
    finally:
        api.stop()
