"""The sampler against straightforward references: filters, penalties, bans, logprobs, the
counter-based RNG, and sampling frequencies (chi-square, with a check that the test rejects a
wrong distribution)."""

import types

import numpy as np
import pytest
import torch
from fastserve.layers.sampler import (
    Sampler,
    SamplingTensors,
    _apply_min_p,
    _apply_penalties,
    _apply_top_k,
    _apply_top_p,
    _apply_top_p_within_top_k,
    compute_prompt_logprobs,
    row_keys,
    uniform_noise,
)
from tiny_models import SHARED_MODELS

M64 = 2**64 - 1


def make_batch(s, rng, **over):
    """A Batch's sampling attributes as the Rust core lays them out (numpy, per sample row)."""
    b = dict(
        temperature=np.ones(s, np.float32),
        top_p=np.ones(s, np.float32),
        top_k=np.zeros(s, np.int32),
        min_p=np.zeros(s, np.float32),
        presence_penalty=np.zeros(s, np.float32),
        frequency_penalty=np.zeros(s, np.float32),
        repetition_penalty=np.ones(s, np.float32),
        seeds=rng.integers(-(2**63), 2**63 - 1, size=s, dtype=np.int64),
        sample_steps=rng.integers(0, 1000, size=s, dtype=np.int64),
        num_logprobs=np.full(s, -1, np.int32),
        prompt_token_ids=np.zeros(0, np.int64),
        prompt_offsets=np.zeros(s + 1, np.int32),
        output_token_ids=np.zeros(0, np.int64),
        output_offsets=np.zeros(s + 1, np.int32),
        banned_rows=np.zeros(0, np.int64),
        banned_token_ids=np.zeros(0, np.int64),
        any_penalties=False,
    )
    for k, v in over.items():
        b[k] = np.asarray(v, dtype=b[k].dtype) if isinstance(b.get(k), np.ndarray) else v
    b["all_greedy"] = bool((b["temperature"] == 0).all())
    b["max_num_logprobs"] = max(int(b["num_logprobs"].max(initial=-1)), 0)
    return types.SimpleNamespace(**b)


def sample(logits, batch):
    st = SamplingTensors.from_batch(batch, "cpu", logits.shape[1])
    return Sampler()(logits.clone(), st)


# --------------------------------------------------------------------------- RNG


