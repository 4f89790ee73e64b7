"""Rebuild the committed quantized fixtures under tests/assets/quant/ with the REAL quantizers.

Each fixture is a tiny random-weight HF model (Llama, Qwen2, Qwen3, Mistral; hidden 128,
intermediate 256, 2 layers, vocab 1024 with a truncated real tokenizer) quantized by the tool
itself, saved as the tool saves it, plus `reference/reference.json` and `reference/logits.safetensors`: what HF
transformers computes from that quantized checkpoint (fp32 teacher-forced logits over prompt +
continuation, and HF's greedy continuation).

The quantizers need incompatible environments, so the script runs in steps, each in its own
virtualenv (never the project's .venv):

    python regenerate.py base                       # any venv with transformers: float16 base models
    /work/qvenv-gptq/bin/python regenerate.py quantize --tool gptqmodel
    /work/qvenv-llmc/bin/python regenerate.py quantize --tool llmcompressor
    /work/qvenv-awq/bin/python  regenerate.py quantize --tool autoawq
    /work/qvenv-gptq/bin/python regenerate.py reference --tool gptqmodel --tool autoawq
    /work/qvenv-llmc/bin/python regenerate.py reference --tool llmcompressor
    (compact: turns an older run's full reference/logits.safetensors into logprobs.safetensors)

venvs (each may reuse one torch through a .pth file instead of downloading its own): qvenv-gptq =
gptqmodel 7.6.0 + optimum + transformers 5.17; qvenv-llmc = llmcompressor 0.14 +
compressed-tensors; qvenv-awq = autoawq 0.2.9 (--no-deps) + transformers 4.51.3.
Calibration data are random token lists (no dataset download). GPTQModel on 2 cores needs
GPTQMODEL_CPU_WORKERS=2.

The reference step also dequantizes every checkpoint with the plain fp32 formulas written
below (from the formats' own code, see /work/shared/QUANT_FORMATS.md) and records how far
that is from HF's loader (`hf_check` and `other_max_abs` in reference.json): a second, independent
reading of the same tensors. Where HF has no CPU path for a format the dequant result becomes
the reference and reference.json says `"reference": "dequant"`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
WORK = Path(os.environ.get("QUANT_FIXTURE_WORK", "/work/qcache/fixture-work"))

VOCAB = 1024  # embedding rows; ids >= KEEP are special tokens or unused rows
KEEP = 1000  # ordinary BPE tokens kept from the real tokenizer (bytes + its first merges)
BASE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
            vocab_size=VOCAB, initializer_range=0.05)
# family -> (architecture, tokenizer, overrides). Qwen2 has q/k/v biases by construction; Qwen3
# gets head_dim 64 != hidden / heads so q/o projections are not square.
ARCHS = {
    "llama": ("LlamaForCausalLM", "llama3", {}),
    "qwen2": ("Qwen2ForCausalLM", "qwen3", {}),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", {"head_dim": 64}),
    "mistral": ("MistralForCausalLM", "llama3", {"sliding_window": None}),
}
SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
GEN_CONFIG = {
    "llama3": {"bos_token_id": KEEP, "eos_token_id": [KEEP + 1, KEEP + 4]},
    "qwen3": {"eos_token_id": [KEEP + 2, KEEP], "pad_token_id": KEEP},
}

# name -> (family, tool, scheme). Spread over the four architectures, not every combination.
FIXTURES = {
    "gptq-int4-sym-llama": ("llama", "gptqmodel", dict(bits=4, group_size=32, sym=True, desc_act=False)),
    "gptq-int4-asym-actorder-qwen2": ("qwen2", "gptqmodel", dict(bits=4, group_size=32, sym=False, desc_act=True)),
    "gptq-int8-qwen3": ("qwen3", "gptqmodel", dict(bits=8, group_size=32, sym=True, desc_act=False)),
    "awq-gptqmodel-gemm-llama": ("llama", "gptqmodel", dict(method="awq", bits=4, group_size=32)),
    "awq-autoawq-gemm-qwen2": ("qwen2", "autoawq", dict(w_bit=4, q_group_size=32, zero_point=True, version="GEMM")),
    "ct-w4a16-qwen3": ("qwen3", "llmcompressor", dict(scheme="W4A16")),
    "ct-w4a16-asym-llama": ("llama", "llmcompressor", dict(scheme="W4A16_ASYM")),
    "ct-fp8-dynamic-mistral": ("mistral", "llmcompressor", dict(scheme="FP8_DYNAMIC")),
    "ct-fp8-static-qwen2": ("qwen2", "llmcompressor", dict(scheme="FP8")),
}

PROMPT_LENGTHS = (3, 11, 26, 45)
SHARED_PREFIX, TAIL_LENGTHS = 20, (5, 9, 14, 3)  # for the prefix-cache case
MAX_NEW = 16


def prompts() -> list[list[int]]:
    rng = random.Random(1234)
    out = [[rng.randrange(KEEP) for _ in range(n)] for n in PROMPT_LENGTHS]
    prefix = [rng.randrange(KEEP) for _ in range(SHARED_PREFIX)]
    return out + [prefix + [rng.randrange(KEEP) for _ in range(n)] for n in TAIL_LENGTHS]


def calibration(n: int = 32, length: int = 64) -> list[list[int]]:
    rng = random.Random(99)
    return [[rng.randrange(KEEP) for _ in range(length)] for _ in range(n)]


# --------------------------------------------------------------------------- tokenizer + base
def small_tokenizer(src: Path, family: str, dst: Path) -> None:
    """The real byte-level BPE cut to its first KEEP tokens: ids below KEEP are the original
    ids (all 256 bytes and the earliest merges, so any text still tokenizes, just into more
    pieces), the family's special tokens move to KEEP, KEEP+1, ..."""
    tok = json.loads((src / "tokenizer.json").read_text())
    model = tok["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < KEEP}
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    model["vocab"], model["merges"] = vocab, merges
    by_content = {a["content"]: a for a in tok["added_tokens"]}
    tok["added_tokens"] = [dict(by_content[c], id=KEEP + i) for i, c in enumerate(SPECIALS[family])]
    byte_chars = {t for t in vocab if len(t) == 1}
    if len(byte_chars) < 256:
        raise RuntimeError(f"{src}: the first {KEEP} ids miss single-byte tokens; raise KEEP")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, separators=(",", ":")))
    shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    (dst / "generation_config.json").write_text(json.dumps(GEN_CONFIG[family], indent=2))


