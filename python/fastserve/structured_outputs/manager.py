"""The engine's side of structured outputs: one xgrammar matcher per constrained sequence,
the step's bitmask for the constrained sample rows, and advancing the matchers with the
tokens the step sampled.

Per step (only while some constrained request runs):
    prepare()  the scheduler names the constrained sample rows (`pending_structured_samples`)
    fill()     inside ModelRunner.execute, after the forward pass is launched (so on CUDA it
               overlaps the GPU): the previous step's tokens are accepted first (advance is
               deferred to here for the same overlap), then each live matcher writes its row
               of a pinned int32 bitmask, copied to the device; the sampler masks the logits
    advance()  after sampling: the step's sampled tokens are kept for the next fill (or
               accepted at once with `now=True`)
The only Python loops are over the constrained rows. Matchers advance only on newly sampled
tokens, so a preempted sequence (recomputed, its tokens kept) never re-advances, and a prefix
hit changes nothing. Each child of an n > 1 request gets its own matcher, created when its
first sample row appears (nothing was accepted before the prompt's end, so that is a fork at
the prompt end)."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future

import numpy as np
import torch

from .bitmask import TokenBitmask
from .compiler import GrammarCompiler, xgrammar
from .params import StructuredOutputsParams

logger = logging.getLogger("fastserve")

# Below this many rows a loop fills the bitmask faster than xgrammar's thread pool.
_BATCH_FILL_MIN_ROWS = 32


class RequestGrammar:
    """The compiled grammar of one request and a matcher per sequence (sample index)."""

    __slots__ = ("compiled", "stop_token_ids", "matchers", "broken", "request_id")

    def __init__(self, request_id: str, compiled, num_seqs: int, stop_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.compiled = compiled
        self.stop_token_ids = stop_token_ids
        self.matchers: list = [None] * num_seqs
        # Sequences whose matcher refused a sampled token (only possible if something other
        # than the mask chose it); they run unconstrained from there, with a warning.
        self.broken = [False] * num_seqs

    def matcher(self, i: int):
        m = self.matchers[i]
        if m is None:
            xgr = xgrammar()
            m = self.matchers[i] = xgr.GrammarMatcher(self.compiled, override_stop_tokens=self.stop_token_ids or None)
        return m


class StepGrammar:
    """The constrained sample rows of one step and their matchers."""

    def __init__(self, manager: StructuredOutputManager, rows: list[int], entries: list[tuple[RequestGrammar, int]]):
        self.manager = manager
        self.rows = rows
        self.entries = entries

    def fill(self, device: torch.device) -> TokenBitmask | None:
        """The bitmask of this step's live constrained rows, on `device` (None when every
        constrained row's grammar has ended: those rows sample unconstrained, as vLLM's do)."""
        t0 = time.perf_counter()
        self.manager.flush()
        live_rows, matchers = [], []
        for row, (rg, i) in zip(self.rows, self.entries):
            if rg.broken[i]:
                continue
            m = rg.matcher(i)
            if m.is_terminated():
                continue
            live_rows.append(row)
            matchers.append(m)
        if not matchers:
            return None
        mask = self.manager._fill(matchers, live_rows, device)
        self.manager._record_fill(len(matchers), time.perf_counter() - t0)
        return mask

    def advance(self, sampled_token_ids: np.ndarray, now: bool = False) -> None:
        """Each constrained sequence accepts the token sampled for its row: at the next
        step's fill (the previous pending step first), or at once with `now`."""
        self.manager.flush()
        self.manager._pending = (self, sampled_token_ids[self.rows].tolist())
        if now:
            self.manager.flush()

    def _accept(self, tokens: list[int]) -> None:
        for tok, (rg, i) in zip(tokens, self.entries):
            if rg.broken[i]:
                continue
            m = rg.matcher(i)
            if m.is_terminated():
                continue
            if not m.accept_token(tok):
                rg.broken[i] = True
                logger.warning(
                    "request %s (sequence %d): its grammar refused sampled token %d; the sequence "
                    "continues unconstrained",
                    rg.request_id,
                    i,
                    tok,
                )


