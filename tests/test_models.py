"""Model parity with Hugging Face on tiny random checkpoints, through the paged KV cache.

Each variant runs two engine-like steps over one cache whose blocks are handed out in a
shuffled, non-contiguous order and whose unused slots hold NaN:
  step 1: three prefills at once (A whole, B whole, the first chunk of C);
  step 2: decodes for A and B (rows first, as the scheduler orders them), the rest of C
          over its cached chunk, and a fresh prefill D.
Logits at every scheduled token are compared with HF's for that sequence alone.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastserve.config import ModelConfig, derive_max_model_len, resolve_dtype
from fastserve.layers.attention import AttentionMetadata
from fastserve.models.registry import get_model_class, supported_architectures
from fastserve.worker.loader import iterate_weights, load_model
from tiny_models import SHARED_MODELS, TINY_VARIANTS, load_hf_model, make_tiny_checkpoint

BLOCK_SIZE = 4
NUM_BLOCKS = 40
ATOL = 1e-4


def _slot_mapping(table: list[int], positions: range) -> list[int]:
    return [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]


def _step(chunks, tables, num_decodes):
    """chunks: per sequence (token ids [n], first position); tables: per sequence block ids."""
    ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
    for (tok, start), table in zip(chunks, tables):
        rng = range(start, start + len(tok))
        ids.append(tok)
        pos.extend(rng)
        slots.extend(_slot_mapping(table, rng))
        qsl.append(qsl[-1] + len(tok))
        seq_lens.append(start + len(tok))
    width = max(len(t) for t in tables)
    block_tables = torch.zeros(len(tables), width, dtype=torch.int32)
    for row, table in enumerate(tables):
        block_tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
    query_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return torch.cat(ids), torch.tensor(pos, dtype=torch.int64), meta


def _kv_caches(cfg: ModelConfig):
    # NaN-filled: attention must never read a slot it did not write for that sequence.
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    return [torch.full(shape, float("nan"), dtype=cfg.dtype, device=cfg.device) for _ in range(cfg.num_hidden_layers)]


def _to(device, ids, pos, meta):
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(meta).items()}
    return ids.to(device), pos.to(device), AttentionMetadata(**fields)


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    """HF logits of `ids` fed in chunks ending at `cuts`, with HF's own KV cache.

    For every rope type but dynamic this equals one full forward (checked); dynamic NTK
    rotates by the length so far, so chunked feeding is what a cached engine must match."""
    hf(ids[:1].unsqueeze(0))  # resets HF's dynamic-rope state (a no-op for other types)
    out, past, start = [], None, 0
    for cut in cuts:
        res = hf(ids[start:cut].unsqueeze(0), past_key_values=past, use_cache=True)
        out.append(res.logits[0].float())
        past, start = res.past_key_values, cut
    if (getattr(hf.config, "rope_parameters", None) or {}).get("rope_type", "default") != "dynamic":  # OPT: none
        full = hf(ids.unsqueeze(0)).logits[0].float()
        torch.testing.assert_close(torch.cat(out), full[:cut], atol=ATOL, rtol=1e-4)
    return out


def _check_paged_parity(path, *, seed=0, lens=(9, 18, 6, 20, 5), device="cpu"):
    """lens: A, B (full prompts), C's first chunk, C's total, D (step 2 prefill)."""
    len_a, len_b, c_chunk, len_c, len_d = lens
    cfg = ModelConfig.from_pretrained(path, device=device, dtype="float32")
    model = load_model(cfg)
    hf = load_hf_model(path).to(device)
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.vocab_size
    seq = {
        k: torch.randint(0, vocab, (n,), generator=g)
        for k, n in {"A": len_a + 1, "B": len_b + 1, "C": len_c, "D": len_d}.items()
    }
    perm = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables = {}
    for k, t in seq.items():
        n = math.ceil(len(t) / BLOCK_SIZE)
        tables[k], perm = perm[:n], perm[n:]
    kv = _kv_caches(cfg)

    # step 1: A, B whole, C's first chunk
    ids, pos, meta = _step(
        [(seq["A"][:len_a], 0), (seq["B"][:len_b], 0), (seq["C"][:c_chunk], 0)],
        [tables["A"], tables["B"], tables["C"]],
        num_decodes=0,
    )
    ids, pos, meta = _to(device, ids, pos, meta)
    with torch.no_grad():
        logits1 = model.compute_logits(model(ids, pos, meta, kv))
    assert logits1.dtype == torch.float32 and logits1.shape == (ids.numel(), vocab)

    # step 2: decodes for A and B first, then the rest of C, then D from scratch
    ids, pos, meta = _step(
        [(seq["A"][len_a:], len_a), (seq["B"][len_b:], len_b), (seq["C"][c_chunk:], c_chunk), (seq["D"], 0)],
        [tables["A"], tables["B"], tables["C"], tables["D"]],
        num_decodes=2,
    )
    ids, pos, meta = _to(device, ids, pos, meta)
    with torch.no_grad():
        logits2 = model.compute_logits(model(ids, pos, meta, kv))

    seq = {k: v.to(device) for k, v in seq.items()}
    ref_a = _hf_logits(hf, seq["A"], [len_a, len_a + 1])
    ref_b = _hf_logits(hf, seq["B"], [len_b, len_b + 1])
    ref_c = _hf_logits(hf, seq["C"], [c_chunk, len_c])
    ref_d = _hf_logits(hf, seq["D"], [len_d])
    got1 = logits1.split([len_a, len_b, c_chunk])
    got2 = logits2.split([1, 1, len_c - c_chunk, len_d])
    for name, got, ref in [
        ("A step1", got1[0], ref_a[0]),
        ("B step1", got1[1], ref_b[0]),
        ("C chunk1", got1[2], ref_c[0]),
        ("A decode", got2[0], ref_a[1]),
        ("B decode", got2[1], ref_b[1]),
        ("C chunk2", got2[2], ref_c[1]),
        ("D prefill", got2[3], ref_d[0]),
    ]:
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # random weights must still give a non-degenerate distribution, or parity means little
    assert logits2.std() > 1e-3


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_paged_parity_with_hf(variant, tmp_path):
    arch, overrides = TINY_VARIANTS[variant]
    path = make_tiny_checkpoint(arch, tmp_path, **overrides)
    _check_paged_parity(path)


@pytest.mark.parametrize(
    "arch,tok,vocab,bos,eos",
    [
        ("LlamaForCausalLM", "llama3-tokenizer", 128256, 128000, [128001, 128009]),
        ("Qwen3ForCausalLM", "qwen3-tokenizer", 151936, None, [151645, 151643]),
    ],
)
def test_real_tokenizer_vocab(arch, tok, vocab, bos, eos, tmp_path):
    path = make_tiny_checkpoint(arch, tmp_path, tokenizer_dir=SHARED_MODELS / tok, num_hidden_layers=1)
    cfg = ModelConfig.from_pretrained(path, device="cpu")
    assert cfg.vocab_size == vocab and cfg.bos_token_id == bos and cfg.eos_token_ids == eos
    assert (path / "tokenizer.json").exists() and (path / "tokenizer_config.json").exists()
    _check_paged_parity(path, lens=(5, 3, 2, 6, 2))


def test_loader_sharded_safetensors(tmp_path):
    path = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path, max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    names = {n for n, _ in iterate_weights(str(path))}
    assert names == set(index["weight_map"])
    _check_paged_parity(path, lens=(3, 4, 2, 5, 1))


@pytest.mark.parametrize("sharded", [False, True])
def test_loader_pytorch_bin(sharded, tmp_path):
    path = make_tiny_checkpoint(
        "MistralForCausalLM",
        tmp_path,
        save_format="bin",
        max_shard_size="100KB" if sharded else None,
        sliding_window=None,
    )
    assert not list(path.glob("*.safetensors")) and list(path.glob("pytorch_model*.bin"))
    assert (path / "pytorch_model.bin.index.json").exists() == sharded
    _check_paged_parity(path, lens=(3, 4, 2, 5, 1))


def test_loader_bin_refuses_pickled_code(tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, save_format="bin")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model.norm.weight": Evil()}, path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only"):
        list(iterate_weights(str(path)))


def test_loader_dummy(tmp_path):
    path = make_tiny_checkpoint("Qwen3ForCausalLM", tmp_path)
    for f in path.glob("*.safetensors"):
        f.unlink()  # dummy needs only config.json
    cfg = ModelConfig.from_pretrained(path, device="cpu", seed=7)
    m1, m2 = load_model(cfg, "dummy"), load_model(cfg, "dummy")
    cfg.seed = 8
    m3 = load_model(cfg, "dummy")
    ids, pos, meta = _step([(torch.arange(5) * 37 % 1000, 0), (torch.arange(3) * 91 % 1000, 0)], [[3, 5], [1]], 0)
    with torch.no_grad():
        out = [m.compute_logits(m(ids, pos, meta, _kv_caches(cfg))) for m in (m1, m2, m3)]
    assert torch.isfinite(out[0]).all() and out[0].std() > 0
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)
    assert not torch.allclose(out[0], out[2])
    with pytest.raises(ValueError, match="no weights found"):
        load_model(cfg, "auto")
    with pytest.raises(ValueError, match="load_format"):
        load_model(cfg, "gguf")


def test_load_weights_reports_missing_and_unknown(tmp_path):
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path)
    cfg = ModelConfig.from_pretrained(path, device="cpu")
    weights = dict(iterate_weights(str(path)))
    model = get_model_class(cfg.hf_config)(cfg)
    with pytest.raises(ValueError, match="missing weights.*o_proj"):
        model.load_weights((n, t) for n, t in weights.items() if "o_proj" not in n)
    with pytest.raises(ValueError, match="no matching parameter"):
        model.load_weights([("model.layers.0.self_attn.bogus.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_weights([("model.layers.0.self_attn.q_proj.weight", torch.zeros(3, 3))])


def test_registry_error_lists_supported():
    assert get_model_class({"architectures": ["Qwen2ForCausalLM"]}).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(ValueError) as e:
        get_model_class({"architectures": ["GPT2LMHeadModel"]})
    assert "GPT2LMHeadModel" in str(e.value)
    for arch in supported_architectures():
        assert arch in str(e.value)


def _hf(**kw):
    base = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 512,
    }
    base.update(kw)
    return base


def test_config_max_model_len():
    assert ModelConfig.from_hf_config(_hf(), device="cpu").max_model_len == 512
    assert ModelConfig.from_hf_config(_hf(), max_model_len=100, device="cpu").max_model_len == 100
    with pytest.raises(ValueError, match=r"max_model_len \(600\).*max_position_embeddings=512"):
        ModelConfig.from_hf_config(_hf(), max_model_len=600, device="cpu")
    with pytest.raises(ValueError, match="max_model_len"):
        ModelConfig.from_hf_config(_hf(), max_model_len=0, device="cpu")
    # rope scaling: linear/dynamic stretch the window, llama3 already counts it (vLLM rules);
    # both config layouts (transformers 4 rope_scaling + rope_theta, 5 rope_parameters)
    assert derive_max_model_len(_hf(rope_scaling={"type": "linear", "factor": 4.0}))[0] == 2048
    assert (
        derive_max_model_len(_hf(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))[0] == 1024
    )
    assert (
        derive_max_model_len(
            _hf(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            )
        )[0]
        == 512
    )
    # a sliding window we do not implement caps the length; Qwen's off-by-default one does not
    assert derive_max_model_len(_hf(sliding_window=128))[0] == 128
    assert derive_max_model_len(_hf(sliding_window=128, use_sliding_window=False))[0] == 512
    cfg = ModelConfig.from_hf_config(_hf(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}), device="cpu")
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf_config(_hf(rope_scaling={"type": "yarn", "factor": 2.0}), device="cpu")


def test_config_shapes_and_dtype():
    cfg = ModelConfig.from_hf_config(_hf(num_key_value_heads=1, head_dim=32, torch_dtype="bfloat16"), device="cpu")
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.dtype) == (1, 32, torch.bfloat16)
    assert ModelConfig.from_hf_config(_hf(), device="cpu").num_kv_heads == 4
    assert resolve_dtype("auto", {"dtype": "float32"}, "cpu") == torch.float32
    assert resolve_dtype("auto", {}, "cpu") == torch.float32
    assert resolve_dtype("auto", {"torch_dtype": "float16"}, "cpu") == torch.float16
    assert resolve_dtype("auto", {"torch_dtype": "float32"}, "cuda") in (torch.bfloat16, torch.float16)
    assert resolve_dtype("half", {"torch_dtype": "bfloat16"}, "cpu") == torch.float16
    assert resolve_dtype("float", {"torch_dtype": "bfloat16"}, "cpu") == torch.float32
    with pytest.raises(ValueError, match="dtype 'int8'"):
        resolve_dtype("int8", {}, "cpu")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_hf_config(_hf(num_key_value_heads=3), device="cpu")
    with pytest.raises(ValueError, match="architectures"):
        ModelConfig.from_hf_config(_hf(architectures=[]), device="cpu")
    with pytest.raises(ValueError, match="'intermediate_size'"):
        ModelConfig.from_hf_config(_hf(intermediate_size=None), device="cpu")
    cfg = ModelConfig.from_hf_config(_hf(), device="cpu")
    assert get_model_class(cfg).__name__ == "LlamaForCausalLM"  # a ModelConfig works too


def test_bfloat16_model_tracks_float32(tmp_path):
    path = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path)
    ids, pos, meta = _step([(torch.arange(7) * 13 % 1000, 0), (torch.arange(4) * 7 % 1000, 0)], [[2, 9], [4]], 0)
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = ModelConfig.from_pretrained(path, device="cpu", dtype=dtype)
        model = load_model(cfg)
        assert model.model.embed_tokens.weight.dtype == cfg.dtype
        with torch.no_grad():
            out[dtype] = model.compute_logits(model(ids, pos, meta, _kv_caches(cfg)))
    assert out["bfloat16"].dtype == torch.float32
    torch.testing.assert_close(out["bfloat16"], out["float32"], atol=0.05, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["llama", "qwen3", "llama_dynamic_rope", "qwen2_tied_mqa"])
def test_paged_parity_with_hf_cuda(variant, tmp_path):
    """The torch path on CUDA (float32, TF32 off), and dtype="auto" downcasting a float32
    checkpoint to a half type there as vLLM does."""
    torch.backends.cuda.matmul.allow_tf32 = False
    arch, overrides = TINY_VARIANTS[variant]
    path = make_tiny_checkpoint(arch, tmp_path, **overrides)
    _check_paged_parity(path, device="cuda")
    cfg = ModelConfig.from_pretrained(path, device="cuda")
    assert cfg.dtype in (torch.bfloat16, torch.float16)
    model = load_model(cfg, "dummy")
    assert model.lm_head.weight.device.type == "cuda" and model.lm_head.weight.dtype == cfg.dtype


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_tensor_parallel_weight_loaders_shard(num_kv_heads, monkeypatch):
    """With 2 ranks, each rank's packed qkv / gate_up / row slices are the right rows and
    columns of HF's tensors (KV heads replicated when fewer than ranks)."""
    import fastserve.layers.linear as linear

    hidden, head_dim, heads, inter = 16, 4, 4, 12
    g = torch.Generator().manual_seed(0)
    wq = torch.randn(heads * head_dim, hidden, generator=g)
    wk = torch.randn(num_kv_heads * head_dim, hidden, generator=g)
    wv = torch.randn(num_kv_heads * head_dim, hidden, generator=g)
    wg, wu = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g)
    wo = torch.randn(hidden, heads * head_dim, generator=g)
    for rank in range(2):
        monkeypatch.setattr(linear, "tp_rank_and_size", lambda r=rank: (r, 2))
        qkv = linear.QKVParallelLinear(hidden, head_dim, heads, num_kv_heads)
        for sid, w in zip("qkv", (wq, wk, wv)):
            qkv.weight.weight_loader(qkv.weight, w, sid)
        q_rows = heads * head_dim // 2
        kv_rows = head_dim * max(1, num_kv_heads // 2)
        kv_rank = rank if num_kv_heads >= 2 else 0
        expect = torch.cat(
            [
                wq[rank * q_rows : (rank + 1) * q_rows],
                wk[kv_rank * kv_rows : (kv_rank + 1) * kv_rows],
                wv[kv_rank * kv_rows : (kv_rank + 1) * kv_rows],
            ]
        )
        torch.testing.assert_close(qkv.weight.data, expect, atol=0, rtol=0)
        gate_up = linear.MergedColumnParallelLinear(hidden, [inter, inter])
        gate_up.weight.weight_loader(gate_up.weight, wg, 0)
        gate_up.weight.weight_loader(gate_up.weight, wu, 1)
        half = inter // 2
        torch.testing.assert_close(
            gate_up.weight.data,
            torch.cat([wg[rank * half : (rank + 1) * half], wu[rank * half : (rank + 1) * half]]),
            atol=0,
            rtol=0,
        )
        o = linear.RowParallelLinear(heads * head_dim, hidden)
        o.weight.weight_loader(o.weight, wo)
        torch.testing.assert_close(o.weight.data, wo[:, rank * q_rows : (rank + 1) * q_rows], atol=0, rtol=0)
    monkeypatch.setattr(linear, "tp_rank_and_size", lambda: (0, 3))
    with pytest.raises(ValueError, match="num_attention_heads"):
        linear.QKVParallelLinear(hidden, head_dim, heads, num_kv_heads)
