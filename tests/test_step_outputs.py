"""Scheduler.update()'s columnar result (StepOutputs) and final-only requests, through the
binding, with the real tokenizers (multi-byte text, so code-point offsets matter), and the
engine routing both kinds to the same RequestOutput."""

import numpy as np
import pytest
from fastserve import _core
from fastserve._core import RequestParams, Scheduler
from tiny_models import SHARED_MODELS, make_tiny_checkpoint

TOKENIZERS = ["llama3-tokenizer", "qwen3-tokenizer"]
TEXT = "Grüße aus Köln: 東京は晴れ 🌤️, naïve café — done. END here; more 終了 words"


@pytest.fixture(scope="module", params=TOKENIZERS)
def tok(request):
    return _core.Tokenizer(str(SHARED_MODELS / request.param))


def run(s, steps, now0=1000.0):
    """Feeds steps[k] (one id per sample row, repeated as needed) to update() until every
    request finishes; returns the StepOutputs of each update."""
    results = []
    k = 0
    while s.has_unfinished():
        b = s.schedule()
        ids = np.array([steps[min(k, len(steps) - 1)]] * b.num_samples, dtype=np.int64)
        results.append(s.update(ids, now0 + k))
        k += 1
        assert k < 500
    return results


def check_columns(out):
    """The columns agree with each other and with the per-sequence views."""
    n = out.num_rows
    assert len(out.request_ids) == n
    for a in (out.sample_indices, out.sample_rows, out.token_ids):
        assert a.shape == (n,)
    assert out.text_offsets.shape == (n + 1,) and out.text_offsets[0] == 0
    assert out.text_offsets[-1] == len(out.text) and (np.diff(out.text_offsets) >= 0).all()
    views = list(out)
    assert len(views) == len(out)
    rowless = [v for v in views if v.sample_row < 0]
    rows = views[len(rowless) :]
    assert len(rows) == n
    for j, v in enumerate(rows):
        assert v.request_id == out.request_ids[j] and v.sample_index == out.sample_indices[j]
        assert v.new_token_ids == [int(out.token_ids[j])] and v.sample_row == out.sample_rows[j]
        assert v.text_delta == out.text[out.text_offsets[j] : out.text_offsets[j + 1]]
    finished = {(f.request_id, f.sample_index) for f in out.finished}
    assert {(v.request_id, v.sample_index) for v in views if v.finished} == finished


def collect(results):
    """Streamed text and tokens per (request, sample), and each sequence's FinishedOutput."""
    text, tokens, fin = {}, {}, {}
    for out in results:
        check_columns(out)
        for j, rid in enumerate(out.request_ids):
            key = (rid, int(out.sample_indices[j]))
            text[key] = text.get(key, "") + out.text[out.text_offsets[j] : out.text_offsets[j + 1]]
            tokens.setdefault(key, []).append(int(out.token_ids[j]))
        for f in out.finished:
            key = (f.request_id, f.sample_index)
            assert key not in fin, "a sequence finished twice"
            fin[key] = f
    return text, tokens, fin


PARAM_CASES = {
    "plain": dict(),
    "stop": dict(stop=["END", "終了"]),
    "stop_included": dict(stop=["終了"], include_stop_str_in_output=True),
    "stop_below_min_tokens": dict(stop=["Grü", "END"], min_tokens=3),
    "keep_special": dict(skip_special_tokens=False),
}


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_final_only_equals_streamed(tok, case):
    gen = tok.encode(TEXT, add_special_tokens=False)
    prompt = tok.encode("Say it:")
    s = Scheduler(num_blocks=256, max_model_len=512, block_size=4, tokenizer=tok)
    kw = dict(max_tokens=len(gen), ignore_eos=True, **PARAM_CASES[case])
    s.add_request("streamed", prompt, RequestParams(**kw))
    s.add_request("final", prompt, RequestParams(final_only=True, **kw))
    results = run(s, gen)
    text, tokens, fin = collect(results)
    assert all(rid == "streamed" for rid, _ in text), "a final-only request got rows"
    st, fo = fin[("streamed", 0)], fin[("final", 0)]
    assert fo.text == text[("streamed", 0)] and fo.token_ids == tokens[("streamed", 0)] == st.token_ids
    assert (fo.finish_reason, fo.stop_reason) == (st.finish_reason, st.stop_reason)
    assert st.text == "", "a streamed sequence's text travels as deltas only"
    # Both were stamped by the update() that appended their first token.
    assert fo.first_token_time == st.first_token_time == 1000.0
    assert sum(out.num_new_tokens for out in results) == 2 * len(st.token_ids)
    if case == "plain":
        assert fo.text == tok.decode(gen) and fo.finish_reason == "length"
    if case == "stop":
        assert fo.stop_reason == "END" and fo.text == tok.decode(gen).split("END")[0]


