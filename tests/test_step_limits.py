"""The GPU staging path on CPU tensors, fed by real scheduler batches at the step limits.

StepBuffers (the model inputs) and GraphInputs (the decode graphs' padded static inputs) are
the code that copies a Batch into fixed-size buffers; on CUDA only pinning differs. Every
batch a scheduler produces under a heavy mix (n = best_of children, long prompts with
prompt logprobs, bans, chunked prefill, preemption) must fit the buffers sized from the same
limits and arrive intact; a buffer smaller than its limit must be a StepLimitError naming
the first row past it, before anything is copied."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fastserve._core import RequestParams, Scheduler
from fastserve.errors import InternalError, StepLimitError
from fastserve.layers.attention import PAD_SLOT_ID
from fastserve.worker.cuda_graphs import GraphInputs, capture_sizes
from fastserve.worker.step_buffers import StepBuffers, StepLimits

# Room for 8 decodes plus one n = 32 prompt finishing: more sample rows than 4 x max_num_seqs,
# the old logits buffer's guessed size.
LIMITS = StepLimits(
    max_num_batched_tokens=64, max_num_seqs=8, max_num_sample_rows=8 + 32, max_model_len=96, block_size=4
)


def heavy_scheduler(limits: StepLimits, num_blocks: int = 200, seed: int = 0) -> Scheduler:
    """A scheduler holding every kind of request that grows a step: many prompts finishing
    with n = 32 children (more sample rows than 4 x max_num_seqs), prompts of
    max_model_len - 1 tokens with prompt logprobs, ban lists, plain decodes."""
    rng = np.random.default_rng(seed)
    s = Scheduler(num_blocks=num_blocks, eos_token_ids=[2], **limits.scheduler_kwargs())
    for i in range(9):
        s.add_request(
            f"n{i}",
            rng.integers(3, 900, size=int(rng.integers(3, 20))).tolist(),
            RequestParams(n=32, max_tokens=3, ignore_eos=True, temperature=0.8, seed=i),
        )
    for i in range(3):
        s.add_request(
            f"long{i}",
            rng.integers(3, 900, size=limits.max_model_len - 1).tolist(),
            RequestParams(max_tokens=1, prompt_logprobs=20, logprobs=20),
        )
    for i in range(12):
        s.add_request(
            f"ban{i}",
            rng.integers(3, 900, size=int(rng.integers(1, 40))).tolist(),
            RequestParams(
                max_tokens=6,
                min_tokens=3,
                stop_token_ids=list(range(100, 140)),
                bad_words_token_ids=[[7], [8, 9]],
                repetition_penalty=1.2,
            ),
        )
    return s


def drain(s: Scheduler, on_batch, max_steps: int = 5000) -> int:
    steps = 0
    while s.has_unfinished():
        b = s.schedule()
        if b is None:
            s.update(np.zeros(0, dtype=np.int64))
            continue
        on_batch(b)
        s.update(np.full(b.num_samples, 11, dtype=np.int64))
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def check_loaded(view: torch.Tensor, array: np.ndarray) -> None:
    assert tuple(view.shape) == array.shape
    np.testing.assert_array_equal(view.numpy(), array)


def test_real_batches_fit_and_arrive_intact():
    limits = LIMITS
    s = heavy_scheduler(limits)
    buffers = StepBuffers(limits, torch.device("cpu"))
    sizes = capture_sizes(limits.max_num_seqs)
    graph = GraphInputs(sizes[-1], limits.max_blocks_per_seq, limits.max_model_len, torch.device("cpu"))
    seen = {"max_samples": 0, "decode_only": 0, "prompt_lp": 0, "max_tokens": 0}

    def on_batch(b):
        buffers.check(b)
        for name in (
            "input_ids",
            "positions",
            "slot_mapping",
            "query_start_loc",
            "seq_lens",
            "block_tables",
            "logits_indices",
        ):
            check_loaded(buffers.load(getattr(buffers, name), getattr(b, name)), getattr(b, name))
        seen["max_samples"] = max(seen["max_samples"], b.num_samples)
        seen["max_tokens"] = max(seen["max_tokens"], b.num_tokens)
        seen["prompt_lp"] += b.prompt_logprob_indices.shape[0]
        if b.num_decodes == b.num_seqs:
            seen["decode_only"] += 1
            bs = b.num_seqs
            g = next(x for x in sizes if x >= bs)
            graph.load(b, g)
            ids, pos, meta = graph.args(g)
            np.testing.assert_array_equal(ids[:bs].numpy(), b.input_ids)
            np.testing.assert_array_equal(pos[:bs].numpy(), b.positions)
            np.testing.assert_array_equal(meta.slot_mapping[:bs].numpy(), b.slot_mapping)
            np.testing.assert_array_equal(meta.seq_lens[:bs].numpy(), b.seq_lens)
            mb = b.block_tables.shape[1]
            np.testing.assert_array_equal(meta.block_tables[:bs, :mb].numpy(), b.block_tables)
            # Padding rows write no KV and attend to one key of a valid block.
            assert (meta.slot_mapping[bs:g] == PAD_SLOT_ID).all() and (meta.seq_lens[bs:g] == 1).all()
            assert (meta.block_tables[bs:g, :mb] == 0).all()

    drain(s, on_batch)
    # The workload reached the limits it is meant to test.
    assert 4 * limits.max_num_seqs < seen["max_samples"] <= limits.max_num_sample_rows
    assert seen["max_tokens"] == limits.max_num_batched_tokens
    assert seen["decode_only"] > 0 and seen["prompt_lp"] > 0


@pytest.mark.parametrize(
    "quantity,shrink",
    [
        ("sample rows", {"max_num_sample_rows": 34}),
        ("tokens", {"max_num_batched_tokens": 40}),
        ("rows", {"max_num_seqs": 5}),
        ("blocks per table", {"max_model_len": 40}),
    ],
)
def test_buffer_smaller_than_its_limit_is_a_step_limit_error(quantity, shrink):
    s = heavy_scheduler(LIMITS)
    small = StepBuffers(dataclasses.replace(LIMITS, **shrink), torch.device("cpu"))
    errors = []

    def on_batch(b):
        try:
            small.check(b)
        except StepLimitError as e:
            errors.append((e, b))
            # The named row is the first past the limit: its request is a real one.
            assert b.request_id(e.row)
            if e.quantity == "tokens":
                assert b.query_start_loc[e.row + 1] > e.capacity >= b.query_start_loc[e.row]
            elif e.quantity == "sample rows":
                first = int(b.logits_indices[e.capacity])
                assert b.query_start_loc[e.row] <= first < b.query_start_loc[e.row + 1]

    drain(s, on_batch)
    kinds = {e.quantity for e, _ in errors}
    assert quantity in kinds, f"no batch exceeded the shrunken {quantity}: {kinds}"
    e = next(e for e, _ in errors if e.quantity == quantity)
    assert isinstance(e, InternalError) and not isinstance(e, ValueError)
    assert e.needed > e.capacity and "num_samples" in str(e)


def test_discarded_step_runs_again_unchanged():
    """discard_pending() leaves the scheduler as if the step had not been scheduled: the
    next schedule() returns the same work, and the run still completes."""
    s = heavy_scheduler(LIMITS)
    for _ in range(3):
        b = s.schedule()
        s.update(np.full(b.num_samples, 11, dtype=np.int64))
    b = s.schedule()
    before = (b.input_ids.copy(), b.positions.copy(), b.num_samples)
    assert s.discard_pending() and not s.discard_pending()
    with pytest.raises(RuntimeError, match="no longer pending"):
        b.request_id(0)
    again = s.schedule()
    np.testing.assert_array_equal(again.input_ids, before[0])
    np.testing.assert_array_equal(again.positions, before[1])
    assert again.num_samples == before[2]
    s.update(np.full(again.num_samples, 11, dtype=np.int64))
    s.check_invariants()
    drain(s, lambda b: None)
    assert s.num_free_blocks == s.num_total_blocks


def test_n_past_the_sample_rows_is_refused_naming_n():
    s = Scheduler(num_blocks=64, max_model_len=96, block_size=4, max_num_seqs=4, max_num_sample_rows=10)
    with pytest.raises(ValueError, match=r"n \(sequences per request.*max_num_sample_rows"):
        s.add_request("x", [1, 2, 3], RequestParams(n=11, max_tokens=2))
    assert s.max_num_sample_rows == 10
    # The default makes room for one request of the server's largest n on top of full decodes.
    assert Scheduler(num_blocks=8, max_model_len=32, max_num_seqs=8).max_num_sample_rows == 8 + 128


def test_cli_flag_reaches_the_engine_args():
    """`--max-num-sample-rows` (the server's and run-batch's flag) sets the scheduler limit."""
    from fastserve.server.app import engine_args_from
    from fastserve.server.cli import parse_args

    args = parse_args(["--model", "m", "--max-num-seqs", "8", "--max-num-sample-rows", "40"])
    assert engine_args_from(args).max_num_sample_rows == 40
    assert engine_args_from(parse_args(["--model", "m"])).max_num_sample_rows is None


@pytest.mark.parametrize("fields, field", [({"n": 12}, "n"), ({"n": 2, "best_of": 12}, "best_of")])
def test_engine_names_the_field_past_the_sample_rows(tmp_path, fields, field):
    """The core counts a request's sequences as one number; the engine's error names the
    field the caller set (`best_of` when it is the larger), as an InvalidRequest."""
    from fastserve import LLM, SamplingParams
    from fastserve.errors import InvalidRequest
    from tiny_models import SHARED_MODELS, make_tiny_checkpoint

    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path)
    llm = LLM(
        str(path),
        tokenizer=str(SHARED_MODELS / "llama3-tokenizer"),
        device="cpu",
        dtype="float32",
        max_model_len=64,
        max_num_seqs=2,
        max_num_sample_rows=10,
        cpu_kv_cache_space_gb=0.01,
    )
    with pytest.raises(InvalidRequest, match="max_num_sample_rows") as e:
        llm.generate(
            [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=1.0, max_tokens=2, **fields), use_tqdm=False
        )
    assert e.value.field == field
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2  # the engine goes on
