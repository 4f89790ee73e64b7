"""Type stubs for fastserve._core, the Rust core: the contract between Rust and Python.

Everything the GPU needs per step comes out of `Scheduler.schedule()` as one `Batch` of flat,
contiguous numpy arrays (moved out of Rust `Vec`s, never copied element by element);
everything the engine reports comes back from `Scheduler.update()` as one `StepOutputs` of
columns (a list of request ids, numpy arrays, one text buffer), not an object per sequence.
"""

from typing import Iterator, Sequence

import numpy as np
import numpy.typing as npt

__version__: str

class Tokenizer:
    """A Hugging Face tokenizer directory: tokenizer.json plus tokenizer_config.json and
    (optional) generation_config.json / config.json for BOS/EOS and special tokens."""

    def __init__(self, path: str) -> None: ...
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

class Detokenizer:
    """Incremental detokenizer and stop-string matcher for one output sequence.

    Invariant: the concatenation of every delta returned by push() followed by flush()
    equals tokenizer.decode(output_ids, ...) (cut at the stop string when one matched).
    Text that could be the start of a stop string, or an incomplete UTF-8 sequence, is held
    back; emitted text is never retracted."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None: ...
    def push(self, token_id: int) -> tuple[str, str | None]:
        """Append one generated token; returns (text delta now safe to emit, the stop string
        matched by this token or None). After a match the sequence is finished: the text ends
        just before the stop string (or just after it with include_stop_str_in_output)."""
    def flush(self) -> str:
        """At finish (no stop string matched): whatever was held back."""
    @property
    def text(self) -> str:
        """All text emitted so far."""

class RequestParams:
    """A plain typed copy of the SamplingParams fields the core needs. Validation with
    user-facing messages happens in Python (fastserve.sampling_params.SamplingParams)."""

    def __init__(
        self,
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
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        bad_words_token_ids: Sequence[Sequence[int]] = (),
        ignore_eos: bool = False,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        detokenize: bool = True,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        final_only: bool = False,
        vocab_bias: Sequence[tuple[int, float]] = (),
        vocab_allow: Sequence[int] = (),
        structured_output: bool = False,
    ) -> None:
        """`n` here is the number of sequences to run (best_of when set); top_k <= 0 is off.
        final_only: report the request's sequences only when they finish (vLLM's FINAL_ONLY
        output kind), with their whole text, instead of a row per step.
        structured_output: a grammar constrains the request (see
        Scheduler.pending_structured_samples)."""

class Batch:
    """One step's work. Sequences are rows 0..num_seqs; decodes (query length 1) come first,
    rows 0..num_decodes. Tokens are laid out sequence after sequence.
    "Samples" are rows of the sampler: one per sequence whose scheduled tokens reach the end
    of its known tokens (a finished prefill chunk or a decode). When a request with n > 1
    finishes its prompt, its logits row is repeated n times in logits_indices (one sample per
    child sequence), so num_samples may exceed the number of sampling sequences."""

    num_seqs: int  # B
    num_tokens: int  # T
    num_samples: int  # S
    num_decodes: int  # D
    max_query_len: int
    max_seq_len: int
    # model inputs
    input_ids: npt.NDArray[np.int64]  # [T]
    positions: npt.NDArray[np.int64]  # [T]
    slot_mapping: npt.NDArray[np.int64]  # [T] block_id * block_size + offset
    query_start_loc: npt.NDArray[np.int32]  # [B + 1]
    seq_lens: npt.NDArray[np.int32]  # [B] context (cached + new) length after this step
    block_tables: npt.NDArray[np.int32]  # [B, max_blocks] padded with 0 past each table
    logits_indices: npt.NDArray[np.int64]  # [S] token index (into T) whose logits are sampled

    # sampling: the worker keeps each sequence's sampler state by sequence slot
    # (worker/sampler_state.py); a step names the slot and the output count of each row
    sample_seq_slots: npt.NDArray[np.int32]  # [S]
    sample_steps: npt.NDArray[np.int64]  # [S] output tokens the sequence has so far (RNG counter)
    # rows of children 1..n of a prompt finishing this step (the parent's slot, own seed)
    fork_sample_rows: npt.NDArray[np.int64]  # [F]
    fork_seeds: npt.NDArray[np.int64]  # [F]
    # (sample row, token) pairs banned this step alone: multi-token bad words whose prefix
    # the sequence's outputs end with
    banned_rows: npt.NDArray[np.int64]  # [K]
    banned_token_ids: npt.NDArray[np.int64]  # [K]

    # sequences new to the worker (first scheduled, or forked children): their state, once
    new_seq_slots: npt.NDArray[np.int32]  # [N]
    new_temperature: npt.NDArray[np.float32]  # [N] 0 = greedy
    new_top_p: npt.NDArray[np.float32]
    new_top_k: npt.NDArray[np.int32]  # <= 0 off
    new_min_p: npt.NDArray[np.float32]
    new_presence_penalty: npt.NDArray[np.float32]
    new_frequency_penalty: npt.NDArray[np.float32]
    new_repetition_penalty: npt.NDArray[np.float32]
    new_seeds: npt.NDArray[np.int64]  # the request's seed (or one drawn from the scheduler's
    # seeded RNG), mixed with the child index for n > 1
    new_num_logprobs: npt.NDArray[np.int32]  # -1 = none
    new_min_tokens: npt.NDArray[np.int32]
    # CSR by new sequence ([N + 1] offsets): prompt tokens (repetition penalty only), outputs
    # so far (any penalty), single-token bad words, ids banned below min_tokens
    new_prompt_offsets: npt.NDArray[np.int32]
    new_prompt_token_ids: npt.NDArray[np.int64]
    new_output_offsets: npt.NDArray[np.int32]
    new_output_token_ids: npt.NDArray[np.int64]
    new_ban_offsets: npt.NDArray[np.int32]
    new_ban_token_ids: npt.NDArray[np.int64]
    new_min_ban_offsets: npt.NDArray[np.int32]
    new_min_ban_token_ids: npt.NDArray[np.int64]
    # CSR by new sequence: (token, value) logit biases; the allow-list (empty: every token)
    new_bias_offsets: npt.NDArray[np.int32]
    new_bias_token_ids: npt.NDArray[np.int64]
    new_bias_values: npt.NDArray[np.float32]
    new_allow_offsets: npt.NDArray[np.int32]
    new_allow_token_ids: npt.NDArray[np.int64]
    # sequence slots released since the last batch that ran
    freed_seq_slots: npt.NDArray[np.int32]

    # prompt logprobs: token indices (into T) whose next-token logprob is wanted, the token
    # that follows each, and the sequence row it belongs to
    prompt_logprob_indices: npt.NDArray[np.int64]  # [P]
    prompt_logprob_targets: npt.NDArray[np.int64]  # [P]
    prompt_logprob_rows: npt.NDArray[np.int32]  # [P]

    def request_id(self, row: int) -> str:
        """Request id of sequence row `row` (for the rare per-request paths: prompt logprobs).
        RuntimeError once this batch's update() has run: rows name request slots, which
        update() may release."""
    def sample_request_id(self, sample: int) -> str: ...

class FinishedOutput:
    """A sequence that finished (or was aborted), reported once."""

    request_id: str
    sample_index: int
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop string or stop token id; None for EOS/length
    text: str  # the whole output for a final_only request; "" otherwise (rows carried it)
    token_ids: list[int]  # every output token
    num_prompt_tokens: int
    num_cached_tokens: int
    first_token_time: float | None  # the `now` of the update() that appended the first token

class StepOutputs:
    """One update(), as columns: row j is one sequence (of a request without final_only)
    that got a token this step. A Python loop over rows is for the caller that streams;
    iteration and indexing build a StepOutput per sequence (tests, simple callers)."""

    num_new_tokens: int  # tokens appended this step, reported as rows or not
    num_rows: int
    request_ids: list[str]  # [R]
    sample_indices: npt.NDArray[np.int32]  # [R] 0..n-1: which child sequence of the request
    sample_rows: npt.NDArray[np.int32]  # [R] the batch's sample row of the token (logprobs)
    token_ids: npt.NDArray[np.int64]  # [R]
    text: str  # the rows' text deltas, concatenated
    text_offsets: npt.NDArray[np.int64]  # [R + 1] code-point offsets into text
    finished: list[FinishedOutput]  # every sequence that finished, with a row or not
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> StepOutput: ...
    def __iter__(self) -> Iterator[StepOutput]: ...

class StepOutput:
    """One sequence's output of one step (a view built from StepOutputs)."""

    request_id: str
    sample_index: int  # 0..n-1: which child sequence of the request
    sample_row: int  # this step's sample row of the new token (for its logprobs); -1 if none
    new_token_ids: list[int]  # all of them for a final_only sequence, [] for an abort
    text_delta: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop string or stop token id; None for EOS/length
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache

class Scheduler:
    def __init__(
        self,
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
        eos_token_ids: Sequence[int] = (),
        seed: int = 0,
    ) -> None: ...
    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int] | npt.NDArray[np.integer], params: RequestParams
    ) -> None:
        """ValueError for a duplicate id, an empty prompt, or prompt_len >= max_model_len."""
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
