"""The Rust scheduler through its Python binding (no model: sampled ids come from a seeded RNG)."""

import numpy as np
import pytest
from fastserve import _core
from fastserve._core import RequestParams, Scheduler
from tiny_models import SHARED_MODELS

EOS = 2


def make(num_blocks=256, max_model_len=256, block_size=4, **kw):
    kw.setdefault("eos_token_ids", [EOS])
    return Scheduler(num_blocks=num_blocks, max_model_len=max_model_len, block_size=block_size, **kw)


def rand_prompt(rng, n, low=3):
    # ids >= 3 so a random prompt never contains the test EOS id
    return rng.integers(low, 1000, size=n).tolist()


def check_layout(s, b):
    """Every array agrees with the others and with the block size, per the _core.pyi contract."""
    bs = s.block_size
    B, T, S = b.num_seqs, b.num_tokens, b.num_samples
    assert b.query_start_loc.shape == (B + 1,) and b.query_start_loc[0] == 0 and b.query_start_loc[-1] == T
    q = np.diff(b.query_start_loc)
    assert (q > 0).all() and (q[: b.num_decodes] == 1).all()
    assert b.max_query_len == q.max() and b.max_seq_len == b.seq_lens.max()
    assert b.block_tables.shape[0] == B and b.block_tables.shape[1] == (b.seq_lens.max() + bs - 1) // bs
    for row in range(B):
        lo, hi = b.query_start_loc[row], b.query_start_loc[row + 1]
        pos = b.positions[lo:hi]
        assert (np.diff(pos) == 1).all() and pos[-1] + 1 == b.seq_lens[row]
        expect = b.block_tables[row, pos // bs].astype(np.int64) * bs + pos % bs
        np.testing.assert_array_equal(b.slot_mapping[lo:hi], expect)
    # no two tokens of the step write the same KV slot
    assert len(np.unique(b.slot_mapping)) == T
    assert b.logits_indices.shape == (S,) and ((b.logits_indices >= 0) & (b.logits_indices < T)).all()
    for name in ("sample_seq_slots", "sample_steps"):
        assert getattr(b, name).shape == (S,), name


def drive(s, rng, check=True, max_steps=10_000, hook=None):
    """Runs the scheduler to completion; returns {(request_id, sample_index): [outputs]}."""
    outs = {}
    for _ in range(max_steps):
        if not s.has_unfinished():
            return outs
        b = s.schedule()
        assert b is not None, "unfinished requests but nothing scheduled"
        if check:
            check_layout(s, b)
            s.check_invariants()
        if hook is not None:
            hook(b)
        ids = rng.integers(3, 1000, size=b.num_samples).astype(np.int64)
        for o in s.update(ids):
            outs.setdefault((o.request_id, o.sample_index), []).append(o)
        if check:
            s.check_invariants()
    raise AssertionError("scheduler did not finish")


def test_batch_arrays_dtype_and_shape():
    rng = np.random.default_rng(0)
    s = make()
    s.add_request("a", rand_prompt(rng, 11), RequestParams(max_tokens=4, temperature=0.0, logprobs=3))
    s.add_request("b", np.array(rand_prompt(rng, 7), dtype=np.int32), RequestParams(max_tokens=4, seed=123))
    b = s.schedule()
    dtypes = {
        "input_ids": np.int64,
        "positions": np.int64,
        "slot_mapping": np.int64,
        "query_start_loc": np.int32,
        "seq_lens": np.int32,
        "block_tables": np.int32,
        "logits_indices": np.int64,
        "sample_seq_slots": np.int32,
        "sample_steps": np.int64,
        "fork_sample_rows": np.int64,
        "fork_seeds": np.int64,
        "banned_rows": np.int64,
        "banned_token_ids": np.int64,
        "new_seq_slots": np.int32,
        "new_temperature": np.float32,
        "new_top_p": np.float32,
        "new_top_k": np.int32,
        "new_min_p": np.float32,
        "new_presence_penalty": np.float32,
        "new_frequency_penalty": np.float32,
        "new_repetition_penalty": np.float32,
        "new_seeds": np.int64,
        "new_num_logprobs": np.int32,
        "new_min_tokens": np.int32,
        "new_prompt_offsets": np.int32,
        "new_prompt_token_ids": np.int64,
        "new_output_offsets": np.int32,
        "new_output_token_ids": np.int64,
        "new_ban_offsets": np.int32,
        "new_ban_token_ids": np.int64,
        "new_min_ban_offsets": np.int32,
        "new_min_ban_token_ids": np.int64,
        "freed_seq_slots": np.int32,
        "prompt_logprob_indices": np.int64,
        "prompt_logprob_targets": np.int64,
        "prompt_logprob_rows": np.int32,
    }
    for name, dt in dtypes.items():
        a = getattr(b, name)
        assert isinstance(a, np.ndarray) and a.dtype == dt and a.flags.c_contiguous, name
    assert b.block_tables.ndim == 2
    assert (b.num_seqs, b.num_tokens, b.num_samples, b.num_decodes) == (2, 18, 2, 0)
    check_layout(s, b)
    assert [b.request_id(0), b.request_id(1)] == ["a", "b"]
    assert [b.sample_request_id(0), b.sample_request_id(1)] == ["a", "b"]
    np.testing.assert_array_equal(b.logits_indices, [10, 17])
    # The sampler state of both sequences travels with their first batch, and only then.
    np.testing.assert_array_equal(b.new_seq_slots, b.sample_seq_slots)
    np.testing.assert_array_equal(b.new_temperature, [0.0, 1.0])
    np.testing.assert_array_equal(b.new_num_logprobs, [3, -1])
    assert b.new_seeds[1] == 123
    assert b.new_prompt_token_ids.shape == (0,) and b.new_prompt_offsets.tolist() == [0, 0, 0]
    with pytest.raises(IndexError):
        b.request_id(2)
    s.update(np.array([100, 101], dtype=np.int64))
    b = s.schedule()
    assert b.new_seq_slots.shape == (0,) and b.sample_seq_slots.shape == (2,)
    np.testing.assert_array_equal(b.sample_steps, [1, 1])


def worker_bans(state, b) -> list[tuple[int, int]]:
    """(sample row, token) pairs the sampler masks this step: the worker state's static bans
    (min_tokens' ids while below min_tokens, single-token bad words) and the batch's pairs."""
    state.apply(b)
    r = state.rows(b)
    pairs = set(zip(r["banned_rows"].tolist(), r["banned_token_ids"].tolist()))
    for row, vrow, active in zip(r["ban_rows"], r["ban_vocab_rows"], r["min_tokens_active"]):
        f = state.flags[int(vrow)].numpy()
        mask = ((f & 2) != 0) | (((f & 4) != 0) & bool(active))
        pairs |= {(int(row), int(t)) for t in np.flatnonzero(mask)}
    return sorted(pairs)


def test_chunked_prefill_layout_decodes_first():
    rng = np.random.default_rng(1)
    s = make(max_num_batched_tokens=32)
    s.add_request("short", rand_prompt(rng, 5), RequestParams(max_tokens=20, ignore_eos=True))
    b = s.schedule()
    s.update(np.array([7], dtype=np.int64))
    s.add_request("long", rand_prompt(rng, 100), RequestParams(max_tokens=2, ignore_eos=True))
    chunks = []
    while True:
        b = s.schedule()
        check_layout(s, b)
        # the running decode is row 0 every step; the long prompt fills the rest of the budget
        assert b.num_decodes == 1 and b.request_id(0) == "short"
        assert b.num_tokens <= 32
        chunks.append(int(b.query_start_loc[2] - b.query_start_loc[1]))
        outs = s.update(rng.integers(3, 1000, size=b.num_samples).astype(np.int64))
        if any(o.request_id == "long" for o in outs):
            break
    assert chunks == [31, 31, 31, 7]
    assert b.num_samples == 2  # the prompt's last chunk produces its first token


def test_max_num_seqs_and_budget_respected():
    rng = np.random.default_rng(2)
    s = make(num_blocks=400, max_num_seqs=5, max_num_batched_tokens=24)
    for i in range(20):
        s.add_request(
            f"r{i}",
            rand_prompt(rng, int(rng.integers(1, 60))),
            RequestParams(max_tokens=int(rng.integers(1, 9)), ignore_eos=True),
        )
    seen = []

    def hook(b):
        assert b.num_seqs <= 5 and b.num_tokens <= 24
        seen.append(b.num_seqs)

    outs = drive(s, rng, hook=hook)
    assert max(seen) == 5 and len(outs) == 20
    assert s.num_free_blocks == s.num_total_blocks


def test_prefix_cache_hits_shared_prefix():
    rng = np.random.default_rng(3)
    s = make(block_size=4)
    shared = rand_prompt(rng, 22)
    s.add_request("a", shared + rand_prompt(rng, 5), RequestParams(max_tokens=2))
    outs = drive(s, rng)
    assert outs[("a", 0)][-1].num_cached_tokens == 0
    s.add_request("b", shared + rand_prompt(rng, 9), RequestParams(max_tokens=2))
    b = s.schedule()
    # 5 full blocks (20 tokens) of the shared 22 are served from the cache
    assert b.num_tokens == 31 - 20 and b.positions[0] == 20
    out = s.update(np.array([5], dtype=np.int64))[0]
    assert out.num_cached_tokens == 20 and out.num_prompt_tokens == 31
    assert s.prefix_cache_queried_tokens == 27 + 31 and s.prefix_cache_hit_tokens == 20
    drive(s, rng)
    assert s.num_free_blocks == s.num_total_blocks


def test_prefix_cache_off_means_no_hits():
    rng = np.random.default_rng(4)
    s = make(enable_prefix_caching=False)
    p = rand_prompt(rng, 40)
    s.add_request("a", p, RequestParams(max_tokens=1))
    drive(s, rng)
    s.add_request("b", p, RequestParams(max_tokens=1))
    assert s.schedule().num_tokens == 40
    assert s.prefix_cache_hit_tokens == 0


def test_preemption_with_few_blocks_all_finish():
    rng = np.random.default_rng(5)
    s = make(num_blocks=24, block_size=4, max_num_seqs=8)
    want = {}
    for i in range(12):
        m = int(rng.integers(5, 30))
        want[f"r{i}"] = m
        s.add_request(f"r{i}", rand_prompt(rng, int(rng.integers(3, 30))), RequestParams(max_tokens=m, ignore_eos=True))
    outs = drive(s, rng)
    assert s.num_preemptions > 0
    for rid, m in want.items():
        o = outs[(rid, 0)]
        assert sum(len(x.new_token_ids) for x in o) == m
        assert o[-1].finished and o[-1].finish_reason == "length"
        assert all(not x.finished for x in o[:-1])
    assert s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0


def test_abort_frees_all_blocks_at_any_point():
    rng = np.random.default_rng(6)
    s = make(num_blocks=64, max_num_batched_tokens=16)
    for i in range(6):
        s.add_request(f"r{i}", rand_prompt(rng, 20), RequestParams(max_tokens=50, n=1 + i % 3, ignore_eos=True))
    for _ in range(4):
        b = s.schedule()
        s.update(rng.integers(3, 1000, size=b.num_samples).astype(np.int64))
    assert s.num_free_blocks < s.num_total_blocks
    b = s.schedule()
    assert s.abort_request("r0") and s.abort_request("r5")  # between schedule() and update()
    assert not s.abort_request("r0") and not s.abort_request("nope")
    outs = s.update(rng.integers(3, 1000, size=b.num_samples).astype(np.int64))
    aborted = [o for o in outs if o.finish_reason == "abort"]
    assert {o.request_id for o in aborted} == {"r0", "r5"}
    assert len([o for o in aborted if o.request_id == "r5"]) == 3  # every child of n=3
    assert all(o.new_token_ids == [] and o.finished for o in aborted)
    assert not any(o.request_id in ("r0", "r5") and o.finish_reason != "abort" for o in outs)
    for rid in ("r1", "r2", "r3", "r4"):
        s.abort_request(rid)
    assert s.num_free_blocks == s.num_total_blocks
    assert not s.has_unfinished() and s.num_running == 0 and s.num_waiting == 0
    s.check_invariants()
    assert s.schedule() is None
    outs = s.update(np.empty(0, dtype=np.int64))
    # one "abort" per child: r1 (n=2), r2 (n=3), r3 (n=1), r4 (n=2)
    assert sorted((o.request_id, o.sample_index) for o in outs) == [
        ("r1", 0),
        ("r1", 1),
        ("r2", 0),
        ("r2", 1),
        ("r2", 2),
        ("r3", 0),
        ("r4", 0),
        ("r4", 1),
    ]


def test_abort_outputs_delivered_without_a_batch():
    rng = np.random.default_rng(7)
    s = make()
    s.add_request("a", rand_prompt(rng, 9), RequestParams(max_tokens=5, n=2))
    assert s.abort_request("a")
    assert s.schedule() is None
    outs = s.update(np.empty(0, dtype=np.int64))
    assert [(o.request_id, o.sample_index, o.finish_reason) for o in outs] == [("a", 0, "abort"), ("a", 1, "abort")]
    assert s.num_free_blocks == s.num_total_blocks


def test_n_fork_shares_prompt_blocks():
    rng = np.random.default_rng(8)
    bs = 4
    s = make(block_size=bs)
    prompt = rand_prompt(rng, 14)  # 3 full blocks + 2 tokens
    s.add_request("a", prompt, RequestParams(n=3, max_tokens=4, seed=99, ignore_eos=True))
    b = s.schedule()
    assert b.num_seqs == 1 and b.num_samples == 3
    np.testing.assert_array_equal(b.logits_indices, [13, 13, 13])
    from fastserve.worker.sampler_state import SamplerState

    state = SamplerState("cpu", 1000)
    state.apply(b)
    seeds = state.rows(b)["seeds"]
    # One slot (the parent's) for the three rows; children 1 and 2 get their own seeds.
    assert len(set(b.sample_seq_slots.tolist())) == 1 and b.fork_sample_rows.tolist() == [1, 2]
    assert len(set(seeds.tolist())) == 3 and (b.sample_steps == 0).all()
    used_before = s.num_total_blocks - s.num_free_blocks
    outs = s.update(np.array([10, 11, 12], dtype=np.int64))
    assert [(o.sample_index, o.new_token_ids) for o in outs] == [(0, [10]), (1, [11]), (2, [12])]
    assert [o.sample_row for o in outs] == [0, 1, 2]
    # the children took references on the full blocks, no new blocks yet
    assert s.num_total_blocks - s.num_free_blocks == used_before
    b = s.schedule()
    check_layout(s, b)
    assert b.num_seqs == 3 and b.num_decodes == 1
    # children recompute the partial block (2 prompt tokens + their own token)
    np.testing.assert_array_equal(np.diff(b.query_start_loc), [1, 3, 3])
    np.testing.assert_array_equal(b.input_ids[1:], prompt[12:] + [11] + prompt[12:] + [12])
    full = b.block_tables[:, :3]
    assert (full == full[0]).all()
    assert len(set(b.block_tables[:, 3].tolist())) == 3
    # The children are new to the worker, with the seeds they sampled their first token with.
    assert len(b.new_seq_slots) == 2 and b.fork_sample_rows.shape == (0,)
    state.apply(b)
    np.testing.assert_array_equal(state.rows(b)["seeds"], seeds)
    np.testing.assert_array_equal(b.sample_steps, [1, 1, 1])
    s.update(np.array([20, 21, 22], dtype=np.int64))
    outs = drive(s, rng)
    assert all(outs[("a", i)][-1].finish_reason == "length" for i in range(3))
    assert s.num_free_blocks == s.num_total_blocks


def test_seeds_request_or_drawn_from_scheduler_rng():
    def seeds(sched_seed):
        s = make(seed=sched_seed)
        s.add_request("x", [5, 6, 7], RequestParams(max_tokens=1))
        s.add_request("y", [5, 6, 8], RequestParams(max_tokens=1, seed=42))
        return s.schedule().new_seeds.tolist()

    a, b, c = seeds(0), seeds(0), seeds(1)
    assert a == b and a[1] == 42 and c[1] == 42 and a[0] != c[0]


def test_finish_reasons_stop_ids_eos_length():
    s = make(max_model_len=20)
    s.add_request("eos", [5, 6, 7], RequestParams(max_tokens=10))
    s.add_request("stopid", [5, 6, 9], RequestParams(max_tokens=10, stop_token_ids=[77]))
    s.add_request("ignore", [5, 6, 10], RequestParams(max_tokens=2, ignore_eos=True))
    s.add_request("len", [5, 6, 11], RequestParams(max_tokens=2))
    s.add_request("model_len", list(range(3, 22)), RequestParams(max_tokens=100))
    s.schedule()
    outs = {o.request_id: o for o in s.update(np.array([EOS, 77, EOS, 8, 8], dtype=np.int64))}
    assert (outs["eos"].finish_reason, outs["eos"].stop_reason, outs["eos"].new_token_ids) == ("stop", None, [EOS])
    assert (outs["stopid"].finish_reason, outs["stopid"].stop_reason) == ("stop", 77)
    assert outs["ignore"].finish_reason is None
    assert outs["len"].finish_reason is None
    assert (outs["model_len"].finish_reason, outs["model_len"].stop_reason) == ("length", None)
    s.schedule()
    outs = {o.request_id: o for o in s.update(np.array([EOS, 9], dtype=np.int64))}
    assert outs["ignore"].finish_reason == "length" and outs["ignore"].new_token_ids == [EOS]
    assert outs["len"].finish_reason == "length"
    assert s.num_free_blocks == s.num_total_blocks


def test_min_tokens_bans_stop_ids():
    from fastserve.worker.sampler_state import SamplerState

    state = SamplerState("cpu", 1000)
    s = make()
    s.add_request("m", [5, 6, 7], RequestParams(max_tokens=10, min_tokens=3, stop_token_ids=[77, 78]))
    banned = []
    # As in vLLM: the sampler bans EOS and stop ids while fewer than min_tokens outputs exist.
    for tok in (5, 6, 7):
        b = s.schedule()
        banned.append(worker_bans(state, b))
        (o,) = s.update(np.array([tok], dtype=np.int64))
        assert not o.finished
    assert banned == [[(0, EOS), (0, 77), (0, 78)]] * 3
    b = s.schedule()
    assert worker_bans(state, b) == []
    (o,) = s.update(np.array([78], dtype=np.int64))
    assert (o.finish_reason, o.stop_reason, o.new_token_ids) == ("stop", 78, [78])


def test_eos_and_stop_ids_end_even_below_min_tokens():
    # vLLM's check_stop: a stop id that was sampled anyway (only a grammar allowing nothing
    # else makes the sampler pick a banned id) ends the sequence; so does EOS.
    for tok, reason in ((77, 77), (EOS, None)):
        s = make()
        s.add_request("m", [5, 6, 7], RequestParams(max_tokens=10, min_tokens=5, stop_token_ids=[77]))
        s.schedule()
        (o,) = s.update(np.array([tok], dtype=np.int64))
        assert (o.finish_reason, o.stop_reason) == ("stop", reason)


def test_eos_on_the_last_allowed_token_is_stop_not_length():
    s = make()
    s.add_request("m", [5, 6, 7], RequestParams(max_tokens=2))
    s.schedule()
    s.update(np.array([9], dtype=np.int64))
    s.schedule()
    (o,) = s.update(np.array([EOS], dtype=np.int64))
    assert (o.finish_reason, o.stop_reason) == ("stop", None)


def test_min_tokens_with_ignore_eos_bans_only_stop_ids():
    s = make()
    s.add_request("m", [5, 6, 7], RequestParams(max_tokens=3, min_tokens=1, ignore_eos=True, stop_token_ids=[9]))
    b = s.schedule()
    from fastserve.worker.sampler_state import SamplerState

    assert worker_bans(SamplerState("cpu", 1000), b) == [(0, 9)]


def test_bad_words_single_and_multi_token():
    s = make()
    s.add_request("a", [5, 6, 7], RequestParams(max_tokens=10, bad_words_token_ids=[[13], [40, 41, 42]]))
    s.add_request("b", [5, 6, 8], RequestParams(max_tokens=10))
    from fastserve.worker.sampler_state import SamplerState

    state = SamplerState("cpu", 1000)
    pairs = []
    for toks in ([40, 3], [41, 3], [50, 3], [40, 3]):
        b = s.schedule()
        pairs.append(worker_bans(state, b))
        s.update(np.array(toks, dtype=np.int64))
    # after "40 41" the multi-token word's last token is banned; after "50" it no longer is
    assert pairs == [[(0, 13)], [(0, 13)], [(0, 13), (0, 42)], [(0, 13)]]


def test_penalty_state_sent_once_and_counted_on_the_worker():
    """A penalized sequence's prompt tokens travel once; its output counts then live in the
    worker's state, updated from the sampled ids, and equal the outputs at every step."""
    import torch
    from fastserve.worker.sampler_state import SamplerState

    s = make()
    s.add_request("a", [5, 6, 7], RequestParams(max_tokens=10, repetition_penalty=1.2, frequency_penalty=0.5))
    s.add_request("b", [8, 9], RequestParams(max_tokens=10))
    b = s.schedule()
    np.testing.assert_array_equal(b.new_prompt_token_ids, [5, 6, 7])  # repetition penalty only
    np.testing.assert_array_equal(b.new_prompt_offsets, [0, 3, 3])
    np.testing.assert_array_equal(b.new_repetition_penalty, np.array([1.2, 1.0], dtype=np.float32))
    state = SamplerState("cpu", 100)
    outputs = []
    for toks in ([30, 31], [30, 33], [44, 35]):
        state.apply(b)
        r = state.rows(b)
        assert r["penalty_rows"].tolist() == [0]
        state.record(torch.from_numpy(r["count_rows"]), torch.from_numpy(r["count_vocab_rows"]), torch.tensor(toks))
        outputs.append(toks[0])
        vrow = int(r["penalty_vocab_rows"][0])
        want = np.bincount(outputs, minlength=100)
        np.testing.assert_array_equal(state.counts[vrow].numpy(), want)
        assert set(np.flatnonzero(state.flags[vrow].numpy() & 1)) == {5, 6, 7}
        s.update(np.array(toks, dtype=np.int64))
        b = s.schedule()
        assert b.new_seq_slots.shape == (0,) and b.new_prompt_token_ids.shape == (0,)


def test_prompt_logprobs_positions_across_chunks():
    rng = np.random.default_rng(9)
    s = make(max_num_batched_tokens=8)
    prompt = rand_prompt(rng, 19)
    s.add_request("a", prompt, RequestParams(max_tokens=2, prompt_logprobs=1))
    targets, rows = [], []
    while True:
        b = s.schedule()
        check_layout(s, b)
        idx = b.prompt_logprob_indices
        # each index points at a token of this step whose successor is the recorded target
        np.testing.assert_array_equal(b.prompt_logprob_targets, [prompt[p + 1] for p in b.positions[idx]])
        targets += b.prompt_logprob_targets.tolist()
        rows += b.prompt_logprob_rows.tolist()
        if s.update(rng.integers(3, 1000, size=b.num_samples).astype(np.int64)):
            break
    assert targets == prompt[1:] and set(rows) == {0}


def test_add_request_errors_name_the_problem():
    s = make(num_blocks=8, block_size=4, max_model_len=64)
    s.add_request("a", [5, 6], RequestParams())
    with pytest.raises(ValueError, match="request_id.*already"):
        s.add_request("a", [5, 6], RequestParams())
    with pytest.raises(ValueError, match="prompt_token_ids is empty"):
        s.add_request("b", [], RequestParams())
    with pytest.raises(ValueError, match=r"64 tokens but max_model_len is 64.*max-model-len"):
        s.add_request("c", list(range(64)), RequestParams())
    with pytest.raises(ValueError, match=r"needs 10 KV-cache blocks.*only 8.*gpu-memory-utilization"):
        s.add_request("d", list(range(30)), RequestParams(max_tokens=10))
    with pytest.raises(ValueError, match="prompt_token_ids holds -1"):
        s.add_request("e", [5, -1], RequestParams())
    with pytest.raises(ValueError, match="stop strings need"):
        s.add_request("f", [5], RequestParams(stop=["x"]))
    with pytest.raises(ValueError, match="min_tokens"):
        RequestParams(min_tokens=5, max_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        RequestParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make(enable_chunked_prefill=False, max_num_batched_tokens=16, max_model_len=64)
    assert s.num_waiting == 1


def test_update_checks_sample_count():
    s = make()
    s.add_request("a", [5, 6], RequestParams())
    s.schedule()
    with pytest.raises(ValueError, match="sample rows"):
        s.update(np.array([1, 2], dtype=np.int64))
    with pytest.raises(RuntimeError, match="update"):
        s.schedule()
    assert len(s.update(np.array([3], dtype=np.int64))) == 1


def test_chunked_prefill_off_schedules_whole_prompts():
    rng = np.random.default_rng(10)
    s = make(enable_chunked_prefill=False, max_num_batched_tokens=256, max_model_len=256)
    for i in range(6):
        s.add_request(f"r{i}", rand_prompt(rng, 100), RequestParams(max_tokens=3, ignore_eos=True))
    b = s.schedule()
    assert b.num_tokens == 200 and b.num_samples == 2  # a third whole prompt does not fit
    s.update(rng.integers(3, 1000, size=2).astype(np.int64))
    drive(s, rng)


@pytest.mark.skipif(not hasattr(_core, "Tokenizer"), reason="needs the Rust Tokenizer (tokenizer branch)")
def test_detokenize_and_stop_string_with_real_tokenizer():
    tok = _core.Tokenizer(str(SHARED_MODELS / "llama3-tokenizer"))
    s = Scheduler(num_blocks=64, max_model_len=256, tokenizer=tok)
    assert set(tok.eos_token_ids) <= set(s.eos_token_ids)
    prompt = tok.encode("The answer is")
    gen = tok.encode(" forty two. END of story", add_special_tokens=False)
    s.add_request("a", prompt, RequestParams(max_tokens=50, stop=["END"]))
    s.add_request("b", prompt, RequestParams(max_tokens=len(gen), ignore_eos=True))
    # below min_tokens a stop string is ordinary text (vLLM)
    s.add_request("m", prompt, RequestParams(max_tokens=len(gen), min_tokens=len(gen), stop=["END"]))
    text = {"a": "", "b": "", "m": ""}
    fin = {}
    for t in gen:
        b = s.schedule()
        for o in s.update(np.array([t] * b.num_samples, dtype=np.int64)):
            text[o.request_id] += o.text_delta
            if o.finished:
                fin[o.request_id] = o
    assert (fin["a"].finish_reason, fin["a"].stop_reason) == ("stop", "END")
    assert text["a"] == " forty two. "
    assert text["b"] == tok.decode(gen) and fin["b"].finish_reason == "length"
    assert text["m"] == tok.decode(gen) and fin["m"].finish_reason == "length"
    eos = tok.eos_token_ids[0]
    s.add_request("c", prompt, RequestParams(max_tokens=5))
    s.schedule()
    (o,) = s.update(np.array([eos], dtype=np.int64))
    assert (o.finish_reason, o.stop_reason) == ("stop", None)


@pytest.mark.skipif(not hasattr(_core, "Tokenizer"), reason="needs the Rust Tokenizer (tokenizer branch)")
@pytest.mark.parametrize("final_only", [False, True])
def test_stop_token_text_is_left_out_unless_asked_for(final_only):
    # vLLM: the EOS / stop token that ends a sequence is not part of its text, unless
    # include_stop_str_in_output (then it is, like a stop string would be).
    tok = _core.Tokenizer(str(SHARED_MODELS / "llama3-tokenizer"))
    s = Scheduler(num_blocks=64, max_model_len=256, block_size=4, tokenizer=tok, eos_token_ids=[])
    gen = tok.encode(" forty two.", add_special_tokens=False)
    dot = gen[-1]
    prompt = tok.encode("The answer is", add_special_tokens=False)
    s.add_request("cut", prompt, RequestParams(max_tokens=20, stop_token_ids=[dot], final_only=final_only))
    s.add_request(
        "kept",
        prompt,
        RequestParams(max_tokens=20, stop_token_ids=[dot], include_stop_str_in_output=True, final_only=final_only),
    )
    text = {"cut": "", "kept": ""}
    fin = {}
    for t in gen:
        b = s.schedule()
        out = s.update(np.array([t] * b.num_samples, dtype=np.int64))
        if not final_only:
            for o in out:
                text[o.request_id] += o.text_delta
        for f in out.finished:
            fin[f.request_id] = f
            if final_only:
                text[f.request_id] = f.text
    assert {k: (f.finish_reason, f.stop_reason) for k, f in fin.items()} == {
        "cut": ("stop", dot),
        "kept": ("stop", dot),
    }
    assert text == {"cut": " forty two", "kept": " forty two."}
