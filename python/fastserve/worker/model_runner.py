"""ModelRunner: owns the model, the KV cache and the step's device buffers; turns one
`fastserve._core.Batch` into sampled token ids.

Per step the Batch's flat numpy arrays are copied (one memcpy each) into persistent host
buffers (pinned on CUDA) and from there, asynchronously, into persistent device buffers
sized from the scheduler's step limits (worker/step_buffers.py lists them); the only
host<->device sync is reading the sampled ids back. Decode-only steps replay a CUDA graph
captured for the nearest padded batch size (see cuda_graphs.py). The CPU runner takes the
same buffer path, so CPU tests exercise it."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from fastserve.config import ModelConfig
from fastserve.distributed.parallel_state import all_reduce_min, cpu_barrier, tp_rank_and_size
from fastserve.engine.arg_utils import EngineArgs
from fastserve.layers.attention import PAD_SLOT_ID, Attention, AttentionMetadata
from fastserve.layers.cpu_gemm import pack_cpu_linears
from fastserve.layers.sampler import Sampler, SamplingTensors, compute_prompt_logprobs
from fastserve.quantization.warmup import warm_up_quantized
from fastserve.worker import kv_cache as kvc
from fastserve.worker.loader import describe_weights, load_model
from fastserve.worker.sampler_state import SamplerState
from fastserve.worker.staging import PinnedStaging
from fastserve.worker.step_buffers import StepBuffers, StepLimits

logger = logging.getLogger("fastserve")


@dataclass
class StepResult:
    """Host-side results of one step (numpy, already synchronized)."""

    sampled_token_ids: np.ndarray  # int64 [S]
    sampled_logprobs: np.ndarray  # float32 [S]
    topk_ids: np.ndarray | None  # int64 [S, K] when any sample asked for logprobs
    topk_logprobs: np.ndarray | None
    sampled_ranks: np.ndarray | None
    prompt_logprobs: tuple[np.ndarray, ...] | None  # (target lp, ranks, topk ids, topk lps) [P...]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU: use device='cpu' or 'auto'")
    return torch.device(name)


class ModelRunner:
    def __init__(self, args: EngineArgs, model_config: ModelConfig):
        self.args = args
        self.config = model_config
        self.device = model_config.device
        self.block_size = args.block_size
        self.limits = StepLimits.from_args(args, model_config.max_model_len)
        self.max_num_seqs = args.max_num_seqs
        self.max_num_batched_tokens = args.max_num_batched_tokens
        self.max_num_sample_rows = self.limits.max_num_sample_rows
        self.max_blocks_per_seq = self.limits.max_blocks_per_seq
        torch.manual_seed(args.seed)
        self.tp_rank, self.tp_size = tp_rank_and_size()
        self.num_kv_heads = model_config.get_num_kv_heads(self.tp_size)
        self.kv_cache_dtype = kvc.resolve_cache_dtype(args.kv_cache_dtype, model_config.dtype)

        t0 = time.perf_counter()
        self.model = load_model(model_config, args.load_format)
        cpu_barrier()
        logger.info(
            "loaded %s (%s, %s) in %.1f s; %s",
            model_config.architecture,
            model_config.dtype,
            self.device,
            time.perf_counter() - t0,
            describe_weights(self.model, model_config),
        )
        if self.device.type == "cpu":
            t0 = time.perf_counter()
            if n := pack_cpu_linears(self.model):
                logger.info("packed %d float32 weights for oneDNN in %.1f s", n, time.perf_counter() - t0)
        self._settle_kv_scales()
        if self.device.type == "cuda":
            info = warm_up_quantized(self.model, self.max_num_batched_tokens, model_config.dtype, self.device)
            if info["layers"]:
                logger.info(
                    "compiled the quantized GEMMs for %d layer shapes x %d row counts in %.1f s",
                    info["layers"],
                    len(info["row_counts"]),
                    info["seconds"],
                )
        self.sampler = Sampler()
        self.vocab_size = model_config.vocab_size
        # Per-sequence sampling state, sent once per sequence by the scheduler (driver only:
        # only rank 0 samples).
        self.sampler_state = SamplerState(self.device, self.vocab_size)
        self.is_cuda = self.device.type == "cuda"
        self.buffers = StepBuffers(self.limits, self.device)
        self.sampling_staging = PinnedStaging(self.device)
        # Every rank must hold the same block ids, so the rank with the least free memory
        # decides.
        self.num_blocks = all_reduce_min(self._determine_num_blocks())
        kvc.check_fits(self.num_blocks, self.block_size, model_config.max_model_len)
        self.kv_caches = kvc.allocate(
            model_config.num_hidden_layers,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            model_config.head_dim,
            self.kv_cache_dtype,
            self.device,
        )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB, %s); %.1f sequences of max_model_len=%d fit",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self._block_bytes() / (1 << 30),
            str(self.kv_cache_dtype).replace("torch.", ""),
            self.num_blocks * self.block_size / model_config.max_model_len,
            model_config.max_model_len,
        )
        self.graphs = None
        if self.is_cuda and not args.enforce_eager:
            from fastserve.worker.cuda_graphs import DecodeGraphs

            t0 = time.perf_counter()
            self.graphs = DecodeGraphs(self)
            logger.info(
                "captured CUDA graphs for decode batch sizes %s in %.1f s", self.graphs.sizes, time.perf_counter() - t0
            )
        elif not self.is_cuda and args.emulate_decode_graphs:
            from fastserve.worker.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, capture=False)

    def _settle_kv_scales(self) -> None:
        """Checkpoint KV-cache scales apply to an FP8 cache only (as in vLLM); otherwise 1.0."""
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        scaled = [m for m in layers if m.k_scale != 1.0 or m.v_scale != 1.0]
        if not scaled:
            return
        if kvc.is_fp8(self.kv_cache_dtype):
            logger.info("KV-cache scales from the checkpoint for %d of %d layers", len(scaled), len(layers))
            return
        logger.info("the checkpoint's KV-cache scales are not used: kv_cache_dtype is not fp8")
        for m in scaled:
            m.k_scale = m.v_scale = 1.0

    def _block_bytes(self) -> int:
        c = self.config
        return kvc.bytes_per_block(
            c.num_hidden_layers, self.block_size, self.num_kv_heads, c.head_dim, self.kv_cache_dtype
        )

    def _determine_num_blocks(self) -> int:
        if self.args.num_gpu_blocks_override is not None:
            return self.args.num_gpu_blocks_override
        if not self.is_cuda:
            return kvc.cpu_num_blocks(self._block_bytes(), self.args.cpu_kv_cache_space_gb)
        return kvc.gpu_num_blocks(
            self._block_bytes(), self.args.gpu_memory_utilization, self._profile_peak_bytes(), self.device
        )

    @torch.inference_mode()
    def _profile_peak_bytes(self) -> int:
        """Peak memory of the largest step: max_num_batched_tokens prompt tokens over a
        throwaway cache just big enough for them, plus logits and the sampler's heaviest
        path (penalties, top-p sort, logprobs) for max_num_sample_rows rows."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.max_num_batched_tokens
        seqs = min(self.max_num_seqs, tokens)
        per_seq = tokens // seqs
        seq_lens = np.full(seqs, per_seq, dtype=np.int32)
        seq_lens[-1] += tokens - per_seq * seqs
        blocks_per_seq = math.ceil(int(seq_lens.max()) / self.block_size)
        num_blocks = seqs * blocks_per_seq
        c = self.config
        scratch = kvc.allocate(
            c.num_hidden_layers,
            num_blocks,
            self.block_size,
            self.num_kv_heads,
            c.head_dim,
            self.kv_cache_dtype,
            self.device,
        )
        block_tables = np.arange(num_blocks, dtype=np.int32).reshape(seqs, blocks_per_seq)
        qsl = np.zeros(seqs + 1, dtype=np.int32)
        qsl[1:] = np.cumsum(seq_lens)
        positions = np.concatenate([np.arange(n) for n in seq_lens]).astype(np.int64)
        rows = np.repeat(np.arange(seqs), seq_lens)
        slots = (
            block_tables[rows, positions // self.block_size].astype(np.int64) * self.block_size
            + positions % self.block_size
        )
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(self.device),
            query_start_loc=torch.from_numpy(qsl).to(self.device),
            seq_lens=torch.from_numpy(seq_lens).to(self.device),
            block_tables=torch.from_numpy(block_tables).to(self.device),
            num_decodes=0,
            max_query_len=int(seq_lens.max()),
            max_seq_len=int(seq_lens.max()),
        )
        input_ids = torch.randint(0, self.vocab_size, (tokens,), device=self.device)
        hidden = self.model(input_ids, torch.from_numpy(positions).to(self.device), meta, scratch)
        rows = self.max_num_sample_rows
        logits = self.model.compute_logits(hidden[qsl[1:] - 1].repeat(math.ceil(rows / seqs), 1)[:rows])
        self.sampler(
            logits,
            SamplingTensors.from_batch(_heaviest_sampling(rows), self.device, self.vocab_size, self.sampling_staging),
        )
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        scratch_bytes = sum(t.numel() * t.element_size() for t in scratch)
        del scratch, hidden, logits, meta
        torch.cuda.empty_cache()
        return peak - scratch_bytes

    # -- one step ---------------------------------------------------------------------------

    def _prepare(self, batch):
        b = self.buffers
        meta = AttentionMetadata(
            slot_mapping=b.load(b.slot_mapping, batch.slot_mapping),
            query_start_loc=b.load(b.query_start_loc, batch.query_start_loc),
            seq_lens=b.load(b.seq_lens, batch.seq_lens),
            block_tables=b.load(b.block_tables, batch.block_tables),
            num_decodes=batch.num_decodes,
            max_query_len=batch.max_query_len,
            max_seq_len=batch.max_seq_len,
        )
        return (
            b.load(b.input_ids, batch.input_ids),
            b.load(b.positions, batch.positions),
            meta,
            b.load(b.logits_indices, batch.logits_indices),
        )

    def _forward(self, batch):
        """(hidden states, hidden states prompt logprobs may read or None, logits row
        indices). The path taken depends only on the batch, so every tensor-parallel rank
        takes the same one and meets the same collectives."""
        if self.graphs is not None and batch.num_decodes == batch.num_seqs and self.graphs.can_run(batch):
            hidden = self.graphs.run(batch)
            b = self.buffers
            return hidden, None, b.load(b.logits_indices, batch.logits_indices)
        input_ids, positions, meta, logits_indices = self._prepare(batch)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        return hidden, hidden, logits_indices

    def _prompt_hidden_rows(self, prompt_hidden, batch):
        """Hidden states [P, H] at the batch's prompt-logprob positions. The callers project
        them max_num_sample_rows rows at a time, so a long prompt never holds [P, vocab]
        float32 logits (8k prompt tokens x 128k vocabulary would be 4 GiB, past the profile)."""
        return prompt_hidden[torch.from_numpy(batch.prompt_logprob_indices).to(self.device)]

    @torch.inference_mode()
    def execute_model(self, batch) -> None:
        """A non-driver tensor-parallel rank's step: the forward pass and the LM head's
        all-gathers, in the driver's order; the driver samples."""
        hidden, prompt_hidden, logits_indices = self._forward(batch)
        self.model.compute_logits(hidden[logits_indices])
        if batch.prompt_logprob_indices.shape[0] and prompt_hidden is not None:
            # The driver's chunks, in its order: each one all-gathers the LM head's slices.
            rows = self._prompt_hidden_rows(prompt_hidden, batch)
            for start in range(0, rows.shape[0], self.max_num_sample_rows):
                self.model.compute_logits(rows[start : start + self.max_num_sample_rows])
        if self.is_cuda:
            # The next step refills the pinned host buffers this step's copies read from.
            # The driver cannot send it before this rank's last collective anyway, so the
            # wait costs nothing and makes the reuse safe without that argument.
            torch.cuda.current_stream(self.device).synchronize()

    def check(self, batch) -> None:
        """StepLimitError when `batch` exceeds a step buffer; the executor asks before running
        anything (or sending it to other ranks)."""
        self.buffers.check(batch)

    @torch.inference_mode()
    def execute(self, batch, prompt_logprobs_k: int = 0, grammar=None) -> StepResult:
        """prompt_logprobs_k: top-K for the batch's prompt-logprob rows (the engine knows
        which requests asked for how many). The batch has passed check(). grammar: the step's
        structured-outputs rows (structured_outputs.manager.StepGrammar) or None; its bitmask
        is filled here, after the forward pass (or graph replay) was launched, so the host work
        overlaps the GPU."""
        hidden, prompt_hidden, logits_indices = self._forward(batch)
        logits = self.model.compute_logits(hidden[logits_indices])
        state = self.sampler_state
        state.apply(batch)
        st = SamplingTensors.from_rows(state.rows(batch), self.device, self.vocab_size, self.sampling_staging, state)
        token_mask = grammar.fill(self.device) if grammar is not None else None
        out = self.sampler(logits, st, token_mask)
        state.record(st.count_rows, st.count_vocab_rows, out.sampled_token_ids)

        prompt_lp = None
        if batch.prompt_logprob_indices.shape[0] and prompt_hidden is not None:
            targets = torch.from_numpy(batch.prompt_logprob_targets).to(self.device)
            plp = compute_prompt_logprobs(
                self._prompt_hidden_rows(prompt_hidden, batch),
                targets,
                max(1, prompt_logprobs_k),
                chunk_rows=self.max_num_sample_rows,
                compute_logits=self.model.compute_logits,
            )
            prompt_lp = (
                plp.target_logprobs.cpu().numpy(),
                plp.target_ranks.cpu().numpy(),
                plp.topk_ids.cpu().numpy(),
                plp.topk_logprobs.cpu().numpy(),
            )

        want_top = out.sampled_ranks is not None
        result = StepResult(
            sampled_token_ids=out.sampled_token_ids.cpu().numpy(),
            sampled_logprobs=out.sampled_logprobs.cpu().numpy(),
            topk_ids=out.topk_ids.cpu().numpy() if want_top else None,
            topk_logprobs=out.topk_logprobs.cpu().numpy() if want_top else None,
            sampled_ranks=out.sampled_ranks.cpu().numpy() if want_top else None,
            prompt_logprobs=prompt_lp,
        )
        return result


