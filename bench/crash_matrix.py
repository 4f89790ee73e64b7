"""The extreme-request matrix against a real `python -m fastserve` (every flag at its default
but the model): each case inside the README's documented limits, sent at once beside a
streamed bystander request; every case must be answered correctly and /health must be 200
afterwards. Writes each case's status, choices, tokens and seconds.

    python bench/crash_matrix.py --model bench/configs/llama3-8b --out bench/results/crash-matrix-h200.json

(The model directory needs config.json and tokenizer files; weights are dummy.)"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

_PYTHON = str(Path(__file__).resolve().parents[1] / "python")
sys.path.insert(0, _PYTHON)
from fastserve.limits import MAX_N, MAX_PROMPTS, MAX_STOP_STRINGS, MAX_TOKEN_ID_LIST  # noqa: E402


def cases(max_model_len: int, max_num_seqs: int) -> dict[str, tuple[dict, int, int | None]]:
    """name -> (body, choices expected, completion tokens per choice or None)."""
    rng = random.Random(0)

    def prompts(count, lo=2, hi=12):
        return [[rng.randrange(1000, 100000) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]

    long_prompt = [rng.randrange(1000, 100000) for _ in range(max_model_len - 1)]
    return {
        "1024_prompts": (dict(prompt=prompts(MAX_PROMPTS), max_tokens=4, ignore_eos=True), MAX_PROMPTS, 4),
        # The reproducer: 9 prompts x n=128 = 1,152 sample rows > 4 x max_num_seqs.
        "n_128_x9": (dict(prompt=prompts(9), n=MAX_N, max_tokens=4, ignore_eos=True), 9 * MAX_N, 4),
        "best_of_128_x9": (dict(prompt=prompts(9), n=1, best_of=MAX_N, max_tokens=4, ignore_eos=True), 9, 4),
        "logprobs20_prompt_logprobs20_max_len_prompt": (
            dict(prompt=long_prompt, max_tokens=1, logprobs=20, prompt_logprobs=20),
            1,
            1,
        ),
        "64_stops_1024_stop_ids_1024_bad_words": (
            dict(
                prompt=prompts(4),
                max_tokens=16,
                min_tokens=4,
                stop=[f"<<stop{i}>>" for i in range(MAX_STOP_STRINGS)],
                stop_token_ids=list(range(20000, 20000 + MAX_TOKEN_ID_LIST)),
                bad_words=[f" word{i}" for i in range(MAX_TOKEN_ID_LIST)],
            ),
            4,
            None,
        ),
        "max_num_seqs_prefills": (
            dict(prompt=prompts(max_num_seqs, 60, 61), max_tokens=4, ignore_eos=True),
            max_num_seqs,
            4,
        ),
    }


async def wait_health(base: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before /health answered")
            try:
                async with s.get(f"{base}/health") as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server did not become healthy")


async def run(args) -> dict:
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    max_model_len = args.max_model_len or cfg["max_position_embeddings"]
    base = f"http://127.0.0.1:{args.port}"
    log = open(args.log, "w") if args.log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastserve",
            "--model",
            args.model,
            "--load-format",
            "dummy",
            "--port",
            str(args.port),
            *args.server_args,
            *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else []),
            *(["--max-num-seqs", str(args.max_num_seqs)] if args.max_num_seqs != 256 else []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (_PYTHON, os.environ.get("PYTHONPATH")) if p),
        },
    )
    try:
        startup = await wait_health(base, proc, 600)
        matrix = cases(max_model_len, args.max_num_seqs)
        out = {"startup_seconds": startup, "max_model_len": max_model_len, "cases": []}
        timeout = aiohttp.ClientTimeout(total=1200)
        async with aiohttp.ClientSession(timeout=timeout) as s:

            async def post(name, body):
                t0 = time.perf_counter()
                try:
                    async with s.post(f"{base}/v1/completions", json={**body, "model": args.model}) as r:
                        data = await r.json(content_type=None)
                        return name, r.status, data, time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - recorded as this case's failure
                    return name, None, {"error": repr(e)}, time.perf_counter() - t0

            bystander = dict(prompt=[11, 12, 13, 14], max_tokens=64, temperature=0, ignore_eos=True)
            alone = await post("bystander", bystander)
            results = await asyncio.gather(
                post("bystander", bystander), *(post(n, b) for n, (b, _, _) in matrix.items())
            )
            async with s.get(f"{base}/health") as r:
                out["health_after"] = r.status
        by = results[0]
        # Unharmed = answered in full while the matrix ran. Its text is recorded against the same
        # request run alone, but not required to match: in bf16 a batch of other sizes takes other
        # GEMM tilings, and random weights leave near-tied logits (CPU float32 tests check equality).
        by_choice = by[2]["choices"][0] if by[1] == 200 else {}
        out["bystander_unharmed"] = (
            by[1] == 200 and by[2]["usage"]["completion_tokens"] == 64 and by_choice.get("finish_reason") == "length"
        )
        out["bystander_same_text_as_alone"] = by_choice.get("text") == alone[2]["choices"][0]["text"]
        for name, status, data, secs in results[1:]:
            _, want_choices, want_tokens = matrix[name]
            choices = data.get("choices", []) if isinstance(data, dict) else []
            tokens = data.get("usage", {}).get("completion_tokens") if isinstance(data, dict) else None
            ok = (
                status == 200
                and len(choices) == want_choices
                and (want_tokens is None or tokens == want_tokens * want_choices)
            )
            if name.startswith("logprobs20") and ok:
                plp = choices[0].get("prompt_logprobs") or []
                ok = len(plp) == max_model_len - 1 and len(choices[0]["logprobs"]["top_logprobs"][0]) >= 20
            out["cases"].append(
                {
                    "case": name,
                    "status": status,
                    "choices": len(choices),
                    "expected_choices": want_choices,
                    "completion_tokens": tokens,
                    "ok": ok,
                    "seconds": round(secs, 2),
                    "error": None if status == 200 else str(data)[:500],
                }
            )
        out["server_alive"] = proc.poll() is None
        out["all_ok"] = (
            all(c["ok"] for c in out["cases"])
            and out["health_after"] == 200
            and out["bystander_unharmed"]
            and out["server_alive"]
        )
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8311)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="the server's max_num_seqs (256: its default)")
    ap.add_argument("--max-model-len", type=int, help="the server's max_model_len (default: the config's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--info", help="device_info JSON to embed")
    ap.add_argument("--log", help="server log file")
    ap.add_argument("server_args", nargs="*", help="extra server flags after --")
    args = ap.parse_args()
    res = asyncio.run(run(args))
    if args.info and os.path.exists(args.info):
        res["device"] = json.loads(Path(args.info).read_text())
    res["git_commit"] = os.environ.get("FASTSERVE_GIT_COMMIT", "unknown")
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"{'case':45s} {'status':>6s} {'choices':>8s} {'tokens':>7s} {'s':>7s} ok")
    for c in res["cases"]:
        print(
            f"{c['case']:45s} {c['status']!s:>6s} {c['choices']:>8d} {c['completion_tokens']!s:>7s} "
            f"{c['seconds']:7.1f} {c['ok']}"
        )
    print(
        f"health after: {res['health_after']}, bystander unharmed: {res['bystander_unharmed']}, "
        f"startup {res['startup_seconds']:.1f} s, all ok: {res['all_ok']}"
    )


if __name__ == "__main__":
    main()
