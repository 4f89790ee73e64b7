"""The real SmolLM2-135M-Instruct under structured outputs: every answer parses and validates
against its JSON schema (jsonschema), and regex, choice and grammar answers match — greedy,
so each answer is the model's own best text within the grammar."""

from __future__ import annotations

import json
import re

import pytest
from fastserve.structured_outputs.params import StructuredOutputsParams
from real_smollm2 import smollm2_dir

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
pytestmark = pytest.mark.timeout(900)

# Free-form strings and numbers are bounded: a 135M model can loop inside an unbounded one.
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": -1000, "maximum": 100000},
        },
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string", "maxLength": 24},
                    "city": {"type": "string", "maxLength": 24},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": ["red", "green", "blue"]},
            "size": {"enum": ["S", "M", "L"]},
        },
        "required": ["color", "size"],
    },
    "array_bounds": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 2, "maxItems": 4}
        },
        "required": ["tags"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "product": {"type": "string", "maxLength": 24},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["product", "quantity"],
                },
            }
        },
        "required": ["items"],
    },
    "integer_bounds": {
        "type": "object",
        "properties": {
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "rating": {"type": "number", "minimum": 0, "maximum": 5},
        },
        "required": ["year", "rating"],
    },
    "booleans_and_null": {
        "type": "object",
        "properties": {"active": {"type": "boolean"}, "nickname": {"type": ["string", "null"], "maxLength": 24}},
        "required": ["active", "nickname"],
    },
    "pattern": {
        "type": "object",
        "properties": {
            "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        },
        "required": ["phone", "code"],
    },
    "string_length": {
        "type": "object",
        "properties": {"title": {"type": "string", "minLength": 3, "maxLength": 20}},
        "required": ["title"],
    },
    "no_extra": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": -1000, "maximum": 100000},
            "b": {"type": "string", "maxLength": 24},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "value": {
                "anyOf": [{"type": "integer", "minimum": -1000, "maximum": 100000}, {"type": "string", "maxLength": 10}]
            }
        },
        "required": ["value"],
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "number", "minimum": -1000, "maximum": 100000},
                    "y": {"type": "number", "minimum": -1000, "maximum": 100000},
                },
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "const_and_date": {
        "type": "object",
        "properties": {"kind": {"const": "event"}, "date": {"type": "string", "format": "date"}},
        "required": ["kind", "date"],
    },
    "top_level_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -1000, "maximum": 100000},
        "minItems": 3,
        "maxItems": 5,
    },
    "deep": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
                        "required": ["c"],
                    }
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
}


@pytest.fixture(scope="module")
def llm():
    from fastserve import LLM

    return LLM(str(smollm2_dir()), dtype="float32", device="cpu", max_model_len=1024)


def _sp(spec, max_tokens=150):
    from fastserve import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=spec)


def test_every_schema_validates(llm):
    names = list(SCHEMAS)
    convs = [
        [{"role": "user", "content": f"Reply with a JSON example of a {n.replace('_', ' ')} record."}] for n in names
    ]
    # compact JSON: the model's whitespace habits cannot eat the token budget
    params = [_sp(StructuredOutputsParams(json=SCHEMAS[n], disable_any_whitespace=True)) for n in names]
    outs = llm.chat(convs, params, use_tqdm=False)
    for name, out in zip(names, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (name, o.text)
        value = json.loads(o.text)
        jsonschema.validate(value, SCHEMAS[name])
        assert "\n" not in o.text  # compact: no whitespace between tokens of the JSON
    # any whitespace allowed by default (and then vLLM's answers: tests/test_vllm_parity.py)
    (out,) = llm.chat([convs[0]], _sp(StructuredOutputsParams(json=SCHEMAS["person"])), use_tqdm=False)
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS["person"])


def test_regex_choice_grammar(llm):
    prompts = [
        "My phone number is",
        "The answer (yes or no) is",
        "An arithmetic expression:",
        "A greeting:",
        "Today's date is",
    ]
    specs = [
        StructuredOutputsParams(regex=r" \(\d{3}\) \d{3}-\d{4}"),
        StructuredOutputsParams(choice=[" yes", " no"]),
        StructuredOutputsParams(
            grammar='root ::= " " num op num (op num)?\nop ::= "+" | "*"\nnum ::= [0-9] [0-9]? [0-9]?'
        ),
        StructuredOutputsParams(
            grammar='start: " " GREETING " " NAME\nGREETING: "hello" | "hi"\nNAME: /[A-Z][a-z]{1,8}/'
        ),
        StructuredOutputsParams(json={"type": "string", "format": "date"}),
    ]
    outs = llm.generate(prompts, [_sp(s, 40) for s in specs], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    assert re.fullmatch(r" \(\d{3}\) \d{3}-\d{4}", texts[0])
    assert texts[1] in (" yes", " no")
    assert re.fullmatch(r" [0-9]{1,3}[+*][0-9]{1,3}([+*][0-9]{1,3})?", texts[2])
    assert re.fullmatch(r" (hello|hi) [A-Z][a-z]{1,8}", texts[3])
    assert re.fullmatch(r'"\d{4}-\d{2}-\d{2}"', texts[4])