def test_final_only_n_samples_and_abort(tok):
    gen = tok.encode(TEXT, add_special_tokens=False)
    prompt = tok.encode("Once upon a time, in a city far away,")
    s = Scheduler(num_blocks=256, max_model_len=512, block_size=4, tokenizer=tok)
    s.add_request("n3", prompt, RequestParams(n=3, max_tokens=6, ignore_eos=True, final_only=True))
    s.add_request("gone", prompt, RequestParams(max_tokens=50, ignore_eos=True, final_only=True))
    seen = []
    for k in range(3):  # prefill (the prompts share their blocks), then two decode steps
        b = s.schedule()
        out = s.update(np.array(gen[k : k + 1] * b.num_samples, dtype=np.int64))
        assert out.num_rows == 0 and out.num_new_tokens == b.num_samples
        seen.append(gen[k])
    assert s.abort_request("gone")
    out = s.update(np.empty(0, dtype=np.int64))
    (f,) = out.finished
    assert (f.request_id, f.finish_reason, f.token_ids) == ("gone", "abort", seen)
    assert f.text == tok.decode(seen)
    fin = collect(run(s, gen[3:]))[2]
    assert sorted(fin) == [("n3", 0), ("n3", 1), ("n3", 2)]
    for f in fin.values():
        assert f.finish_reason == "length" and len(f.token_ids) == 6
        assert f.text == tok.decode(f.token_ids)


def test_streamed_n_samples_share_one_text_buffer(tok):
    gen = tok.encode(TEXT, add_special_tokens=False)
    s = Scheduler(num_blocks=256, max_model_len=512, block_size=4, tokenizer=tok)
    s.add_request("a", tok.encode("Hello"), RequestParams(n=2, max_tokens=len(gen), ignore_eos=True))
    s.add_request("b", tok.encode("Hi there, friend of mine"), RequestParams(max_tokens=len(gen), ignore_eos=True))
    text, tokens, fin = collect(run(s, gen))
    for key in [("a", 0), ("a", 1), ("b", 0)]:
        assert tokens[key] == gen and text[key] == tok.decode(gen)
        assert fin[key].token_ids == gen


def test_batch_request_ids_only_while_pending():
    s = Scheduler(num_blocks=64, max_model_len=128, block_size=4, eos_token_ids=[2])
    s.add_request("x", [5, 6, 7], RequestParams(max_tokens=1))
    b = s.schedule()
    assert b.request_id(0) == "x" and b.sample_request_id(0) == "x"
    (f,) = s.update(np.array([9], dtype=np.int64)).finished
    assert f.request_id == "x" and f.token_ids == [9]
    # The request's slot was released with that update(): the batch cannot name it any more.
    with pytest.raises(RuntimeError, match="no longer pending"):
        b.request_id(0)


def test_request_ids_are_the_callers_strings():
    s = Scheduler(num_blocks=64, max_model_len=128, block_size=4, eos_token_ids=[2])
    rid = "".join(["req-", "ü", "7"])  # built at run time: not an interned literal
    s.add_request(rid, [5, 6, 7], RequestParams(max_tokens=3))
    s.schedule()
    out = s.update(np.array([9], dtype=np.int64))
    assert out.request_ids[0] is rid  # a reference, not a copy per row per step


def test_engine_final_only_equals_streamed(tmp_path):
    """The offline LLM's final-only path and the streamed path (the server's) give the same
    RequestOutputs: seeded sampling, stop strings, n > 1, with the real Llama 3 tokenizer."""
    from fastserve import SamplingParams
    from fastserve.engine.arg_utils import EngineArgs
    from fastserve.engine.engine import Engine

    tok_dir = SHARED_MODELS / "llama3-tokenizer"
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, tokenizer_dir=tok_dir, name="llama")
    engine = Engine(
        EngineArgs(model=str(path), tokenizer=str(tok_dir), device="cpu", max_model_len=256, max_num_batched_tokens=64)
    )
    tok = engine.tokenizer
    prompts = [tok.encode(p) for p in ("The weather in", "Ein langer Satz über", "東京の", "def f(x):")]
    params = [
        SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=24,
            n=2 if i == 1 else 1,
            stop=["e", "の"] if i % 2 else [],
            ignore_eos=True,
        )
        for i in range(len(prompts))
    ]

    def generate(final_only: bool):
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(f"r{i}", p, sp, final_only=final_only)
        assert all(s.final_only == final_only for s in engine.requests.values())
        done, seen = {}, {}
        while engine.has_unfinished():
            for state in engine.step():
                if state.finished:
                    done[state.request_id] = state.to_output()
                elif final_only:  # routed only when one of its sequences finished
                    assert state.num_finished > seen.get(state.request_id, 0)
                seen[state.request_id] = state.num_finished
        return [done[f"r{i}"] for i in range(len(prompts))]

    streamed, final = generate(False), generate(True)
    stopped = 0
    for a, b in zip(streamed, final):
        assert len(a.outputs) == len(b.outputs)
        for x, y in zip(a.outputs, b.outputs):
            assert (x.text, x.token_ids, x.finish_reason, x.stop_reason) == (
                y.text,
                y.token_ids,
                y.finish_reason,
                y.stop_reason,
            )
            stopped += x.stop_reason is not None
        assert b.metrics.first_token_time is not None
        assert b.metrics.first_token_time <= b.metrics.finished_time
    assert stopped, "no stop string hit: the comparison did not cover the stop path"