def build_base(family: str) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(TESTS))
    from tiny_models import unpack_test_tokenizers

    arch, tok_name, overrides = ARCHS[family]
    out = WORK / "base" / family
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kw = dict(BASE, **overrides, **{k: v for k, v in GEN_CONFIG[tok_name].items()})
    config = cfg_cls(**kw)
    config.architectures = [arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for pname, p in model.named_parameters():
            # HF initializes norms to 1 and biases to 0, which would hide a mis-loaded one.
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    # float16 like the checkpoints these tools are run on; fp16 scales come out of that.
    model = model.to(torch.float16)
    model.save_pretrained(out)
    small_tokenizer(unpack_test_tokenizers() / f"{tok_name}-tokenizer", tok_name, out)
    return out


# --------------------------------------------------------------------------- quantizers
def quantize_gptqmodel(name: str, base: Path, scheme: dict, out: Path) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    scheme = dict(scheme)
    method = scheme.pop("method", "gptq")
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration()]
    if method == "awq":
        from gptqmodel.quantization import FORMAT, METHOD

        qcfg = QuantizeConfig(quant_method=METHOD.AWQ, format=FORMAT.GEMM, **scheme)
        model = GPTQModel.load(str(base), qcfg)
        model.quantize(calib, batch_size=4, backend=BACKEND.AWQ_TORCH)
    else:
        model = GPTQModel.load(str(base), QuantizeConfig(**scheme))
        model.quantize(calib, batch_size=4)
    model.save(str(out))


