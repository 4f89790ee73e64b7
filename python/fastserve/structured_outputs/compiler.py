"""Grammar compilation with xgrammar, off the step loop: a thread pool compiles, an LRU of
futures keyed by the constraint caches (and de-duplicates in-flight compiles), and a bad
constraint comes back as a StructuredOutputsError naming its request field.

The xgrammar TokenizerInfo (the vocabulary as bytes, ~0.2-0.7 s for 50k-150k tokens) is
built once, on the first compile, in the pool."""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .params import MAX_SPEC_CHARS, StructuredOutputsError, StructuredOutputsParams, check_nesting

logger = logging.getLogger("fastserve")

# Compiled grammars kept (vLLM's VLLM_XGRAMMAR_CACHE_MB default is 512).
DEFAULT_CACHE_BYTES = 512 << 20
DEFAULT_CACHE_ENTRIES = 4096
# A compile running longer than this is reported as a 400 (a regex like (a+)+b explodes).
DEFAULT_COMPILE_TIMEOUT_S = 30.0


def xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise StructuredOutputsError(
            "structured outputs need the xgrammar package: pip install 'fastserve[structured]' "
            "(or pip install xgrammar)",
            "structured_outputs",
        ) from None
    return xgrammar


def load_tokenizer_info(tokenizer_dir: str, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's view of the vocabulary. `vocab_size` is the model's logits width (ids past
    the tokenizer's vocabulary are never allowed)."""
    xgr = xgrammar()
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"))
    return xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of `choices` (vLLM's choice_as_grammar)."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}

    def esc(s: str) -> str:
        return "".join(escapes.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in s)

    return "root ::= " + " | ".join(f'"{esc(c)}"' for c in choices)


def looks_like_lark(grammar: str) -> bool:
    """Lark rules are `name: ...`; EBNF/GBNF rules are `name ::= ...` (vLLM's heuristic)."""
    import re

    for line in grammar.split("\n"):
        line = re.sub(r"(#|//).*$", "", line).strip()
        if not line:
            continue
        if "::=" in line:
            return False
    return True


# xgrammar accepts these string formats; other formats would be silently unconstrained.
_STRING_FORMATS = {
    "email",
    "date",
    "time",
    "date-time",
    "duration",
    "ipv4",
    "ipv6",
    "hostname",
    "uuid",
    "uri",
    "uri-reference",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
}


def unsupported_json_feature(schema: Any) -> str | None:
    """The first JSON Schema feature xgrammar would not enforce (vLLM's list; it falls back
    to another backend there, fastserve refuses instead of ignoring it), or None."""
    if isinstance(schema, list):
        return next((r for r in map(unsupported_json_feature, schema) if r), None)
    if not isinstance(schema, dict):
        return None
    t = schema.get("type")
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    if types & {"integer", "number"} and "multipleOf" in schema:
        return "multipleOf"
    if "array" in types:
        for key in ("uniqueItems", "contains", "minContains", "maxContains"):
            if key in schema:
                return key
    if "string" in types:
        if "format" in schema and schema["format"] not in _STRING_FORMATS:
            return f"format {schema['format']!r}"
        if ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema):
            return "pattern or format together with minLength/maxLength"
    if "object" in types and "propertyNames" in schema:
        if "properties" in schema or "patternProperties" in schema:
            return "propertyNames together with properties or patternProperties"
    if "object" in types and isinstance(schema.get("patternProperties"), dict):
        if "properties" in schema or len(schema["patternProperties"]) > 1:
            return "patternProperties together with properties, or several patternProperties"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) >= 2:
        return "allOf with several branches"
    for v in schema.values():
        if isinstance(v, (dict, list)) and (r := unsupported_json_feature(v)):
            return r
    return None


class GrammarCompiler:
    """Compiles StructuredOutputsParams to xgrammar CompiledGrammars in a thread pool, cached
    by `StructuredOutputsParams.cache_key()`."""

    def __init__(
        self,
        tokenizer_dir: str,
        vocab_size: int,
        stop_token_ids: list[int],
        *,
        max_workers: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
    ) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        cpus = os.cpu_count() or 2
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers or max(1, min(4, (cpus + 1) // 2)), thread_name_prefix="fastserve-grammar"
        )
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple, Future] = collections.OrderedDict()
        self._cache_bytes = cache_bytes
        self._cache_entries = cache_entries
        self._info = None
        self._compiler = None
        self._init_lock = threading.Lock()
        # Reported by stats(): what compiling cost and how often the cache answered.
        self.num_compiled = 0
        self.num_cache_hits = 0
        self.compile_seconds = 0.0
        self.max_compile_seconds = 0.0
        self.tokenizer_info_seconds = 0.0

    # -- compiling --------------------------------------------------------------------------

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """A future of the CompiledGrammar (done at once when cached)."""
        key = spec.cache_key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[key] = fut
        # Outside the lock: a future already done runs its callback right here.
        fut.add_done_callback(lambda _f: self._evict())
        return fut

    def compile(self, spec: StructuredOutputsParams, timeout: float | None = DEFAULT_COMPILE_TIMEOUT_S):
        """Blocking: the CompiledGrammar, or StructuredOutputsError."""
        fut = self.submit(spec)
        try:
            return fut.result(timeout)
        except TimeoutError:
            raise StructuredOutputsError(
                f"compiling the {spec.kind} constraint took longer than {timeout:.0f} s; simplify it", spec.param
            ) from None

    def _evict(self) -> None:
        with self._lock:
            total = 0
            sizes = []
            for key, fut in self._cache.items():
                size = 0
                if fut.done() and fut.exception() is None:
                    size = int(getattr(fut.result(), "memory_size_bytes", 0) or 0)
                sizes.append((key, fut, size))
                total += size
            for key, fut, size in sizes:
                if total <= self._cache_bytes and len(self._cache) <= self._cache_entries:
                    break
                if fut.done():
                    del self._cache[key]
                    total -= size

    def _ensure_compiler(self):
        with self._init_lock:
            if self._compiler is None:
                xgr = xgrammar()
                t0 = time.perf_counter()
                self._info = load_tokenizer_info(self.tokenizer_dir, self.vocab_size, self.stop_token_ids)
                self.tokenizer_info_seconds = time.perf_counter() - t0
                # The cache is ours (keyed by the constraint, bounded): xgrammar's would hold a
                # second copy of every grammar.
                self._compiler = xgr.GrammarCompiler(
                    self._info, max_threads=min(8, os.cpu_count() or 2), cache_enabled=False
                )
                logger.info(
                    "structured outputs: xgrammar tokenizer info built in %.2f s (vocab %d, %s)",
                    self.tokenizer_info_seconds,
                    self.vocab_size,
                    self._info.vocab_type,
                )
            return self._compiler

    def _compile(self, spec: StructuredOutputsParams):
        compiler = self._ensure_compiler()
        t0 = time.perf_counter()
        try:
            out = self._build(compiler, spec)
        except StructuredOutputsError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar's parse errors: the request's constraint is bad
            raise StructuredOutputsError(f"the {spec.kind} constraint is invalid: {_clean(e)}", spec.param) from None
        dt = time.perf_counter() - t0
        with self._lock:
            self.num_compiled += 1
            self.compile_seconds += dt
            self.max_compile_seconds = max(self.max_compile_seconds, dt)
        return out

    def _build(self, compiler, spec: StructuredOutputsParams):
        kind, param = spec.kind, spec.param
        if spec.whitespace_pattern is not None:
            raise StructuredOutputsError(
                "whitespace_pattern is not supported by the xgrammar backend; use disable_any_whitespace",
                "structured_outputs.whitespace_pattern",
            )
        text = spec.spec_text()
        if len(text) > MAX_SPEC_CHARS:
            raise StructuredOutputsError(
                f"the {kind} constraint is {len(text)} characters long; at most {MAX_SPEC_CHARS} are allowed", param
            )
        if kind in ("json", "json_object"):
            if kind == "json_object":
                if spec.json_object is not True:
                    raise StructuredOutputsError("json_object must be true", param)
                schema: Any = {"type": "object"}
            elif isinstance(spec.json, str):
                try:
                    schema = json.loads(spec.json)
                except json.JSONDecodeError as e:
                    raise StructuredOutputsError(f"the JSON schema is not valid JSON: {e}", param) from None
            else:
                schema = spec.json
            if not isinstance(schema, (dict, bool)):
                raise StructuredOutputsError("a JSON schema must be a JSON object (or true/false)", param)
            check_nesting(schema, param)
            if (feature := unsupported_json_feature(schema)) is not None:
                raise StructuredOutputsError(
                    f"the JSON schema uses {feature}, which the xgrammar backend cannot enforce; remove it", param
                )
            compact = spec.disable_any_whitespace
            return compiler.compile_json_schema(
                json.dumps(schema, ensure_ascii=False),
                any_whitespace=not compact,
                separators=(",", ":") if compact else None,
            )
        if kind == "regex":
            if not isinstance(spec.regex, str) or not spec.regex:
                raise StructuredOutputsError("regex must be a non-empty string", param)
            if "\x00" in spec.regex:
                raise StructuredOutputsError("regex must not contain a NUL character", param)
            return compiler.compile_regex(spec.regex)
        if kind == "choice":
            choices = spec.choice
            if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
                raise StructuredOutputsError("choice must be a non-empty list of strings", param)
            return compiler.compile_grammar(choice_grammar(list(choices)))
        if kind == "grammar":
            if not isinstance(spec.grammar, str) or not spec.grammar.strip():
                raise StructuredOutputsError("grammar must be a non-empty string", param)
            if looks_like_lark(spec.grammar):
                return compiler.compile_lark(spec.grammar)
            return compiler.compile_grammar(spec.grammar)
        # structural_tag: xgrammar's JSON format, or the older {"structures", "triggers"} one.
        try:
            tag = json.loads(spec.structural_tag)
        except (TypeError, json.JSONDecodeError) as e:
            raise StructuredOutputsError(f"structural_tag must be JSON text: {e}", param) from None
        check_nesting(tag, param)
        if isinstance(tag, dict) and "structures" in tag:
            xgr = xgrammar()
            try:
                items = [
                    xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                    for s in tag["structures"]
                ]
                triggers = list(tag["triggers"])
            except (KeyError, TypeError) as e:
                raise StructuredOutputsError(
                    f"structural_tag's structures need begin, schema and end, and triggers a list: {e!r}", param
                ) from None
            return compiler.compile_structural_tag(items, triggers)
        return compiler.compile_structural_tag(spec.structural_tag)

    # -- the rest ---------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            return {
                "num_compiled": self.num_compiled,
                "num_cache_hits": self.num_cache_hits,
                "compile_seconds": self.compile_seconds,
                "max_compile_seconds": self.max_compile_seconds,
                "tokenizer_info_seconds": self.tokenizer_info_seconds,
                "cache_entries": len(self._cache),
            }

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _clean(e: BaseException) -> str:
    import re

    # xgrammar prefixes its C++ errors with "[hh:mm:ss] /project/cpp/file.cc:123: ".
    msg = re.sub(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(e).strip()) or type(e).__name__
    return msg if len(msg) <= 2000 else msg[:2000] + "..."