def _heaviest_sampling(rows: int):
    """A Batch's sampling arrays for `rows` rows on the sampler's heaviest path: penalties
    (two [S, vocab + 1] count tensors), top-p without top-k (a full sort), min-p, 20
    logprobs (ranks and top-K), random draws. For the memory profile only."""
    from types import SimpleNamespace

    f32 = lambda v: np.full(rows, v, dtype=np.float32)  # noqa: E731
    one = np.arange(rows + 1, dtype=np.int32)
    return SimpleNamespace(
        temperature=f32(1.0),
        top_p=f32(0.9),
        top_k=np.zeros(rows, dtype=np.int32),
        min_p=f32(0.05),
        presence_penalty=f32(0.5),
        frequency_penalty=f32(0.5),
        repetition_penalty=f32(1.1),
        seeds=np.arange(rows, dtype=np.int64),
        sample_steps=np.zeros(rows, dtype=np.int64),
        num_logprobs=np.full(rows, 20, dtype=np.int32),
        any_penalties=True,
        prompt_token_ids=np.arange(rows, dtype=np.int64),
        prompt_offsets=one,
        output_token_ids=np.arange(rows, dtype=np.int64),
        output_offsets=one,
        banned_rows=np.zeros(0, dtype=np.int64),
        banned_token_ids=np.zeros(0, dtype=np.int64),
    )


__all__ = ["ModelRunner", "StepResult", "resolve_device", "PAD_SLOT_ID"]
