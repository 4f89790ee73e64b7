"""The sampler: one token per sample row from the model's logits, vLLM v1's order of operations.

    raw logits ──▶ grammar bitmask (structured outputs' constrained rows: disallowed → -inf)
        ├─ logprobs (top-K, the sampled token's logprob and rank)   [vLLM "raw_logprobs"]
        ├─ banned (row, token) pairs → -inf   (min_tokens' EOS/stop ids, bad_words, outside
        │                                       allowed_token_ids)
        ├─ + logit_bias
        ├─ repetition (prompt + output), frequency and presence (output) penalties
        ├─ greedy rows: argmax here
        └─ temperature → min_p → top_k → top_p → exponential race with counter-based noise

Logprobs come from the raw logits, before bans, penalties and temperature, like vLLM v1's
default `logprobs_mode="raw_logprobs"`: they describe the model, not the sampling filters.

Random rows draw their noise from a hash of (seed, sample_step, token id), so a row samples
the same token whatever else is in the batch, at any row position, on any device, with no
torch.Generator per row and no Python loop over rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fastserve import kernels
from fastserve.kernels import reference

_SAMPLING_EPS = 1e-5
# Bits of the sampler state's flags pool (worker/sampler_state.py).
_PROMPT, _BANNED, _MIN_BANNED, _ALLOWED = 1, 2, 4, 8

# splitmix64 constants as two's-complement int64 (torch has no uint64 arithmetic; int64
# add/mul wrap modulo 2**64, so the bits equal the unsigned algorithm's).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


@dataclass
class SamplingTensors:
    """A step's sampling arrays on the device, plus host-side flags computed with numpy so that
    choosing a path never synchronizes with the device. Built by `from_rows` from the
    worker's per-sequence state (worker/sampler_state.py), whose device pools `counts` and
    `flags` the penalty and ban rows index."""

    temperature: torch.Tensor  # f32 [S]; 0 = greedy
    top_p: torch.Tensor  # f32 [S]
    top_k: torch.Tensor  # i64 [S]; <= 0 off
    min_p: torch.Tensor  # f32 [S]
    presence_penalty: torch.Tensor  # f32 [S]
    frequency_penalty: torch.Tensor  # f32 [S]
    repetition_penalty: torch.Tensor  # f32 [S]
    seeds: torch.Tensor  # i64 [S]
    sample_steps: torch.Tensor  # i64 [S]
    num_logprobs: torch.Tensor  # i32 [S]; -1 none
    # penalized sample rows and their rows in the state's pools
    penalty_rows: torch.Tensor  # i64 [P]
    penalty_vocab_rows: torch.Tensor  # i64 [P]
    # sample rows with static bans (bad words, min_tokens' ids) or an allow-list, their pool
    # rows, whether min_tokens still holds and whether an allow-list applies, for each
    ban_rows: torch.Tensor  # i64 [B]
    ban_vocab_rows: torch.Tensor  # i64 [B]
    min_tokens_active: torch.Tensor  # bool [B]
    allow_active: torch.Tensor  # bool [B]
    # sample rows with logit biases and their pool rows
    bias_rows: torch.Tensor  # i64 [Bb]
    bias_vocab_rows: torch.Tensor  # i64 [Bb]
    # (row, token) pairs banned this step (multi-token bad words)
    banned_rows: torch.Tensor  # i64 [K]
    banned_token_ids: torch.Tensor  # i64 [K]
    # i64 [R]: random rows with top_p < 1 and no top_k (only these sort the vocabulary)
    top_p_rows: torch.Tensor
    # i64 [Rk]: random rows with top_p < 1 and top_k (top-p runs inside their top-k values)
    top_p_top_k_rows: torch.Tensor
    # sample rows whose sampled token goes into their output counts, and their pool rows
    count_rows: torch.Tensor  # i64 [C]
    count_vocab_rows: torch.Tensor  # i64 [C]
    counts: torch.Tensor | None  # i32 [R, V] the state's output-token counts
    flags: torch.Tensor | None  # u8 [R, V] the state's prompt / ban / allow bits
    bias: torch.Tensor | None  # f32 [R, V] the state's logit biases (None until one is set)

    num_samples: int
    all_greedy: bool
    all_random: bool
    any_penalties: bool
    any_top_k: bool
    max_top_k: int  # max top_k over rows that use it (0 when none)
    any_min_p: bool
    any_banned: bool  # static or per-step bans, or allow-lists
    any_bias: bool
    max_num_logprobs: int  # K of the top-K outputs
    any_logprobs: bool  # some row asked for logprobs (ranks are computed only then)

    @classmethod
    def from_rows(
        cls, rows: dict, device: torch.device | str, vocab_size: int, staging=None, state=None
    ) -> SamplingTensors:
        """`rows`: the step's per-sample-row host arrays (SamplerState.rows). `staging` (a
        worker.staging.PinnedStaging) moves every array in one copy; without it each array
        is copied on its own."""
        temperature = np.asarray(rows["temperature"], dtype=np.float32)
        top_p = np.asarray(rows["top_p"], dtype=np.float32)
        top_k = np.asarray(rows["top_k"]).astype(np.int64)
        min_p = np.asarray(rows["min_p"], dtype=np.float32)
        num_logprobs = np.asarray(rows["num_logprobs"], dtype=np.int32)
        s = int(temperature.shape[0])

        greedy = temperature < _SAMPLING_EPS
        random = ~greedy
        # top_k >= vocab keeps everything: treat it as off so it costs no topk.
        uses_top_k = random & (top_k > 0) & (top_k < vocab_size)
        top_k = np.where(uses_top_k, top_k, 0)
        uses_min_p = random & (min_p > 0)
        uses_top_p = random & (top_p < 1.0)
        top_p_rows = np.flatnonzero(uses_top_p & ~uses_top_k).astype(np.int64)
        top_p_top_k_rows = np.flatnonzero(uses_top_p & uses_top_k).astype(np.int64)

        banned_rows = np.asarray(rows["banned_rows"], dtype=np.int64)
        banned_ids = np.asarray(rows["banned_token_ids"], dtype=np.int64)
        if banned_ids.size and banned_ids.max() >= vocab_size:
            # Tokenizer ids past the model's vocabulary can never be sampled anyway.
            keep = banned_ids < vocab_size
            banned_rows, banned_ids = banned_rows[keep], banned_ids[keep]
        i64 = lambda a: np.asarray(a, dtype=np.int64)  # noqa: E731

        host = dict(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            presence_penalty=np.asarray(rows["presence_penalty"], dtype=np.float32),
            frequency_penalty=np.asarray(rows["frequency_penalty"], dtype=np.float32),
            repetition_penalty=np.asarray(rows["repetition_penalty"], dtype=np.float32),
            seeds=i64(rows["seeds"]),
            sample_steps=i64(rows["sample_steps"]),
            num_logprobs=num_logprobs,
            penalty_rows=i64(rows["penalty_rows"]),
            penalty_vocab_rows=i64(rows["penalty_vocab_rows"]),
            ban_rows=i64(rows["ban_rows"]),
            ban_vocab_rows=i64(rows["ban_vocab_rows"]),
            min_tokens_active=np.asarray(rows["min_tokens_active"], dtype=np.bool_),
            allow_active=np.asarray(rows["allow_active"], dtype=np.bool_),
            bias_rows=i64(rows["bias_rows"]),
            bias_vocab_rows=i64(rows["bias_vocab_rows"]),
            banned_rows=banned_rows,
            banned_token_ids=banned_ids,
            top_p_rows=top_p_rows,
            top_p_top_k_rows=top_p_top_k_rows,
            count_rows=i64(rows["count_rows"]),
            count_vocab_rows=i64(rows["count_vocab_rows"]),
        )
        if staging is not None:
            tensors = dict(zip(host, staging.to_device(list(host.values()))))
        else:
            with warnings.catch_warnings():
                # Arrays moved out of Rust may be read-only; nothing here writes to them.
                warnings.simplefilter("ignore", UserWarning)
                tensors = {k: torch.from_numpy(a).to(device, non_blocking=True) for k, a in host.items()}

        return cls(
            **tensors,
            counts=None if state is None else state.counts,
            flags=None if state is None else state.flags,
            bias=None if state is None else state.bias,
            num_samples=s,
            all_greedy=bool(greedy.all()),
            all_random=s > 0 and bool(random.all()),
            any_penalties=host["penalty_rows"].size > 0,
            any_top_k=bool(uses_top_k.any()),
            max_top_k=int(top_k.max()) if s else 0,
            any_min_p=bool(uses_min_p.any()),
            any_banned=banned_rows.size > 0 or host["ban_rows"].size > 0,
            any_bias=host["bias_rows"].size > 0,
            max_num_logprobs=max(int(num_logprobs.max()) if s else 0, 0),
            any_logprobs=bool((num_logprobs >= 0).any()),
        )

    @classmethod
    def from_batch(cls, rows, device: torch.device | str, vocab_size: int, staging=None) -> SamplingTensors:
        """The tensors of one step described row by row (per-row arrays, prompt/output CSR
        when `any_penalties`, (row, token) bans), through a fresh state holding one sequence
        per row: for tests and the memory profile; the engine keeps its state across steps."""
        from fastserve.worker.sampler_state import SamplerState

        state, gathered = SamplerState.for_rows(rows, device, vocab_size)
        return cls.from_rows(gathered, device, vocab_size, staging, state)


@dataclass
class SamplerOutput:
    # i64 [S]
    sampled_token_ids: torch.Tensor
    # f32 [S]: raw logprob of the sampled token (for cumulative_logprob)
    sampled_logprobs: torch.Tensor
    # i64 [S, K], K = max_num_logprobs; row s uses its first num_logprobs[s] columns
    topk_ids: torch.Tensor
    # f32 [S, K]
    topk_logprobs: torch.Tensor
    # i64 [S]: 1-based rank of the sampled token; None when no row asked for logprobs
    # (it costs a pass over the vocabulary)
    sampled_ranks: torch.Tensor | None


@dataclass
class PromptLogprobsOutput:
    target_logprobs: torch.Tensor  # f32 [P]
    target_ranks: torch.Tensor  # i64 [P] 1-based
    topk_ids: torch.Tensor  # i64 [P, K]
    topk_logprobs: torch.Tensor  # f32 [P, K]


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer, in place on int64."""
    z ^= _shr(z, 30)
    z *= _MIX1
    z ^= _shr(z, 27)
    z *= _MIX2
    z ^= _shr(z, 31)
    return z


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 64-bit stream key per (seed, step): distinct steps of one seed get unrelated noise."""
    return _mix64_(seeds ^ _mix64_(steps * _GOLDEN + _GOLDEN))


def uniform_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """u[s, j] in (0, 1), a pure function of (keys[s], token_ids[...j]): splitmix64's output for
    counter token_id + 1 of stream keys[s]. token_ids is [V] (shared) or [S, J] (per row)."""
    z = token_ids + 1
    z = z * _GOLDEN
    z = z + keys[:, None]
    # The top bits of splitmix64 are final after its second multiply (the last xor-shift only
    # touches the low 33 bits), so that step is skipped.
    z ^= _shr(z, 30)
    z *= _MIX1
    z ^= _shr(z, 27)
    z *= _MIX2
    # 23 bits, so that bits + 0.5 is exact in float32's 24-bit mantissa: u stays strictly
    # inside (0, 1) and -log(u) is finite and positive.
    u = _shr(z, 41).to(torch.float32)
    return u.add_(0.5).mul_(2.0**-23)


def _apply_bans(x: torch.Tensor, st: SamplingTensors) -> None:
    """In place: -inf at each banned (row, token): the pools' static bans (bad words; the
    min_tokens ids while a row is below min_tokens; outside a row's allow-list), then this
    step's pairs."""
    if st.ban_rows.numel():
        f = st.flags.index_select(0, st.ban_vocab_rows)
        mask = (f & _BANNED) != 0
        mask |= ((f & _MIN_BANNED) != 0) & st.min_tokens_active[:, None]
        mask |= ((f & _ALLOWED) == 0) & st.allow_active[:, None]
        x.index_copy_(0, st.ban_rows, x.index_select(0, st.ban_rows).masked_fill_(mask, float("-inf")))
    if st.banned_rows.numel():
        x.index_put_((st.banned_rows, st.banned_token_ids), torch.tensor(float("-inf"), device=x.device))


