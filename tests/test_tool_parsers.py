"""Tool-call parsers on text: whole answers, streams cut anywhere (their deltas concatenate to
the whole answer), the grammars that enforce required / named choice (built and compiled with
xgrammar), and the request checks (400s naming the field)."""

from __future__ import annotations

import json

import pytest
from fastserve.server.errors import APIError
from fastserve.server.tool_parsers import TOOL_PARSERS, ToolCallStreamer, get_tool_parser
from fastserve.server.tool_parsers.base import FunctionCall
from fastserve.server.tool_parsers.request import ToolCalling, check_tools
from hypothesis import given, settings
from hypothesis import strategies as st

W = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
T = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
W_STRICT = {"type": "function", "function": {**W["function"], "strict": True}}

CALL_W = FunctionCall("get_weather", '{"city": "Paris"}')
CALL_T = FunctionCall("get_time", "{}")

# parser -> [(text, expected content, expected calls)]
EXAMPLES = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None, [CALL_W]),
        (
            'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
            "Let me check.",
            [CALL_W, CALL_T],
        ),
        ('<tool_call>{"name": "get_time", "arguments": {}}', None, [CALL_T]),  # left open at the end
        ("No tools needed.", "No tools needed.", []),
        ('<tool_call>{"name": "get_time", "arguments": {', '<tool_call>{"name": "get_time", "arguments": {', []),
        ("a <tool_ca", "a <tool_ca", []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [CALL_W]),
        (
            '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}; {"name": "get_time", '
            '"parameters": {}}',
            None,
            [CALL_W, CALL_T],
        ),
        ("It is sunny.", "It is sunny.", []),
        ('{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON but not a call: content
        ('{"name": "get_time", "parameters": {', '{"name": "get_time", "parameters": {', []),
    ],
    "mistral": [
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [CALL_W]),
        (
            'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
            '"arguments": {}}]',
            "Sure. ",
            [CALL_W, CALL_T],
        ),
        ("Plain answer.", "Plain answer.", []),
        ("[TOOL_CALLS] [not json", "[TOOL_CALLS] [not json", []),
    ],
    "pythonic": [
        ('[get_weather(city="Paris")]', None, [CALL_W]),
        ('[get_weather(city="Paris"), get_time()]', None, [CALL_W, CALL_T]),
        (
            "[get_weather(city='Paris', days=3, ok=true, extra=None, opts={'a': [1, -2.5]})]",
            None,
            [
                FunctionCall(
                    "get_weather", '{"city": "Paris", "days": 3, "ok": true, "extra": null, "opts": {"a": [1, -2.5]}}'
                )
            ],
        ),
        ("The weather is nice.", "The weather is nice.", []),
        ("[get_weather('Paris')]", "[get_weather('Paris')]", []),  # positional: not a tool call
        ("[1, 2, 3]", "[1, 2, 3]", []),
    ],
}

CASES = [(name, *case) for name, cases in EXAMPLES.items() for case in cases]


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_extract(parser, text, content, calls):
    assert get_tool_parser(parser).extract(text) == (content, calls)


def _stream(parser_name: str, pieces: list[str]):
    s = ToolCallStreamer(get_tool_parser(parser_name))
    content, calls = "", []
    for i, piece in enumerate(pieces):
        c, d = s.feed(piece)
        content += c
        calls += d
    c, d = s.finish()
    return content + c, calls + d


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 300), max_size=10))
def test_stream_equals_whole(case, cuts):
    parser, text, content, calls = case
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    got_content, got_calls = _stream(parser, [text[a:b] for a, b in zip(bounds, bounds[1:])])
    assert (got_content or None) == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == [
        (c.name, c.arguments) for c in calls
    ]
    assert [c["index"] for c in got_calls] == list(range(len(calls)))
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in got_calls)


def test_stream_holds_back_a_possible_marker():
    s = ToolCallStreamer(get_tool_parser("hermes"))
    assert s.feed("Hello <tool") == ("Hello ", [])
    assert s.feed('_call>{"name": "get_time", "arguments": {}}') == ("", [])
    content, calls = s.feed("</tool_call>")
    assert content == "" and calls[0]["function"] == {"name": "get_time", "arguments": "{}"}


# -- grammars ------------------------------------------------------------------------------


def _compiles(spec):
    xgr = pytest.importorskip("xgrammar")
    if spec.structural_tag is not None:
        xgr.Grammar.from_structural_tag(spec.structural_tag)
    else:
        xgr.Grammar.from_json_schema(json.dumps(spec.json))


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_always_have_a_grammar(parser, choice):
    pytest.importorskip("xgrammar")
    spec = get_tool_parser(parser).grammar([W, T], choice, None)
    assert spec is not None and spec.param == "tools"
    _compiles(spec)


