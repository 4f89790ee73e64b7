"""StructuredOutputsParams: vLLM's constraint description (`vllm.sampling_params.
StructuredOutputsParams`), same fields and rules, plus the canonical key grammars are cached by.

Exactly one constraint is set: `json` (a JSON Schema, dict or text), `regex`, `choice` (a list
of strings), `grammar` (EBNF/GBNF, or Lark), `json_object` (any JSON object) or
`structural_tag` (xgrammar's structural-tag JSON)."""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

from fastserve.errors import InvalidRequest

CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

# vLLM's check_json_nesting bound: deeper schemas make the converter recurse for ever.
MAX_SCHEMA_DEPTH = 64
# A schema, grammar or regex larger than this is refused before it reaches the compiler.
MAX_SPEC_CHARS = 1 << 20


class StructuredOutputsError(InvalidRequest):
    """A constraint that cannot be compiled; `field` names the request field it came from
    (response_format, structured_outputs, guided_json...: the same name offline and on the wire)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param)

    @property
    def param(self) -> str | None:
        return self.field


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    # The request field each constraint came from (the 400 names it); not part of the key.
    _param: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise StructuredOutputsError(
                f"give one kind of structured-outputs constraint, not {' and '.join(given)}",
                self._param or "structured_outputs",
            )
        if not given:
            raise StructuredOutputsError(
                f"structured_outputs needs one constraint: one of {', '.join(CONSTRAINTS)}",
                self._param or "structured_outputs",
            )

    @property
    def kind(self) -> str:
        return next(name for name in CONSTRAINTS if getattr(self, name) is not None)

    @property
    def param(self) -> str:
        """The request field a failure of this constraint is blamed on."""
        return self._param or f"structured_outputs.{self.kind}"

    def spec_text(self) -> str:
        """The constraint as text (a dict schema serialized in its own key order: xgrammar
        emits properties in schema order, so sorting would change the output)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            return value if isinstance(value, str) else _json.dumps(value, ensure_ascii=False)
        if kind == "choice":
            return _json.dumps(list(value), ensure_ascii=False)
        if kind == "json_object":
            return ""
        return value

    def cache_key(self) -> tuple:
        """Equal for constraints that compile to the same grammar."""
        return (self.kind, self.spec_text(), self.disable_any_whitespace, self.whitespace_pattern)

    def __reduce__(self):
        # Pickled to data-parallel replicas with the param hint kept.
        state = {
            name: getattr(self, name)
            for name in (*CONSTRAINTS, "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")
        }
        return (_rebuild, (state, self._param))


def _rebuild(state: dict, param: str | None) -> StructuredOutputsParams:
    return StructuredOutputsParams(**state, _param=param)


def check_nesting(value: Any, param: str, depth: int = 0) -> None:
    """A JSON value nested deeper than MAX_SCHEMA_DEPTH is refused (vLLM's rule)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise StructuredOutputsError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it", param)
    if isinstance(value, dict):
        for v in value.values():
            check_nesting(v, param, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_nesting(v, param, depth + 1)
