"""GGUF loading on small files written here (tests/gguf_files.py): weights of every supported
tensor type equal what the file holds and what transformers' own GGUF loader reads (names,
q/k row order, dequantization), greedy output equals transformers token for token, the
config comes from the metadata, K-quant blocks dequantize as llama.cpp's reference code
does, and each tokenizer kind converts to the ids of its original tokenizer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastserve import LLM, SamplingParams
from fastserve._core import Tokenizer
from fastserve.config import ModelConfig
from fastserve.gguf_loader import SUPPORTED_TYPES, hf_config, iterate_gguf_weights
from fastserve.gguf_tokenizer import gguf_tokenizer_dir
from gguf_files import (
    CORPUS,
    byte_level_tokenizer_fields,
    llama3_rope_factors,
    sentencepiece_fields,
    tokenizer_json_fields,
    write_tiny_gguf,
    write_tokenizer_gguf,
)
from tiny_models import SHARED_MODELS

ALL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TEXTS = CORPUS + [
    "",
    " ",
    "Hello world",
    "  two leading spaces",
    "trailing  ",
    "a  1",
    "x \n1",
    "tab\t\t2",
    "line\n\n\nbreaks",
    "I'M he'LL we'Re THEY'D",
    "\u00dcber Stra\u00dfe na\u00efve fa\u00e7ade",
    "\u6771\u4eac \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4",
    "emoji \U0001f999\U0001f389 and \u2603",
    "3.14159 2,718 1e-9 0x1F",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n\tif x:  # comment\n\t\treturn x**2\n",
    "    indented\n        more",
    "a" * 300,
    "mixed 123abc456 def789",
    "URL https://example.com/path?q=1&r=2#frag",
    "\u00e9\u0301 combining",
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSERVE_CACHE", str(tmp_path / "cache"))


# transformers' GGUF config for qwen3 ignores attention.key_length (head_dim falls back to
# Qwen3Config's 128), so the qwen3 files use head_dim 128 as every real Qwen3 does.
QWEN3 = {"head_dim": 128}


def hf_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, tokens = out.past_key_values, []
        for _ in range(n):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return tokens


# -- weights --------------------------------------------------------------------------------


def test_supported_types_are_the_tested_ones():
    assert sorted(SUPPORTED_TYPES) == sorted(ALL_TYPES)


@pytest.mark.parametrize(
    "arch,weight_type,tie",
    [("llama", t, False) for t in ALL_TYPES]
    + [("llama", "Q4_1", True), ("qwen2", "Q8_0", False), ("qwen2", "Q4_K", True), ("qwen3", "Q6_K", False)],
)
def test_weights_equal_the_file_and_transformers(tmp_path, arch, weight_type, tie):
    """Every tensor under its HF name, with llama's q/k rows back in HF order, equals the
    values the file holds, and what transformers reads from the same file."""
    held, path = write_tiny_gguf(tmp_path / "m.gguf", arch, weight_type, tie=tie, **(QWEN3 if arch == "qwen3" else {}))
    ours = dict(iterate_gguf_weights(path))
    expect = {k: v for k, v in held.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert set(ours) == set(expect)
    for name, ref in expect.items():
        assert ours[name].shape == ref.shape, name
        assert torch.equal(ours[name].float(), ref), name
    theirs = hf_from_gguf(path).state_dict()
    for name, t in ours.items():
        assert torch.equal(t.float(), theirs[name]), name


@pytest.mark.parametrize(
    "arch,weight_type,tie",
    [("llama", "Q4_K", True), ("llama", "Q8_0", False), ("qwen2", "Q5_K", False), ("qwen3", "F16", True)],
)
def test_greedy_matches_transformers(tmp_path, arch, weight_type, tie):
    _, path = write_tiny_gguf(tmp_path / "m.gguf", arch, weight_type, tie=tie, **(QWEN3 if arch == "qwen3" else {}))
    hf = hf_from_gguf(path)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=256)
    rng = np.random.default_rng(7)
    vocab = hf.config.vocab_size
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (1, 5, 17, 40)]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("arch,weight_type", [("llama", "Q4_K"), ("qwen2", "Q8_0")])
def test_gpu_greedy_matches_transformers(tmp_path, arch, weight_type):
    """The same files on CUDA: float32 (exact dots) equals transformers on the CPU token for
    token; "auto" picks bfloat16 there (the file's weights are dequantized to float32) and runs."""
    _, path = write_tiny_gguf(tmp_path / "m.gguf", arch, weight_type)
    hf = hf_from_gguf(path)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, hf.config.vocab_size, size=n).tolist() for n in (1, 9, 33, 70)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for dtype in ("float32", "auto"):
        llm = LLM(model=str(path), dtype=dtype, device="cuda", max_model_len=256, num_gpu_blocks_override=256)
        assert llm.engine.model_config.dtype == (torch.float32 if dtype == "float32" else torch.bfloat16)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        if dtype == "float32":
            assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 8) for p in prompts]
        else:
            assert all(
                len(o.outputs[0].token_ids) == 8 and max(o.outputs[0].token_ids) < hf.config.vocab_size for o in outs
            )
        llm.shutdown()


def test_config_from_metadata(tmp_path):
    from transformers import AutoConfig

    _, path = write_tiny_gguf(
        tmp_path / "m.gguf",
        "llama",
        "Q4_0",
        tie=True,
        rope_theta=50000.0,
        num_key_value_heads=1,
        max_position_embeddings=384,
    )
    cfg = hf_config(path)
    ref = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps)
    assert cfg["rope_theta"] == 50000.0 and "rope_scaling" not in cfg
    mc = ModelConfig.from_pretrained(path, device="cpu")
    assert (mc.architecture, mc.dtype, mc.max_model_len, mc.head_dim) == ("LlamaForCausalLM", torch.float32, 384, 64)
    # eos, then <|endoftext|>: a control token llama.cpp also ends generation at
    assert mc.eos_token_ids == [2, 0] and mc.bos_token_id == 1
    f16 = hf_config(write_tiny_gguf(tmp_path / "h.gguf", "llama", "F16")[1])
    assert f16["torch_dtype"] == "float16"


@pytest.mark.parametrize("factor,original,high", [(8.0, 8192, 4.0), (32.0, 8192, 4.0), (8.0, 2048, 2.0)])
def test_llama3_rope_from_rope_freqs_tensor(tmp_path, factor, original, high):
    """Llama 3.1+ files carry their rope scaling as a rope_freqs tensor: recovered as the
    llama3 rope_scaling that reproduces it, and the model loads (the tensor is not a weight)."""
    factors = llama3_rope_factors(64, 500000.0, factor, 1.0, high, original)
    _, path = write_tiny_gguf(
        tmp_path / "m.gguf", "llama", "Q8_0", rope_theta=500000.0, extra_tensors={"rope_freqs.weight": factors}
    )
    scaling = hf_config(path)["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == pytest.approx(factor)
    assert scaling["high_freq_factor"] == pytest.approx(high, rel=1e-3)
    assert scaling["original_max_position_embeddings"] == original
    assert "rope_freqs.weight" not in dict(iterate_gguf_weights(path))
    LLM(model=str(path), dtype="float32", device="cpu", max_model_len=64)


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    factors = np.linspace(1, 4, 32, dtype=np.float32) ** 2
    _, path = write_tiny_gguf(tmp_path / "m.gguf", "llama", "F32", extra_tensors={"rope_freqs.weight": factors})
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_config(path)


def test_linear_rope_scaling_metadata(tmp_path):
    _, path = write_tiny_gguf(
        tmp_path / "m.gguf",
        "llama",
        "F32",
        metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
    )
    assert hf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    _, path = write_tiny_gguf(
        tmp_path / "y.gguf",
        "llama",
        "F32",
        metadata={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
    )
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_pretrained(path, device="cpu")


def test_unsupported_files_are_clear_errors(tmp_path):
    _, moe = write_tiny_gguf(tmp_path / "moe.gguf", "llama", "F32", metadata={"llama.expert_count": 8})
    with pytest.raises(ValueError, match="mixture-of-experts"):
        hf_config(moe)
    bad_type = write_tiny_gguf(tmp_path / "tq.gguf", "llama", "TQ2_0")[1]
    with pytest.raises(ValueError, match="TQ2_0"):
        list(iterate_gguf_weights(bad_type))
    other = write_tokenizer_gguf(tmp_path / "bert.gguf", byte_level_tokenizer_fields(), arch="bert")
    with pytest.raises(ValueError, match="'bert' is not supported"):
        hf_config(other)
    wrong_tok = write_tokenizer_gguf(
        tmp_path / "t5.gguf", {**byte_level_tokenizer_fields(), "tokenizer.ggml.model": "t5"}
    )
    with pytest.raises(ValueError, match="t5"):
        gguf_tokenizer_dir(wrong_tok)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ValueError, match="GGUF"):
        hf_config(tmp_path / "junk.gguf")


# -- dequantization against llama.cpp's reference code (ggml-quants.c) -----------------------


def _f16(b: np.ndarray, off: int) -> np.float32:
    return np.float32(b[off : off + 2].view(np.float16)[0])


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return int(q[j]) & 63, int(q[j + 4]) & 63
    return (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4), (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4)


def _ref_q4_k(b):
    d, dmin, sc, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:144]
    y = []
    for j in range(4):
        s1, m1 = _scale_min_k4(2 * j, sc)
        s2, m2 = _scale_min_k4(2 * j + 1, sc)
        q = qs[32 * j : 32 * j + 32].astype(np.int32)
        y += [d * np.float32(s1) * np.float32(v & 0xF) - dmin * np.float32(m1) for v in q]
        y += [d * np.float32(s2) * np.float32(v >> 4) - dmin * np.float32(m2) for v in q]
    return y