def quantize_llmcompressor(name: str, base: Path, scheme: dict, out: Path) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    tok = AutoTokenizer.from_pretrained(base)
    s = scheme["scheme"]
    if s.startswith("W4A16"):
        recipe = GPTQModifier(targets="Linear", scheme=s, ignore=["lm_head"])
    else:
        recipe = QuantizationModifier(targets="Linear", scheme=s, ignore=["lm_head"])
    kwargs = {}
    if s != "FP8_DYNAMIC":  # weight-only round-to-nearest needs no data; GPTQ and static FP8 do
        ids = calibration()
        kwargs = dict(dataset=Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}),
                      num_calibration_samples=len(ids), max_seq_length=64)
    oneshot(model=model, recipe=recipe, **kwargs)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)


def quantize_autoawq(name: str, base: Path, scheme: dict, out: Path) -> None:
    from awq import AutoAWQForCausalLM

    model = AutoAWQForCausalLM.from_pretrained(str(base), device_map="cpu")
    # AutoAWQ's search runs per-sample with a fixed block size: a list of token lists is accepted.
    model.quantize(None, quant_config=dict(scheme), calib_data=calibration(), max_calib_seq_len=64,
                   n_parallel_calib_samples=8, max_calib_samples=32)
    model.save_quantized(str(out))


QUANTIZERS = {"gptqmodel": quantize_gptqmodel, "llmcompressor": quantize_llmcompressor, "autoawq": quantize_autoawq}