def test_auto_is_free_unless_a_tool_is_strict():
    pytest.importorskip("xgrammar")
    for parser in ("hermes", "llama3_json"):
        p = get_tool_parser(parser)
        assert p.grammar([W, T], "auto", None) is None
        spec = p.grammar([W_STRICT, T], "auto", None)
        tag = json.loads(spec.structural_tag)
        assert tag["format"]["type"] == "triggered_tags"
        _compiles(spec)
    for parser in ("mistral", "pythonic"):
        assert get_tool_parser(parser).grammar([W_STRICT, T], "auto", None) is None


def test_hermes_grammar_is_vllms():
    pytest.importorskip("xgrammar")
    p = get_tool_parser("hermes")
    tag = json.loads(p.grammar([W_STRICT, T], "required", None).structural_tag)["format"]
    assert tag["type"] == "tags_with_separator" and tag["at_least_one"] and not tag["stop_after_first"]
    begins = [t["begin"] for t in tag["tags"]]
    assert begins == [
        '<tool_call>\n{"name": "get_weather", "arguments": ',
        '<tool_call>{"name": "get_weather", "arguments": ',
        '<tool_call>\n{"name": "get_time", "arguments": ',
        '<tool_call>{"name": "get_time", "arguments": ',
    ]
    # strict: the parameters schema; not strict: any JSON
    assert tag["tags"][0]["content"]["json_schema"] == W["function"]["parameters"]
    assert tag["tags"][2]["content"]["json_schema"] is True
    named = json.loads(p.grammar([W, T], {"type": "function", "function": {"name": "get_time"}}, None).structural_tag)[
        "format"
    ]
    assert named["stop_after_first"] and {t["begin"].split('"')[3] for t in named["tags"]} == {"get_time"}
    single = json.loads(p.grammar([W, T], "required", False).structural_tag)["format"]
    assert single["stop_after_first"]


def test_generic_json_form():
    p = get_tool_parser("pythonic")
    schema = p.grammar([W, T], "required", False).json
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert (
        p.grammar([W, T], {"type": "function", "function": {"name": "get_weather"}}, None).json
        == W["function"]["parameters"]
    )
    assert p.parse_constrained('[{"name": "get_weather", "parameters": {"city": "Paris"}}]', "required") == [CALL_W]
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert p.parse_constrained('{"city": "Paris"}', named) == [FunctionCall("get_weather", '{"city": "Paris"}')]


# -- request checks and answers ------------------------------------------------------------


@pytest.mark.parametrize(
    "tools,choice,param",
    [
        ([], None, "tools"),
        ([{"type": "code_interpreter"}], None, "tools[0].type"),
        ([{"type": "function", "function": {}}], None, "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], None, "tools[0].function.strict"),
        (None, "required", "tool_choice"),
        (None, "auto", "tool_choice"),
        ([W], "sometimes", "tool_choice"),
        ([W], {"type": "function"}, "tool_choice.function.name"),
        ([W], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ],
)
def test_check_tools_names_the_field(tools, choice, param):
    with pytest.raises(APIError) as e:
        check_tools(tools, choice)
    assert e.value.status == 400 and e.value.param == param


class _Req:
    def __init__(self, tools, tool_choice=None, parallel_tool_calls=None):
        self.tools, self.tool_choice, self.parallel_tool_calls = tools, tool_choice, parallel_tool_calls


def test_tool_calling_needs_the_server_flags():
    assert ToolCalling.for_request(_Req(None), None, False) is None
    assert ToolCalling.for_request(_Req([W], "none"), None, False) is None
    with pytest.raises(APIError, match="--enable-auto-tool-choice") as e:
        ToolCalling.for_request(_Req([W]), "hermes", False)
    assert e.value.param == "tool_choice"
    with pytest.raises(APIError, match="--tool-call-parser"):
        ToolCalling.for_request(_Req([W], "required"), None, True)
    assert ToolCalling.for_request(_Req([W], "required"), "hermes", False) is not None


def test_answers_follow_vllms_rules():
    pytest.importorskip("xgrammar")
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    auto = ToolCalling(get_tool_parser("hermes"), [W_STRICT, T], "auto", None)
    content, calls, called = auto.message(text)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"] and called
    assert auto.finish_reason("stop", True) == "tool_calls" and auto.finish_reason("length", False) == "length"
    assert auto.message("plain") == ("plain", [], False)
    required = ToolCalling(get_tool_parser("hermes"), [W, T], "required", False)
    content, calls, _ = required.message(text)
    assert content == "" and len(calls) == 1  # parallel_tool_calls false keeps the first
    assert required.finish_reason("stop", True) == "tool_calls" and required.finish_reason("length", True) == "length"
    named = ToolCalling(
        get_tool_parser("pythonic"), [W, T], {"type": "function", "function": {"name": "get_time"}}, None
    )
    content, calls, called = named.message("{}")
    assert content == "" and calls[0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert named.finish_reason("stop", True) == "stop"  # OpenAI: named choice finishes with "stop"
