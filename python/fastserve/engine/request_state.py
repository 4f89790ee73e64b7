"""RequestState: what the engine accumulates for one request from the core's step outputs
(a row per streamed token: text delta, id, logprob; a FinishedOutput per finished sequence),
turned into a vLLM RequestOutput."""

from __future__ import annotations

import time

import numpy as np

from fastserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from fastserve.sampling_params import SamplingParams


class RequestState:
    __slots__ = (
        "request_id",
        "prompt",
        "prompt_token_ids",
        "params",
        "tokenizer",
        "num_seqs",
        "texts",
        "token_ids",
        "cum_logprobs",
        "logprobs",
        "finish_reasons",
        "stop_reasons",
        "num_finished",
        "prompt_logprobs",
        "num_cached_tokens",
        "metrics",
        "finished",
        "final_only",
    )

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer,
        final_only: bool = False,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        # best_of sequences run; the n best by cumulative logprob are returned.
        self.num_seqs = params.best_of or params.n
        n = self.num_seqs
        self.texts = [""] * n
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.cum_logprobs = [0.0] * n
        self.logprobs: list[list[dict] | None] = [[] if params.logprobs is not None else None for _ in range(n)]
        self.finish_reasons: list[str | None] = [None] * n
        self.stop_reasons: list[int | str | None] = [None] * n
        self.num_finished = 0
        self.prompt_logprobs = [None] if params.prompt_logprobs is not None else None
        self.num_cached_tokens = 0
        now = time.time()
        self.metrics = RequestMetrics(arrival_time=now, last_token_time=now)
        self.finished = False
        # The core reports this request only as its sequences finish (no per-step rows).
        self.final_only = final_only

    def add_token(self, i: int, token_id: int, text_delta: str, logprob: float, result, row: int, now: float) -> None:
        """One streamed row: sequence `i` got `token_id` (sample row `row` of `result`)."""
        self.token_ids[i].append(token_id)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now
        self.texts[i] += text_delta
        self.cum_logprobs[i] += logprob
        if self.logprobs[i] is not None:
            self.logprobs[i].append(self._token_logprobs(result, row, token_id))

    def finish_seq(self, f, now: float) -> None:
        """Sequence `f.sample_index` finished (a `FinishedOutput`); a final-only one brings
        its whole output here, a streamed one has had it row by row."""
        i = f.sample_index
        if self.finish_reasons[i] is not None:
            return
        if self.final_only:
            self.token_ids[i] = f.token_ids
            self.texts[i] = f.text
            first = f.first_token_time
            if first is not None:
                m = self.metrics
                m.first_token_time = first if m.first_token_time is None else min(m.first_token_time, first)
                m.last_token_time = now
        self.num_cached_tokens = f.num_cached_tokens
        self.finish_reasons[i] = f.finish_reason
        self.stop_reasons[i] = f.stop_reason
        self.num_finished += 1
        if self.num_finished == self.num_seqs:
            self.finished = True
            self.metrics.finished_time = now

    def _token_logprobs(self, result, row: int, token_id: int) -> dict:
        k = self.params.logprobs
        detok = self.params.detokenize
        entry = {
            token_id: Logprob(
                float(result.sampled_logprobs[row]),
                int(result.sampled_ranks[row]),
                self._piece(token_id) if detok else None,
            )
        }
        if k:
            ids = result.topk_ids[row, :k].tolist()
            lps = result.topk_logprobs[row, :k].tolist()
            for rank, (tid, lp) in enumerate(zip(ids, lps), start=1):
                if tid not in entry:
                    entry[tid] = Logprob(lp, rank, self._piece(tid) if detok else None)
        return entry

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def add_prompt_logprobs(
        self, targets: np.ndarray, lps: np.ndarray, ranks: np.ndarray, top_ids: np.ndarray, top_lps: np.ndarray
    ) -> None:
        if self.prompt_logprobs is None:
            return
        k = self.params.prompt_logprobs
        for t, lp, rank, ids, tl in zip(
            targets.tolist(), lps.tolist(), ranks.tolist(), top_ids[:, :k].tolist(), top_lps[:, :k].tolist()
        ):
            entry = {t: Logprob(lp, rank, self._piece(t))}
            for r, (tid, v) in enumerate(zip(ids, tl), start=1):
                if tid not in entry:
                    entry[tid] = Logprob(v, r, self._piece(tid))
            self.prompt_logprobs.append(entry)

    def abort(self) -> None:
        for i in range(self.num_seqs):
            if self.finish_reasons[i] is None:
                self.finish_reasons[i] = "abort"
        self.finished = True

    def to_output(self) -> RequestOutput:
        order = range(self.num_seqs)
        n = self.params.n
        if self.num_seqs > n and self.finished:
            # best_of: keep the n sequences with the highest cumulative logprob (vLLM's rule).
            order = sorted(order, key=lambda i: self.cum_logprobs[i], reverse=True)[:n]
        want_lp = self.params.logprobs is not None
        outputs = (
            [
                CompletionOutput(
                    index=j,
                    text=self.texts[i],
                    token_ids=list(self.token_ids[i]),
                    cumulative_logprob=self.cum_logprobs[i] if want_lp else None,
                    logprobs=list(self.logprobs[i]) if want_lp else None,
                    finish_reason=self.finish_reasons[i],
                    stop_reason=self.stop_reasons[i],
                )
                for j, i in enumerate(order)
            ][:n]
            if self.num_seqs <= n or self.finished
            else []
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            outputs=outputs,
            finished=self.finished,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )
