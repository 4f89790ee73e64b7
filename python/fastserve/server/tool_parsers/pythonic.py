"""`--tool-call-parser pythonic` (Llama 3.2 / 4 pythonic, ToolACE):

    [get_weather(city="Paris"), get_time(city="Paris", utc=true)]

The whole output must be one list of calls with keyword arguments of literal values (JSON's
null/true/false accepted); otherwise it is plain content. Required and named choice use the
generic JSON form (as vLLM does for this parser)."""

from __future__ import annotations

import ast
import re

from .base import FunctionCall, ToolParser, dumps_arguments

_NAMES = {"null": None, "true": True, "false": False}
_PATTERN = re.compile(r"\s*\[\s*[A-Za-z_][\w.]*\(")


class _NotACall(Exception):
    pass


def _value(node: ast.expr):
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (str, int, float)):
            return node.value
        raise _NotACall
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, (int, float))
    ):
        return -node.operand.value
    if isinstance(node, ast.Dict):
        if not all(isinstance(k, ast.Constant) for k in node.keys):
            raise _NotACall
        return {k.value: _value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(v) for v in node.elts]
    raise _NotACall


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise _NotACall


def _calls(text: str) -> list[FunctionCall] | None:
    if not _PATTERN.match(text):
        return None
    try:
        module = ast.parse(text.strip())
    except SyntaxError:
        return None
    if len(module.body) != 1 or not isinstance(module.body[0], ast.Expr):
        return None
    lst = module.body[0].value
    if not isinstance(lst, ast.List) or not lst.elts or not all(isinstance(e, ast.Call) for e in lst.elts):
        return None
    calls = []
    try:
        for c in lst.elts:
            if c.args or any(k.arg is None for k in c.keywords):  # positional or **kwargs: not a tool call
                return None
            calls.append(FunctionCall(_dotted(c.func), dumps_arguments({k.arg: _value(k.value) for k in c.keywords})))
    except _NotACall:
        return None
    return calls


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        calls = _calls(text)
        return (None, calls) if calls else (text, [])

    def extract_partial(self, text: str) -> tuple[str, list[FunctionCall]]:
        head = text.lstrip()
        if not head or head.startswith("["):
            calls = _calls(text) if head.rstrip().endswith("]") else None
            return "", calls or []
        return text, []  # not a list of calls: plain content from the start
