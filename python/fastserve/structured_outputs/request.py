"""Every way a request asks for structured output, normalized to one StructuredOutputsParams:

    response_format      OpenAI's {"type": "json_object" | "json_schema" | "structural_tag" | "text"}
    structured_outputs   vLLM's {json, regex, choice, grammar, json_object, structural_tag, options}
    guided_*             vLLM's older top-level fields (guided_json, guided_regex, guided_choice,
                         guided_grammar, guided_decoding_backend, guided_whitespace_pattern)

Each error names the field it comes from; two spellings that both constrain the output are
a 400 rather than one silently winning."""

from __future__ import annotations

import json
from typing import Any

from .params import CONSTRAINTS, StructuredOutputsError, StructuredOutputsParams

_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")
# Older vLLM options, accepted: fastserve has no fallback backend to disable.
_ACCEPTED_LEGACY = ("disable_fallback",)
_BACKENDS = ("auto", "xgrammar")
GUIDED_FIELDS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
)


def _from_response_format(rf: Any) -> tuple[dict, str] | None:
    """(constraint kwargs, param) or None for plain text."""
    if not isinstance(rf, dict):
        raise StructuredOutputsError("response_format must be an object with a `type`", "response_format")
    kind = rf.get("type")
    if kind in (None, "text"):
        if kind is None:
            raise StructuredOutputsError(
                "response_format needs a `type`: text, json_object, json_schema or structural_tag",
                "response_format.type",
            )
        return None
    if kind == "json_object":
        return {"json_object": True}, "response_format"
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise StructuredOutputsError(
                "response_format of type json_schema needs a `json_schema` object holding the `schema`",
                "response_format.json_schema",
            )
        schema = js.get("schema", js.get("json_schema"))
        if schema is None:
            raise StructuredOutputsError("response_format.json_schema needs a `schema`", "response_format.json_schema")
        if not isinstance(schema, (dict, str, bool)):
            raise StructuredOutputsError(
                "response_format.json_schema.schema must be a JSON Schema object", "response_format.json_schema.schema"
            )
        return {"json": schema}, "response_format"
    if kind == "structural_tag":
        return {"structural_tag": json.dumps(rf, ensure_ascii=False)}, "response_format"
    raise StructuredOutputsError(
        f"response_format.type must be text, json_object, json_schema or structural_tag, got {kind!r}",
        "response_format.type",
    )


def _from_structured_outputs(so: Any) -> tuple[dict, dict]:
    """(constraint kwargs, option kwargs)."""
    if not isinstance(so, dict):
        raise StructuredOutputsError('structured_outputs must be an object, e.g. {"json": {...}}', "structured_outputs")
    unknown = sorted(set(so) - set(CONSTRAINTS) - set(_OPTIONS) - set(_ACCEPTED_LEGACY))
    if unknown:
        raise StructuredOutputsError(
            f"structured_outputs has unknown field {unknown[0]!r}; known: {', '.join((*CONSTRAINTS, *_OPTIONS))}",
            f"structured_outputs.{unknown[0]}",
        )
    constraint = {k: so[k] for k in CONSTRAINTS if so.get(k) is not None}
    if isinstance(constraint.get("structural_tag"), dict):
        constraint["structural_tag"] = json.dumps(constraint["structural_tag"], ensure_ascii=False)
    for k in ("regex", "grammar", "structural_tag"):
        if k in constraint and not isinstance(constraint[k], str):
            raise StructuredOutputsError(f"structured_outputs.{k} must be a string", f"structured_outputs.{k}")
    if "choice" in constraint and not (
        isinstance(constraint["choice"], list) and all(isinstance(c, str) for c in constraint["choice"])
    ):
        raise StructuredOutputsError("structured_outputs.choice must be a list of strings", "structured_outputs.choice")
    if "json_object" in constraint and constraint["json_object"] is not True:
        raise StructuredOutputsError("structured_outputs.json_object must be true", "structured_outputs.json_object")
    options = {k: so[k] for k in _OPTIONS if so.get(k) is not None}
    for k in ("disable_any_whitespace", "disable_additional_properties"):
        if k in options and not isinstance(options[k], bool):
            raise StructuredOutputsError(f"structured_outputs.{k} must be true or false", f"structured_outputs.{k}")
    return constraint, options


