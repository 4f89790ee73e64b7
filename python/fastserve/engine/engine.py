"""Engine: the synchronous step loop shared by the offline LLM and the AsyncEngine.

One step = Scheduler.schedule() (Rust) -> ModelRunner.execute() (torch) ->
Scheduler.update() (Rust: append, detokenize, stop checks, free blocks) -> route the step's
outputs to their requests. Only the routing touches Python per request: per streamed row,
and per finished sequence; a final-only request (the offline LLM's) costs nothing per step."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

import numpy as np
import torch

from fastserve._core import Scheduler, Tokenizer
from fastserve.config import ModelConfig
from fastserve.engine.arg_utils import EngineArgs
from fastserve.engine.executor import make_executor
from fastserve.engine.request_state import RequestState
from fastserve.errors import InvalidRequest, RequestError, StepLimitError
from fastserve.model_resolver import resolve_engine_args
from fastserve.outputs import RequestOutput
from fastserve.sampling_params import SamplingParams
from fastserve.structured_outputs.manager import StructuredOutputManager
from fastserve.worker.model_runner import resolve_device
from fastserve.worker.step_buffers import StepLimits

logger = logging.getLogger("fastserve")

# Scheduler token budget when the user gives none: vLLM's default for chunked prefill on
# large GPUs; the CPU path keeps steps short so tests stay quick.
_DEFAULT_BATCHED_TOKENS = {"cuda": 8192, "cpu": 2048}


class Engine:
    def __init__(self, args: EngineArgs):
        t0 = time.perf_counter()
        # Model IDs become local snapshot directories here (downloading what is missing);
        # served_model_name keeps the name the user gave.
        args = resolve_engine_args(args)
        self.args = args
        device = resolve_device(args.device)
        self.model_config = ModelConfig.from_pretrained(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            device=device,
            seed=args.seed,
            quantization=args.quantization,
            load_format=args.load_format,
        )
        from fastserve.quantization import check_tensor_parallel

        # Before any memory is taken: a quantized layout the split cannot cut names its layer.
        check_tensor_parallel(self.model_config, args.tensor_parallel_size)
        if args.max_num_batched_tokens is None:
            args.max_num_batched_tokens = _DEFAULT_BATCHED_TOKENS[device.type]
        if not args.enable_chunked_prefill and args.max_num_batched_tokens < self.model_config.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({args.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.model_config.max_model_len}) with chunked prefill off: raise --max-num-batched-tokens, "
                "lower --max-model-len or enable chunked prefill"
            )
        tokenizer_dir = _tokenizer_dir(args.tokenizer or args.model)
        self.tokenizer = Tokenizer(tokenizer_dir)
        self.served_model_names = list(args.served_model_name or [args.model])
        self.eos_token_ids = list(dict.fromkeys(self.tokenizer.eos_token_ids + self.model_config.eos_token_ids))
        # The executor runs each step's Batch (engine/executor.py): the runner here, or rank 0
        # of a tensor-parallel group whose other ranks it starts.
        # (rank 0), which broadcasts each step's Batch to them; step() is the same either way.
        self.executor = make_executor(args, self.model_config)
        self.model_config = self.executor.model_config
        self.runner = self.executor.runner  # the driver's runner (tests and benches read it)
        # The same limits the runner sized its step buffers from (worker/step_buffers.py).
        limits = StepLimits.from_args(args, self.model_config.max_model_len)
        self.scheduler = Scheduler(
            num_blocks=self.executor.num_blocks,
            **limits.scheduler_kwargs(),
            enable_prefix_caching=args.enable_prefix_caching,
            enable_chunked_prefill=args.enable_chunked_prefill,
            tokenizer=self.tokenizer,
            eos_token_ids=self.eos_token_ids,
            seed=args.seed,
        )
        self.requests: dict[str, RequestState] = {}
        # Structured outputs: grammars compile in the manager's thread pool; a request whose
        # grammar is not compiled yet waits here (not in the scheduler) until it is.
        self.structured = StructuredOutputManager(tokenizer_dir, self.model_config.vocab_size, self.eos_token_ids)
        self._awaiting_grammar: dict[str, tuple] = {}
        # Output tokens appended so far, streamed or not (the offline progress bar's rate).
        self.num_new_tokens = 0
        # Requests failed alone by the last step() (their states come back finished): the
        # AsyncEngine hands each caller its error instead of an output.
        self.request_errors: dict[str, RequestError] = {}
        self.step_hook = None
        if device.type == "cuda":
            try:
                self._warmup()
            except BaseException:
                self.shutdown()  # no tensor-parallel worker outlives a failed start
                raise
        self.step_hook = args.step_hook
        logger.info("engine ready in %.1f s", time.perf_counter() - t0)

    def _warmup(self) -> None:
        """Compile every Triton kernel variant a real workload meets (decode-like and long
        prefills, split and unsplit decode) before the first request, so no user request
        waits on the JIT."""
        t0 = time.perf_counter()
        # Greedy and random rows both: the random draw's noise is compiled on first use.
        params = [
            SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
            SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=3, ignore_eos=True, seed=0),
        ]
        limit = self.model_config.max_model_len - 4
        lengths = sorted({min(n, limit) for n in (1, 3, 9, 17, 130, 600, 2100)})
        for i, n in enumerate(lengths):
            self.add_request(f"__warmup_{i}", [i % 100 + 1] * n, params[i % 2])
        while self.has_unfinished():
            self.step()
        self.requests.clear()
        from fastserve.structured_outputs.bitmask import TokenBitmask, apply_token_bitmask

        # The grammar-mask kernel, so the first structured request does not wait on the JIT.
        dev = self.model_config.device
        words = (self.model_config.vocab_size + 31) // 32
        apply_token_bitmask(
            torch.zeros(2, self.model_config.vocab_size, device=dev),
            TokenBitmask(
                torch.full((1, words), -1, dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int64, device=dev)
            ),
        )
        logger.info("warm-up (kernel compilation) took %.1f s", time.perf_counter() - t0)

    # -- requests ---------------------------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt after truncate_prompt_tokens; InvalidRequest when it cannot run."""
        if params.truncate_prompt_tokens is not None:
            prompt_token_ids = prompt_token_ids[-params.truncate_prompt_tokens :]
        n = len(prompt_token_ids)
        limit = self.model_config.max_model_len
        if n == 0:
            raise InvalidRequest("prompt is empty: give at least one token", "prompt")
        if n >= limit:
            raise InvalidRequest(
                f"prompt is {n} tokens long but max_model_len is {limit} (one token must be left to "
                "generate): shorten the prompt, set truncate_prompt_tokens, or raise --max-model-len",
                "prompt",
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt_token_ids holds ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
        for name in ("logit_bias", "allowed_token_ids"):
            ids = getattr(params, name) or ()
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"{name} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}", name)
        return prompt_token_ids

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        final_only: bool = False,
    ) -> RequestState:
        """final_only: the caller wants the finished output alone (the offline LLM), so the
        core reports the request once per sequence at its end instead of a row per token.
        Ignored when per-token logprobs or best_of ranking need every step's row."""
        if request_id in self.requests:
            raise InvalidRequest(f"request_id {request_id!r} is already running", "request_id")
        prompt_token_ids = self.validate_prompt(list(prompt_token_ids), params)
        final_only = final_only and params.logprobs is None and (params.best_of or params.n) == params.n
        core = params.to_core(self.tokenizer, final_only=final_only)
        state = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer, final_only)
        if params.structured_outputs is not None:
            grammar = self.structured.submit(params.structured_outputs)
            if not grammar.done():
                self._awaiting_grammar[request_id] = (grammar, prompt_token_ids, core)
                self.requests[request_id] = state
                return state
            compiled = grammar.result()  # StructuredOutputsError (a ValueError naming the field)
            self._schedule(request_id, prompt_token_ids, core, params)
            self.structured.add(request_id, compiled, state.num_seqs, params.stop_token_ids)
        else:
            self._schedule(request_id, prompt_token_ids, core, params)
        self.requests[request_id] = state
        return state

    def _schedule(self, request_id: str, prompt_token_ids: list[int], core, params: SamplingParams) -> None:
        try:
            self.scheduler.add_request(request_id, prompt_token_ids, core)
        except InvalidRequest as e:
            # The core counts sequences as one `n` (best_of when set): name the field the caller set.
            if e.field == "n" and params.best_of is not None and params.best_of != params.n:
                raise InvalidRequest(e.message, "best_of") from None
            raise

    def _admit_compiled(self, touched: dict[str, RequestState]) -> None:
        """Requests whose grammar finished compiling go to the scheduler (or fail alone)."""
        for rid, (grammar, prompt_token_ids, core) in list(self._awaiting_grammar.items()):
            if not grammar.done():
                continue
            del self._awaiting_grammar[rid]
            state = self.requests.get(rid)
            if state is None:
                continue
            try:
                compiled = grammar.result()
                self.scheduler.add_request(rid, prompt_token_ids, core)
                self.structured.add(rid, compiled, state.num_seqs, state.params.stop_token_ids)
            except Exception as e:  # noqa: BLE001 - this request's constraint: it alone fails
                self._fail(RequestError(rid, f"its structured-output constraint failed: {e}"), touched, e)

    def abort_request(self, request_id: str) -> RequestState | None:
        state = self.requests.pop(request_id, None)
        self.scheduler.abort_request(request_id)
        self._awaiting_grammar.pop(request_id, None)
        self.structured.remove(request_id)
        if state is not None:
            state.abort()
        return state

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._awaiting_grammar)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestState]:
        """Run one step; returns the requests that got new output (finished ones included,
        and removed from the engine). A request failed alone this step is among them,
        finished, with its error in `request_errors`."""
        touched: dict[str, RequestState] = {}
        if self._awaiting_grammar:
            self._admit_compiled(touched)
        batch = self.scheduler.schedule()
        if batch is None:
            if self._awaiting_grammar:  # nothing to run until a grammar is ready
                concurrent.futures.wait(
                    [g for g, _, _ in self._awaiting_grammar.values()],
                    timeout=0.05,
                    return_when=concurrent.futures.FIRST_COMPLETED,
                )
            return list(touched.values())
        if self.step_hook is not None:
            try:
                self.step_hook(batch)
            except RequestError as e:
                # The batch still runs for everyone else: update() skips the rows of a
                # request aborted after schedule(), and the aborted rows only write KV into
                # slots of blocks just freed (nothing allocates before the next schedule()).
                self._fail(e, touched, e)
        grammar = self.structured.prepare(self.scheduler, batch) if self.structured.requests else None
        try:
            result = self.executor.execute(batch, self._prompt_logprobs_k(batch), grammar)
        except StepLimitError as e:
            self._refuse_step(batch, e, touched)
            return list(touched.values())
        if grammar is not None:
            grammar.advance(result.sampled_token_ids)
        if result.prompt_logprobs is not None:
            self._route_prompt_logprobs(batch, result.prompt_logprobs, touched)
        now = time.time()
        out = self.scheduler.update(result.sampled_token_ids, now)
        self.num_new_tokens += out.num_new_tokens
        if out.num_rows:
            self._route_rows(out, result, now, touched)
        for f in out.finished:
            rid = f.request_id
            state = self.requests.get(rid)
            if state is None:  # aborted by the caller already, or failed this step
                continue
            try:
                state.finish_seq(f, now)
            except Exception as e:  # noqa: BLE001 - this request's own output broke: it alone fails
                self._fail(RequestError(rid, f"routing its output failed: {e!r}"), touched, e)
                continue
            touched[rid] = state
        constrained = self.structured.requests
        for rid, state in touched.items():
            if state.finished:
                self.requests.pop(rid, None)
                if constrained:
                    constrained.pop(rid, None)
        return list(touched.values())

    def _route_rows(self, out, result, now: float, touched: dict[str, RequestState]) -> None:
        """Hands each streamed row (one sequence's token of this step) to its request. The
        columns become Python lists in one call each; what is left per row is the append."""
        requests = self.requests
        indices = out.sample_indices.tolist()
        rows = out.sample_rows
        logprobs = result.sampled_logprobs[rows].tolist()
        rows = rows.tolist()
        tokens = out.token_ids.tolist()
        offsets = out.text_offsets.tolist()
        text = out.text
        for j, rid in enumerate(out.request_ids):
            state = requests.get(rid)
            if state is None:  # aborted by the caller already, or failed this step
                continue
            try:
                state.add_token(
                    indices[j], tokens[j], text[offsets[j] : offsets[j + 1]], logprobs[j], result, rows[j], now
                )
            except Exception as e:  # noqa: BLE001 - this request's own output broke: it alone fails
                self._fail(RequestError(rid, f"routing its output failed: {e!r}"), touched, e)
                continue
            touched[rid] = state

    def _prompt_logprobs_k(self, batch) -> int:
        """Top-K for this step's prompt logprobs: the largest any of its requests asked for
        (0, and no per-row work, when none did)."""
        rows = batch.prompt_logprob_rows
        if not rows.shape[0]:
            return 0
        states = (self.requests.get(batch.request_id(int(r))) for r in np.unique(rows))
        return max((s.params.prompt_logprobs or 0 for s in states if s is not None), default=0)

    def _refuse_step(self, batch, err: StepLimitError, touched: dict[str, RequestState]) -> None:
        """The worker refused the batch before running anything (a step limit the scheduler
        should have kept): drop the step, fail the request of the first row past the limit
        as an internal error, and let everyone else run again next step."""
        rid = str(batch.request_id(err.row))
        logger.error("step refused by the worker, failing request %s alone: %s", rid, err)
        self.scheduler.discard_pending()
        self._fail(RequestError(rid, str(err)), touched, err)

    def _fail(self, err: RequestError, touched: dict[str, RequestState], cause: BaseException) -> None:
        state = self.requests.pop(err.request_id, None)
        if state is None:
            logger.warning("ignoring %s: no such running request", err)
            return
        logger.error("request %s failed alone: %s", err.request_id, err, exc_info=cause)
        self.scheduler.abort_request(err.request_id)
        self._awaiting_grammar.pop(err.request_id, None)
        self.structured.remove(err.request_id)
        state.abort()
        self.request_errors[err.request_id] = err
        touched[err.request_id] = state

    def _route_prompt_logprobs(self, batch, arrays, touched: dict[str, RequestState]) -> None:
        rows = batch.prompt_logprob_rows
        # Rows come grouped by sequence: one slice per request.
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        ends = np.r_[starts[1:], len(rows)]
        for start, end in zip(starts.tolist(), ends.tolist()):
            rid = batch.request_id(int(rows[start]))
            state = self.requests.get(rid)
            if state is None:
                continue
            try:
                state.add_prompt_logprobs(batch.prompt_logprob_targets[start:end], *(a[start:end] for a in arrays))
            except Exception as e:  # noqa: BLE001 - this request's own output broke: it alone fails
                self._fail(RequestError(rid, f"routing its prompt logprobs failed: {e!r}"), touched, e)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (idempotent; a TP=1 engine holds no processes)."""
        self.executor.shutdown()
        structured = getattr(self, "structured", None)
        if structured is not None:
            structured.shutdown()

    def stats(self) -> dict:
        s = self.scheduler
        total = s.num_total_blocks
        return {
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "num_free_blocks": s.num_free_blocks,
            "num_total_blocks": total,
            "kv_cache_usage": 1.0 - s.num_free_blocks / total if total else 0.0,
            "prefix_cache_queried_tokens": s.prefix_cache_queried_tokens,
            "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
            "num_preemptions": s.num_preemptions,
        }


def _tokenizer_dir(path: str) -> str:
    from fastserve.gguf_loader import is_gguf

    if is_gguf(path):  # the GGUF's own tokenizer and chat template, converted once into the cache
        from fastserve.gguf_tokenizer import gguf_tokenizer_dir

        return gguf_tokenizer_dir(path)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(
            f"no tokenizer.json in {path!r}: fastserve reads Hugging Face fast tokenizers; pass "
            "--tokenizer with a directory that has one"
        )
    return path


def output_of(state: RequestState) -> RequestOutput:
    return state.to_output()
