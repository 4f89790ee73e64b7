"""Tool calling and structured outputs through a real started server on the real SmolLM2,
with the official openai client: its tool loop unchanged (call -> run the tool -> answer),
streamed tool-call deltas, each parser's format under required / named choice, reasoning
in `reasoning` and `reasoning_content`, and the 400s that name the field."""

from __future__ import annotations

import json

import pytest
from real_smollm2 import smollm2_dir
from server_harness import ServerThread

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")
pytestmark = pytest.mark.timeout(900)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def get_weather(city: str, unit: str) -> str:
    return json.dumps({"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit})


@pytest.fixture(scope="module")
def server():
    s = ServerThread(
        [
            "--model",
            str(smollm2_dir()),
            "--served-model-name",
            "smol",
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
        ]
    ).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def test_openai_tool_loop(client):
    messages = list(QUESTION)
    r = client.chat.completions.create(
        model="smol", messages=messages, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=80
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id for c in calls)
    for call in calls:
        args = json.loads(call.function.arguments)  # strict tools: the arguments match their schema
        if call.function.name == "get_weather":
            assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
        else:
            assert call.function.name == "get_time" and set(args) == {"city"}
    messages.append(choice.message)  # the client's own message object goes back as history
    for call in calls:
        args = json.loads(call.function.arguments)
        result = get_weather(**args) if call.function.name == "get_weather" else '{"time": "14:00"}'
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(
        model="smol", messages=messages, tools=[WEATHER, TIME], tool_choice="none", temperature=0, max_tokens=40
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")
    # the history (assistant tool_calls + tool results) went through the chat template
    assert final.usage.prompt_tokens > r.usage.prompt_tokens + 10


def test_streamed_tool_calls_in_openais_shape(client):
    kw = dict(
        model="smol",
        messages=QUESTION,
        tools=[WEATHER, TIME],
        temperature=0,
        max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "stop"  # OpenAI: a named choice ends with "stop"
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    calls: dict[int, dict] = {}
    finish = None
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = slot["id"] or tc.id
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == "stop"
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls
    ]
    assert all(v["id"] for v in calls.values())


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral", "pythonic"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_each_parsers_format(server, client, parser, choice):
    """The grammar makes the model write the parser's own format; the parser reads it back."""
    server.state.tool_call_parser = parser
    try:
        tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_time"}}
        r = client.chat.completions.create(
            model="smol",
            messages=QUESTION,
            tools=[WEATHER, TIME],
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=80,
        )
    finally:
        server.state.tool_call_parser = "hermes"
    c = r.choices[0]
    assert c.finish_reason == ("tool_calls" if choice == "required" else "stop")
    (call,) = c.message.tool_calls  # parallel_tool_calls false: exactly one
    assert (
        call.function.name in ("get_weather", "get_time") if choice == "required" else call.function.name == "get_time"
    )
    assert isinstance(json.loads(call.function.arguments), dict)
    assert c.message.content == ""


def test_reasoning_under_both_names(server, client):
    """A grammar makes the model think first; --reasoning-parser qwen3 splits it off into
    `reasoning` and `reasoning_content`, streamed the same; enable_thinking false keeps the
    whole answer in content."""
    from fastserve.server.reasoning import get_reasoning_parser

    spec = {"regex": r"<think>[a-z ]{4,30}</think>[A-Za-z ]{2,30}\."}
    kw = dict(
        model="smol",
        messages=[{"role": "user", "content": "Say something."}],
        temperature=0,
        max_tokens=60,
        extra_body={"structured_outputs": spec},
    )
    server.state.reasoning_parser = get_reasoning_parser("qwen3")
    try:
        m = client.chat.completions.create(**kw).choices[0].message
        reasoning = m.model_extra["reasoning"]
        assert reasoning and reasoning == m.model_extra["reasoning_content"] and "<think>" not in m.content
        r, c = "", ""
        for chunk in client.chat.completions.create(stream=True, **kw):
            d = chunk.choices[0].delta
            assert (d.model_extra or {}).get("reasoning") == (d.model_extra or {}).get("reasoning_content")
            r += (d.model_extra or {}).get("reasoning") or ""
            c += d.content or ""
        assert (r, c) == (reasoning, m.content)
        off = (
            client.chat.completions.create(
                **{**kw, "extra_body": {**kw["extra_body"], "chat_template_kwargs": {"enable_thinking": False}}}
            )
            .choices[0]
            .message
        )
        assert off.model_extra["reasoning"] is None and off.content.startswith("<think>")
        hidden = (
            client.chat.completions.create(**{**kw, "extra_body": {**kw["extra_body"], "include_reasoning": False}})
            .choices[0]
            .message
        )
        assert hidden.model_extra["reasoning"] is None and hidden.content == m.content
    finally:
        server.state.reasoning_parser = None


def test_json_schema_stream_and_whole_agree(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
    }
    kw = dict(
        model="smol",
        messages=[{"role": "user", "content": "A person as JSON"}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}},
    )
    whole = client.chat.completions.create(**kw).choices[0]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert streamed == whole.message.content and set(json.loads(streamed)) == {"name", "age"}


@pytest.mark.parametrize(
    "body,param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
            "response_format",
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "root ::= missing_rule"}}, "structured_outputs.grammar"),
        ({"guided_json": {"type": "integer", "multipleOf": 2}}, "guided_json"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"guided_regex": "a+", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
        ({"structured_outputs": {"json": {}, "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": []}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"priority": 3}, "priority"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=4, extra_body=body)
    assert e.value.body["param"] == param, e.value.body
    # the engine lives on
    assert client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=2).choices[0].message.content


def test_vllm_response_extras(client):
    """return_token_ids, return_prompt_text, request_id and truncation_side change the answer,
    so they are honoured (not ignored)."""
    r = client.chat.completions.create(
        model="smol",
        messages=QUESTION,
        max_tokens=3,
        temperature=0,
        extra_body={"return_token_ids": True, "return_prompt_text": True, "request_id": "abc123"},
    )
    assert r.id == "chatcmpl-abc123"
    assert r.model_extra["prompt_text"].endswith("<|im_start|>assistant\n")
    assert len(r.model_extra["prompt_token_ids"]) == r.usage.prompt_tokens
    assert len(r.choices[0].model_extra["token_ids"]) == r.usage.completion_tokens
    kw = dict(model="smol", prompt="one two three four five six", max_tokens=1, temperature=0, logprobs=0, echo=True)
    left = client.completions.create(**kw, extra_body={"truncate_prompt_tokens": 2})
    right = client.completions.create(**kw, extra_body={"truncate_prompt_tokens": 2, "truncation_side": "right"})
    assert left.choices[0].logprobs.tokens[:2] == [" five", " six"]
    assert right.choices[0].logprobs.tokens[:2] == ["one", " two"]