def _ref_q5_k(b):
    d, dmin, sc, qh, ql = _f16(b, 0), _f16(b, 2), b[4:16], b[16:48].astype(np.int32), b[48:176].astype(np.int32)
    y, u1, u2 = [], 1, 2
    for j in range(4):
        s1, m1 = _scale_min_k4(2 * j, sc)
        s2, m2 = _scale_min_k4(2 * j + 1, sc)
        q = ql[32 * j : 32 * j + 32]
        y += [
            d * np.float32(s1) * np.float32((v & 0xF) + (16 if h & u1 else 0)) - dmin * np.float32(m1)
            for v, h in zip(q, qh)
        ]
        y += [
            d * np.float32(s2) * np.float32((v >> 4) + (16 if h & u2 else 0)) - dmin * np.float32(m2)
            for v, h in zip(q, qh)
        ]
        u1, u2 = u1 << 2, u2 << 2
    return y


def _ref_q6_k(b):
    ql, qh, sc, d = b[0:128].astype(np.int32), b[128:192].astype(np.int32), b[192:208].view(np.int8), _f16(b, 208)
    y = [0.0] * 256
    for n in range(2):
        L, H, S = ql[64 * n :], qh[32 * n :], sc[8 * n :].astype(np.int32)
        for l in range(32):
            i = l // 16
            q1 = ((L[l] & 0xF) | ((H[l] & 3) << 4)) - 32
            q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            for k, (q, s) in enumerate(((q1, S[i]), (q2, S[i + 2]), (q3, S[i + 4]), (q4, S[i + 6]))):
                y[128 * n + 32 * k + l] = d * np.float32(s) * np.float32(q)
    return y


def _ref_q8_0(b):
    return [_f16(b, 0) * np.float32(v) for v in b[2:34].view(np.int8)]


def _ref_q4_0(b):
    d, qs = _f16(b, 0), b[2:18].astype(np.int32)
    return [np.float32((v & 0xF) - 8) * d for v in qs] + [np.float32((v >> 4) - 8) * d for v in qs]


def _ref_q4_1(b):
    d, m, qs = _f16(b, 0), _f16(b, 2), b[4:20].astype(np.int32)
    return [np.float32(v & 0xF) * d + m for v in qs] + [np.float32(v >> 4) * d + m for v in qs]


@pytest.mark.parametrize(
    "type_name,ref",
    [
        ("Q4_K", _ref_q4_k),
        ("Q5_K", _ref_q5_k),
        ("Q6_K", _ref_q6_k),
        ("Q8_0", _ref_q8_0),
        ("Q4_0", _ref_q4_0),
        ("Q4_1", _ref_q4_1),
    ],
)
def test_dequantize_matches_llama_cpp_reference(type_name, ref):
    import gguf
    from gguf.quants import dequantize
    from gguf_files import _random_k_blocks

    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(3)
    if type_name.endswith("_K"):
        raw = _random_k_blocks(qtype, 2, 2 * block, rng)
    else:
        raw = gguf.quants.quantize(rng.normal(size=(2, 4 * block)).astype(np.float32), qtype)
    blocks = raw.reshape(-1, size)
    expect = np.array([v for b in blocks for v in ref(b)], dtype=np.float32)
    got = dequantize(raw, qtype).reshape(-1)
    assert np.abs(expect).max() > 0
    np.testing.assert_allclose(got, expect, rtol=2e-6, atol=0)


# -- tokenizers -----------------------------------------------------------------------------


def _ids(tok, texts, special=False):
    return [tok.encode(t, add_special_tokens=special) for t in texts]


