"""fastserve on checkpoints written by the REAL quantizers (GPTQModel, AutoAWQ, llm-compressor).

The fixtures under tests/assets/quant/ were made by `tests/assets/quant/regenerate.py` in the
tools' own environments (none of them is needed here) and carry their reference: teacher-forced
float32 logits and a 16-token greedy continuation for 8 prompts, from HF transformers loading the
same quantized checkpoint, or, where HF has no float32 CPU path for the format (GPTQ/AWQ: its
GPTQModel kernels compute in fp16/bf16 only), from a plain fp32 dequant of the tensors that the
script checks against HF's loader (reference/reference.json says which, and by how much).

Tolerances. Int weights (GPTQ, AWQ, compressed-tensors pack-quantized): fastserve and the
reference multiply the same dequantized fp32 weights, so they differ only by summation order
(measured ~2e-6 on log-probabilities, which are O(1)); 2e-3 is three orders above that and two
below what one mis-unpacked nibble or a wrong zero point does (>0.05). FP8 W8A8: both round each
linear's input to e4m3 (per token, or with input_scale); most positions agree exactly, but a
scale computed in another order now and then puts a value on the other side of a rounding
boundary (one e4m3 step is 6-12 % of that value), which moves a log-probability by up to ~0.04.
So FP8 is held to a median of 1e-3 (running without activation quantization gives a median of
~0.02, recorded in reference.json as weight_only_logprob_median_abs), a 99th percentile of 0.025
and a max of 0.06 (weight-only: 0.12-0.2). Greedy tokens must be equal; a divergence is accepted
only at a step where the reference's own top-2 logits are closer than twice the max tolerance
(a near tie the tolerance cannot decide), and nothing after it is compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fastserve import LLM, SamplingParams
from safetensors.torch import load_file

ASSETS = Path(__file__).resolve().parent / "assets" / "quant"
FIXTURES = sorted(p.name for p in ASSETS.iterdir() if (p / "reference" / "reference.json").is_file())
INT_TOL = 2e-3
FP8_MEDIAN, FP8_P99, FP8_MAX = 1e-3, 2.5e-2, 6e-2
TOP = 5  # prompt_logprobs per position besides the actual token
# Chunked prefill (24-token budget), a prefix-cache hit on the shared 20-token prefix and
# preemption (10 blocks of 16 for 8 sequences of up to 61 tokens) in one run.
STRESS = {"num_gpu_blocks_override": 10, "max_model_len": 128, "max_num_batched_tokens": 24}
STRESS_FIXTURES = ["gptq-int4-asym-actorder-qwen2", "ct-fp8-dynamic-mistral", "awq-autoawq-gemm-qwen2"]


def test_fixtures_are_committed():
    """The set the regenerate script makes: a missing one would silently shrink the parametrization."""
    assert len(FIXTURES) >= 9, FIXTURES
    for name in FIXTURES:
        for f in (ASSETS / name).rglob("*"):
            assert f.stat().st_size < 2 * 1024 * 1024, f"{f} is over the 2 MiB per-file limit"


def _reference(name: str):
    meta = json.loads((ASSETS / name / "reference" / "reference.json").read_text())
    lp = load_file(str(ASSETS / name / "reference" / "logprobs.safetensors"))
    return meta, [
        (lp[f"next_logprob.{i}"], lp[f"top_logprobs.{i}"], lp[f"top_ids.{i}"]) for i in range(len(meta["prompts"]))
    ]


def _tol(meta) -> float:
    """The largest log-probability difference allowed anywhere."""
    return FP8_MAX if "activations" in meta else INT_TOL


def _checkpoint(name: str, tmp_path: Path) -> Path:
    """The fixture without its reference/ folder: what the tool wrote plus the tokenizer."""
    dst = tmp_path / name
    shutil.copytree(ASSETS / name, dst, ignore=shutil.ignore_patterns("reference"))
    return dst


def _check_greedy(got: list[int], entry: dict, tol: float, where: str) -> int:
    """Number of tokens compared (all unless a near tie of the reference decides the split)."""
    ref, margins = entry["greedy_token_ids"], entry["greedy_top2_margin"]
    for step, (g, r) in enumerate(zip(got, ref)):
        if g != r:
            assert margins[step] < 2 * tol, (
                f"{where}: greedy token {step} is {g}, the reference has {r} with a top-2 margin of "
                f"{margins[step]:.4f} (no tie): got {got}, expected {ref}"
            )
            return step
    assert len(got) == len(ref), f"{where}: {len(got)} tokens, expected {len(ref)}"
    return len(ref)


@pytest.mark.parametrize("name", FIXTURES)
def test_real_fixture_matches_reference(name, tmp_path):
    meta, ref_logits = _reference(name)
    tol = _tol(meta)
    llm = LLM(model=str(_checkpoint(name, tmp_path)), dtype="float32", device="cpu")
    prompts = [e["prompt_token_ids"] for e in meta["prompts"]]

    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=meta["max_new_tokens"], ignore_eos=True),
        use_tqdm=False,
    )
    compared = [
        _check_greedy(list(o.outputs[0].token_ids), e, tol, f"{name} prompt {i} ({len(e['prompt_token_ids'])} tokens)")
        for i, (o, e) in enumerate(zip(outs, meta["prompts"]))
    ]
    assert sum(compared) >= len(compared) * meta["max_new_tokens"] // 2, f"{name}: too few tokens compared {compared}"

    # Teacher-forced over prompt + the reference continuation: the log-probability of every
    # actual next token and of the top candidates fastserve reports, against the reference's.
    seqs = [e["prompt_token_ids"] + e["greedy_token_ids"] for e in meta["prompts"]]
    outs = llm.generate(
        [{"prompt_token_ids": s} for s in seqs],
        SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP),
        use_tqdm=False,
    )
    diffs = []
    for i, (seq, out, (ref_next, ref_top, ref_ids)) in enumerate(zip(seqs, outs, ref_logits)):
        plp = out.prompt_logprobs
        assert len(plp) == len(seq) and plp[0] is None
        for pos in range(1, len(seq)):
            cands, where = plp[pos], f"{name} prompt {i} position {pos}"
            assert seq[pos] in cands, f"{where}: the actual token is not reported"
            assert len(cands) >= TOP
            ref = {int(t): float(v) for t, v in zip(ref_ids[pos - 1], ref_top[pos - 1])}
            ref[seq[pos]] = float(ref_next[pos - 1])
            floor = float(ref_top[pos - 1, -1])  # every token outside the reference's top-k is below it
            for tok, lp in cands.items():
                if tok in ref:
                    diffs.append(d := abs(lp.logprob - ref[tok]))
                    assert d <= tol, (
                        f"{where} token {tok}: logprob {lp.logprob:.6f}, reference "
                        f"({meta['reference']}) {ref[tok]:.6f}, tolerance {tol}"
                    )
                else:
                    assert lp.logprob <= floor + tol, (
                        f"{where} token {tok}: logprob {lp.logprob:.6f}, but the "
                        f"reference ranks it below its top {ref_top.shape[1]} "
                        f"(<= {floor:.6f})"
                    )
            top1 = max(cands.items(), key=lambda kv: kv[1].logprob)[0]
            if float(ref_top[pos - 1, 0] - ref_top[pos - 1, 1]) > 2 * tol:
                assert top1 == int(ref_ids[pos - 1, 0]), f"{where}: top-1 {top1}, reference {int(ref_ids[pos - 1, 0])}"
    diffs = torch.tensor(diffs)
    worst = float(diffs.max())
    if "activations" in meta:
        med, p99 = float(diffs.median()), float(diffs.quantile(0.99))
        assert med <= FP8_MEDIAN and p99 <= FP8_P99, (
            f"{name}: |dlogprob| median {med:.2e} (limit {FP8_MEDIAN}), p99 {p99:.2e} (limit {FP8_P99}): the "
            f"activations are not quantized like the reference's ({meta['activations']})"
        )
    print(f"{name}: max |dlogprob| {worst:.2e} (tolerance {tol}), reference {meta['reference']}")


@pytest.mark.parametrize("name", STRESS_FIXTURES)
def test_real_fixture_chunked_prefix_preemption(name, tmp_path):
    """The same greedy continuations when prefill is chunked, the shared prefix comes from the
    prefix cache and the KV cache is too small for the batch (sequences are preempted and
    recomputed from the quantized weights)."""
    if name not in FIXTURES:
        pytest.fail(f"fixture {name} is not committed: run tests/assets/quant/regenerate.py")
    meta, _ = _reference(name)
    tol = _tol(meta)
    llm = LLM(model=str(_checkpoint(name, tmp_path)), dtype="float32", device="cpu", **STRESS)
    entries = meta["prompts"]
    shared = [
        e
        for e in entries
        if len(e["prompt_token_ids"]) > 20 and e["prompt_token_ids"][:20] == entries[-1]["prompt_token_ids"][:20]
    ]
    assert len(shared) >= 3, "the fixture's reference lacks the shared-prefix prompts"
    params = SamplingParams(temperature=0.0, max_tokens=meta["max_new_tokens"], ignore_eos=True)
    # A request that finished earlier leaves the shared prefix in the cache: the batch hits it.
    first = llm.generate([{"prompt_token_ids": shared[0]["prompt_token_ids"]}], params, use_tqdm=False)
    _check_greedy(list(first[0].outputs[0].token_ids), shared[0], tol, f"{name} warm-up")
    outs = llm.generate([{"prompt_token_ids": e["prompt_token_ids"]} for e in entries], params, use_tqdm=False)
    for i, (o, e) in enumerate(zip(outs, entries)):
        _check_greedy(list(o.outputs[0].token_ids), e, tol, f"{name} stress prompt {i}")
    sched = llm.engine.scheduler
    assert sum(o.num_cached_tokens for o in outs) > 0, "the shared prefix should hit the prefix cache"
    assert sched.num_preemptions > 0, "the case is meant to force preemption"
    assert sched.num_free_blocks == sched.num_total_blocks and not sched.has_unfinished()