class StructuredOutputManager:
    """Owned by the Engine. `stop_token_ids`: the engine's EOS ids; each request adds its
    stop_token_ids (vLLM's all_stop_token_ids), the tokens a finished grammar allows."""

    def __init__(self, tokenizer_dir: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.compiler = GrammarCompiler(tokenizer_dir, vocab_size, self.stop_token_ids)
        self.requests: dict[str, RequestGrammar] = {}
        self.words = (vocab_size + 31) // 32
        self._host_mask: torch.Tensor | None = None
        self._host_rows: torch.Tensor | None = None
        self._batch_matcher = None
        # The last step's (StepGrammar, sampled tokens of its rows), accepted at the next fill.
        self._pending: tuple[StepGrammar, list[int]] | None = None
        self.advance_seconds = 0.0
        # Reported by stats(): the per-step cost of masking.
        self.mask_steps = 0
        self.mask_rows = 0
        self.mask_seconds = 0.0
        self.max_mask_seconds = 0.0

    # -- requests ---------------------------------------------------------------------------

    def submit(self, spec: StructuredOutputsParams) -> Future:
        return self.compiler.submit(spec)

    def add(self, request_id: str, compiled, num_seqs: int, stop_token_ids: list[int]) -> None:
        stops = list(dict.fromkeys([*self.stop_token_ids, *stop_token_ids]))
        self.requests[request_id] = RequestGrammar(request_id, compiled, num_seqs, stops)

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def flush(self) -> None:
        """Accept the pending step's tokens (matchers of removed requests just go with them)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            t0 = time.perf_counter()
            pending[0]._accept(pending[1])
            self.advance_seconds += time.perf_counter() - t0

    # -- the step ---------------------------------------------------------------------------

    def prepare(self, scheduler, batch) -> StepGrammar | None:
        """The step's constrained rows, or None when it has none."""
        if not self.requests:
            return None
        rows, indices = scheduler.pending_structured_samples()
        if not rows.shape[0]:
            return None
        requests = self.requests
        kept_rows, entries = [], []
        for row, i in zip(rows.tolist(), indices.tolist()):
            rg = requests.get(batch.sample_request_id(row))
            if rg is not None:
                kept_rows.append(row)
                entries.append((rg, i))
        return StepGrammar(self, kept_rows, entries) if entries else None

    def _fill(self, matchers: list, rows: list[int], device: torch.device) -> TokenBitmask:
        c = len(matchers)
        pin = device.type == "cuda"
        if self._host_mask is None or self._host_mask.shape[0] < c:
            cap = max(64, 1 << (c - 1).bit_length())
            self._host_mask = torch.empty((cap, self.words), dtype=torch.int32, pin_memory=pin)
            self._host_rows = torch.empty(cap, dtype=torch.int64, pin_memory=pin)
        mask = self._host_mask[:c]
        if c >= _BATCH_FILL_MIN_ROWS and (os.cpu_count() or 1) >= 4:
            if self._batch_matcher is None:
                self._batch_matcher = xgrammar().BatchGrammarMatcher(max_threads=min(8, (os.cpu_count() or 2) // 2))
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, mask)
        else:
            for j, m in enumerate(matchers):
                m.fill_next_token_bitmask(mask, j)
        row_t = self._host_rows[:c]
        row_t.numpy()[:] = rows
        if not pin:
            return TokenBitmask(mask, row_t)
        # The pinned buffers are refilled next step only after this step's sampled ids were
        # read back, which waits for these copies.
        return TokenBitmask(mask.to(device, non_blocking=True), row_t.to(device, non_blocking=True))

    def _record_fill(self, rows: int, seconds: float) -> None:
        self.mask_steps += 1
        self.mask_rows += rows
        self.mask_seconds += seconds
        self.max_mask_seconds = max(self.max_mask_seconds, seconds)

    def stats(self) -> dict:
        s = self.compiler.stats()
        s.update(
            num_constrained_requests=len(self.requests),
            mask_steps=self.mask_steps,
            mask_rows=self.mask_rows,
            mask_seconds=self.mask_seconds,
            max_mask_seconds=self.max_mask_seconds,
            advance_seconds=self.advance_seconds,
            mean_mask_ms_per_step=1e3 * self.mask_seconds / self.mask_steps if self.mask_steps else 0.0,
        )
        return s

    def shutdown(self) -> None:
        self.compiler.shutdown()