def test_byte_level_tokenizer_equals_its_original(tmp_path):
    """A byte-level BPE (pre "gpt2") converts to the ids of the tokenizer it came from, and
    the GGUF's special tokens, BOS/EOS and chat template reach the Rust Tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    fields = byte_level_tokenizer_fields()
    path = write_tokenizer_gguf(tmp_path / "t.gguf", fields)
    ours = Tokenizer(gguf_tokenizer_dir(path))
    vocab = {t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    orig = HFTokenizer(models.BPE(vocab, merges))
    orig.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    orig.decoder = decoders.ByteLevel()
    orig.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert _ids(ours, TEXTS) == [orig.encode(t).ids for t in TEXTS]
    for t, ids in zip(TEXTS, _ids(ours, TEXTS)):
        assert ours.decode(ids, skip_special_tokens=False) == t
    assert (ours.bos_token, ours.eos_token, ours.eos_token_ids) == ("<|im_start|>", "<|im_end|>", [2, 0])
    assert ours.chat_template == fields["tokenizer.chat_template"]
    assert ours.encode("hi", add_special_tokens=True) == ours.encode("hi", add_special_tokens=False)
    assert set(ours.special_token_ids) == {0, 1, 2}


@pytest.mark.parametrize(
    "name,pre,add_bos", [("llama3-tokenizer", "llama-bpe", True), ("qwen3-tokenizer", "qwen2", False)]
)
def test_regex_pre_tokenizers_equal_the_original_tokenizer(tmp_path, name, pre, add_bos):
    """Llama 3 ("llama-bpe": its regex, ignore_merges, BOS) and Qwen ("qwen2": its regex,
    NFC) files written from the real tokenizer.json give that tokenizer's ids."""
    src = SHARED_MODELS / name
    fields = tokenizer_json_fields(src, pre, add_bos)
    ours = Tokenizer(gguf_tokenizer_dir(write_tokenizer_gguf(tmp_path / "t.gguf", fields)))
    orig = Tokenizer(str(src))
    assert _ids(ours, TEXTS) == _ids(orig, TEXTS)
    first = ours.encode("Hello", add_special_tokens=True)
    if add_bos:
        assert first[0] == fields["tokenizer.ggml.bos_token_id"]
        assert first[1:] == ours.encode("Hello", add_special_tokens=False)
        assert 128009 in ours.eos_token_ids  # <|eot_id|>, the instruct models' end of turn
    else:
        assert first == ours.encode("Hello", add_special_tokens=False)
        assert 151645 in ours.eos_token_ids  # <|im_end|>


def _sentencepiece_model() -> bytes:
    import sentencepiece as spm

    corpus = CORPUS * 3 + [
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "\u00dcber Stra\u00dfe na\u00efve fa\u00e7ade \u6771\u4eac",
        "   spaces   and\ttabs\n\nnewlines",
    ]
    buf = io.BytesIO()
    # Llama 2's trainer settings (byte fallback, digits split, identity normalization).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buf.getvalue()


def test_sentencepiece_tokenizer_equals_sentencepiece_and_transformers(tmp_path):
    """tokenizer.ggml.model "llama" (Llama 2, Mistral v0.1): the ids of SentencePiece itself
    (BOS first, byte fallback for unseen characters) and of transformers' GGUF conversion."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    proto = _sentencepiece_model()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", sentencepiece_fields(proto))
    ours = Tokenizer(gguf_tokenizer_dir(path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    # Prompt text naming a control token is that token (llama.cpp's parse_special), which
    # SentencePiece itself does not do: kept out of the SentencePiece comparison.
    plain = [t for t in TEXTS if "<|" not in t]
    assert _ids(ours, plain, special=True) == [[sp.bos_id()] + sp.encode(t) for t in plain]
    # transformers is the reference for control-token texts, and for plain text wherever it
    # agrees with SentencePiece itself: 5.25's conversion splits runs of spaces differently from
    # SentencePiece (" ", "  two leading spaces", indented lines; 5.17 agreed), and there
    # SentencePiece, checked above, is the truth.
    judged = [t for t in TEXTS if "<|" in t or hf.encode(t, add_special_tokens=False) == sp.encode(t)]
    disagree = [t for t in TEXTS if t not in judged]
    assert all(t.strip() == "" or "  " in t for t in disagree), f"transformers differs beyond space runs: {disagree}"
    assert _ids(ours, judged) == [hf.encode(t, add_special_tokens=False) for t in judged]
    for t in plain:
        assert ours.decode(ours.encode(t, add_special_tokens=True), skip_special_tokens=True) == sp.decode(sp.encode(t))
    assert ours.encode("<s> x", add_special_tokens=False)[0] == sp.bos_id()


def test_tokenizer_conversion_is_cached(tmp_path):
    """Converted once per file version into the cache; a changed file gets a new directory."""
    path = write_tokenizer_gguf(tmp_path / "t.gguf", byte_level_tokenizer_fields())
    first = gguf_tokenizer_dir(path)
    assert first.startswith(str(tmp_path / "cache"))
    stamp = (Path(first) / "tokenizer.json").stat().st_mtime_ns
    assert gguf_tokenizer_dir(path) == first
    assert (Path(first) / "tokenizer.json").stat().st_mtime_ns == stamp
    write_tokenizer_gguf(path, byte_level_tokenizer_fields(vocab_size=300))
    second = gguf_tokenizer_dir(path)
    assert second != first and Tokenizer(second).vocab_size < Tokenizer(first).vocab_size