def splitmix64_ref(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def mix_ref(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_noise_equals_unsigned_splitmix64_reference():
    rng = np.random.default_rng(1)
    seeds = rng.integers(-(2**63), 2**63 - 1, size=8, dtype=np.int64)
    steps = rng.integers(0, 10**6, size=8, dtype=np.int64)
    tokens = torch.from_numpy(rng.integers(0, 200_000, size=64, dtype=np.int64))
    keys = row_keys(torch.from_numpy(seeds), torch.from_numpy(steps))
    u = uniform_noise(keys, tokens)
    for i in range(8):
        s, t = int(seeds[i]) & M64, int(steps[i])
        key = mix_ref(s ^ mix_ref((t * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & M64))
        assert int(keys[i]) & M64 == key
        for j, tok in enumerate(tokens.tolist()):
            # splitmix64 stream `key`, element tok + 1: state key + (tok + 1) * golden.
            z = splitmix64_ref((key + tok * 0x9E3779B97F4A7C15) & M64)
            expected = ((z >> 41) + 0.5) * 2.0**-23
            assert float(u[i, j]) == pytest.approx(expected, rel=0, abs=0)
    assert (u > 0).all() and (u < 1).all()


def test_noise_is_uniform_and_uncorrelated_across_steps():
    keys = row_keys(torch.full((4000,), 1234, dtype=torch.int64), torch.arange(4000))
    u = uniform_noise(keys, torch.arange(64)).flatten().double()
    assert abs(u.mean().item() - 0.5) < 0.003
    assert abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 37.7  # df = 15, p = 0.001
    a = uniform_noise(keys[:-1], torch.arange(64)).flatten().double()
    b = uniform_noise(keys[1:], torch.arange(64)).flatten().double()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01


# --------------------------------------------------------------------------- frequencies


def chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    expected = probs * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


# df = 11 at p = 1e-4 (a fixed seed set, so the outcome is deterministic; the bound is loose
# enough for any correct sampler and far below what a 0.02 shift of mass produces at 24k draws).
CHI2_BOUND = 35.0


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_temperature_sampling_matches_softmax_frequencies(vary):
    v, n = 12, 24_000
    gen = torch.Generator().manual_seed(7)
    row = torch.randn(v, generator=gen) * 1.5
    t = 0.8
    rng = np.random.default_rng(3)
    over = dict(temperature=np.full(n, t))
    if vary == "seed":
        over.update(seeds=np.arange(n) * 7919 + 11, sample_steps=np.zeros(n))
    else:
        over.update(seeds=np.full(n, 42), sample_steps=np.arange(n))
    out = sample(row.expand(n, v).contiguous(), make_batch(n, rng, **over))
    tokens = out.sampled_token_ids.numpy()
    probs = torch.softmax(row.double() / t, -1).numpy()
    assert chi_square(tokens, probs) < CHI2_BOUND
    # The same test rejects a wrong distribution: the untempered softmax, and the right one
    # with 0.02 of probability moved from the likeliest token to the second likeliest.
    assert chi_square(tokens, torch.softmax(row.double(), -1).numpy()) > CHI2_BOUND
    first, second = np.argsort(probs)[::-1][:2]
    biased = probs.copy()
    biased[first] -= 0.02
    biased[second] += 0.02
    assert chi_square(tokens, biased) > CHI2_BOUND


# --------------------------------------------------------------------------- filters


def ref_allowed(row, t, top_k, top_p, min_p):
    """Straightforward vLLM semantics on one row (python lists, float64)."""
    x = [float(a) / t for a in row]
    v = len(x)
    allowed = set(range(v))
    if min_p > 0:
        e = [np.exp(a - max(x)) for a in x]
        z = sum(e)
        pmax = max(e) / z
        allowed = {i for i in allowed if e[i] / z >= min_p * pmax}
    if 0 < top_k < v:
        kth = sorted((x[i] for i in allowed), reverse=True)[top_k - 1] if len(allowed) >= top_k else -np.inf
        allowed = {i for i in allowed if x[i] >= kth}
    if top_p < 1:
        order = sorted(allowed, key=lambda i: x[i])  # ascending
        e = np.array([np.exp(x[i] - max(x)) for i in order])
        cum = np.cumsum(e / e.sum())
        allowed = {i for i, c in zip(order, cum) if c > 1 - top_p} | {order[-1]}
    return allowed


def test_filters_equal_reference_sets():
    rng = np.random.default_rng(5)
    gen = torch.Generator().manual_seed(5)
    s, v = 48, 40
    logits = torch.randn(s, v, generator=gen) * 2
    t = rng.uniform(0.3, 1.5, s).astype(np.float32)
    top_k = rng.choice([0, 1, 3, 7, 39, 40, 100], s).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.5, 0.1], s).astype(np.float32)
    min_p = rng.choice([0.0, 0.05, 0.3], s).astype(np.float32)
    st = SamplingTensors.from_batch(
        make_batch(s, rng, temperature=t, top_k=top_k, top_p=top_p, min_p=min_p),
        "cpu",
        v,
    )
    x = logits.clone() / st.temperature[:, None]
    x = _apply_min_p(x, st.min_p)
    x, values = _apply_top_k(x, st.top_k, st.max_top_k)
    x = _apply_top_p_within_top_k(x, values, st.top_p_top_k_rows, st.top_k, st.top_p)
    x = _apply_top_p(x, st.top_p_rows, st.top_p)
    assert len(st.top_p_rows) and len(st.top_p_top_k_rows)
    for i in range(s):
        got = set(torch.nonzero(x[i] > float("-inf")).flatten().tolist())
        assert got == ref_allowed(logits[i].tolist(), t[i], int(top_k[i]), float(top_p[i]), float(min_p[i])), i


def test_sampled_tokens_cover_exactly_the_allowed_set():
    rng = np.random.default_rng(9)
    gen = torch.Generator().manual_seed(9)
    v, reps = 30, 600
    row = torch.randn(v, generator=gen)
    cases = [
        (1.0, 5, 1.0, 0.0),
        (1.0, 0, 0.6, 0.0),
        (0.7, 0, 1.0, 0.2),
        (1.3, 8, 0.8, 0.05),
    ]
    for t, k, p, mp in cases:
        out = sample(
            row.expand(reps, v).contiguous(),
            make_batch(
                reps,
                rng,
                temperature=np.full(reps, t),
                top_k=np.full(reps, k),
                top_p=np.full(reps, p),
                min_p=np.full(reps, mp),
            ),
        )
        got = set(out.sampled_token_ids.tolist())
        assert got == ref_allowed(row.tolist(), t, k, p, mp), (t, k, p, mp)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    rng = np.random.default_rng(2)
    gen = torch.Generator().manual_seed(2)
    s, v = 64, 1000
    logits = torch.randn(s, v, generator=gen) * 3
    greedy = sample(logits, make_batch(s, rng, temperature=np.zeros(s))).sampled_token_ids
    assert torch.equal(greedy, logits.argmax(-1))
    k1 = sample(logits, make_batch(s, rng, top_k=np.ones(s), temperature=np.full(s, 1.7)))
    assert torch.equal(k1.sampled_token_ids, greedy)
    p0 = sample(logits, make_batch(s, rng, top_p=np.full(s, 1e-6), temperature=np.full(s, 0.9)))
    assert torch.equal(p0.sampled_token_ids, greedy)
    # And sampling without filters is not greedy (the test above could not pass by accident).
    free = sample(logits / 3, make_batch(s, rng, temperature=np.full(s, 1.0)))
    assert not torch.equal(free.sampled_token_ids, greedy)


def test_mixed_greedy_and_random_rows():
    rng = np.random.default_rng(4)
    gen = torch.Generator().manual_seed(4)
    s, v = 50, 200
    logits = torch.randn(s, v, generator=gen)
    temp = np.where(np.arange(s) % 2 == 0, 0.0, 1.0).astype(np.float32)
    out = sample(logits, make_batch(s, rng, temperature=temp)).sampled_token_ids
    greedy_rows = torch.from_numpy(temp == 0)
    assert torch.equal(out[greedy_rows], logits.argmax(-1)[greedy_rows])
    assert not torch.equal(out[~greedy_rows], logits.argmax(-1)[~greedy_rows])


# --------------------------------------------------------------------------- penalties, bans


def csr(lists):
    offsets = np.zeros(len(lists) + 1, np.int32)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    flat = np.array([t for x in lists for t in x], dtype=np.int64)
    return flat, offsets


def ref_penalties(logits, prompts, outputs, pres, freq, rep):
    out = logits.clone()
    for i in range(out.shape[0]):
        seen = set(prompts[i]) | set(outputs[i])
        for tok in seen:
            x = out[i, tok].item()
            out[i, tok] = x / rep[i] if x > 0 else x * rep[i]
        for tok in set(outputs[i]):
            out[i, tok] -= freq[i] * outputs[i].count(tok) + pres[i]
    return out


def test_penalties_equal_loop_reference():
    rng = np.random.default_rng(11)
    gen = torch.Generator().manual_seed(11)
    s, v = 16, 50
    logits = torch.randn(s, v, generator=gen) * 2
    prompts = [rng.integers(0, v, rng.integers(1, 30)).tolist() for _ in range(s)]
    outputs = [rng.integers(0, v, rng.integers(0, 40)).tolist() for _ in range(s)]
    pres = rng.uniform(-2, 2, s).astype(np.float32)
    freq = rng.uniform(-2, 2, s).astype(np.float32)
    rep = rng.uniform(0.5, 2.0, s).astype(np.float32)
    pt, po = csr(prompts)
    ot, oo = csr(outputs)
    batch = make_batch(
        s,
        rng,
        presence_penalty=pres,
        frequency_penalty=freq,
        repetition_penalty=rep,
        prompt_token_ids=pt,
        prompt_offsets=po,
        output_token_ids=ot,
        output_offsets=oo,
        any_penalties=True,
    )
    st = SamplingTensors.from_batch(batch, "cpu", v)
    got = _apply_penalties(logits.clone(), st)
    want = ref_penalties(logits, prompts, outputs, pres.tolist(), freq.tolist(), rep.tolist())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Greedy decoding follows the penalized logits, logprobs stay raw (vLLM's default).
    batch.temperature = np.zeros(s, np.float32)
    batch.num_logprobs = np.full(s, 2, np.int32)
    out = sample(logits, batch)
    assert torch.equal(out.sampled_token_ids, want.argmax(-1))
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.sampled_logprobs, raw.gather(1, out.sampled_token_ids[:, None])[:, 0])


def test_banned_pairs_are_never_sampled():
    rng = np.random.default_rng(12)
    gen = torch.Generator().manual_seed(12)
    s, v = 200, 20
    logits = torch.randn(s, v, generator=gen)
    rows = np.repeat(np.arange(s), 3)
    # ban each row's three likeliest tokens: an unmasked sampler would pick them most often
    banned = logits.topk(3, -1).indices.flatten().numpy()
    out = sample(logits, make_batch(s, rng, banned_rows=rows, banned_token_ids=banned)).sampled_token_ids
    assert not (out[:, None] == logits.topk(3, -1).indices).any()
    greedy = sample(
        logits,
        make_batch(s, rng, temperature=np.zeros(s), banned_rows=rows, banned_token_ids=banned),
    ).sampled_token_ids
    assert torch.equal(greedy, logits.topk(4, -1).indices[:, 3])


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_and_step_give_same_token_in_any_batch():
    rng = np.random.default_rng(13)
    gen = torch.Generator().manual_seed(13)
    v = 500
    base_logits = torch.randn(8, v, generator=gen)
    base = make_batch(
        8,
        rng,
        temperature=rng.uniform(0.5, 1.5, 8),
        top_k=rng.choice([0, 50], 8),
        top_p=rng.choice([1.0, 0.9], 8),
        min_p=rng.choice([0.0, 0.01], 8),
    )
    first = sample(base_logits, base).sampled_token_ids
    for trial in range(4):
        extra = int(rng.integers(1, 30))
        other = make_batch(
            extra,
            rng,
            temperature=rng.choice([0.0, 1.0], extra),
            top_k=rng.choice([0, 3, 400], extra),
            top_p=rng.choice([1.0, 0.3], extra),
        )
        perm = rng.permutation(8 + extra)
        merged = {}
        for name in vars(base):
            a, b = getattr(base, name), getattr(other, name)
            if isinstance(a, np.ndarray) and a.shape == (8,):
                merged[name] = np.concatenate([a, b])[perm]
        big = make_batch(8 + extra, rng, **merged)
        logits = torch.cat([base_logits, torch.randn(extra, v, generator=gen)])[torch.from_numpy(perm)]
        out = sample(logits, big).sampled_token_ids
        where = np.argsort(perm)[:8]  # position of each base row in the merged batch
        assert torch.equal(out[torch.from_numpy(where)], first), trial
    # A different step of the same seed gives different tokens (noise is not frozen).
    base.sample_steps = base.sample_steps + 1
    assert not torch.equal(sample(base_logits, base).sampled_token_ids, first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_sample_the_same_tokens():
    rng = np.random.default_rng(14)
    gen = torch.Generator().manual_seed(14)
    s, v = 64, 32000
    logits = torch.randn(s, v, generator=gen) * 2
    batch = make_batch(s, rng, temperature=rng.uniform(0.5, 1.5, s), top_k=rng.choice([0, 40], s))
    cpu = Sampler()(logits.clone(), SamplingTensors.from_batch(batch, "cpu", v)).sampled_token_ids
    gpu = Sampler()(logits.cuda(), SamplingTensors.from_batch(batch, "cuda", v)).sampled_token_ids
    assert torch.equal(cpu, gpu.cpu())


# --------------------------------------------------------------------------- logprobs


def test_logprobs_topk_and_ranks_equal_log_softmax():
    rng = np.random.default_rng(15)
    gen = torch.Generator().manual_seed(15)
    s, v = 32, 300
    logits = torch.randn(s, v, generator=gen) * 2
    nlp = rng.choice([-1, 0, 1, 5], s).astype(np.int32)
    nlp[0] = 5
    out = sample(logits, make_batch(s, rng, num_logprobs=nlp, temperature=np.full(s, 1.0)))
    ref = torch.log_softmax(logits.double(), -1).float()
    assert out.topk_ids.shape == (s, 5) and out.topk_logprobs.shape == (s, 5)
    ref_top = ref.topk(5, -1)
    assert torch.equal(out.topk_ids, ref_top.indices)
    torch.testing.assert_close(out.topk_logprobs, ref_top.values)
    tok = out.sampled_token_ids
    torch.testing.assert_close(out.sampled_logprobs, ref.gather(1, tok[:, None])[:, 0])
    want_rank = torch.tensor([int((ref[i] > ref[i, tok[i]]).sum()) + 1 for i in range(s)])
    assert torch.equal(out.sampled_ranks, want_rank)
    # Ranks are skipped when nobody asked for logprobs.
    none = sample(logits, make_batch(s, rng))
    assert none.sampled_ranks is None and none.topk_ids.shape == (s, 0)
    torch.testing.assert_close(none.sampled_logprobs, ref.gather(1, none.sampled_token_ids[:, None])[:, 0])


def test_forward_leaves_logits_unchanged():
    rng = np.random.default_rng(18)
    gen = torch.Generator().manual_seed(18)
    s, v = 10, 64
    logits = torch.randn(s, v, generator=gen)
    before = logits.clone()
    pt, po = csr([[1, 2, 3]] * s)
    batch = make_batch(
        s,
        rng,
        temperature=rng.choice([0.0, 0.5], s),
        top_k=np.full(s, 5),
        top_p=np.full(s, 0.7),
        min_p=np.full(s, 0.1),
        banned_rows=np.arange(s),
        banned_token_ids=np.zeros(s),
        repetition_penalty=np.full(s, 1.5),
        prompt_token_ids=pt,
        prompt_offsets=po,
        output_offsets=np.zeros(s + 1),
        any_penalties=True,
    )
    Sampler()(logits, SamplingTensors.from_batch(batch, "cpu", v))
    assert torch.equal(logits, before)


def test_prompt_logprobs_equal_reference_in_chunks():
    gen = torch.Generator().manual_seed(16)
    p, v = 37, 120
    logits = torch.randn(p, v, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, v, (p,), generator=gen)
    out = compute_prompt_logprobs(logits, targets, 3, chunk_rows=8)
    ref = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(out.target_logprobs, ref.gather(1, targets[:, None])[:, 0])
    want_rank = (ref >= ref.gather(1, targets[:, None])).sum(-1)
    assert torch.equal(out.target_ranks, want_rank)
    assert torch.equal(out.topk_ids, ref.topk(3, -1).indices)
    torch.testing.assert_close(out.topk_logprobs, ref.topk(3, -1).values)
    # From hidden states through an lm_head, chunk by chunk: the same numbers.
    head = torch.nn.Linear(24, v, bias=False)
    hidden = torch.randn(p, 24, generator=gen)
    with torch.no_grad():
        via_head = compute_prompt_logprobs(hidden, targets, 3, chunk_rows=5, compute_logits=head)
        whole = compute_prompt_logprobs(head(hidden), targets, 3)
    torch.testing.assert_close(via_head.target_logprobs, whole.target_logprobs)
    assert torch.equal(via_head.target_ranks, whole.target_ranks)
    assert torch.equal(via_head.topk_ids, whole.topk_ids)
    empty = compute_prompt_logprobs(torch.zeros(0, v), torch.zeros(0, dtype=torch.int64), 3)
    assert empty.topk_ids.shape == (0, 3) and empty.target_logprobs.shape == (0,)


def test_from_batch_accepts_read_only_arrays_without_warnings(recwarn):
    rng = np.random.default_rng(17)
    batch = make_batch(6, rng, top_k=[0, 2, 0, 5, 0, 0], top_p=[1, 1, 0.5, 1, 0.2, 1])
    for a in vars(batch).values():
        if isinstance(a, np.ndarray):
            a.setflags(write=False)
    st = SamplingTensors.from_batch(batch, "cpu", 100)
    assert not [w for w in recwarn if "writable" in str(w.message)]
    assert st.top_p_rows.tolist() == [2, 4] and st.max_top_k == 5 and st.any_top_k
    assert st.top_p_top_k_rows.tolist() == []
    assert not st.any_min_p and not st.any_logprobs and st.all_random


def test_empty_batch_and_out_of_vocab_ids():
    rng = np.random.default_rng(19)
    empty = sample(torch.randn(0, 32), make_batch(0, rng))
    assert empty.sampled_token_ids.shape == (0,) and empty.sampled_logprobs.shape == (0,)
    # Ids the tokenizer has but the model's vocabulary lacks are ignored, not clamped onto
    # the last real token.
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(4, 16, generator=gen)
    logits[:, 15] = 10.0
    pt, po = csr([[40, 15]] * 4)
    batch = make_batch(
        4,
        rng,
        temperature=np.zeros(4),
        banned_rows=[0, 1],
        banned_token_ids=[16, 99],
        repetition_penalty=np.full(4, 1.0),
        prompt_token_ids=pt,
        prompt_offsets=po,
        output_offsets=np.zeros(5),
        any_penalties=True,
    )
    assert sample(logits, batch).sampled_token_ids.tolist() == [15] * 4


# --------------------------------------------------------------------------- with the Rust core


def _fake_model_logits(batch, vocab):
    """Logits that depend only on the last input token of each sample (a stand-in LM that is
    deterministic per sequence, so two schedules can be compared)."""
    rows = []
    for token in batch.input_ids[batch.logits_indices].tolist():
        gen = torch.Generator().manual_seed(int(token))
        rows.append(torch.randn(vocab, generator=gen) * 4)
    return torch.stack(rows) if rows else torch.zeros(0, vocab)


def _run(scheduler, vocab):
    """The scheduler driven with the worker's persistent sampler state, as the engine does."""
    from fastserve.worker.sampler_state import SamplerState

    tokens: dict[tuple[str, int], list[int]] = {}
    sampler = Sampler()
    state = SamplerState("cpu", vocab)
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        if batch is None:
            break
        state.apply(batch)
        st = SamplingTensors.from_rows(state.rows(batch), "cpu", vocab, None, state)
        out = sampler(_fake_model_logits(batch, vocab), st)
        state.record(st.count_rows, st.count_vocab_rows, out.sampled_token_ids)
        sampled = out.sampled_token_ids
        # min_tokens keeps EOS out of every row that has a ban row (all here).
        for row, vrow, active in zip(st.ban_rows.tolist(), st.ban_vocab_rows.tolist(), st.min_tokens_active.tolist()):
            flags = int(state.flags[vrow, sampled[row]])
            assert not flags & 2 and not (active and flags & 4)
        for so in scheduler.update(out.sampled_token_ids.numpy()):
            tokens.setdefault((so.request_id, so.sample_index), []).extend(so.new_token_ids)
    return tokens


def test_seeded_request_samples_the_same_tokens_whatever_it_is_batched_with():
    core = pytest.importorskip("fastserve._core")
    if not hasattr(core, "Scheduler"):
        pytest.skip("fastserve._core has no Scheduler yet")

    from fastserve.sampling_params import SamplingParams

    path = SHARED_MODELS / "qwen3-tokenizer"
    if not (path / "tokenizer.json").exists():
        pytest.skip("qwen3 tokenizer not present")
    tok = core.Tokenizer(str(path))
    vocab = tok.vocab_size

    def scheduler():
        return core.Scheduler(
            num_blocks=64,
            max_model_len=256,
            tokenizer=tok,
            eos_token_ids=tok.eos_token_ids,
        )

    seeded = SamplingParams(n=2, temperature=0.9, top_p=0.95, seed=7, max_tokens=6, min_tokens=6)
    prompt = tok.encode("The quick brown fox")
    alone = scheduler()
    alone.add_request("x", prompt, seeded.to_core(tok))
    a = _run(alone, vocab)
    crowded = scheduler()
    crowded.add_request(
        "y",
        tok.encode("Other text first"),
        SamplingParams(temperature=1.0, max_tokens=9).to_core(tok),
    )
    crowded.add_request(
        "z",
        tok.encode("greedy"),
        SamplingParams(temperature=0, max_tokens=3).to_core(tok),
    )
    crowded.add_request("x", prompt, seeded.to_core(tok))
    b = _run(crowded, vocab)
    assert len(a[("x", 0)]) == 6 and a[("x", 0)] != a[("x", 1)]
    assert a[("x", 0)] == b[("x", 0)] and a[("x", 1)] == b[("x", 1)]


def test_top_k_top_p_rows_with_tied_logits_do_not_depend_on_the_batch():
    rng = np.random.default_rng(20)
    gen = torch.Generator().manual_seed(20)
    v, n = 64, 300
    # Coarsely rounded logits: many ties, including at the k-th value and the nucleus cutoff.
    row = (torch.randn(v, generator=gen) * 2).round() / 2
    seeds = rng.integers(0, 2**62, n)
    alone = make_batch(
        n,
        rng,
        top_k=np.full(n, 5),
        top_p=np.full(n, 0.7),
        seeds=seeds,
        sample_steps=np.zeros(n),
    )
    a = sample(row.expand(n, v).contiguous(), alone).sampled_token_ids
    # Same rows next to rows with a larger top_k (so the batch's topk width changes).
    mixed = make_batch(
        2 * n,
        rng,
        top_k=np.concatenate([np.full(n, 5), np.full(n, 40)]),
        top_p=np.full(2 * n, 0.7),
        seeds=np.concatenate([seeds, seeds + 1]),
        sample_steps=np.zeros(2 * n),
    )
    b = sample(row.expand(2 * n, v).contiguous(), mixed).sampled_token_ids[:n]
    assert torch.equal(a, b)
    # Tie groups are kept or dropped whole: a value stays when the mass of candidates at or
    # below it (ties included) exceeds 1 - p; every kept token is reachable.
    x = row.double()
    cand = x >= x.sort(descending=True).values[4]
    p = torch.where(cand, x.exp(), 0.0)
    p = p / p.sum()
    want = {i for i in range(v) if cand[i] and p[x <= x[i]].sum() > 1 - 0.7}
    assert len(want) > 1 and set(a.tolist()) == want
    assert len([i for i in range(v) if cand[i]]) > 5  # the row really has ties at the k-th value


def test_vocab_bias_and_allow_list_from_the_worker_state():
    """RequestParams.vocab_bias / vocab_allow travel once with the sequence, live in the
    worker's state and shape every later step: an allow-list confines the samples, a bias
    moves the greedy choice, and the raw logprobs stay the model's."""
    from fastserve._core import RequestParams, Scheduler
    from fastserve.worker.sampler_state import SamplerState

    v = 50
    gen = torch.Generator().manual_seed(21)
    s = Scheduler(num_blocks=64, max_model_len=64, block_size=4)
    allow = [3, 7, 11, 40]
    s.add_request(
        "allow", [1, 2, 3], RequestParams(max_tokens=6, temperature=1.0, seed=1, vocab_allow=allow, ignore_eos=True)
    )
    s.add_request(
        "bias",
        [4, 5],
        RequestParams(max_tokens=6, temperature=0.0, vocab_bias=[(9, 100.0), (10, -5.0)], ignore_eos=True),
    )
    s.add_request("plain", [6], RequestParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    state = SamplerState("cpu", v)
    sampler = Sampler()
    steps = 0
    while s.has_unfinished():
        b = s.schedule()
        state.apply(b)
        st = SamplingTensors.from_rows(state.rows(b), "cpu", v, None, state)
        logits = torch.randn(b.num_samples, v, generator=gen)
        out = sampler(logits, st)
        ids = out.sampled_token_ids.tolist()
        rids = [b.sample_request_id(i) for i in range(b.num_samples)]
        for i, rid in enumerate(rids):
            if rid == "allow":
                assert ids[i] in allow
            elif rid == "bias":
                assert ids[i] == 9
            else:
                assert ids[i] == int(logits[i].argmax())
        raw = torch.log_softmax(logits, -1)
        torch.testing.assert_close(out.sampled_logprobs, raw.gather(1, out.sampled_token_ids[:, None])[:, 0])
        s.update(out.sampled_token_ids.numpy())
        steps += 1
    assert steps == 6
    assert state.bias is not None
