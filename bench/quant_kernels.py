"""Quantized GEMMs against cuBLAS bf16 on the Llama-3-8B and Qwen2.5-32B layer shapes.

For each layer (qkv, o, gate_up, down) and M (tokens in the step) it times, with
triton.testing.do_bench (median; weights rotate among copies so that L2 never holds them):
  bf16         F.linear (cuBLAS)
  int4:*       W4A16 group 128, every path forced: gemv (M <= 4), fused (unpack + tl.dot,
               split-K), deq (dequantize + cuBLAS); int4 = the dispatcher as configured, and
               int4-ao = the dispatcher with an act-order permutation
  fp8:*        W8A8 per-token dynamic activations x per-channel weights, quantization included:
               scaled_mm (torch._scaled_mm), scaled_mm_fast (use_fast_accum), triton
  fp8b:*       block-wise [128, 128]: triton (per-token-group activations), deq (bf16 + cuBLAS)
and reports GB/s and TFLOP/s against the copy bandwidth and bf16 matmul rate measured in the
same run, each method's error against a float32 reference, the crossovers between paths, and
the dispatch settings that the measurements suggest (FASTSERVE_W_INT_DISPATCH,
FASTSERVE_FP8_DISPATCH). A short sweep of the int4 tile configs (quant_gemm.TUNE_CANDIDATES)
runs on the Llama shapes unless --no-sweep.

    python bench/quant_kernels.py --out $OUT/quant-kernels-h200.json [--quick] [--no-sweep]

Every case is caught and reported on its own; the JSON and the tables are written even when
some fail (after a CUDA fault the rest of the GPU work is skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    from fastserve.kernels import quant_common as QC
    from fastserve.kernels import quant_fp8 as QF
    from fastserve.kernels import quant_gemm as QG
except ImportError:  # a bare checkout without the Rust extension built
    sys.path.insert(0, str(ROOT / "python"))
    from fastserve.kernels import quant_common as QC
    from fastserve.kernels import quant_fp8 as QF
    from fastserve.kernels import quant_gemm as QG

from device_info import device_info  # noqa: E402

DEVICE = "cuda"  # "cpu" for --dry-run-cpu (with TRITON_INTERPRET=1 FASTSERVE_QUANT_INTERPRET_DISPATCH=1)
DTYPE = torch.bfloat16
GROUP = 128
ROTATE_BYTES = 256 << 20  # rotate weight copies until a pass touches several times the 60 MB L2
MAX_COPIES = 8
MODELS = {
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "qwen2.5-32b": [("qkv", 5120, 7168), ("o", 5120, 5120), ("gate_up", 5120, 55296), ("down", 27648, 5120)],
}
MS = [1, 16, 64, 256, 1024, 4096]
INT_EXTRA_MS = [2, 4, 128, 512]  # finer steps for the int4 crossovers (gemv/fused, fused/deq)


class CudaFault(RuntimeError):
    pass


def _copies(nbytes: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def sync() -> None:
    if DEVICE == "cuda":
        sync()


def empty_cache() -> None:
    if DEVICE == "cuda":
        empty_cache()


def bench_ms(fns, rep_ms: float) -> float:
    """Median ms of one call, cycling through fns (one per weight copy) call by call."""
    if DEVICE != "cuda":  # the CPU dry run checks that every case runs, not its speed
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t0) * 1e3 / len(fns)
    from triton.testing import do_bench

    i = [0]

    def step():
        fns[i[0] % len(fns)]()
        i[0] += 1

    return float(do_bench(step, warmup=max(1.0, rep_ms / 4), rep=rep_ms, return_mode="median"))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(y).any():
        return float("nan")
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _guard(e: BaseException) -> None:
    if QC._sticky_cuda_error(e):
        raise CudaFault(str(e)) from e


class Layer:
    """One layer shape's weights in every format, each in several copies for rotation."""

    def __init__(self, k: int, n: int, fp8: bool, copies: int | None = None):
        self.k, self.n = k, n
        g = torch.Generator(device=DEVICE).manual_seed(k * 7 + n)
        self.w_bf16 = [
            (torch.randn(n, k, device=DEVICE, generator=g) * 0.02).to(DTYPE)
            for _ in range(copies or _copies(2 * k * n))
        ]
        self.int4 = [
            QG.random_int_weights(k, n, 4, GROUP, DTYPE, DEVICE, act_order=True, generator=g)
            for _ in range(copies or _copies(k * n // 2))
        ]
        self.fp8 = []
        self.fp8_block = []
        if fp8:
            for _ in range(copies or _copies(k * n)):
                w = (torch.randn(n, k, device=DEVICE, generator=g) * 0.5).to(QF.FP8_DTYPE)
                ws = torch.rand(n, device=DEVICE, generator=g) * 0.01 + 1e-3
                s = torch.rand(math.ceil(n / 128), math.ceil(k / 128), device=DEVICE, generator=g) * 0.01 + 1e-3
                self.fp8.append((w, ws))
                self.fp8_block.append((w, s))

    def bytes(self, m: int) -> dict[str, float]:
        k, n = self.k, self.n
        act = 2 * m * k + 2 * m * n
        return {
            "bf16": 2 * k * n + act,
            "int4": k * n / 2 + 2 * 2 * (k // GROUP) * n + act,
            "fp8": k * n + 4 * n + act,
            "fp8b": k * n + 4 * math.ceil(n / 128) * math.ceil(k / 128) + act,
        }


def methods(layer: Layer, m: int, with_fp8: bool) -> dict:
    """name -> (list of callables, one per weight copy, family) for this M."""
    k = layer.k
    xs = [torch.randn(m, k, dtype=DTYPE, device=DEVICE) for _ in range(2)]
    out: dict[str, tuple[list, str]] = {}

    def per_copy(fn, copies):
        return [lambda c=c, x=xs[i % 2]: fn(x, c) for i, c in enumerate(copies)]

    out["bf16"] = (per_copy(lambda x, w: F.linear(x, w), layer.w_bf16), "bf16")
    if m <= 4:
        out["int4:gemv"] = (per_copy(lambda x, c: QG.w_int_gemv(x, c[0], c[1], c[2], GROUP, 4), layer.int4), "int4")
    out["int4:fused"] = (per_copy(lambda x, c: QG.w_int_dot(x, c[0], c[1], c[2], GROUP, 4), layer.int4), "int4")
    if m in (1, 16):  # split-K through the separate reduction kernel, to show what the fixup saves
        no_fix = dict(fixup=False)
        if m == 1:
            out["int4:gemv-2k"] = (
                per_copy(lambda x, c: QG.w_int_gemv(x, c[0], c[1], c[2], GROUP, 4, config=no_fix), layer.int4),
                "int4",
            )
        out["int4:fused-2k"] = (
            per_copy(lambda x, c: QG.w_int_dot(x, c[0], c[1], c[2], GROUP, 4, config=no_fix), layer.int4),
            "int4",
        )
    if m >= 16:  # the scale folded into the weight (one chained accumulator), bucket tiles and 128 x 128 x 64
        sw = dict(SCALE_W=True)
        out["int4:fused-sw"] = (
            per_copy(lambda x, c: QG.w_int_dot(x, c[0], c[1], c[2], GROUP, 4, config=sw), layer.int4),
            "int4",
        )
    if m >= 128:
        sw64 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, JMAJOR=False, GROUP_M=8, num_warps=8, num_stages=4)
        sw64["SCALE_W"] = True
        out["int4:fused-sw64"] = (
            per_copy(lambda x, c: QG.w_int_dot(x, c[0], c[1], c[2], GROUP, 4, config=sw64), layer.int4),
            "int4",
        )
    out["int4:deq"] = (
        per_copy(lambda x, c: QG.w_int_dequant_matmul(x, c[0], c[1], c[2], GROUP, 4), layer.int4),
        "int4",
    )
    out["int4"] = (per_copy(lambda x, c: QG.w_int_matmul(x, c[0], c[1], c[2], GROUP, 4), layer.int4), "int4")
    out["int4-ao"] = (per_copy(lambda x, c: QG.w_int_matmul(x, c[0], c[1], c[2], GROUP, 4, c[3]), layer.int4), "int4")
    if with_fp8:

        def fp8_sm(x, c, fast=False):
            xq, sx = QF.per_token_quant_fp8_triton(x)
            return QF.scaled_mm_linear(xq, sx, c[0], c[1], None, DTYPE, use_fast_accum=fast)

        def fp8_tr(x, c):
            xq, sx = QF.per_token_quant_fp8_triton(x)
            return QF.fp8_gemm_triton(xq, sx, c[0], c[1], None, DTYPE)

        def fp8b_tr(x, c):
            xq, sx = QF.per_token_group_quant_fp8_triton(x, 128)
            return QF.fp8_block_gemm_triton(xq, sx, c[0], c[1], (128, 128), None, DTYPE)

        def fp8b_deq(x, c):
            return F.linear(x, QF.fp8_block_dequant_triton(c[0], c[1], (128, 128), DTYPE))

        out["fp8:scaled_mm"] = (per_copy(fp8_sm, layer.fp8), "fp8")
        out["fp8:scaled_mm_fast"] = (per_copy(lambda x, c: fp8_sm(x, c, True), layer.fp8), "fp8")
        out["fp8:triton"] = (per_copy(fp8_tr, layer.fp8), "fp8")
        out["fp8b:triton"] = (per_copy(fp8b_tr, layer.fp8_block), "fp8b")
        out["fp8b:deq"] = (per_copy(fp8b_deq, layer.fp8_block), "fp8b")
    return out, xs[0]


def references(layer: Layer, x: torch.Tensor, with_fp8: bool) -> dict[str, torch.Tensor]:
    """float32 results of the first weight copy of each format for x."""
    qw, s, z, perm = layer.int4[0]
    w_int = QG._dequantize_torch(qw, s, z, GROUP, 4, torch.float32)
    refs = {
        "bf16": x.float() @ layer.w_bf16[0].float().t(),
        "int4": x.float() @ w_int,
        "int4-ao": x.float()[:, perm.long()] @ w_int,
    }
    del w_int
    if with_fp8:
        w, ws = layer.fp8[0]
        refs["fp8"] = QF._fp8_linear_torch(x, w, ws, None, None, torch.float32)
        w, sb = layer.fp8_block[0]
        refs["fp8b"] = QF._fp8_block_linear_torch(x, w, sb, 128, 128, None, torch.float32)
        wd = w.float() * QF._block_scales_full(sb, layer.n, layer.k, 128, 128)
        refs["fp8b:deq"] = x.float() @ wd.t()  # no activation quantization on this path
    return refs


def layer_ms(ms: list[int], args) -> list[int]:
    return sorted(set(ms) | (set(INT_EXTRA_MS) if not args.quick else set()))


def layer_methods(layer: Layer, m: int, with_fp8: bool):
    meths, x0 = methods(layer, m, with_fp8 and m not in INT_EXTRA_MS)
    if m in INT_EXTRA_MS:
        meths = {key: v for key, v in meths.items() if key in ("bf16", "int4:gemv", "int4:fused", "int4:deq")}
    return meths, x0


def compile_worker(worker: int, workers: int, ms: list[int], args) -> None:
    """Run this worker's share of the (M, method) jobs once on every layer shape, untimed:
    Triton compiles them into its on-disk cache, which the timing process then reads."""
    jobs = []
    for m in layer_ms(ms, args):
        names = sorted(layer_methods(Layer(256, 16, not args.no_fp8, copies=1), m, not args.no_fp8)[0])
        jobs += [(m, name) for name in names if name != "bf16"]
    if not args.no_sweep:
        jobs += [("sweep", i) for i in range(len(_sweep_jobs()))]
    mine = jobs[worker::workers]
    for model in [m for m in args.models.split(",") if m]:
        for _, k, n in MODELS[model]:
            layer = Layer(k, n, not args.no_fp8, copies=1)
            for m, name in mine:
                if m == "sweep":
                    if model != "llama3-8b":
                        continue
                    bm, bucket, cand = _sweep_jobs()[name]
                    x = torch.randn(bm, k, dtype=DTYPE, device=DEVICE)
                    c = layer.int4[0]
                    fn = QG.w_int_gemv if bucket == "gemv" else QG.w_int_dot
                    calls = [lambda: fn(x, c[0], c[1], c[2], GROUP, 4, config=cand)]
                else:
                    meths, _ = layer_methods(layer, m, not args.no_fp8)
                    calls = meths[name][0][:1] if name in meths else []
                for call in calls:
                    try:
                        call()
                    except Exception as e:  # noqa: BLE001 - the timing run reports it
                        _guard(e)
            del layer
            empty_cache()
    sync()


def precompile(ms: list[int], args) -> float:
    import subprocess

    t0 = time.perf_counter()
    cmd = (
        [
            sys.executable,
            __file__,
            "--compile-worker",
            "",
            "--workers",
            str(args.precompile),
            "--models",
            args.models,
            "--ms",
            args.ms,
        ]
        + (["--quick"] if args.quick else [])
        + (["--no-sweep"] if args.no_sweep else [])
        + (["--no-fp8"] if args.no_fp8 else [])
    )
    procs = []
    for i in range(args.precompile):
        c = list(cmd)
        c[3] = str(i)
        procs.append(subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    # Alongside: the engine's cold start, every variant warm-up compiles for the Llama-3-8B
    # shapes, against an empty private Triton cache.
    import tempfile

    cold_dir = tempfile.mkdtemp(prefix="triton-cold-")
    cold_out = os.path.join(cold_dir, "cold.json")
    procs.append(
        subprocess.Popen(
            [sys.executable, __file__, "--cold-warmup", cold_out],
            env=dict(os.environ, TRITON_CACHE_DIR=os.path.join(cold_dir, "cache")),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    for p in procs:
        try:
            _, err = p.communicate(timeout=args.precompile_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            err = "timed out"
        if p.returncode:
            print(f"precompile worker exited {p.returncode}: {(err or '')[-300:]}", flush=True)
    try:
        with open(cold_out) as f:
            args.cold_warmup = json.load(f)
    except (OSError, ValueError):
        args.cold_warmup = None
    return time.perf_counter() - t0


def cold_warmup(out_path: str) -> None:
    """warm-up as the engine runs it for a Llama-3-8B int4 (g128) / FP8 model, timed."""
    shapes = [(k, n) for _, k, n in MODELS["llama3-8b"]]
    res = {}
    t0 = time.perf_counter()
    QG.warmup(shapes, DTYPE, 4, GROUP, max_m=8192, device=DEVICE)
    res["int4_g128_max_m_8192_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    QG.warmup(shapes, DTYPE, 4, GROUP, max_m=256, act_order=True, device=DEVICE)
    res["int4_g128_act_order_max_m_256_s"] = time.perf_counter() - t0
    if QF.fp8_supported(torch.device(DEVICE)):
        t0 = time.perf_counter()
        QF.warmup(shapes, DTYPE, max_m=8192, device=DEVICE)
        res["fp8_per_channel_max_m_8192_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        QF.warmup(shapes, DTYPE, max_m=8192, block_size=(128, 128), device=DEVICE)
        res["fp8_block_max_m_8192_s"] = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump(res, f)


def run_layer(model: str, name: str, k: int, n: int, ms: list[int], args, info: dict, rows: list) -> None:
    with_fp8 = not args.no_fp8
    layer = Layer(k, n, with_fp8)
    bw, mm = info["copy_bandwidth_gbps"], info["matmul_bf16_tflops"]
    int_only = set(INT_EXTRA_MS)
    for m in layer_ms(ms, args):
        meths, x0 = layer_methods(layer, m, with_fp8)
        check = m in (1, 16, 256)
        refs = references(layer, x0, with_fp8 and m not in int_only) if check else {}
        nbytes = layer.bytes(m)
        for meth, (fns, fam) in meths.items():
            row = dict(model=model, layer=name, K=k, N=n, M=m, method=meth)
            try:
                if check:
                    y = fns[0]()
                    ref = refs.get(meth, refs.get(fam if meth != "int4-ao" else "int4-ao"))
                    row["rel_err"] = rel_err(y, ref)
                ms_ = bench_ms(fns, args.rep_ms)
                row.update(ms=ms_, gbps=nbytes[fam] / ms_ / 1e6, tflops=2 * m * n * k / ms_ / 1e9)
                row.update(pct_bw=100 * row["gbps"] / bw, pct_mm=100 * row["tflops"] / mm)
                if meth == "int4" or meth == "int4-ao":
                    row["path"] = QG.choose_path(m, k, n, 4, DTYPE)[0]
            except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
                _guard(e)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
        del refs
    del layer
    empty_cache()


def _sweep_plan():
    return [
        (1, "gemv", QG.GEMV_CONFIG),
        (16, "dot16", QG._dot_bucket(16)[1]),
        (64, "dot64", QG._dot_bucket(64)[1]),
        (256, "dot256", QG._dot_bucket(256)[1]),
        (1024, "dot256", QG._dot_bucket(1024)[1]),
    ]


def _sweep_jobs():
    """(M, bucket, config) for every candidate of the sweep, defaults included."""
    return [
        (m, bucket, cand) for m, bucket, default in _sweep_plan() for cand in [default] + QG.TUNE_CANDIDATES[bucket]
    ]


def run_sweep(args, info: dict) -> list[dict]:
    """The int4 tile candidates against the defaults at the decode / mid / large M buckets."""
    plan = _sweep_plan()
    out = []
    for name, k, n in MODELS["llama3-8b"]:
        copies = [QG.random_int_weights(k, n, 4, GROUP, DTYPE, DEVICE) for _ in range(_copies(k * n // 2))]
        for m, bucket, default in plan:
            x = torch.randn(m, k, dtype=DTYPE, device=DEVICE)
            launch = QG.w_int_gemv if bucket == "gemv" else QG.w_int_dot
            for i, cand in enumerate([default] + QG.TUNE_CANDIDATES[bucket]):
                row = dict(layer=name, K=k, N=n, M=m, bucket=bucket, config=dict(cand), default=i == 0)
                try:
                    fns = [lambda c=c, cand=cand: launch(x, c[0], c[1], c[2], GROUP, 4, config=cand) for c in copies]
                    row["ms"] = bench_ms(fns, args.rep_ms)
                    row["gbps"] = (k * n / 2) / row["ms"] / 1e6
                except Exception as e:  # noqa: BLE001
                    _guard(e)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                out.append(row)
        del copies
        empty_cache()
    return out


# ---------------------------------------------------------------- analysis


def _t(rows, model, layer, m, meth):
    for r in rows:
        if r["model"] == model and r["layer"] == layer and r["M"] == m and r["method"] == meth and "ms" in r:
            return r["ms"]
    return None


def best_of(rows, model, layer, m, prefix):
    cands = [
        (r["ms"], r["method"])
        for r in rows
        if r["model"] == model and r["layer"] == layer and r["M"] == m and r["method"].startswith(prefix) and "ms" in r
    ]
    return min(cands) if cands else (None, None)


def suggest(rows) -> dict:
    """Dispatch thresholds that minimize the summed time over all measured layer shapes."""
    shapes = sorted({(r["model"], r["layer"], r["K"], r["N"]) for r in rows})
    int_ms = sorted({r["M"] for r in rows if r["method"] == "int4:fused" and "ms" in r})

    def t(model, layer, m, path):
        return _t(rows, model, layer, m, f"int4:{path}")

    def total(gemv_max, fused_max, only=None):
        s = 0.0
        for model, layer, k, n in shapes:
            if only and (k, n) != only:
                continue
            for m in int_ms:
                path = "gemv" if m <= gemv_max else "fused" if m <= fused_max else "deq"
                v = t(model, layer, m, path)
                if v is None:  # gemv not measured at this M: the next path
                    v = t(model, layer, m, "fused" if m <= fused_max else "deq")
                s += v if v is not None else 1e9
        return s

    gemv_opts = [0] + [m for m in int_ms if m <= 4]
    fused_opts = [0] + int_ms
    best_g, best_f = min(((g, f) for g in gemv_opts for f in fused_opts if f >= g), key=lambda gf: total(*gf))
    per_shape = {}
    for _, _, k, n in shapes:
        f = min(fused_opts, key=lambda f: total(best_g, max(f, best_g), only=(k, n)))
        if f != best_f and total(best_g, f, (k, n)) < 0.97 * total(best_g, best_f, (k, n)):
            per_shape[f"{k}x{n}"] = f
    res = {"gemv_max_m": best_g, "fused_max_m": best_f, "fused_max_m_by_shape": per_shape}
    env = [f"gemv_max_m={best_g}", f"fused_max_m={best_f}"] + [f"fused_max_m.{s}={v}" for s, v in per_shape.items()]
    res["env_w_int"] = "FASTSERVE_W_INT_DISPATCH=" + ",".join(env)

    fp8_ms = sorted({r["M"] for r in rows if r["method"] == "fp8:triton" and "ms" in r})
    if fp8_ms:

        def sum_m(meth, m):
            vals = [_t(rows, mo, la, m, meth) for mo, la, _, _ in shapes]
            return sum(v if v is not None else 1e9 for v in vals)

        sm = {m: min(sum_m("fp8:scaled_mm", m), sum_m("fp8:scaled_mm_fast", m)) for m in fp8_ms}
        tr = {m: sum_m("fp8:triton", m) for m in fp8_ms}
        fast = sum(sum_m("fp8:scaled_mm_fast", m) for m in fp8_ms) < sum(sum_m("fp8:scaled_mm", m) for m in fp8_ms)
        backend = "triton" if tr[fp8_ms[-1]] < sm[fp8_ms[-1]] else "scaled_mm"
        triton_max = 0
        if backend == "scaled_mm":
            for m in fp8_ms:
                if tr[m] < sm[m]:
                    triton_max = m
                else:
                    break
        bt = {m: sum_m("fp8b:triton", m) for m in fp8_ms}
        bd = {m: sum_m("fp8b:deq", m) for m in fp8_ms}
        deq_min = QF.NEVER
        for m in reversed(fp8_ms):
            if bd[m] < bt[m]:
                deq_min = m
            else:
                break
        res.update(
            fp8_backend=backend, fp8_triton_max_m=triton_max, fp8_use_fast_accum=fast, fp8_block_dequant_min_m=deq_min
        )
        res["env_fp8"] = (
            f"FASTSERVE_FP8_DISPATCH=backend={backend},triton_max_m={triton_max},"
            f"use_fast_accum={str(fast).lower()},block_dequant_min_m={deq_min}"
        )
    return res


def _fmt(v, spec="8.1f"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{spec.split('.')[0]}}"
    return format(v, spec)


def print_tables(report: dict) -> None:
    rows = report["rows"]
    info = report["device"]
    print(
        f"\n{info.get('gpu')}: copy {info.get('copy_bandwidth_gbps')} GB/s, bf16 matmul "
        f"{info.get('matmul_bf16_tflops')} TFLOP/s; torch {info.get('torch')}, triton {info.get('triton')}, "
        f"commit {info.get('git_commit')}"
    )
    errs = [r for r in rows if "error" in r]
    bad = [
        r
        for r in rows
        if r.get("rel_err", 0) > (3e-2 if r["method"] != "fp8b:deq" else 2e-2)
        or (r.get("rel_err") is not None and math.isnan(r["rel_err"]))
    ]
    print(f"cases {len(rows)}, errors {len(errs)}, wrong results {len(bad)}")
    for r in (errs + bad)[:12]:
        print(
            f"  ! {r['model']} {r['layer']} M={r['M']} {r['method']}: {r.get('error') or 'rel_err %.3g' % r['rel_err']}"
        )
    main_ms = report.get("ms") or MS
    print("\nper layer, us; xN = speedup over bf16; int4 = the dispatcher (path), %bw = of copy bandwidth")
    print(
        f"{'model':<6}{'layer':<8}{'M':>5}{'bf16':>8}{'int4':>8}{'path':>6}{'x':>6}{'%bw':>5}{'ao x':>6}"
        f"{'fp8':>8}{'x':>6}{'by':>8}{'fp8b':>8}{'x':>6}"
    )
    for model, layer, k, n in sorted(
        {(r["model"], r["layer"], r["K"], r["N"]) for r in rows},
        key=lambda s: (s[0], ["qkv", "o", "gate_up", "down"].index(s[1])),
    ):
        for m in sorted({r["M"] for r in rows if r["model"] == model and r["layer"] == layer} & set(main_ms)):
            b = _t(rows, model, layer, m, "bf16")
            i4 = next(
                (
                    r
                    for r in rows
                    if r["model"] == model
                    and r["layer"] == layer
                    and r["M"] == m
                    and r["method"] == "int4"
                    and "ms" in r
                ),
                {},
            )
            ao = _t(rows, model, layer, m, "int4-ao")
            f8, f8m = best_of(rows, model, layer, m, "fp8:")
            fb, _ = best_of(rows, model, layer, m, "fp8b:")

            def us(v):
                return v * 1e3 if v is not None else None

            def x(v):
                return b / v if (b and v) else None

            print(
                f"{model[:5]:<6}{layer:<8}{m:>5}{_fmt(us(b))}{_fmt(us(i4.get('ms')))}{i4.get('path', '-'):>6}"
                f"{_fmt(x(i4.get('ms')), '6.2f')}{_fmt(i4.get('pct_bw'), '5.0f')}{_fmt(x(ao), '6.2f')}"
                f"{_fmt(us(f8))}{_fmt(x(f8), '6.2f')}{(f8m or '-').split(':')[-1][-8:]:>8}"
                f"{_fmt(us(fb))}{_fmt(x(fb), '6.2f')}"
            )
    print(
        "\ndecoder-layer totals (the 4 GEMMs): speedup over bf16 of int4 dispatcher | best int4 path | "
        "act order | best fp8 | best fp8 block"
    )
    for model in report["models"]:
        for m in sorted({r["M"] for r in rows if r["model"] == model} & set(main_ms)):
            layers = [la for la, _, _ in MODELS[model]]

            def tot(fn):
                vals = [fn(la) for la in layers]
                return sum(vals) if all(v is not None for v in vals) else None

            b = tot(lambda la: _t(rows, model, la, m, "bf16"))
            parts = [
                tot(lambda la: _t(rows, model, la, m, "int4")),
                tot(lambda la: best_of(rows, model, la, m, "int4:")[0]),
                tot(lambda la: _t(rows, model, la, m, "int4-ao")),
                tot(lambda la: best_of(rows, model, la, m, "fp8:")[0]),
                tot(lambda la: best_of(rows, model, la, m, "fp8b:")[0]),
            ]
            print(
                f"  {model:<12} M={m:<5} bf16 {_fmt(b * 1e3 if b else None, '8.1f')} us "
                + " ".join(_fmt(b / p if (b and p) else None, "6.2f") + "x" for p in parts)
            )
    sw = report.get("sweep") or []
    if sw:
        print("\nint4 tile sweep, llama3-8b (us summed over its 4 layers): default -> best candidate")
        for bucket in dict.fromkeys(r["bucket"] for r in sw):
            by_cfg: dict[str, list] = {}
            for r in sw:
                if r["bucket"] == bucket:
                    by_cfg.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r)
            totals = {c: sum(r["ms"] for r in rs) for c, rs in by_cfg.items() if all("ms" in r for r in rs)}
            dflt = next((c for c, rs in by_cfg.items() if rs[0]["default"]), None)
            if not totals:
                continue
            best = min(totals, key=totals.get)
            print(
                f"  {bucket:<7} M={sw[[r['bucket'] for r in sw].index(bucket)]['M']:<4} "
                f"{_fmt(totals.get(dflt, float('nan')) * 1e3, '8.1f')} -> {totals[best] * 1e3:8.1f}  "
                f"{'(default)' if best == dflt else best}"
            )
    s = report.get("suggested", {})
    print("\ncrossovers: fastest int4 path per M")
    for model, layer, k, n in sorted({(r["model"], r["layer"], r["K"], r["N"]) for r in rows}):
        ms = sorted({r["M"] for r in rows if r["model"] == model and r["layer"] == layer and r["method"] == "int4:deq"})
        picks = [f"{m}:{(best_of(rows, model, layer, m, 'int4:')[1] or '-').split(':')[-1]}" for m in ms]
        print(f"  {f'{k}x{n}':<12}" + " ".join(picks))
    if report.get("failed_variants"):
        print("fell back:", "; ".join(f"{k} ({v[:80]})" for k, v in report["failed_variants"].items()))
    cold = report.get("cold_warmup_s")
    if cold:
        print(
            "engine warm-up, llama3-8b shapes, empty Triton cache (compiling next to the precompile workers): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in cold.items())
        )
    else:
        print(
            f"warm-up of the int4 variants for the llama3-8b shapes (Triton cache warm): "
            f"{report.get('warmup_s', float('nan')):.1f} s"
        )
    for m, a, b2 in (
        (1, "int4:gemv", "int4:gemv-2k"),
        (1, "int4:fused", "int4:fused-2k"),
        (16, "int4:fused", "int4:fused-2k"),
    ):
        pairs = [
            (_t(rows, r0, r1, m, a), _t(rows, r0, r1, m, b2))
            for r0, r1, _, _ in {(r["model"], r["layer"], r["K"], r["N"]) for r in rows}
        ]
        pairs = [p for p in pairs if None not in p]
        if pairs:
            print(
                f"split-K fixup vs reduction kernel, {a} M={m}: {sum(p[0] for p in pairs) * 1e3:.1f} vs "
                f"{sum(p[1] for p in pairs) * 1e3:.1f} us summed over {len(pairs)} shapes"
            )
    print("suggested:", s.get("env_w_int", "-"), s.get("env_fp8", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/quant-kernels-<gpu>.json)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--rep-ms", type=float, default=4.0, help="do_bench time per case (ms)")
    ap.add_argument("--quick", action="store_true", help="no extra int4 crossover steps")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument(
        "--precompile",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes that compile the variants into Triton's cache first (0: none)",
    )
    ap.add_argument("--precompile-timeout", type=float, default=150.0)
    ap.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="tiny shapes on the CPU through the interpreter (set TRITON_INTERPRET=1 and "
        "FASTSERVE_QUANT_INTERPRET_DISPATCH=1): checks that every case and table runs",
    )
    ap.add_argument("--compile-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cold-warmup", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry_run_cpu:
        _dry_run_setup(args)
    if args.cold_warmup:
        cold_warmup(args.cold_warmup)
        return
    if args.compile_worker is not None:
        compile_worker(args.compile_worker, args.workers, [int(v) for v in args.ms.split(",") if v], args)
        return
    t_start = time.perf_counter()
    torch.manual_seed(0)
    info = device_info(measure=DEVICE == "cuda")
    info.setdefault("copy_bandwidth_gbps", float("nan"))
    info.setdefault("matmul_bf16_tflops", float("nan"))
    ms = [int(v) for v in args.ms.split(",") if v]
    report = dict(
        device=info,
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        dtype=str(DTYPE),
        ms=ms,
        group_size=GROUP,
        models=[m for m in args.models.split(",") if m],
        rows=[],
        sweep=[],
        dispatch=dict(
            w_int=vars(QG.W_INT_DISPATCH)
            | {"fused_max_m_by_shape": {f"{k}x{n}": v for (k, n), v in QG.W_INT_DISPATCH.fused_max_m_by_shape.items()}},
            fp8=vars(QF.FP8_DISPATCH),
        ),
    )
    if not args.no_fp8 and not QF.fp8_supported(torch.device(DEVICE)):
        args.no_fp8 = True
        report["note"] = "no FP8 tensor cores on this GPU: fp8 skipped"
    out = args.out or os.path.join(
        os.environ.get("OUT", str(ROOT / "bench" / "results")), f"quant-kernels-{_slug(info.get('gpu') or 'cpu')}.json"
    )
    try:
        if args.precompile > 0:
            report["precompile_s"] = precompile(ms, args)
            report["cold_warmup_s"] = args.cold_warmup
            print(f"precompiled in {report['precompile_s']:.1f} s ({args.precompile} processes)", flush=True)
        t0 = time.perf_counter()
        QG.warmup([(k, n) for _, k, n in MODELS["llama3-8b"]], DTYPE, 4, GROUP, max_m=max(ms), device=DEVICE)
        report["warmup_s"] = time.perf_counter() - t0
        for model in report["models"]:
            for name, k, n in MODELS[model]:
                t0 = time.perf_counter()
                run_layer(model, name, k, n, ms, args, info, report["rows"])
                print(f"{model} {name} {k}x{n}: {time.perf_counter() - t0:.1f} s", flush=True)
        if not args.no_sweep:
            report["sweep"] = run_sweep(args, info)
    except CudaFault as e:
        report["cuda_fault"] = str(e)[:500]
        print(f"CUDA fault, remaining cases skipped: {str(e)[:200]}", flush=True)
    except Exception as e:  # noqa: BLE001 - still write what was measured
        report["fatal"] = traceback.format_exc()[-2000:]
        print(f"stopped early: {type(e).__name__}: {str(e)[:200]}", flush=True)
    report["failed_variants"] = QC.failed_variants()
    try:
        report["suggested"] = suggest(report["rows"])
    except Exception as e:  # noqa: BLE001
        report["suggested"] = {"error": f"{type(e).__name__}: {e}"}
    report["seconds"] = time.perf_counter() - t_start
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print_tables(report)
    print(f"-> {out} ({report['seconds']:.0f} s)")


def _dry_run_setup(args) -> None:
    global DEVICE, DTYPE, GROUP, MODELS, INT_EXTRA_MS
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("FASTSERVE_QUANT_INTERPRET_DISPATCH") != "1":
        raise SystemExit(
            "--dry-run-cpu needs TRITON_INTERPRET=1 FASTSERVE_QUANT_INTERPRET_DISPATCH=1 in the environment"
        )
    DEVICE, DTYPE, GROUP = "cpu", torch.float16, 64  # bf16 tl.dot is wrong in the interpreter
    MODELS = {"llama3-8b": [("qkv", 256, 96)], "qwen2.5-32b": [("down", 320, 48)]}
    INT_EXTRA_MS = [2]
    args.ms = "1,16,40"
    args.precompile = 0
    args.rep_ms = 0.0
    QG.set_w_int_dispatch(fused_max_m=16)
    QF.set_fp8_dispatch(block_dequant_min_m=40)


def _slug(name: str) -> str:
    for key in ("H100", "H200", "A100", "L40", "A10"):
        if key in name:
            return key.lower()
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower())


if __name__ == "__main__":
    main()
