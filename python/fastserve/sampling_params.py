"""SamplingParams: vLLM's sampling parameters, with vLLM's names, defaults and validation.

Validation lives here (not in Rust) so that every bad value becomes a `ValueError` naming the
field and the accepted range, the message a vLLM user already knows; `to_core()` then hands a
plain typed copy (`fastserve._core.RequestParams`) to the scheduler.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from fastserve.errors import InvalidRequest
from fastserve.structured_outputs.params import StructuredOutputsParams

__all__ = ["SamplingParams", "StructuredOutputsParams"]

# vLLM's bounds: below _SAMPLING_EPS a temperature means greedy; between it and _MAX_TEMP vLLM
# raises the temperature to _MAX_TEMP because logits / t overflows to inf/nan in half precision.
_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2

_FIELDS = (
    "n",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "bad_words",
    "ignore_eos",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "detokenize",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "truncate_prompt_tokens",
    "logit_bias",
    "allowed_token_ids",
    "structured_outputs",
)


def _int(name: str, value: Any, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    # bool is an int subclass; n=True is a caller bug, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
        kind = "an int or None" if optional else "an int"
        raise InvalidRequest(f"{name} must be {kind}, got {value!r} of type {type(value).__name__}.", name)
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            if isinstance(value, (np.floating, np.integer)):
                value = float(value)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise InvalidRequest(
                f"{name} must be a number, got {value!r} of type {type(value).__name__}.", name
            ) from None
    value = float(value)
    if math.isnan(value):
        raise InvalidRequest(f"{name} must be a number, got NaN.", name)
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}.", name)
    return value


def _str_list(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest(f"{name} must be a string or a list of strings, got {value!r}.", name)
    return list(value)


def _int_list(name: str, value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidRequest(f"{name} must be a list of ints, got {value!r}.", name)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidRequest(f"{name} must be a list of ints, got element {v!r}.", name)
        if not 0 <= v < 2**32:
            raise InvalidRequest(f"{name} must hold token ids in [0, 2**32), got {v}.", name)
        out.append(v)
    return out


def _logit_bias(value: Any) -> dict[int, float] | None:
    """{token id: bias}; keys may be ints or digit strings (OpenAI's JSON keys are strings)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"logit_bias must be a mapping of token id to bias, got {value!r}.", "logit_bias")
    out = {}
    for k, v in value.items():
        try:
            tok = int(k) if not isinstance(k, bool) else None
        except (TypeError, ValueError):
            tok = None
        if tok is None or tok < 0 or (isinstance(k, float) and k != tok):
            raise InvalidRequest(f"logit_bias keys must be token ids (non-negative integers), got {k!r}.", "logit_bias")
        out[tok] = _float(f"logit_bias[{k!r}]", v)
        if not math.isfinite(out[tok]):
            raise InvalidRequest(f"logit_bias values must be finite, got {v!r} for token {tok}.", "logit_bias")
    return out


class SamplingParams:
    """Sampling parameters for text generation, as in vLLM.

    n: number of output sequences returned for the prompt.
    best_of: sequences generated; the n with the highest cumulative logprob are returned
        (default n).
    presence_penalty / frequency_penalty: in [-2, 2]; subtracted once / per occurrence for
        tokens already generated.
    repetition_penalty: > 0; divides positive (multiplies negative) logits of tokens seen in the
        prompt or output; 1 is off.
    temperature: >= 0; 0 is greedy.  top_p: in (0, 1].  top_k: 0 or -1 is off, else >= 1.
    min_p: in [0, 1], relative to the most likely token.
    seed: per-request seed for reproducible sampling (-1 or None: none).
    stop / stop_token_ids / bad_words / ignore_eos / max_tokens (None: up to max_model_len) /
    min_tokens / logprobs / prompt_logprobs / detokenize / skip_special_tokens /
    spaces_between_special_tokens / include_stop_str_in_output / truncate_prompt_tokens: as in
    vLLM.
    logit_bias: {token id: bias} added to the logits before sampling (OpenAI's; the reported
        logprobs stay the model's raw ones, as in vLLM).
    allowed_token_ids: when set, the only tokens that may be sampled (vLLM's).
    structured_outputs: a StructuredOutputsParams (json schema, regex, choice, grammar,
        json_object or structural_tag) the output must match, enforced with xgrammar.
    """

    __slots__ = _FIELDS

    def __init__(
        self,
        n: int = 1,
        best_of: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        bad_words: Sequence[str] | None = None,
        ignore_eos: bool = False,
        max_tokens: int | None = 16,
        min_tokens: int = 0,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        detokenize: bool = True,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        truncate_prompt_tokens: int | None = None,
        logit_bias: dict[int, float] | None = None,
        allowed_token_ids: Sequence[int] | None = None,
        structured_outputs: StructuredOutputsParams | None = None,
    ) -> None:
        self.n = _int("n", n)
        self.best_of = _int("best_of", best_of, optional=True)
        self.presence_penalty = _float("presence_penalty", presence_penalty)
        self.frequency_penalty = _float("frequency_penalty", frequency_penalty)
        self.repetition_penalty = _float("repetition_penalty", repetition_penalty)
        self.temperature = _float("temperature", temperature)
        self.top_p = _float("top_p", top_p)
        self.top_k = _int("top_k", top_k)
        self.min_p = _float("min_p", min_p)
        seed = _int("seed", seed, optional=True)
        self.seed = None if seed == -1 else seed
        self.stop = _str_list("stop", stop)
        self.stop_token_ids = _int_list("stop_token_ids", stop_token_ids)
        self.bad_words = _str_list("bad_words", bad_words)
        self.ignore_eos = _bool("ignore_eos", ignore_eos)
        self.max_tokens = _int("max_tokens", max_tokens, optional=True)
        self.min_tokens = _int("min_tokens", min_tokens)
        # vLLM accepts logprobs=True as "the sampled token only" (OpenAI's boolean flag).
        self.logprobs = 1 if logprobs is True else _int("logprobs", logprobs, optional=True)
        self.prompt_logprobs = 1 if prompt_logprobs is True else _int("prompt_logprobs", prompt_logprobs, optional=True)
        self.detokenize = _bool("detokenize", detokenize)
        self.skip_special_tokens = _bool("skip_special_tokens", skip_special_tokens)
        self.spaces_between_special_tokens = _bool("spaces_between_special_tokens", spaces_between_special_tokens)
        self.include_stop_str_in_output = _bool("include_stop_str_in_output", include_stop_str_in_output)
        self.truncate_prompt_tokens = _int("truncate_prompt_tokens", truncate_prompt_tokens, optional=True)
        self.logit_bias = _logit_bias(logit_bias)
        self.allowed_token_ids = (
            None if allowed_token_ids is None else _int_list("allowed_token_ids", allowed_token_ids)
        )
        if self.allowed_token_ids == []:
            raise InvalidRequest(
                "allowed_token_ids must not be empty: leave it out to allow every token.", "allowed_token_ids"
            )
        if structured_outputs is not None and not isinstance(structured_outputs, StructuredOutputsParams):
            raise InvalidRequest(
                "structured_outputs must be a StructuredOutputsParams (from "
                "fastserve.sampling_params import StructuredOutputsParams), got "
                f"{type(structured_outputs).__name__}.",
                "structured_outputs",
            )
        self.structured_outputs = structured_outputs

        self._verify_args()
        if 0 < self.temperature < _MAX_TEMP and self.temperature >= _SAMPLING_EPS:
            self.temperature = _MAX_TEMP
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the filters cannot change an argmax, so they are reset (as vLLM does)
            # and the batch can take the greedy fast path.
            self.temperature = 0.0
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            self._verify_greedy_sampling()

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments where None means "the default" (an OpenAI request's
        omitted fields), unlike the constructor where None is a value for some fields."""
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def _verify_args(self) -> None:
        if self.n < 1:
            raise InvalidRequest(f"n must be at least 1, got {self.n}.", "n")
        if self.best_of is not None:
            if self.best_of < 1:
                raise InvalidRequest(f"best_of must be at least 1, got {self.best_of}.", "best_of")
            if self.best_of < self.n:
                raise InvalidRequest(
                    f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.", "best_of"
                )
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidRequest(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.", "presence_penalty"
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequest(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.", "frequency_penalty"
            )
        if not 0.0 < self.repetition_penalty < math.inf:
            raise InvalidRequest(
                f"repetition_penalty must be greater than zero (1 disables it), got {self.repetition_penalty}.",
                "repetition_penalty",
            )
        if not 0.0 <= self.temperature < math.inf:
            raise InvalidRequest(
                f"temperature must be non-negative and finite (0 is greedy), got {self.temperature}.", "temperature"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}.", "top_p")
        if self.top_k < -1:
            raise InvalidRequest(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}.", "min_p")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequest(f"seed must fit in 64 bits, got {self.seed}.", "seed")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")
        if self.min_tokens < 0:
            raise InvalidRequest(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.",
                "min_tokens",
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise InvalidRequest(f"logprobs must be non-negative, got {self.logprobs}.", "logprobs")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise InvalidRequest(
                f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.", "prompt_logprobs"
            )
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise InvalidRequest(
                f"truncate_prompt_tokens must be at least 1, got {self.truncate_prompt_tokens}.",
                "truncate_prompt_tokens",
            )
        if any(not s for s in self.stop):
            raise InvalidRequest("stop cannot contain an empty string.", "stop")
        if self.stop and not self.detokenize:
            raise InvalidRequest(
                "stop strings are only supported when detokenize is True. Set detokenize=True to use stop.", "stop"
            )
        if any(not w.strip() for w in self.bad_words):
            raise InvalidRequest("bad_words cannot contain an empty or whitespace-only string.", "bad_words")

    def _verify_greedy_sampling(self) -> None:
        # n identical greedy sequences are a wasted batch slot each; vLLM refuses them.
        if self.n > 1:
            raise InvalidRequest(f"n must be 1 when using greedy sampling (temperature=0), got {self.n}.", "n")
        if self.best_of is not None and self.best_of > 1:
            raise InvalidRequest(
                f"best_of must be 1 when using greedy sampling (temperature=0), got {self.best_of}.", "best_of"
            )

    @property
    def sampling_type(self) -> str:
        """ "greedy", "random_seed" or "random", like vLLM's SamplingType names."""
        if self.temperature < _SAMPLING_EPS:
            return "greedy"
        return "random" if self.seed is None else "random_seed"

    @property
    def all_stop_token_ids(self) -> set[int]:
        return set(self.stop_token_ids)

    def bad_words_token_ids(self, tokenizer: Any) -> list[list[int]]:
        """Token ids of each bad word, built like vLLM: encoded without special tokens as
        written (left-stripped) and again with a leading space, so that the word is banned at
        the start of the text and mid-text; the spaced form is kept only if it is a different
        word token of the same length (otherwise it is the same ban or a different split).

        `tokenizer` is a fastserve._core.Tokenizer or anything with
        `encode(text, add_special_tokens=...)` returning a list of ints."""
        out: list[list[int]] = []
        vocab_size = _vocab_size(tokenizer)
        for word in self.bad_words:
            plain: list[int] | None = None
            for prefix in ("", " "):
                ids = list(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
                if not ids:
                    raise InvalidRequest(f"bad_words entry {word!r} encodes to no tokens; remove it.", "bad_words")
                if plain is None:
                    plain = ids
                    out.append(ids)
                elif ids[0] != plain[0] and len(ids) == len(plain):
                    out.append(ids)
        if vocab_size is not None:
            invalid = [t for ids in out for t in ids if t < 0 or t >= vocab_size]
            if invalid:
                raise InvalidRequest(
                    f"bad_words encode to token ids {invalid} outside the tokenizer's vocabulary "
                    f"(size {vocab_size}); remove those words.",
                    "bad_words",
                )
        return out

    def to_core(self, tokenizer: Any = None, final_only: bool = False) -> Any:
        """The Rust core's typed copy (`fastserve._core.RequestParams`). A tokenizer is
        needed only when bad_words is set. `n` there is the number of sequences to run
        (best_of when set); top_k <= 0 means off; final_only: see Engine.add_request."""
        from fastserve._core import RequestParams

        if self.bad_words and tokenizer is None:
            raise InvalidRequest("bad_words needs a tokenizer: pass one to to_core(tokenizer).", "bad_words")
        bad_words_ids = self.bad_words_token_ids(tokenizer) if self.bad_words else []
        return RequestParams(
            n=self.best_of if self.best_of is not None else self.n,
            # The core has no "unbounded"; the engine caps it at max_model_len - prompt_len.
            max_tokens=self.max_tokens if self.max_tokens is not None else 2**31 - 1,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            # The core holds an i64; seeds up to 2**64 - 1 (torch's range) keep their bits.
            seed=self.seed - 2**64 if self.seed is not None and self.seed >= 2**63 else self.seed,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            bad_words_token_ids=bad_words_ids,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            detokenize=self.detokenize,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            final_only=final_only,
            vocab_bias=sorted(self.logit_bias.items()) if self.logit_bias else [],
            vocab_allow=list(self.allowed_token_ids or []),
            structured_output=self.structured_outputs is not None,
        )

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    def __copy__(self) -> SamplingParams:
        new = object.__new__(SamplingParams)
        for f in _FIELDS:
            v = getattr(self, f)
            object.__setattr__(new, f, list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        return new

    def __deepcopy__(self, memo: dict) -> SamplingParams:
        return self.__copy__()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SamplingParams):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in _FIELDS)

    __hash__ = None  # mutable, like vLLM's

    def __repr__(self) -> str:
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in _FIELDS)
        return f"SamplingParams({body})"

    def __getstate__(self) -> dict:
        return {f: getattr(self, f) for f in _FIELDS}

    def __setstate__(self, state: dict) -> None:
        for f in _FIELDS:
            # Pickles made before a field existed get its default.
            object.__setattr__(self, f, state.get(f))


def _vocab_size(tokenizer: Any) -> int | None:
    size = getattr(tokenizer, "vocab_size", None)
    try:
        # Hugging Face tokenizers count added tokens only in len(); fastserve's vocab_size
        # already includes them.
        size = max(size or 0, len(tokenizer))
    except TypeError:
        pass
    return size if size else None