def _from_guided(fields: dict[str, Any]) -> tuple[dict, dict, str | None]:
    """(constraint kwargs, option kwargs, the field named)."""
    constraint, options, param = {}, {}, None
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = fields.get(name)
        if value is None:
            continue
        if constraint:
            raise StructuredOutputsError(f"give one guided_* constraint, not {param} and {name}", name)
        if key == "choice" and not (isinstance(value, list) and all(isinstance(c, str) for c in value)):
            raise StructuredOutputsError("guided_choice must be a list of strings", name)
        if key in ("regex", "grammar") and not isinstance(value, str):
            raise StructuredOutputsError(f"{name} must be a string", name)
        constraint[key], param = value, name
    backend = fields.get("guided_decoding_backend")
    if backend is not None:
        if not isinstance(backend, str):
            raise StructuredOutputsError("guided_decoding_backend must be a string", "guided_decoding_backend")
        name, _, opts = backend.partition(":")
        if name not in _BACKENDS:
            raise StructuredOutputsError(
                f"guided_decoding_backend {name!r} is not available: fastserve runs "
                f"xgrammar (use 'xgrammar' or 'auto')",
                "guided_decoding_backend",
            )
        for opt in filter(None, (o.strip() for o in opts.split(","))):
            if opt == "disable-any-whitespace":
                options["disable_any_whitespace"] = True
            elif opt in ("disable-additional-properties", "no-fallback"):
                pass  # xgrammar's strict mode already forbids extra properties; there is no fallback
            else:
                raise StructuredOutputsError(
                    f"guided_decoding_backend option {opt!r} is not supported", "guided_decoding_backend"
                )
    if fields.get("guided_whitespace_pattern") is not None:
        options["whitespace_pattern"] = fields["guided_whitespace_pattern"]
    return constraint, options, param


def structured_outputs_from_request(
    *, response_format: Any = None, structured_outputs: Any = None, guided: dict[str, Any] | None = None
) -> StructuredOutputsParams | None:
    """The request's constraint, or None when its output is free text."""
    rf = _from_response_format(response_format) if response_format is not None else None
    so_constraint, so_options = (
        _from_structured_outputs(structured_outputs) if structured_outputs is not None else ({}, {})
    )
    g_constraint, g_options, g_param = _from_guided(guided or {})
    sources = [
        (c, p)
        for c, p in (
            (rf[0] if rf else None, "response_format"),
            (so_constraint or None, "structured_outputs"),
            (g_constraint or None, g_param),
        )
        if c
    ]
    if len(sources) > 1:
        raise StructuredOutputsError(
            f"{sources[0][1]} and {sources[1][1]} both constrain the output; give one", sources[1][1]
        )
    options = {**g_options, **so_options}
    if "whitespace_pattern" in options:
        field = (
            "structured_outputs.whitespace_pattern"
            if "whitespace_pattern" in so_options
            else "guided_whitespace_pattern"
        )
        raise StructuredOutputsError(
            "whitespace_pattern is not supported by the xgrammar backend; use disable_any_whitespace", field
        )
    if not sources:
        if options or structured_outputs is not None:
            raise StructuredOutputsError(
                f"structured_outputs needs one constraint: one of {', '.join(CONSTRAINTS)}", "structured_outputs"
            )
        return None
    constraint, param = sources[0]
    if param == "structured_outputs":
        param = f"structured_outputs.{next(iter(constraint))}"
    return StructuredOutputsParams(**constraint, **options, _param=param)