def finish_fixture(name: str, base: Path, tmp: Path) -> None:
    """Keep only what a checkpoint directory needs (config, weights, tokenizer); tools also write
    logs and their own meta files, which the loader is not meant to need."""
    dst = HERE / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in tmp.iterdir():
        if f.suffix == ".safetensors" or f.name in ("config.json", "quantize_config.json",
                                                     "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    for fname in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(base / fname, dst / fname)


# --------------------------------------------------------------------------- fp32 dequant
def _unpack_seq(packed, bits: int, dim: int):
    """Sequential packing along `dim` (GPTQ qweight along K, GPTQ qzeros along N, compressed-tensors
    along K): value j of word w is element w * (32 // bits) + j."""
    import torch

    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    p = packed.to(torch.int32).unsqueeze(-1) if dim == packed.dim() - 1 else packed.to(torch.int32).unsqueeze(dim + 1)
    s = shifts.view(*([1] * (p.dim() - 1)), per) if dim == packed.dim() - 1 else shifts.view(
        *([1] * (dim + 1)), per, *([1] * (packed.dim() - dim - 1)))
    vals = torch.bitwise_and(torch.bitwise_right_shift(p, s), (1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= per
    return vals.reshape(shape)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # logical column c*8 + AWQ_ORDER[i] sits in nibble i


def _unpack_awq(packed):
    import torch

    nib = _unpack_seq(packed, 4, packed.dim() - 1).view(*packed.shape, 8)
    out = torch.empty_like(nib)
    out[..., AWQ_ORDER] = nib
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def dequant_state_dict(ckpt: Path) -> dict:
    """Every quantized Linear of the checkpoint as a float32 `weight` [N, K], from the format
    formulas alone; other tensors upcast to float32."""
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((ckpt / "config.json").read_text())
    q = cfg["quantization_config"]
    sd = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    out = {}
    method = q["quant_method"]
    prefixes = {k.rsplit(".", 1)[0] for k in sd if k.endswith((".qweight", ".weight_packed"))}
    prefixes |= {k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_scale")}
    for pre in sorted(prefixes):
        if method == "gptq":
            bits, gsz = q["bits"], q["group_size"]
            qw, qz, sc = sd[pre + ".qweight"], sd[pre + ".qzeros"], sd[pre + ".scales"].float()
            qv = _unpack_seq(qw, bits, 0)  # [K, N]
            zeros = _unpack_seq(qz, bits, 1)  # [K/G, N]
            if q.get("checkpoint_format", "gptq") == "gptq":
                zeros = zeros + 1  # v1 stores zero - 1
            K = qv.shape[0]
            g = sd.get(pre + ".g_idx")
            g = g.long() if g is not None else torch.arange(K) // (gsz if gsz > 0 else K)
            w = sc[g] * (qv - zeros[g]).float()
            out[pre + ".weight"] = w.t().contiguous()
        elif method == "awq":
            gsz = q.get("group_size", q.get("q_group_size"))
            qv = _unpack_awq(sd[pre + ".qweight"])  # [K, N]
            zeros = _unpack_awq(sd[pre + ".qzeros"])  # [K/G, N]
            sc = sd[pre + ".scales"].float()
            g = torch.arange(qv.shape[0]) // gsz
            out[pre + ".weight"] = (sc[g] * (qv - zeros[g]).float()).t().contiguous()
        elif method == "compressed-tensors":
            group = next(iter(q["config_groups"].values()))["weights"]
            if pre + ".weight_packed" in sd:
                bits = group["num_bits"]
                off = 1 << (bits - 1)  # signed values stored + 2^(bits-1)
                qv = _unpack_seq(sd[pre + ".weight_packed"], bits, 1) - off  # [N, K]
                N, K = (int(x) for x in sd[pre + ".weight_shape"])
                qv = qv[:N, :K]
                sc = sd[pre + ".weight_scale"].float()  # [N, K/G]
                gsz = group.get("group_size") or K
                gi = sd.get(pre + ".weight_g_idx")
                g = gi.long() if gi is not None else torch.arange(K) // gsz
                zp = sd.get(pre + ".weight_zero_point")
                if zp is not None:
                    if zp.dtype == torch.int32:  # packed along N like the weights are along K
                        zp = _unpack_seq(zp, bits, 0)[:N] - off
                    zeros = zp.float()[:, g]
                else:
                    zeros = 0.0
                out[pre + ".weight"] = (sc[:, g] * (qv.float() - zeros)).contiguous()
            else:  # float-quantized: fp8 weight times a per-tensor or per-channel scale
                w = sd[pre + ".weight"].float()
                out[pre + ".weight"] = w * sd[pre + ".weight_scale"].float().reshape(-1, 1) \
                    if sd[pre + ".weight_scale"].numel() > 1 else w * sd[pre + ".weight_scale"].float()
        else:
            raise ValueError(f"{ckpt}: no dequant formula for quant_method {method!r}")
    quant_suffixes = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed", ".weight_scale",
                      ".weight_zero_point", ".weight_g_idx", ".weight_shape", ".input_scale")
    for k, v in sd.items():
        if k.endswith(quant_suffixes) or (k.endswith(".weight") and k in out):
            continue
        out[k] = v.float()
    return out


def dequant_model(ckpt: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    missing, unexpected = model.load_state_dict(dequant_state_dict(ckpt), strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: dequantized state dict does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.eval()


# --------------------------------------------------------------------------- reference
def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """HF's greedy continuation with its own KV cache, and each step's top-1 minus top-2 logit
    (a small margin means the token is a near tie that a tolerance-level difference may flip)."""
    import torch

    toks, margins = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        past = out.past_key_values
        for _ in range(n):
            last = out.logits[0, -1].float()
            top = last.topk(2).values
            margins.append(float(top[0] - top[1]))
            nxt = int(last.argmax())
            toks.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return toks, margins


def teacher_forced(model, seq: list[int]):
    import torch

    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float()


def hf_quantized(ckpt: Path):
    import torch
    from transformers import AutoModelForCausalLM

    kw = {}
    if json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        # The compressed forward has no CPU fp8/int4 matmul; decompressed it is plain float Linears
        # (with the activation fake-quant compressed-tensors keeps for the FP8 schemes).
        kw["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager",
                                                device_map="cpu", **kw).eval()


def hf_check(hf, ckpt: Path) -> dict:
    """How HF's loaded quantized modules compare with the fp32 dequant formulas: their own
    dequantized weights where the module offers them, and whether they compute in fp32."""
    import torch

    mine = dequant_state_dict(ckpt)
    out = {"weights": {}, "fp32_compute": True}
    torch.set_grad_enabled(False)
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    for mname, mod in hf.named_modules():
        key = mname + ".weight"
        if key not in mine or mine[key].dim() != 2 or isinstance(mod, torch.nn.Embedding):
            continue
        w = mine[key]
        rec = {"module": type(mod).__name__}
        if hasattr(mod, "dequantize_weight"):
            try:
                theirs = mod.dequantize_weight().float()
                # GPTQModel returns [in, out] (also when square)
                theirs = theirs.t() if theirs.shape == (w.shape[1], w.shape[0]) else theirs
                rec["weight_max_abs"] = float((theirs - w).abs().max())
            except Exception as e:  # noqa: BLE001
                rec["weight_error"] = f"{type(e).__name__}: {e}"[:200]
        elif isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.shape == w.shape \
                and mod.weight.dtype.is_floating_point and mod.weight.element_size() >= 2:
            rec["weight_max_abs"] = float((mod.weight.float() - w).abs().max())
        xi = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = mod(xi)
        bias = getattr(mod, "bias", None)
        y_ref = xi @ w.t() + (bias.float() if isinstance(bias, torch.Tensor) else 0)
        rec["out_rel_err"] = float((y.float() - y_ref).abs().max() / y_ref.abs().max())
        # A float32 matmul of the same weights agrees to ~1e-6 relative; fp16 compute shows ~1e-3.
        if rec["out_rel_err"] > 1e-5:
            out["fp32_compute"] = False
        out["weights"][mname] = rec
    del x
    return out


def versions(tool: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = {"gptqmodel": ["gptqmodel", "optimum"], "llmcompressor": ["llmcompressor", "compressed-tensors"],
             "autoawq": ["autoawq"]}[tool]
    out = {}
    for n in names + ["transformers", "torch"]:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def write_reference(name: str) -> None:
    import torch
    from safetensors.torch import save_file

    family, tool, scheme = FIXTURES[name]
    ckpt = HERE / name
    deq = dequant_model(ckpt)
    meta = {"fixture": name, "architecture": ARCHS[family][0], "tool": tool, "scheme": scheme,
            "made_with": json.loads((ckpt / "made_with.json").read_text()) if (ckpt / "made_with.json").exists()
            else None, "reference_env": versions(tool), "max_new_tokens": MAX_NEW}
    try:
        hf = hf_quantized(ckpt)
        meta["hf_check"] = hf_check(hf, ckpt)
    except Exception as e:  # noqa: BLE001 - recorded, then the dequant reference stands in
        print(f"[{name}] HF cannot load it on CPU ({type(e).__name__}: {e}); using the fp32 dequant", flush=True)
        hf, meta["hf_check"] = None, {"error": f"{type(e).__name__}: {e}"[:500]}
    # HF's CPU path for GPTQ/AWQ is GPTQModel's torch kernels, which dequantize and multiply in
    # float16/bfloat16 only (SUPPORTS_DTYPES): no fp32 reference. There the fp32 dequant is the
    # reference and HF's loader is the check on it (weights and logits, recorded in hf_check).
    fp32_hf = hf is not None and meta["hf_check"].get("fp32_compute", False)
    if tool == "llmcompressor" and "FP8" in scheme["scheme"]:
        # compressed-tensors' decompressed forward fake-quantizes the activations to fp8 (per token
        # for FP8_DYNAMIC, with input_scale for FP8), in fp32 otherwise: a W8A8 reference, which is
        # what vLLM (and fastserve's CPU emulation) compute. Its weights must equal the dequant's.
        meta["activations"] = "fp8 " + ("dynamic per token" if scheme["scheme"] == "FP8_DYNAMIC" else "static")
        ws = [r.get("weight_max_abs") for r in meta["hf_check"].get("weights", {}).values()]
        fp32_hf = hf is not None and bool(ws) and all(w == 0.0 for w in ws if w is not None)
    meta["reference"] = "hf" if fp32_hf else "dequant"
    ref_model, other = (hf, deq) if fp32_hf else (deq, hf)
    tensors, entries, worst = {}, [], 0.0
    for i, p in enumerate(prompts()):
        toks, margins = greedy(ref_model, p, MAX_NEW)
        seq = p + toks
        ref = teacher_forced(ref_model, seq)
        tensors[f"logits.{i}"] = ref.contiguous()
        entry = {"prompt_token_ids": p, "greedy_token_ids": toks, "greedy_top2_margin": margins}
        if other is not None:
            o = teacher_forced(other, seq)
            if "activations" in meta:
                wo = torch.log_softmax(o.double(), -1) - torch.log_softmax(ref.double(), -1)
                entry["weight_only_logprob_max_abs"] = float(wo.abs().max())
                entry["weight_only_logprob_median_abs"] = float(wo.abs().median())
            entry["other_max_abs"] = diff = float((ref - o).abs().max())
            entry["other_argmax_agree"] = float((ref.argmax(-1) == o.argmax(-1)).float().mean())
            worst = max(worst, diff)
            print(f"[{name}] prompt {len(p):3d}: {meta['reference']} vs the other max |dlogit| {diff:.2e}, "
                  f"argmax agree {entry['other_argmax_agree']:.2f}, min margin {min(margins):.3f}", flush=True)
        entries.append(entry)
    meta["hf_vs_dequant_logits_max_abs"] = worst
    meta["prompts"] = entries
    meta["logprobs"] = "reference/logprobs.safetensors: teacher-forced over prompt + greedy_token_ids (HF's or the " \
                       "dequant's, as `reference` says), see compact_logits(); other_max_abs is the largest logit " \
                       "difference to the other of the two; for FP8 weight_only_logprob_* compare with activations " \
                       "left unquantized"
    # Beside the checkpoint, not in it: a loader globbing *.safetensors must not see the logits.
    (ckpt / "reference").mkdir(exist_ok=True)
    (ckpt / "reference" / "reference.json").write_text(json.dumps(meta, indent=1))
    save_file(compact_logits(tensors, [e["prompt_token_ids"] + e["greedy_token_ids"] for e in entries]),
              str(ckpt / "reference" / "logprobs.safetensors"))


TOPK = 32  # reference log-probabilities kept per position (the full [P, vocab] logits are 10x larger)


def compact_logits(tensors: dict, seqs: list[list[int]]) -> dict:
    """From logits.i [len, vocab]: per position p (predicting seq[p+1]) the float32 log-probability
    of the actual next token (`next_logprob.i`, len-1) and the TOPK best (`top_logprobs.i`,
    `top_ids.i`, [len-1, TOPK]); a candidate outside the top-k is bounded by the k-th value."""
    import torch

    out = {}
    for i, seq in enumerate(seqs):
        lp = torch.log_softmax(tensors[f"logits.{i}"].double(), dim=-1)[:-1]
        nxt = torch.tensor(seq[1:])
        out[f"next_logprob.{i}"] = lp[torch.arange(len(nxt)), nxt].float().contiguous()
        top = lp.topk(TOPK, dim=-1)
        out[f"top_logprobs.{i}"] = top.values.float().contiguous()
        out[f"top_ids.{i}"] = top.indices.to(torch.int32).contiguous()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["base", "quantize", "reference", "compact"])
    ap.add_argument("--tool", action="append", choices=sorted(QUANTIZERS))
    ap.add_argument("--only", action="append", help="fixture name(s)")
    args = ap.parse_args()
    if args.step == "base":
        for fam in ARCHS:
            print("base", build_base(fam))
        return
    for name, (family, tool, scheme) in FIXTURES.items():
        if (args.tool and tool not in args.tool) or (args.only and name not in args.only):
            continue
        if args.step == "quantize":
            base = WORK / "base" / family
            tmp = WORK / "out" / name
            if tmp.exists():
                shutil.rmtree(tmp)
            QUANTIZERS[tool](name, base, scheme, tmp)
            finish_fixture(name, base, tmp)
            (HERE / name / "made_with.json").write_text(json.dumps({"tool": tool, "scheme": scheme,
                                                                   "versions": versions(tool)}, indent=1))
            print("quantized", name, flush=True)
        elif args.step == "compact":  # full logits of an earlier run -> logprobs.safetensors
            from safetensors.torch import load_file, save_file

            ref = HERE / name / "reference"
            meta = json.loads((ref / "reference.json").read_text())
            seqs = [e["prompt_token_ids"] + e["greedy_token_ids"] for e in meta["prompts"]]
            save_file(compact_logits(load_file(str(ref / "logits.safetensors")), seqs), str(ref / "logprobs.safetensors"))
            (ref / "logits.safetensors").unlink()
        else:
            write_reference(name)


if __name__ == "__main__":
    main()
