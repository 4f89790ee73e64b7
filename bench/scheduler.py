"""Cost of one scheduler step (schedule() + update(), numpy hand-off included) on the CPU.

Scenarios (block size 16, prefix caching on):
  decode_1024           1,024 running sequences, each decoding one token per step
  decode_1024_wait_8192 the same with 8,192 more requests waiting (max_num_seqs = 1,024)
  decode_1024_final_only decode_1024 with final_only requests (the offline LLM's): the same
                        detokenization and stop checks, nothing reported until a sequence ends
  decode_1024_no_detok  decode_1024 without a tokenizer (only when one is given)
  admit_8192            8,192 waiting 128-token prompts admitted under an 8,192-token budget
                        (each step: decodes of those admitted so far, then new prompts)
With a tokenizer (default: shared/models/llama3-tokenizer beside the checkout, or under
$FASTSERVE_SHARED_MODELS) every request detokenizes incrementally and has stop strings set.

The same decode scenarios also run through `PyScheduler`, a compact pure-Python scheduler
with the same block bookkeeping (ref counts, chained-hash prefix cache, LRU free list) and
the same arrays, as the baseline a Python engine would pay. It does not detokenize.

    python bench/scheduler.py [--tokenizer DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time

# OpenBLAS worker threads spin on this 2-core machine and would bill their time to the steps.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from fastserve import _core  # noqa: E402
from fastserve._core import RequestParams, Scheduler  # noqa: E402

BLOCK = 16
PROMPT = 128


# ---------------------------------------------------------------------------------------------
# Pure-Python reference
# ---------------------------------------------------------------------------------------------


class PySeq:
    __slots__ = ("rid", "tokens", "num_prompt", "computed", "table", "hashes", "max_tokens", "seed", "params")

    def __init__(self, rid, tokens, params, seed):
        self.rid, self.tokens, self.num_prompt = rid, list(tokens), len(tokens)
        self.computed, self.table, self.hashes = 0, [], []
        self.max_tokens, self.seed, self.params = params["max_tokens"], seed, params


class PyScheduler:
    """Same policy as the Rust scheduler for n == 1 (decodes first, FCFS prefill chunks,
    preemption of the newest, prefix cache), written the way a Python engine would."""

    def __init__(self, num_blocks, max_num_seqs, max_num_batched_tokens, eos):
        self.ref = [0] * num_blocks
        self.block_hash = [None] * num_blocks
        self.free = collections.OrderedDict((b, None) for b in range(num_blocks))  # LRU order
        self.cached: dict = {}
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.eos = set(eos)
        self.waiting: collections.deque = collections.deque()
        self.running: list[PySeq] = []
        self.last = None

    def add_request(self, rid, tokens, params, seed):
        self.waiting.append(PySeq(rid, tokens, params, seed))

    def _hash(self, s, j):
        while len(s.hashes) <= j:
            i = len(s.hashes)
            s.hashes.append(hash((s.hashes[i - 1] if i else 0, tuple(s.tokens[i * BLOCK : (i + 1) * BLOCK]))))
        return s.hashes[j]

    def _grow(self, s, n):
        need = n - len(s.table)
        if need > len(self.free):
            return False
        for _ in range(need):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.block_hash[b] = None
            self.ref[b] = 1
            s.table.append(b)
        return True

    def _free(self, s):
        for b in reversed(s.table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:
                    self.free.move_to_end(b, last=False)
        s.table = []

    def schedule(self):
        budget, rows, preempted = self.budget, [], False
        for decode_pass in (True, False):
            i = 0
            while i < len(self.running) and budget and len(rows) < self.max_num_seqs:
                s = self.running[i]
                rem = len(s.tokens) - s.computed
                if (rem == 1) != decode_pass:
                    i += 1
                    continue
                n = min(rem, budget)
                while not self._grow(s, -(-(s.computed + n) // BLOCK)):
                    v = self.running.pop()
                    self._free(v)
                    v.computed = 0
                    preempted = True
                    budget += sum(n for r, n in rows if r is v)
                    rows = [r for r in rows if r[0] is not v]
                    self.waiting.appendleft(v)
                    if v is s:
                        break
                else:
                    rows.append((s, n))
                    budget -= n
                    i += 1
        while not preempted and self.waiting and budget and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            hits = []
            for j in range((len(s.tokens) - 1) // BLOCK):
                b = self.cached.get(self._hash(s, j))
                if b is None:
                    break
                hits.append(b)
            computed = len(hits) * BLOCK
            n = min(len(s.tokens) - computed, budget)
            nb = -(-(computed + n) // BLOCK)
            if nb - len(hits) + sum(self.ref[b] == 0 for b in hits) > len(self.free):
                break
            for b in hits:
                if self.ref[b] == 0:
                    del self.free[b]
                self.ref[b] += 1
            s.table, s.computed = hits, computed
            self._grow(s, nb)
            self.waiting.popleft()
            self.running.append(s)
            rows.append((s, n))
            budget -= n
        if not rows:
            return None
        ids, pos, slots, qsl, lens, tables, logits = [], [], [], [0], [], [], []
        temp, top_p, top_k, seeds, steps = [], [], [], [], []
        for s, n in rows:
            a, e = s.computed, s.computed + n
            ids += s.tokens[a:e]
            pos += range(a, e)
            slots += [s.table[p // BLOCK] * BLOCK + p % BLOCK for p in range(a, e)]
            qsl.append(qsl[-1] + n)
            lens.append(e)
            tables.append(s.table)
            if e == len(s.tokens):
                logits.append(qsl[-1] - 1)
                temp.append(s.params["temperature"])
                top_p.append(s.params["top_p"])
                top_k.append(s.params["top_k"])
                seeds.append(s.seed)
                steps.append(len(s.tokens) - s.num_prompt)
        width = max(len(t) for t in tables)
        bt = np.zeros((len(rows), width), dtype=np.int32)
        for r, t in enumerate(tables):
            bt[r, : len(t)] = t
        self.last = rows
        f32 = np.float32
        return dict(
            input_ids=np.array(ids, np.int64),
            positions=np.array(pos, np.int64),
            slot_mapping=np.array(slots, np.int64),
            query_start_loc=np.array(qsl, np.int32),
            seq_lens=np.array(lens, np.int32),
            block_tables=bt,
            logits_indices=np.array(logits, np.int64),
            temperature=np.array(temp, f32),
            top_p=np.array(top_p, f32),
            top_k=np.array(top_k, np.int32),
            min_p=np.zeros(len(logits), f32),
            presence_penalty=np.zeros(len(logits), f32),
            frequency_penalty=np.zeros(len(logits), f32),
            repetition_penalty=np.ones(len(logits), f32),
            seeds=np.array(seeds, np.int64),
            sample_steps=np.array(steps, np.int64),
            num_logprobs=np.full(len(logits), -1, np.int32),
        )

    def update(self, sampled):
        outs, k, done = [], 0, False
        sampled = sampled.tolist()
        for s, n in self.last:
            old = s.computed
            s.computed += n
            for j in range(old // BLOCK, s.computed // BLOCK):
                b, h = s.table[j], self._hash(s, j)
                if self.block_hash[b] is None and h not in self.cached:
                    self.cached[h] = b
                    self.block_hash[b] = h
            if s.computed < len(s.tokens):
                continue
            t = sampled[k]
            k += 1
            s.tokens.append(t)
            nout = len(s.tokens) - s.num_prompt
            reason = (
                "length" if nout >= s.max_tokens else "stop" if (t in self.eos and not s.params["ignore_eos"]) else None
            )
            if reason:
                self._free(s)
                done = True
            outs.append((s.rid, [t], reason))
        if done:
            self.running = [s for s in self.running if s.table]
        return outs


# ---------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------


def stats(ns: list[int]) -> dict:
    us = np.array(ns) / 1e3
    return {
        "median_us": round(float(np.median(us)), 1),
        "p90_us": round(float(np.percentile(us, 90)), 1),
        "min_us": round(float(us.min()), 1),
        "steps": len(ns),
    }


def time_steps(sched, steps, vocab_hi, rng, py=False, max_samples=1024):
    """schedule() + update() per step; the sampled ids (the model's part) are drawn outside
    the timed region, fresh each step: the same ids every step would keep their detokenizer
    table entries in cache."""
    ns = []
    for _ in range(steps):
        ids = rng.integers(100, vocab_hi, size=max_samples).astype(np.int64)
        t0 = time.perf_counter_ns()
        b = sched.schedule()
        n = len(b["logits_indices"]) if py else b.num_samples
        out = sched.update(ids[:n])
        t1 = time.perf_counter_ns()
        del b, out
        ns.append(t1 - t0)
    return ns


def rust_params(stop, max_tokens, final_only=False):
    extra = {"final_only": True} if final_only else {}  # a baseline build may predate it
    return RequestParams(max_tokens=max_tokens, ignore_eos=True, stop=stop, temperature=0.8, top_p=0.95, **extra)


def warm_to_decode(sched, num_seqs, vocab_hi, rng, py=False):
    for _ in range(1000):
        b = sched.schedule()
        n = len(b["logits_indices"]) if py else b.num_samples
        sched.update(rng.integers(100, vocab_hi, size=n).astype(np.int64))
        nd = (len(b["input_ids"]) == num_seqs) if py else (b.num_decodes == num_seqs)
        if nd:
            return
    raise RuntimeError("did not reach steady decode")


def bench_rust(tok, steps, rng, vocab_hi, stop):
    out = {}
    kw = dict(
        num_blocks=120_000,
        max_model_len=8192,
        block_size=BLOCK,
        max_num_seqs=1024,
        max_num_batched_tokens=8192,
        enable_prefix_caching=True,
        tokenizer=tok,
        eos_token_ids=[0],
        seed=0,
    )
    s = Scheduler(**kw)
    for i in range(1024):
        s.add_request(f"d{i}", rng.integers(100, vocab_hi, size=PROMPT).tolist(), rust_params(stop, 4000))
    warm_to_decode(s, 1024, vocab_hi, rng)
    out["decode_1024"] = stats(time_steps(s, steps, vocab_hi, rng))
    for i in range(8192):
        s.add_request(f"w{i}", rng.integers(100, vocab_hi, size=PROMPT).tolist(), rust_params(stop, 16))
    out["decode_1024_wait_8192"] = stats(time_steps(s, steps, vocab_hi, rng))
    assert s.num_running == 1024 and s.num_waiting == 8192

    s = Scheduler(**{**kw, "max_num_seqs": 8192})
    for i in range(8192):
        s.add_request(f"a{i}", rng.integers(100, vocab_hi, size=PROMPT).tolist(), rust_params(stop, 16))
    ns, tokens = [], []
    while s.num_waiting:
        t0 = time.perf_counter_ns()
        b = s.schedule()
        t1 = time.perf_counter_ns()
        tokens.append(b.num_tokens)
        ids = rng.integers(100, vocab_hi, size=b.num_samples).astype(np.int64)
        t2 = time.perf_counter_ns()
        s.update(ids)
        ns.append(time.perf_counter_ns() - t2 + t1 - t0)
    out["admit_8192"] = {**stats(ns), "mean_tokens_per_step": round(float(np.mean(tokens)))}

    # The offline LLM's requests: detokenized and stop-checked the same, reported at the end.
    try:
        rust_params(stop, 1, True)
    except TypeError:  # a baseline build from before final_only
        return out
    s = Scheduler(**kw)
    for i in range(1024):
        s.add_request(f"f{i}", rng.integers(100, vocab_hi, size=PROMPT).tolist(), rust_params(stop, 4000, True))
    warm_to_decode(s, 1024, vocab_hi, rng)
    out["decode_1024_final_only"] = stats(time_steps(s, steps, vocab_hi, rng))
    return out


def bench_rust_decode_only(steps, rng, vocab_hi):
    s = Scheduler(
        num_blocks=120_000,
        max_model_len=8192,
        block_size=BLOCK,
        max_num_seqs=1024,
        max_num_batched_tokens=8192,
        enable_prefix_caching=True,
        eos_token_ids=[0],
        seed=0,
    )
    for i in range(1024):
        s.add_request(f"d{i}", rng.integers(100, vocab_hi, size=PROMPT).tolist(), rust_params([], 4000))
    warm_to_decode(s, 1024, vocab_hi, rng)
    return stats(time_steps(s, steps, vocab_hi, rng))


def bench_python(steps, rng, vocab_hi):
    out = {}
    p = dict(max_tokens=4000, temperature=0.8, top_p=0.95, top_k=0, ignore_eos=True)
    s = PyScheduler(120_000, 1024, 8192, [0])
    for i in range(1024):
        s.add_request(f"d{i}", rng.integers(100, vocab_hi, size=PROMPT).tolist(), p, i)
    warm_to_decode(s, 1024, vocab_hi, rng, py=True)
    out["decode_1024"] = stats(time_steps(s, steps, vocab_hi, rng, py=True))
    for i in range(8192):
        s.add_request(f"w{i}", rng.integers(100, vocab_hi, size=PROMPT).tolist(), dict(p, max_tokens=16), i)
    out["decode_1024_wait_8192"] = stats(time_steps(s, steps, vocab_hi, rng, py=True))
    return out


def calibration_us() -> float:
    """Median time to allocate 1,024 small Python objects: this shared machine's speed varies
    several-fold with the other tenants' load, so results carry their own yardstick."""

    class Obj:
        __slots__ = ("a",)

    ns = []
    for _ in range(200):
        t0 = time.perf_counter_ns()
        [Obj() for _ in range(1024)]
        ns.append(time.perf_counter_ns() - t0)
    return round(float(np.median(ns)) / 1e3, 1)


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__))
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cpus_available": len(os.sched_getaffinity(0)),
        "loadavg_1m_at_start": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "fastserve_core": _core.__version__,
        "git_commit": commit,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared = os.environ.get("FASTSERVE_SHARED_MODELS") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models"
    )
    default_tok = os.path.normpath(os.path.join(shared, "llama3-tokenizer")) if hasattr(_core, "Tokenizer") else None
    ap.add_argument("--tokenizer", default=default_tok, help="tokenizer directory (detokenize + stop strings)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--py-steps", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scheduler-cpu.json"))
    ap.add_argument(
        "--baseline",
        metavar="SITE",
        help="also run the Rust scenarios with the fastserve installed "
        "under SITE (e.g. `pip install --target SITE` of an earlier commit's wheel), in a subprocess",
    )
    ap.add_argument("--baseline-commit", default="", help="the commit SITE was built from (recorded)")
    ap.add_argument("--rust-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    info = machine()
    tok, stop, vocab_hi = None, [], 30_000
    if args.tokenizer:
        tok = _core.Tokenizer(args.tokenizer)
        stop = ["\u2603STOP\u2603", "<|bench-end|>"]  # never produced by the random ids
        vocab_hi = min(tok.vocab_size, 120_000)
    cal0 = calibration_us()
    rust = bench_rust(tok, args.steps, rng, vocab_hi, stop)
    if tok is not None:
        # The same decode step with detokenization off: the scheduler's own share.
        rust["decode_1024_no_detok"] = bench_rust_decode_only(args.steps, rng, vocab_hi)
    if args.rust_only:
        with open(args.out, "w") as f:
            json.dump({"rust": rust, "machine": info, "calibration_1024_py_objects_us": [cal0, calibration_us()]}, f)
        return
    baseline = run_baseline(args) if args.baseline else None
    py = bench_python(args.py_steps, rng, vocab_hi)
    info["loadavg_1m_at_end"] = os.getloadavg()[0]
    info["calibration_1024_py_objects_us"] = [cal0, calibration_us()]
    result = {
        "bench": "scheduler step: schedule() + update(), numpy hand-off included",
        "block_size": BLOCK,
        "prompt_len": PROMPT,
        "prefix_caching": True,
        "tokenizer": args.tokenizer,
        "detokenize": tok is not None,
        "stop_strings": stop,
        "machine": info,
        "rust": rust,
        "python_reference": {
            **py,
            "note": "pure-Python PyScheduler in this file: same block bookkeeping "
            "and arrays, no detokenization or stop strings",
        },
        "targets_us": {"decode_1024": 150, "decode_1024_wait_8192": 1000},
        "speedup_decode_1024": round(py["decode_1024"]["median_us"] / rust["decode_1024"]["median_us"], 1),
    }
    if baseline is not None:
        result["baseline"] = baseline
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'scenario':<26}{'median us':>10}{'p90 us':>9}{'baseline':>10}{'target':>8}")
    base = (baseline or {}).get("rust", {})
    for name, r in rust.items():
        b = base.get(name, {}).get("median_us", "")
        print(f"{name:<26}{r['median_us']:>10}{r['p90_us']:>9}{b:>10}{result['targets_us'].get(name, ''):>8}")
    print(f"{'python reference decode_1024':<26}{py['decode_1024']['median_us']:>10}{py['decode_1024']['p90_us']:>9}")
    print(f"calibration (1,024 Python objects): {info['calibration_1024_py_objects_us']} us; wrote {args.out}")


def run_baseline(args) -> dict:
    """The Rust scenarios of this file against an earlier build, in a fresh interpreter (its
    fastserve from args.baseline), on this machine and in this run."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--rust-only", "--steps", str(args.steps), "--out", tmp.name]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        env = dict(os.environ, PYTHONPATH=args.baseline)
        subprocess.run(cmd, env=env, check=True, cwd="/")
        with open(tmp.name) as f:
            got = json.load(f)
    return {
        "commit": args.baseline_commit,
        "site": args.baseline,
        "rust": got["rust"],
        "calibration_1024_py_objects_us": got["calibration_1024_py_objects_us"],
    }


if __name__ == "__main__":
    main()
