"""The sampler's per-sequence state, kept by the worker between steps.

The scheduler sends a sequence's sampling parameters, seed, ban lists and (when penalized)
prompt and output tokens once, in the `new_*` columns of the first Batch that names it;
afterwards a Batch carries one sequence slot and one step counter per sample row, plus the
slots released since the last step (rust/src/scheduler/batch_builder.rs, `BatchData`). This class holds
what they refer to:

- scalars per slot (temperature, top-p/k, min-p, penalties, seed, logprobs, min_tokens) in
  host numpy arrays: a step gathers its rows with one fancy index each and moves them in the
  one staged copy it already makes (a gather on the device would be a kernel per field);
- per-vocabulary state on the device, only for sequences that need it (penalties, bans,
  logit biases or an allow-list), in a pool of rows: `counts` int32 [R, V] output-token
  counts (updated from each step's sampled ids, on the device, so a penalized step re-sends
  nothing and rebuilds no count tensor), `flags` uint8 [R, V] (bit 0: a prompt token, for
  the repetition penalty; bit 1: a single-token bad word; bit 2: banned while below
  min_tokens; bit 3: in the allow-list), and `bias` float32 [R, V] (created when a sequence
  first has logit biases). The pool doubles when more sequences need rows than it has; rows
  of released slots are reused.

Capacity: slots index the scheduler's sequence table, which grows with the live sequences
(n > 1 forks add them), so the scalar arrays grow too (doubling); nothing here is sized from
a step limit.
"""

from __future__ import annotations

import numpy as np
import torch

from fastserve.layers.sampler import _ALLOWED, _BANNED, _MIN_BANNED, _PROMPT

# (Batch column, per-slot array, dtype, value of an unused slot)
_SCALARS = (
    ("new_temperature", "temperature", np.float32, 1.0),
    ("new_top_p", "top_p", np.float32, 1.0),
    ("new_top_k", "top_k", np.int32, 0),
    ("new_min_p", "min_p", np.float32, 0.0),
    ("new_presence_penalty", "presence_penalty", np.float32, 0.0),
    ("new_frequency_penalty", "frequency_penalty", np.float32, 0.0),
    ("new_repetition_penalty", "repetition_penalty", np.float32, 1.0),
    ("new_seeds", "seeds", np.int64, 0),
    ("new_num_logprobs", "num_logprobs", np.int32, -1),
    ("new_min_tokens", "min_tokens", np.int32, 0),
)


def _csr_rows(offsets: np.ndarray) -> np.ndarray:
    """Entry -> row index of a CSR offsets array [N + 1]."""
    offsets = np.asarray(offsets, dtype=np.int64)
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