def _apply_penalties(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Repetition (prompt and output tokens), frequency and presence (output tokens)
    penalties on the penalized rows, from the state's device-resident counts: in place, one
    Triton pass on CUDA, the torch definition elsewhere (bit-identical)."""
    args = (
        logits,
        st.counts,
        st.flags,
        st.penalty_rows,
        st.penalty_vocab_rows,
        st.repetition_penalty,
        st.frequency_penalty,
        st.presence_penalty,
        _PROMPT,
    )
    if logits.is_cuda:
        kernels.apply_penalties(*args)
    else:
        reference.apply_penalties(*args)
    return logits


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # p < min_p * p_max  <=>  logit < logit_max + log(min_p): no softmax needed.
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    return logits.masked_fill_(logits < threshold, float("-inf"))


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks all but each row's top_k logits; also returns the top max_top_k values (sorted,
    descending) for the top-p step of rows that have both."""
    # Ties with the k-th value are kept, as in vLLM (a threshold, not an index set).
    values = logits.topk(max_top_k, dim=-1).values
    kth = values.gather(1, (top_k.clamp(min=1) - 1)[:, None])
    kth = kth.masked_fill_((top_k <= 0)[:, None], float("-inf"))
    return logits.masked_fill_(logits < kth, float("-inf")), values


def _apply_top_p_within_top_k(
    logits: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """Top-p over each row's top-k candidates without sorting the vocabulary: the k largest
    values (plus any tokens tied with the k-th, which top-k keeps) are all the mass there is.

    Tied values are kept or dropped together (a token goes when the mass of candidates at or
    below its value is <= 1 - p), so the result depends only on the row's own logits, not on the
    batch's largest k nor on how a sort orders ties; without ties it is vLLM's rule exactly."""
    vals = values.index_select(0, rows)
    k = top_k.index_select(0, rows)
    beyond_k = torch.arange(vals.shape[1], device=vals.device)[None, :] >= k[:, None]
    vals = vals.masked_fill(beyond_k, float("-inf"))
    kth = vals.gather(1, (k - 1)[:, None])
    sub = logits.index_select(0, rows)
    extra_ties = (sub >= kth).sum(dim=-1, keepdim=True) - k[:, None]
    top = vals[:, :1]
    e = (vals - top).exp()
    total = e.sum(dim=-1, keepdim=True) + extra_ties * (kth - top).exp()
    # Mass strictly above each value: the exclusive prefix sum taken at the first position of
    # the value's tie group (searchsorted on the negated, ascending list finds it).
    above = e.cumsum(dim=-1) - e
    neg = (-vals).contiguous()
    first_of_group = torch.searchsorted(neg, neg, side="left").clamp(max=vals.shape[1] - 1)
    above = above.gather(1, first_of_group)
    keep = (total - above) > (1 - top_p.index_select(0, rows))[:, None] * total
    keep &= ~beyond_k
    # keep is a prefix (mass at or below a value shrinks as the value grows).
    num_kept = keep.sum(dim=-1).clamp(min=1)
    cutoff = torch.full((logits.shape[0],), float("-inf"), device=logits.device)
    cutoff.index_copy_(0, rows, vals.gather(1, (num_kept - 1)[:, None]).squeeze(1))
    return logits.masked_fill_(logits < cutoff[:, None], float("-inf"))


def _apply_top_p(logits: torch.Tensor, rows: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sub = logits.index_select(0, rows)
    sorted_logits, order = sub.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
    # vLLM's rule: drop a token when the mass at or below it is <= 1 - p; the top token stays.
    drop = cum <= (1 - top_p.index_select(0, rows))[:, None]
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    sub = sorted_logits.scatter(1, order, sorted_logits)
    return logits.index_copy_(0, rows, sub)


def _gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int, ranks: bool):
    token_lp = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    rank = (logprobs >= token_lp[:, None]).sum(dim=-1) if ranks else None
    if k > 0:
        topk_lp, topk_ids = logprobs.topk(k, dim=-1)
    else:
        topk_lp = logprobs.new_empty((logprobs.shape[0], 0))
        topk_ids = token_ids.new_empty((logprobs.shape[0], 0))
    return token_lp, rank, topk_ids, topk_lp


def _grammar_over_bans(x: torch.Tensor, masked: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A constrained row whose grammar allows only banned tokens (min_tokens' EOS after a
    complete JSON document, say) keeps its grammar-masked logits: the grammar wins, as in
    vLLM, so the output still matches it (the scheduler then ends the sequence on EOS)."""
    sub = x.index_select(0, rows)
    dead = torch.isneginf(sub).all(dim=-1, keepdim=True)
    return x.index_copy(0, rows, torch.where(dead, masked.index_select(0, rows), sub))


class Sampler(torch.nn.Module):
    def forward(self, logits: torch.Tensor, st: SamplingTensors, token_mask=None) -> SamplerOutput:
        """logits: [S, V] raw model logits (any float dtype); left unchanged unless
        `token_mask` (a structured_outputs.bitmask.TokenBitmask: the step's grammar masks
        for its constrained rows) is given, which sets their disallowed tokens to -inf
        first, in place. As in vLLM, masking comes before everything else, so a constrained
        row's logprobs are those of the masked distribution."""
        raw = logits.to(torch.float32)
        if token_mask is not None:
            from fastserve.structured_outputs.bitmask import apply_token_bitmask

            apply_token_bitmask(raw, token_mask)
        # Bans, biases and penalties write in place into one copy, so `raw` survives for the
        # logprobs (vLLM's raw_logprobs: they describe the model, not the filters).
        x = raw
        if st.any_banned or st.any_penalties or st.any_bias:
            x = raw.clone()
        if st.any_banned:
            _apply_bans(x, st)
            if token_mask is not None:
                x = _grammar_over_bans(x, raw, token_mask.rows)
        if st.any_bias:
            x.index_add_(0, st.bias_rows, st.bias.index_select(0, st.bias_vocab_rows))
        if st.any_penalties:
            _apply_penalties(x, st)

        greedy = None if st.all_random else x.argmax(dim=-1)
        if st.all_greedy:
            sampled = greedy
        else:
            sampled = self._sample_random(x, st)
            if greedy is not None:
                sampled = torch.where(st.temperature < _SAMPLING_EPS, greedy, sampled)

        if st.any_logprobs:
            token_lp, rank, topk_ids, topk_lp = _gather_logprobs(
                raw.log_softmax(dim=-1), sampled, st.max_num_logprobs, ranks=True
            )
        else:
            # cumulative_logprob only: a log-sum-exp reads the logits once and writes nothing.
            token_lp = raw.gather(1, sampled[:, None]).squeeze(1) - raw.logsumexp(dim=-1)
            rank = None
            topk_ids = sampled.new_empty((st.num_samples, 0))
            topk_lp = raw.new_empty((st.num_samples, 0))
        return SamplerOutput(sampled, token_lp, topk_ids, topk_lp, rank)

    def _sample_random(self, x: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        temperature = torch.where(st.temperature < _SAMPLING_EPS, 1.0, st.temperature)
        x = x / temperature[:, None]
        if st.any_min_p:
            x = _apply_min_p(x, st.min_p)
        if st.any_top_k:
            x, top_values = _apply_top_k(x, st.top_k, st.max_top_k)
            if st.top_p_top_k_rows.numel():
                x = _apply_top_p_within_top_k(x, top_values, st.top_p_top_k_rows, st.top_k, st.top_p)
        if st.top_p_rows.numel():
            x = _apply_top_p(x, st.top_p_rows, st.top_p)
        keys = row_keys(st.seeds, st.sample_steps)
        token_ids = _token_ids(x.shape[1], x.device)
        race = _gumbel_argmax_compiled() if x.is_cuda else _gumbel_argmax
        return race(x, keys, token_ids)


_TOKEN_IDS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _token_ids(vocab_size: int, device: torch.device) -> torch.Tensor:
    # A real int64 tensor, not an arange inside the compiled graph: Inductor turns an arange
    # into an int32 index and then fails on the 64-bit constants multiplied with it.
    key = (vocab_size, device)
    if key not in _TOKEN_IDS:
        _TOKEN_IDS[key] = torch.arange(vocab_size, device=device, dtype=torch.int64)
    return _TOKEN_IDS[key]


def _gumbel_argmax(x: torch.Tensor, keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """argmax(x - log(-log u)): the exponential race argmax(p / E), E = -log(u) ~ Exp(1), taken
    in log space so that no softmax is needed; it draws token i with probability softmax(x)_i."""
    u = uniform_noise(keys, token_ids)
    return (x - u.log_().neg_().log_()).argmax(dim=-1)


_COMPILED = None


def _gumbel_argmax_compiled():
    # Eagerly, the hash is ~12 passes over an [S, V] int64 tensor (gigabytes per step at a
    # 150k vocabulary); compiled, it is one fused kernel that reads x once. CPU stays eager:
    # compiling there costs more than it saves and tests must not need a C++ compiler.
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_gumbel_argmax, dynamic=True, fullgraph=True)
    return _COMPILED


def compute_prompt_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_logprobs: int,
    chunk_rows: int = 1024,
    compute_logits=None,
) -> PromptLogprobsOutput:
    """Logprob and 1-based rank of each prompt position's next token (`targets`, the
    Batch's prompt_logprob_targets), plus the top-`num_logprobs`, from raw logits [P, V].

    With `compute_logits` (hidden [n, H] -> logits [n, V], e.g. the model's lm_head), the first
    argument is the hidden states [P, H] instead: rows are projected chunk by chunk, so a long
    prompt never holds a [P, V] float32 tensor at once."""
    p = logits.shape[0]
    lps, ranks, ids, tops = [], [], [], []
    for start in range(0, p, chunk_rows):
        rows = logits[start : start + chunk_rows]
        if compute_logits is not None:
            rows = compute_logits(rows)
        lp = rows.to(torch.float32).log_softmax(dim=-1)
        a, b, c, d = _gather_logprobs(lp, targets[start : start + chunk_rows], num_logprobs, True)
        lps.append(a)
        ranks.append(b)
        ids.append(c)
        tops.append(d)
    if not lps:
        return PromptLogprobsOutput(
            torch.empty(0, dtype=torch.float32, device=logits.device),
            targets.new_empty(0),
            targets.new_empty((0, num_logprobs)),
            torch.empty((0, num_logprobs), dtype=torch.float32, device=logits.device),
        )
    return PromptLogprobsOutput(torch.cat(lps), torch.cat(ranks), torch.cat(ids), torch.cat(tops))
