"""Type stubs for fastserve._core, the Rust core: the contract between Rust and Python.

Everything the GPU needs per step comes out of `Scheduler.schedule()` as one `Batch` of flat,
contiguous numpy arrays (moved out of Rust `Vec`s, never copied element by element);
everything the engine reports comes back from `Scheduler.update()` as one `StepOutputs` of
columns (a list of request ids, numpy arrays, one text buffer), not an object per sequence.
"""

from collections.abc import Iterator, Sequence
from typing import final

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = [
    "__version__",
    "Tokenizer",
    "Detokenizer",
    "RequestParams",
    "Batch",
    "StepOutput",
    "StepOutputs",
    "FinishedOutput",
    "Scheduler",
]

@final
class Tokenizer:
    """A Hugging Face tokenizer directory: tokenizer.json plus tokenizer_config.json and
    (optional) generation_config.json / config.json for BOS/EOS and special tokens."""

    def __new__(cls, path: str) -> Tokenizer: ...
    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus added tokens (may be below the model's embedding rows)."""
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def bos_token(self) -> str | None: ...
    @property
    def eos_token(self) -> str | None: ...
    @property
    def eos_token_ids(self) -> list[int]:
        """Union, in order, of tokenizer_config `eos_token` and generation_config / config
        `eos_token_id` (int or list): Llama 3 has 128001 and 128009, Qwen 151645 and 151643."""
    @property
    def pad_token_id(self) -> int | None: ...
    @property
    def chat_template(self) -> str | None:
        """`chat_template` from tokenizer_config.json (or chat_template.jinja beside it)."""
    @property
    def special_token_ids(self) -> list[int]:
        """Ids of added tokens marked special (skipped by skip_special_tokens)."""
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Releases the GIL while encoding (the crate encodes in parallel)."""
    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    def token_to_id(self, token: str) -> int | None: ...

@final
class Detokenizer:
    """Incremental detokenizer and stop-string matcher for one output sequence.

    @property
    def Invariant(self) -> the concatenation of every delta returned by push() followed by flush(): ...
    equals tokenizer.decode(output_ids, ...) (cut at the stop string when one matched).
    Text that could be the start of a stop string, or an incomplete UTF-8 sequence, is held
    back; emitted text is never retracted."""

    def __new__(
        cls,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = ...,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = ...,
        include_stop_str_in_output: bool = False,
    ) -> Detokenizer: ...
    def push(self, token_id: int) -> tuple[str, str | None]:
        """Append one generated token; returns (text delta now safe to emit, the stop string
        matched by this token or None). After a match the sequence is finished: the text ends
        just before the stop string (or just after it with include_stop_str_in_output)."""
    def flush(self) -> str:
        """At finish (no stop string matched): whatever was held back."""
    @property
    def text(self) -> str:
        """All text emitted so far."""

@final
class RequestParams:
    """A plain typed copy of the SamplingParams fields the core needs. Validation with
    user-facing messages happens in Python (fastserve.sampling_params.SamplingParams); the
    core's own range checks raise fastserve.errors.InvalidRequest naming the field."""

    def __new__(
        cls,
        *,
        n: int = 1,
        max_tokens: int = 16,
        min_tokens: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = ...,
        stop_token_ids: Sequence[int] = ...,
        bad_words_token_ids: Sequence[Sequence[int]] = ...,
        ignore_eos: bool = False,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        detokenize: bool = True,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        final_only: bool = False,
        vocab_bias: Sequence[tuple[int, float]] = ...,
        vocab_allow: Sequence[int] = ...,
        structured_output: bool = False,
    ) -> RequestParams:
        """`n` here is the number of sequences to run (best_of when set); top_k <= 0 is off.
        final_only: report the request's sequences only when they finish (vLLM's FINAL_ONLY
        output kind), with their whole text, instead of a row per step.
        structured_output: a grammar constrains the request (see
        Scheduler.pending_structured_samples)."""
    @property
    def n(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def min_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def min_p(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop(self) -> list[str]: ...
    @property
    def stop_token_ids(self) -> list[int]: ...
    @property
    def bad_words_token_ids(self) -> list[list[int]]: ...
    @property
    def ignore_eos(self) -> bool: ...
    @property
    def include_stop_str_in_output(self) -> bool: ...
    @property
    def skip_special_tokens(self) -> bool: ...
    @property
    def spaces_between_special_tokens(self) -> bool: ...
    @property
    def detokenize(self) -> bool: ...
    @property
    def logprobs(self) -> int | None: ...
    @property
    def prompt_logprobs(self) -> int | None: ...
    @property
    def final_only(self) -> bool: ...
    @property
    def vocab_bias(self) -> list[tuple[int, float]]: ...
    @property
    def vocab_allow(self) -> list[int]: ...
    @property
    def structured_output(self) -> bool: ...

@final
class Batch:
    """One step's work. Sequences are rows 0..num_seqs; decodes (query length 1) come first,
    rows 0..num_decodes. Tokens are laid out sequence after sequence.
    "Samples" are rows of the sampler: one per sequence whose scheduled tokens reach the end
    of its known tokens (a finished prefill chunk or a decode). When a request with n > 1
    finishes its prompt, its logits row is repeated n times in logits_indices (one sample per
    child sequence), so num_samples may exceed the number of sampling sequences."""

    @property
    def num_seqs(self) -> int: ...  # B
    @property
    def num_tokens(self) -> int: ...  # T
    @property
    def num_samples(self) -> int: ...  # S
    @property
    def num_decodes(self) -> int: ...  # D
    @property
    def max_query_len(self) -> int: ...
    @property
    def max_seq_len(self) -> int: ...
    # model inputs
    @property
    def input_ids(self) -> npt.NDArray[np.int64]: ...  # [T]
    @property
    def positions(self) -> npt.NDArray[np.int64]: ...  # [T]
    @property
    def slot_mapping(self) -> npt.NDArray[np.int64]: ...  # [T] block_id * block_size + offset
    @property
    def query_start_loc(self) -> npt.NDArray[np.int32]: ...  # [B + 1]
    @property
    def seq_lens(self) -> npt.NDArray[np.int32]: ...  # [B] context (cached + new) length after this step
    @property
    def block_tables(self) -> npt.NDArray[np.int32]: ...  # [B, max_blocks] padded with 0 past each table
    @property
    def logits_indices(self) -> npt.NDArray[np.int64]: ...  # [S] token index (into T) whose logits are sampled

    # sampling: the worker keeps each sequence's sampler state by sequence slot
    # (worker/sampler_state.py); a step names the slot and the output count of each row
    @property
    def sample_seq_slots(self) -> npt.NDArray[np.int32]: ...  # [S]
    @property
    def sample_steps(self) -> npt.NDArray[np.int64]: ...  # [S] output tokens the sequence has so far (RNG counter)
    # rows of children 1..n of a prompt finishing this step (the parent's slot, own seed)
    @property
    def fork_sample_rows(self) -> npt.NDArray[np.int64]: ...  # [F]
    @property
    def fork_seeds(self) -> npt.NDArray[np.int64]: ...  # [F]
    # (sample row, token) pairs banned this step alone: multi-token bad words whose prefix
    # the sequence's outputs end with
    @property
    def banned_rows(self) -> npt.NDArray[np.int64]: ...  # [K]
    @property
    def banned_token_ids(self) -> npt.NDArray[np.int64]: ...  # [K]

    # sequences new to the worker (first scheduled, or forked children): their state, once
    @property
    def new_seq_slots(self) -> npt.NDArray[np.int32]: ...  # [N]
    @property
    def new_temperature(self) -> npt.NDArray[np.float32]: ...  # [N] 0 = greedy
    @property
    def new_top_p(self) -> npt.NDArray[np.float32]: ...
    @property
    def new_top_k(self) -> npt.NDArray[np.int32]: ...  # <= 0 off
    @property
    def new_min_p(self) -> npt.NDArray[np.float32]: ...
    @property
    def new_presence_penalty(self) -> npt.NDArray[np.float32]: ...
    @property
    def new_frequency_penalty(self) -> npt.NDArray[np.float32]: ...
    @property
    def new_repetition_penalty(self) -> npt.NDArray[np.float32]: ...
    @property
    def new_seeds(self) -> npt.NDArray[np.int64]: ...  # the request's seed (or one drawn from the scheduler's
    # seeded RNG), mixed with the child index for n > 1
    @property
    def new_num_logprobs(self) -> npt.NDArray[np.int32]: ...  # -1 = none
    @property
    def new_min_tokens(self) -> npt.NDArray[np.int32]: ...
    # CSR by new sequence ([N + 1] offsets): prompt tokens (repetition penalty only), outputs
    # so far (any penalty), single-token bad words, ids banned below min_tokens
    @property
    def new_prompt_offsets(self) -> npt.NDArray[np.int32]: ...
    @property
    def new_prompt_token_ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def new_output_offsets(self) -> npt.NDArray[np.int32]: ...
    @property
    def new_output_token_ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def new_ban_offsets(self) -> npt.NDArray[np.int32]: ...
    @property
    def new_ban_token_ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def new_min_ban_offsets(self) -> npt.NDArray[np.int32]: ...
    @property
    def new_min_ban_token_ids(self) -> npt.NDArray[np.int64]: ...
    # CSR by new sequence: (token, value) logit biases; the allow-list (empty: every token)
    @property
    def new_bias_offsets(self) -> npt.NDArray[np.int32]: ...
    @property
    def new_bias_token_ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def new_bias_values(self) -> npt.NDArray[np.float32]: ...
    @property
    def new_allow_offsets(self) -> npt.NDArray[np.int32]: ...
    @property
    def new_allow_token_ids(self) -> npt.NDArray[np.int64]: ...
    # sequence slots released since the last batch that ran
    @property
    def freed_seq_slots(self) -> npt.NDArray[np.int32]: ...

    # prompt logprobs: token indices (into T) whose next-token logprob is wanted, the token
    # that follows each, and the sequence row it belongs to
    @property
    def prompt_logprob_indices(self) -> npt.NDArray[np.int64]: ...  # [P]
    @property
    def prompt_logprob_targets(self) -> npt.NDArray[np.int64]: ...  # [P]
    @property
    def prompt_logprob_rows(self) -> npt.NDArray[np.int32]: ...  # [P]
    def request_id(self, row: int) -> str:
        """Request id of sequence row `row` (for the rare per-request paths: prompt logprobs).
        RuntimeError once this batch's update() has run: rows name request slots, which
        update() may release."""
    def sample_request_id(self, sample: int) -> str: ...

@final
class FinishedOutput:
    """A sequence that finished (or was aborted), reported once."""

    @property
    def request_id(self) -> str: ...
    @property
    def sample_index(self) -> int: ...
    @property
    def finish_reason(self) -> str: ...  # "stop" | "length" | "abort"
    @property
    def stop_reason(self) -> int | str | None: ...  # the stop string or stop token id; None for EOS/length
    @property
    def text(self) -> str: ...  # the whole output for a final_only request; "" otherwise (rows carried it)
    @property
    def token_ids(self) -> list[int]: ...  # every output token
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_cached_tokens(self) -> int: ...
    @property
    def first_token_time(self) -> float | None: ...  # the `now` of the update() that appended the first token

@final
class StepOutputs:
    """One update(), as columns: row j is one sequence (of a request without final_only)
    that got a token this step. A Python loop over rows is for the caller that streams;
    iteration and indexing build a StepOutput per sequence (tests, simple callers)."""

    @property
    def num_new_tokens(self) -> int: ...  # tokens appended this step, reported as rows or not
    @property
    def num_rows(self) -> int: ...
    @property
    def request_ids(self) -> list[str]: ...  # [R]
    @property
    def sample_indices(self) -> npt.NDArray[np.int32]: ...  # [R] 0..n-1: which child sequence of the request
    @property
    def sample_rows(self) -> npt.NDArray[np.int32]: ...  # [R] the batch's sample row of the token (logprobs)
    @property
    def token_ids(self) -> npt.NDArray[np.int64]: ...  # [R]
    @property
    def text(self) -> str: ...  # the rows' text deltas, concatenated
    @property
    def text_offsets(self) -> npt.NDArray[np.int64]: ...  # [R + 1] code-point offsets into text
    @property
    def finished(self) -> list[FinishedOutput]: ...  # every sequence that finished, with a row or not
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> StepOutput: ...
    def __iter__(self) -> Iterator[StepOutput]: ...

@final
class StepOutput:
    """One sequence's output of one step (a view built from StepOutputs)."""

    @property
    def request_id(self) -> str: ...
    @property
    def sample_index(self) -> int: ...  # 0..n-1: which child sequence of the request
    @property
    def sample_row(self) -> int: ...  # this step's sample row of the new token (for its logprobs); -1 if none
    @property
    def new_token_ids(self) -> list[int]: ...  # all of them for a final_only sequence, [] for an abort
    @property
    def text_delta(self) -> str: ...
    @property
    def finished(self) -> bool: ...
    @property
    def finish_reason(self) -> str | None: ...  # "stop" | "length" | "abort"
    @property
    def stop_reason(self) -> int | str | None: ...  # the stop string or stop token id; None for EOS/length
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_cached_tokens(self) -> int: ...  # prompt tokens served from the prefix cache

@final
class Scheduler:
    def __new__(
        cls,
        *,
        num_blocks: int,
        max_model_len: int,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_num_sample_rows: int | None = None,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        tokenizer: Tokenizer | None = None,
        eos_token_ids: Sequence[int] = ...,
        seed: int | None = 0,
    ) -> Scheduler: ...
    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int] | npt.NDArray[np.integer], params: RequestParams
    ) -> None:
        """fastserve.errors.InvalidRequest (a ValueError; `.field` names the parameter) for a
        duplicate id, an empty or too long prompt, more sequences than max_num_sample_rows,
        stop strings without a tokenizer, or a request the KV cache could never hold."""
    def abort_request(self, request_id: str) -> bool:
        """Frees every block of the request at once; True if it was known. Its sequences come
        back in the next update()'s `finished` (finish_reason "abort")."""
    def schedule(self) -> Batch | None:
        """None when nothing is runnable. A Batch never exceeds max_num_seqs rows,
        max_num_batched_tokens tokens or max_num_sample_rows sample rows (default
        max_num_seqs + 128): work past a limit waits for a later step."""
    def discard_pending(self) -> bool:
        """Drops the pending Batch unrun (the worker refused it): its sequences keep their
        blocks and computed tokens and are scheduled again. True if one was pending."""
    def update(self, sampled_token_ids: npt.NDArray[np.int64], now: float = 0.0) -> StepOutputs:
        """One sampled id per sample row of the last Batch. Appends, detokenizes, checks
        stop strings / stop ids / EOS / max_tokens / max_model_len, frees finished blocks.
        `now` stamps each sequence's first token (FinishedOutput.first_token_time)."""
    def pending_structured_samples(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
        """(sample rows [C], sample indices [C]) of the pending batch's grammar-constrained
        requests, in sample-row order (a prompt finishing for n > 1 gives indices 0..n);
        Batch.sample_request_id(row) names each row's request. Empty without a pending batch."""
    def has_unfinished(self) -> bool: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_total_blocks(self) -> int: ...
    @property
    def num_preemptions(self) -> int: ...
    @property
    def max_num_seqs(self) -> int: ...
    @property
    def max_num_batched_tokens(self) -> int: ...
    @property
    def max_num_sample_rows(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def prefix_cache_queried_tokens(self) -> int: ...
    @property
    def prefix_cache_hit_tokens(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS ids followed by the eos_token_ids given (deduplicated)."""
    def reset_prefix_cache(self) -> bool:
        """Drops the prefix cache (only when no block is in use); True if it was reset."""
    def check_invariants(self) -> None:
        """Verifies the block bookkeeping; RuntimeError naming the broken invariant."""