class SamplerState:
    def __init__(self, device: torch.device | str, vocab_size: int, capacity: int = 256, rows: int = 16):
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.capacity = 0
        for _, name, dtype, fill in _SCALARS:
            setattr(self, name, np.zeros(0, dtype=dtype))
        self.has_penalties = np.zeros(0, dtype=bool)
        self.has_bans = np.zeros(0, dtype=bool)
        self.has_bias = np.zeros(0, dtype=bool)
        self.has_allow = np.zeros(0, dtype=bool)
        self.vocab_row = np.zeros(0, dtype=np.int64)  # pool row per slot, -1: none
        self._grow_slots(capacity)
        self.counts = torch.zeros((rows, vocab_size), dtype=torch.int32, device=self.device)
        self.flags = torch.zeros((rows, vocab_size), dtype=torch.uint8, device=self.device)
        self.bias: torch.Tensor | None = None
        self._free_rows = list(range(rows - 1, -1, -1))

    # -- capacity ---------------------------------------------------------------------------

    def _grow_slots(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity, 16)
        for _, name, dtype, fill in _SCALARS:
            old = getattr(self, name)
            new = np.full(cap, fill, dtype=dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        self.has_penalties = np.concatenate([self.has_penalties, np.zeros(cap - self.capacity, dtype=bool)])
        self.has_bans = np.concatenate([self.has_bans, np.zeros(cap - self.capacity, dtype=bool)])
        self.has_bias = np.concatenate([self.has_bias, np.zeros(cap - self.capacity, dtype=bool)])
        self.has_allow = np.concatenate([self.has_allow, np.zeros(cap - self.capacity, dtype=bool)])
        self.vocab_row = np.concatenate([self.vocab_row, np.full(cap - self.capacity, -1, dtype=np.int64)])
        self.capacity = cap

    def _take_rows(self, count: int) -> np.ndarray:
        if count > len(self._free_rows):
            old = self.counts.shape[0]
            rows = max(2 * old, old + count)
            self.counts = torch.cat([self.counts, self.counts.new_zeros((rows - old, self.vocab_size))])
            self.flags = torch.cat([self.flags, self.flags.new_zeros((rows - old, self.vocab_size))])
            if self.bias is not None:
                self.bias = torch.cat([self.bias, self.bias.new_zeros((rows - old, self.vocab_size))])
            self._free_rows = list(range(rows - 1, old - 1, -1)) + self._free_rows
        taken = [self._free_rows.pop() for _ in range(count)]
        return np.asarray(taken, dtype=np.int64)

    # -- the protocol -----------------------------------------------------------------------

    def apply(self, batch) -> None:
        """Takes in a Batch's released slots, then its new sequences (a slot may be both:
        released and reused since the last step). Idempotent for a batch sent again after a
        refused step."""
        freed = np.asarray(batch.freed_seq_slots, dtype=np.int64)
        if freed.size:
            freed = freed[freed < self.capacity]
            rows = self.vocab_row[freed]
            self._free_rows.extend(int(r) for r in np.unique(rows[rows >= 0]))
            self.vocab_row[freed] = -1
        slots = np.asarray(batch.new_seq_slots, dtype=np.int64)
        if not slots.size:
            return
        self._grow_slots(int(slots.max()) + 1)
        for column, name, dtype, _ in _SCALARS:
            getattr(self, name)[slots] = np.asarray(getattr(batch, column), dtype=dtype)
        pen = (
            (self.presence_penalty[slots] != 0)
            | (self.frequency_penalty[slots] != 0)
            | (self.repetition_penalty[slots] != 1)
        )
        self.has_penalties[slots] = pen
        bans = np.diff(batch.new_ban_offsets) + np.diff(batch.new_min_ban_offsets) > 0
        bias = np.diff(batch.new_bias_offsets) > 0
        allow = np.diff(batch.new_allow_offsets) > 0
        self.has_bans[slots] = bans
        self.has_bias[slots] = bias
        self.has_allow[slots] = allow
        need = pen | bans | bias | allow
        # A slot sent again (after a refused step) keeps its row; one that needs none frees it.
        old = self.vocab_row[slots]
        drop = (old >= 0) & ~need
        self._free_rows.extend(int(r) for r in old[drop])
        self.vocab_row[slots[drop]] = -1
        fresh = need & (old < 0)
        self.vocab_row[slots[fresh]] = self._take_rows(int(fresh.sum()))
        if not need.any():
            return
        rows = torch.from_numpy(self.vocab_row[slots[need]]).to(self.device)
        self.counts.index_fill_(0, rows, 0)
        self.flags.index_fill_(0, rows, 0)
        if bias.any() and self.bias is None:
            self.bias = torch.zeros(self.counts.shape, dtype=torch.float32, device=self.device)
        if self.bias is not None:
            self.bias.index_fill_(0, rows, 0)
        row_of_new = self.vocab_row[slots]  # -1 where not needed (those have no entries)
        self._scatter(row_of_new, batch.new_output_offsets, batch.new_output_token_ids, None)
        self._scatter(row_of_new, batch.new_prompt_offsets, batch.new_prompt_token_ids, _PROMPT)
        self._scatter(row_of_new, batch.new_ban_offsets, batch.new_ban_token_ids, _BANNED)
        self._scatter(row_of_new, batch.new_min_ban_offsets, batch.new_min_ban_token_ids, _MIN_BANNED)
        self._scatter(row_of_new, batch.new_allow_offsets, batch.new_allow_token_ids, _ALLOWED)
        self._scatter(row_of_new, batch.new_bias_offsets, batch.new_bias_token_ids, None, batch.new_bias_values)

    def _scatter(self, row_of_new: np.ndarray, offsets, token_ids, bit: int | None, values=None) -> None:
        """Per-token state of new sequences: a flag bit, bias values (`values`), or, with
        neither, output-token counts."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if not ids.size:
            return
        rows = row_of_new[_csr_rows(offsets)]
        # Tokenizer ids past the model's vocabulary can never be sampled: nothing to track.
        keep = (ids < self.vocab_size) & (rows >= 0)
        rows_t = torch.from_numpy(rows[keep]).to(self.device)
        ids_t = torch.from_numpy(ids[keep]).to(self.device)
        if values is not None:
            vals = torch.from_numpy(np.asarray(values, dtype=np.float32)[keep]).to(self.device)
            self.bias.index_put_((rows_t, ids_t), vals, accumulate=True)
        elif bit is None:
            self.counts.index_put_((rows_t, ids_t), torch.ones_like(ids_t, dtype=torch.int32), accumulate=True)
        else:
            self.flags[rows_t, ids_t] |= bit

    def rows(self, batch) -> dict[str, np.ndarray]:
        """This step's per-sample-row sampling arrays (host), gathered by slot, with the pool
        rows of the penalized and the banned sample rows."""
        slots = np.asarray(batch.sample_seq_slots, dtype=np.int64)
        out = {name: getattr(self, name)[slots] for _, name, _, _ in _SCALARS}
        fork = np.asarray(batch.fork_sample_rows, dtype=np.int64)
        if fork.size:
            out["seeds"][fork] = batch.fork_seeds
        steps = np.asarray(batch.sample_steps, dtype=np.int64)
        out["sample_steps"] = steps
        vrow = self.vocab_row[slots]
        pen = np.flatnonzero(self.has_penalties[slots] & (vrow >= 0))
        out["penalty_rows"] = pen
        out["penalty_vocab_rows"] = vrow[pen]
        ban = np.flatnonzero((self.has_bans[slots] | self.has_allow[slots]) & (vrow >= 0))
        out["ban_rows"] = ban
        out["ban_vocab_rows"] = vrow[ban]
        out["min_tokens_active"] = steps[ban] < out["min_tokens"][ban]
        out["allow_active"] = self.has_allow[slots][ban]
        bias = np.flatnonzero(self.has_bias[slots] & (vrow >= 0))
        out["bias_rows"] = bias
        out["bias_vocab_rows"] = vrow[bias]
        out["banned_rows"] = np.asarray(batch.banned_rows, dtype=np.int64)
        out["banned_token_ids"] = np.asarray(batch.banned_token_ids, dtype=np.int64)
        # Forked children's first tokens are recorded in their own slots' state (sent with
        # them next step), not in the parent's.
        counted = np.ones(len(slots), dtype=bool)
        counted[fork] = False
        out["count_rows"] = np.flatnonzero(self.has_penalties[slots] & (vrow >= 0) & counted)
        out["count_vocab_rows"] = vrow[out["count_rows"]]
        return out

    def record(self, count_rows: torch.Tensor, count_vocab_rows: torch.Tensor, sampled: torch.Tensor) -> None:
        """Adds each penalized row's sampled token to its output counts (on the device)."""
        if count_rows.numel():
            toks = sampled.index_select(0, count_rows)
            self.counts.index_put_((count_vocab_rows, toks), torch.ones_like(toks, dtype=torch.int32), accumulate=True)

    @classmethod
    def for_rows(cls, rows, device, vocab_size: int) -> tuple[SamplerState, dict]:
        """A state holding one slot per sample row of `rows` (an object with per-row arrays
        as the sampler tests and the memory profile describe a step: temperature, ...,
        seeds, sample_steps, num_logprobs, prompt/output CSR when `any_penalties`, and
        (row, token) bans), and that step's gathered arrays."""
        s = len(rows.temperature)
        zeros = np.zeros(s + 1, dtype=np.int32)
        pen = bool(getattr(rows, "any_penalties", False))
        empty = np.zeros(0, dtype=np.int64)
        new = dict(
            new_seq_slots=np.arange(s, dtype=np.int32),
            new_temperature=rows.temperature,
            new_top_p=rows.top_p,
            new_top_k=rows.top_k,
            new_min_p=rows.min_p,
            new_presence_penalty=rows.presence_penalty,
            new_frequency_penalty=rows.frequency_penalty,
            new_repetition_penalty=rows.repetition_penalty,
            new_seeds=rows.seeds,
            new_num_logprobs=rows.num_logprobs,
            new_min_tokens=np.zeros(s, dtype=np.int32),
            new_prompt_offsets=rows.prompt_offsets if pen else zeros,
            new_prompt_token_ids=rows.prompt_token_ids if pen else empty,
            new_output_offsets=rows.output_offsets if pen else zeros,
            new_output_token_ids=rows.output_token_ids if pen else empty,
            new_ban_offsets=zeros,
            new_ban_token_ids=empty,
            new_min_ban_offsets=zeros,
            new_min_ban_token_ids=empty,
            new_bias_offsets=zeros,
            new_bias_token_ids=empty,
            new_bias_values=np.zeros(0, dtype=np.float32),
            new_allow_offsets=zeros,
            new_allow_token_ids=empty,
            freed_seq_slots=np.zeros(0, dtype=np.int32),
            sample_seq_slots=np.arange(s, dtype=np.int32),
            sample_steps=rows.sample_steps,
            fork_sample_rows=empty,
            fork_seeds=empty,
            banned_rows=rows.banned_rows,
            banned_token_ids=rows.banned_token_ids,
        )
        from types import SimpleNamespace

        step = SimpleNamespace(**new)
        state = cls(device, vocab_size, capacity=max(s, 1), rows=max(s, 1))
        if not pen:
            # No penalty lists were given: the rows' penalty values, if any, apply to nothing.
            state.apply(
                SimpleNamespace(
                    **{
                        **new,
                        "new_presence_penalty": np.zeros(s, np.float32),
                        "new_frequency_penalty": np.zeros(s, np.float32),
                        "new_repetition_penalty": np.ones(s, np.float32),
                    }
                )
            )
        else:
            state.apply(step)
        return state, state.rows(step)


__all__ = ["SamplerState"]
