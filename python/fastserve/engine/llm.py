"""The offline API, named and shaped like vLLM's `LLM` so that a vLLM script runs after
changing its import."""

from __future__ import annotations

import atexit
import itertools
import logging
import time
import weakref
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from fastserve.engine.arg_utils import EngineArgs
from fastserve.engine.engine import Engine
from fastserve.outputs import RequestOutput
from fastserve.sampling_params import SamplingParams

logger = logging.getLogger("fastserve")

# vLLM LLM(...) arguments that change nothing here (accepted so vLLM scripts run unchanged).
_ACCEPTED_NOOPS = {
    "swap_space",
    "cpu_offload_gb",
    "disable_custom_all_reduce",
    "disable_async_output_proc",
    "hf_overrides",
    "mm_processor_kwargs",
    "compilation_config",
    "use_v2_block_manager",
    "enable_lora",
    "max_logprobs",
    "distributed_executor_backend",
}


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, **kwargs: Any):
        unknown = set(kwargs) - EngineArgs.field_names() - _ACCEPTED_NOOPS
        if unknown:
            raise ValueError(
                f"unknown LLM argument(s): {sorted(unknown)}; known ones: {sorted(EngineArgs.field_names())}"
            )
        for name in _ACCEPTED_NOOPS & set(kwargs):
            kwargs.pop(name)
        self.engine_args = EngineArgs(model=model, tokenizer=tokenizer, **kwargs)
        from fastserve.generation_config import generation_defaults_for

        # Read before the engine starts so that a bad generation_config.json fails fast.
        self.default_sampling_params = generation_defaults_for(self.engine_args)
        if self.engine_args.data_parallel_size > 1:
            # Replicas in processes of their own; prompts are split among them per call.
            from fastserve.distributed.offline_replicas import OfflineReplicas

            self.engine = OfflineReplicas(self.engine_args)
        else:
            self.engine = Engine(self.engine_args)
        self._ids = itertools.count()
        # Tensor-parallel workers are child processes: stop them at interpreter exit even
        # when the LLM is never shut down or collected (a weak reference, so registering
        # does not keep the LLM alive).
        ref = weakref.ref(self)
        atexit.register(lambda: (llm := ref()) is not None and llm.shutdown())

    def shutdown(self) -> None:
        """Stop the engine's worker processes (idempotent). Called at exit and on deletion."""
        engine = self.__dict__.get("engine")
        if engine is not None:
            engine.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception as e:  # noqa: BLE001 - never raise from a finalizer (interpreter teardown)
            logger.debug("LLM shutdown in __del__ failed: %r", e)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate()/chat() use when given no sampling_params: the model's
        generation_config.json sampling fields over SamplingParams' defaults (vLLM's rule;
        LLM(..., generation_config="vllm") gives plain SamplingParams())."""
        return SamplingParams.from_optional(**self.default_sampling_params)

    # -- generate ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: Any = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
        **_ignored: Any,
    ) -> list[RequestOutput]:
        """Prompts: a string, a list of strings, a list of token-id lists, or vLLM prompt dicts
        ({"prompt": ...} / {"prompt_token_ids": ...}). Outputs come back in input order."""
        texts, token_lists = self._normalize_prompts(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = self._normalize_params(sampling_params, len(token_lists))
        return self._run(texts, token_lists, params, use_tqdm)

    def chat(
        self,
        messages: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
        tools: Any = None,
        **_ignored: Any,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, rendered
        with the model's chat template (chat_template_kwargs reach the template, e.g.
        {"enable_thinking": False} for Qwen3)."""
        from fastserve.chat_template import render_chat

        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts or a list of such lists")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        texts = [
            render_chat(
                self.engine.tokenizer,
                conv,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                chat_template_kwargs=chat_template_kwargs,
                tools=tools,
                continue_final_message=continue_final_message,
            )
            for conv in conversations
        ]
        # The template already wrote BOS where the model wants it.
        token_lists = self.engine.tokenizer.encode_batch(texts, add_special_tokens=False)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = self._normalize_params(sampling_params, len(token_lists))
        return self._run(texts, token_lists, params, use_tqdm)

    # -- internals --------------------------------------------------------------------------

    def _normalize_prompts(self, prompts, prompt_token_ids):
        if prompts is None and prompt_token_ids is None:
            raise ValueError("generate() needs prompts (strings, token-id lists or prompt dicts)")
        if prompts is None:
            prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
            prompts = [{"prompt_token_ids": list(prompts)}]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty string, list of strings or list of token-id lists")
        texts: list[str | None] = []
        token_lists: list[list[int] | None] = []
        to_encode: list[int] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                texts.append(p)
                token_lists.append(None)
                to_encode.append(i)
            elif isinstance(p, dict) and "prompt_token_ids" in p:
                texts.append(p.get("prompt"))
                token_lists.append(_token_list(p["prompt_token_ids"], i))
            elif isinstance(p, dict) and "prompt" in p:
                texts.append(p["prompt"])
                token_lists.append(None)
                to_encode.append(i)
            elif isinstance(p, Sequence) and not isinstance(p, str):
                texts.append(None)
                token_lists.append(_token_list(p, i))
            else:
                raise ValueError(
                    f"prompts[{i}] must be a string, a token-id list or a prompt dict, got {type(p).__name__}"
                )
        if to_encode:
            encoded = self.engine.tokenizer.encode_batch([texts[i] for i in to_encode], add_special_tokens=True)
            for i, ids in zip(to_encode, encoded):
                token_lists[i] = ids
        return texts, token_lists

    @staticmethod
    def _normalize_params(sampling_params, num: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num
        params = list(sampling_params)
        if len(params) != num:
            raise ValueError(f"sampling_params has {len(params)} entries but there are {num} prompts")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        return params

    def _run(self, texts, token_lists, params, use_tqdm) -> list[RequestOutput]:
        engine = self.engine
        # Check every prompt first so that one bad prompt fails the call before any runs.
        token_lists = [engine.validate_prompt(ids, p) for ids, p in zip(token_lists, params)]
        if self.engine_args.data_parallel_size > 1:
            outputs = engine.generate_split(texts, token_lists, params, use_tqdm)
            for out in outputs:  # replicas number their requests independently
                out.request_id = f"offline-{next(self._ids)}"
            return outputs
        self._compile_grammars(params)
        ids = [f"offline-{next(self._ids)}" for _ in token_lists]
        results: dict[str, RequestOutput] = {}
        try:
            for rid, text, toks, p in zip(ids, texts, token_lists, params):
                engine.add_request(rid, toks, p, prompt=text, final_only=True)
            self._loop(ids, results, sum(len(t) for t in token_lists), use_tqdm)
        except BaseException:
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
            raise
        return [results[rid] for rid in ids]

    def _compile_grammars(self, params: list[SamplingParams]) -> None:
        """Every distinct structured-outputs constraint, compiled in parallel before any request
        runs: a bad one fails the call (a ValueError naming the field) and the step loop finds
        them all cached."""
        specs = {id(p.structured_outputs): p.structured_outputs for p in params if p.structured_outputs is not None}
        if not specs:
            return
        t0 = time.perf_counter()
        futures = [self.engine.structured.submit(s) for s in specs.values()]
        for f in futures:
            f.result()
        if time.perf_counter() - t0 > 1.0:
            logger.info("compiled %d structured-output grammars in %.1f s", len(futures), time.perf_counter() - t0)

    def _loop(self, ids, results, num_prompt_tokens: int, use_tqdm: bool) -> None:
        engine = self.engine
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        tokens0 = engine.num_new_tokens
        t0 = time.perf_counter()
        in_done = 0
        try:
            while len(results) < len(ids):
                for state in engine.step():
                    if state.finished:
                        err = engine.request_errors.pop(state.request_id, None)
                        if err is not None:
                            # Its output is kept (finish_reason "abort"); the rest run on.
                            logger.error("request %s failed alone: %s", state.request_id, err)
                        results[state.request_id] = state.to_output()
                        in_done += len(state.prompt_token_ids)
                        bar.update(1)
                        elapsed = max(time.perf_counter() - t0, 1e-9)
                        out_tokens = engine.num_new_tokens - tokens0
                        bar.set_postfix_str(
                            f"est. speed input: {in_done / elapsed:.2f} toks/s, "
                            f"output: {out_tokens / elapsed:.2f} toks/s",
                            refresh=False,
                        )
                if not engine.has_unfinished() and len(results) < len(ids):
                    missing = [rid for rid in ids if rid not in results]
                    raise RuntimeError(f"engine went idle with {len(missing)} unfinished requests: {missing[:5]}")
        finally:
            bar.close()


def _token_list(p, i: int) -> list[int]:
    try:
        ids = [int(t) for t in p]
    except (TypeError, ValueError):
        raise ValueError(f"prompts[{i}] must hold integer token ids") from None
    if any(isinstance(t, bool) for t in p):
        raise ValueError(f"prompts[{i}] must hold integer token ids, not booleans")
    return ids
