"""End-to-end greedy parity with Hugging Face transformers, float32 on the CPU.

Every supported architecture, a batch of mixed-length prompts, and the engine paths that
could break exactness: chunked prefill (tiny token budget), prefix-cache hits (shared long
prefix), preemption (too few KV blocks), n > 1 children sharing the prompt's blocks."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from fastserve import LLM, SamplingParams
from tiny_models import SHARED_MODELS, TINY_VARIANTS, load_hf_model, make_tiny_checkpoint

LLAMA3_TOK = SHARED_MODELS / "llama3-tokenizer"
QWEN_TOK = SHARED_MODELS / "qwen3-tokenizer"
MAX_NEW = 10


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation with HF's own KV cache (no stopping at EOS, like ignore_eos)."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, tokens = out.past_key_values, []
        for _ in range(n):
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return tokens


def mixed_prompts(
    vocab: int,
    seed: int,
    count: int = 8,
    shared_prefix: int = 0,
    lengths: tuple[int, ...] = (1, 3, 7, 16, 17, 29, 33, 50),
) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(shared_prefix)]
    lengths = list(lengths[:count])
    rng.shuffle(lengths)
    return [prefix + [rng.randrange(vocab) for _ in range(n)] for n in lengths]


def tokenizer_for(arch: str):
    return QWEN_TOK if arch.startswith("Qwen") else LLAMA3_TOK


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(variant: str):
        if variant not in cache:
            arch, overrides = TINY_VARIANTS[variant]
            path = make_tiny_checkpoint(
                arch, tmp_path_factory.mktemp(variant), tokenizer_dir=tokenizer_for(arch), name=variant, **overrides
            )
            cache[variant] = (path, load_hf_model(path))
        return cache[variant]

    return get


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

# (variant, LLM kwargs, prompt kwargs); llama_dynamic_rope is covered at the model level in
# test_models.py: HF re-derives its dynamic frequencies as the sequence grows, so token
# parity over a generation is not defined for it.
PARITY_CASES = [pytest.param(v, {}, {}, id=v) for v in TINY_VARIANTS if v != "llama_dynamic_rope"] + [
    pytest.param("llama", {"max_num_batched_tokens": 16}, {}, id="chunked-prefill"),
    pytest.param("qwen3", {"max_num_batched_tokens": 20, "max_num_seqs": 3}, {}, id="chunked-prefill-qwen3"),
    pytest.param("llama", {}, {"shared_prefix": 40}, id="prefix-cache"),
    # Prompts that fit one block each are all admitted; their decodes then cross into a
    # second block that only one of them can get: the rest are preempted and recomputed.
    pytest.param(
        "qwen2",
        {"num_gpu_blocks_override": 9, "max_model_len": 128},
        {"lengths": (14, 15, 13, 12, 15, 11, 14, 9)},
        id="preemption",
    ),
    pytest.param(
        "llama",
        {"num_gpu_blocks_override": 10, "max_model_len": 128, "max_num_batched_tokens": 24},
        {"shared_prefix": 20},
        id="preemption+chunked+prefix",
    ),
    # Decode steps through the CUDA-graph inputs (padded to the captured sizes 1, 2, 4, 5),
    # run eagerly on CPU: padding rows must change nothing.
    pytest.param("llama", {"emulate_decode_graphs": True, "max_num_seqs": 5}, {}, id="decode-graph-inputs"),
    pytest.param(
        "qwen2",
        {"emulate_decode_graphs": True, "num_gpu_blocks_override": 9, "max_model_len": 128},
        {"lengths": (14, 15, 13, 12, 15, 11, 14, 9)},
        id="decode-graph-inputs+preemption",
    ),
]


@pytest.mark.parametrize("variant,llm_kwargs,prompt_kwargs", PARITY_CASES)
def test_greedy_matches_hf(checkpoints, variant, llm_kwargs, prompt_kwargs):
    path, hf = checkpoints(variant)
    llm = LLM(model=str(path), dtype="float32", device="cpu", **llm_kwargs)
    vocab = llm.get_tokenizer().vocab_size
    prompts = mixed_prompts(vocab, seed=zlib.crc32(variant.encode()) % 1000, **prompt_kwargs)
    if "shared_prefix" in prompt_kwargs:
        # A request that finished earlier leaves the shared prefix in the cache: the batch hits it.
        llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, MAX_NEW), f"prompt of {len(prompt)} tokens"
        assert out.outputs[0].finish_reason == "length"
    sched = llm.engine.scheduler
    if llm_kwargs.get("emulate_decode_graphs"):
        assert llm.engine.runner.graphs is not None and not llm.engine.runner.graphs.captured
    if "shared_prefix" in prompt_kwargs and "num_gpu_blocks_override" not in llm_kwargs:
        assert sum(o.num_cached_tokens for o in outs) > 0, "shared prefix should hit the prefix cache"
    if "num_gpu_blocks_override" in llm_kwargs:
        assert sched.num_preemptions > 0, "the case is meant to force preemption"
    # Finished sequences' blocks stay in the prefix cache but are free (reusable).
    assert sched.num_free_blocks == sched.num_total_blocks
    assert not sched.has_unfinished()


def test_n_children_share_prompt_and_match_hf(checkpoints):
    """n > 1 greedy children all equal the single greedy continuation (the prompt's last
    partial block is recomputed per child from the shared full blocks)."""
    path, hf = checkpoints("llama")
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    prompts = mixed_prompts(llm.get_tokenizer().vocab_size, seed=7, count=4)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        # top_k=1 sampling is greedy (vLLM refuses n > 1 with temperature 0).
        SamplingParams(n=3, temperature=1.0, top_k=1, max_tokens=MAX_NEW, ignore_eos=True),
        use_tqdm=False,
    )
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(hf, prompt, MAX_NEW)
        assert [c.index for c in out.outputs] == [0, 1, 2]
        for c in out.outputs:
            assert c.token_ids == ref


def test_text_prompts_and_detokenized_output(checkpoints):
    """String prompts are tokenized like HF (BOS added for Llama 3) and the output text is
    the full decode of the output ids."""
    from transformers import AutoTokenizer

    path, hf = checkpoints("llama")
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    texts = ["Hello, my name is", "The capital of France is", "def fib(n):\n    return", "日本語のテキスト 🎉"]
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for text, out in zip(texts, outs):
        ids = hf_tok(text)["input_ids"]
        assert out.prompt_token_ids == ids
        assert out.prompt == text
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, 8)
        assert out.outputs[0].text == hf_tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_seeded_sampling_independent_of_batch(checkpoints):
    path, _ = checkpoints("qwen2")
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": list(range(10 + i, 30 + 2 * i))} for i in range(5)]
    mixed = llm.generate(
        others[:2] + [{"prompt_token_ids": [5, 6, 7, 8]}] + others[2:],
        [SamplingParams(temperature=0.7, max_tokens=15)] * 2
        + [p]
        + [SamplingParams(temperature=0.7, max_tokens=15)] * 3,
        use_tqdm=False,
    )
    assert mixed[2].outputs[0].token_ids == alone


def test_prompt_too_long_is_a_clear_error(checkpoints):
    path, _ = checkpoints("llama")
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [1] * 64}], GREEDY, use_tqdm=False)
    # The engine is unharmed and nothing is left queued.
    assert not llm.engine.has_unfinished()
    assert llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_max_model_len_above_model_limit_is_a_clear_error(checkpoints):
    path, _ = checkpoints("llama")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=str(path), dtype="float32", device="cpu", max_model_len=10**6)


def test_unsupported_architecture_lists_supported(tmp_path, checkpoints):
    import json
    import shutil

    path, _ = checkpoints("llama")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(model=str(bad), dtype="float32", device="cpu")


def test_chat_renders_template_with_kwargs(checkpoints):
    path, _ = checkpoints("qwen3")
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    msgs = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(
        msgs,
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        chat_template_kwargs={"enable_thinking": False},
        use_tqdm=False,
    )[0]
    rendered = llm.get_tokenizer().decode(out.prompt_token_ids, skip_special_tokens=False)
    assert "<|im_start|>user\nHi there<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert len(out.outputs[0].token_ids) == 4


def hf_penalized_greedy(
    model,
    prompt: list[int],
    n: int,
    rep: float,
    freq: float,
    pres: float,
    bad: list[int],
    min_tokens: int,
    eos: list[int],
) -> list[int]:
    """Greedy with vLLM's penalties and bans, applied to HF's logits by the definitions:
    bad words and (below min_tokens) EOS masked; repetition over prompt + output tokens,
    frequency and presence over output tokens."""
    toks, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            x = model(torch.tensor([toks])).logits[0, -1].float().clone()
            for t in bad:
                x[t] = float("-inf")
            if len(out) < min_tokens:
                for t in eos:
                    x[t] = float("-inf")
            for t in set(prompt) | set(out):
                x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
            for t in set(out):
                x[t] -= freq * out.count(t) + pres
            nxt = int(x.argmax())
            out.append(nxt)
            toks.append(nxt)
    return out


@pytest.mark.parametrize(
    "llm_kwargs,lengths",
    [
        pytest.param({"max_num_batched_tokens": 24}, (3, 9, 17, 5, 30, 12), id="chunked"),
        # Prompts of one block each, admitted together, whose decodes cross into a second block
        # only some can get: the rest are preempted and recomputed (their state must survive).
        pytest.param({"num_gpu_blocks_override": 9, "max_model_len": 128}, (14, 15, 13, 12, 15, 11), id="preemption"),
    ],
)
def test_penalties_and_bans_match_reference(checkpoints, llm_kwargs, lengths):
    """Penalty counts and bans live in the worker's state across steps (sent once per
    sequence, counted on the device): the greedy tokens equal the definitions applied to HF's
    logits, with n > 1 children, preemption, chunked prefill and slots reused in play."""
    path, hf = checkpoints("llama")
    llm = LLM(model=str(path), dtype="float32", device="cpu", **llm_kwargs)
    vocab = llm.get_tokenizer().vocab_size
    eos = llm.engine.eos_token_ids
    prompts = mixed_prompts(vocab, seed=5, count=6, lengths=lengths)
    settings = [  # (repetition, frequency, presence, single-token bad words, min_tokens, n)
        (1.3, 0.0, 0.0, [], 0, 1),
        (1.0, 0.8, 0.0, [], 0, 2),
        (1.0, 0.0, 1.5, [], 4, 1),
        (0.8, -0.3, 0.4, [], 0, 1),
        (1.2, 0.5, 0.5, [17, 99, 1000], 2, 3),
        (1.0, 0.0, 0.0, [], 0, 1),
    ]
    params = []
    for rep, freq, pres, bad, min_tokens, n in settings:
        bad_words = [llm.get_tokenizer().decode([t]) for t in bad]
        # n > 1 greedy is refused (as vLLM): top_k=1 is greedy through the random path.
        greedy = dict(temperature=0.0) if n == 1 else dict(temperature=1.0, top_k=1, seed=n)
        params.append(
            SamplingParams(
                **greedy,
                max_tokens=MAX_NEW,
                ignore_eos=min_tokens == 0,
                n=n,
                repetition_penalty=rep,
                frequency_penalty=freq,
                presence_penalty=pres,
                min_tokens=min_tokens,
                bad_words=bad_words or None,
            )
        )
    for _ in range(2):  # the second round reuses the sequence slots the first one freed
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for prompt, (rep, freq, pres, bad, min_tokens, n), out in zip(prompts, settings, outs):
            want = hf_penalized_greedy(hf, prompt, MAX_NEW, rep, freq, pres, _bad_ids(llm, bad), min_tokens, eos)
            assert len(out.outputs) == n
            for c in out.outputs:
                got = c.token_ids
                assert got == want[: len(got)], (rep, freq, pres, bad, min_tokens)
                assert len(got) == MAX_NEW or (got[-1] in eos and len(got) >= min_tokens)
    if "num_gpu_blocks_override" in llm_kwargs:
        assert llm.engine.scheduler.num_preemptions > 0


def _bad_ids(llm, bad: list[int]) -> list[int]:
    """The ids vLLM bans for each bad word (its text encoded, with and without a leading
    space), single-token ones only: what the reference masks."""
    tok = llm.get_tokenizer()
    ids = set()
    for t in bad:
        word = tok.decode([t])
        for text in (word, " " + word.lstrip()):
            enc = tok.encode(text, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
    return sorted(ids)
