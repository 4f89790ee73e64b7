"""A lower bound on the time of an offline workload on one device, from the model's shape and
the device's two measured ceilings (`fastserve.benchmarks.device`): prefill FLOPs over the
bf16 matmul rate, plus for each decode step max(weight + KV bytes over the copy bandwidth,
step FLOPs over the matmul rate), with sequences running max_num_seqs at a time."""

from __future__ import annotations


def model_shape(cfg: dict) -> dict:
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    per_layer = h * (heads * hd) + 2 * h * (kv * hd) + (heads * hd) * h + 3 * h * inter
    emb = vocab * h
    params = L * per_layer + emb * (1 if cfg.get("tie_word_embeddings") else 2)
    matmul_params = L * per_layer + vocab * h  # embedding lookup is not a matmul
    return dict(params=params, matmul_params=matmul_params, layers=L, heads=heads, kv_heads=kv, head_dim=hd, hidden=h)


def roofline_seconds(shape, in_lens, out_lens, max_num_seqs, bw_gbps, tflops, bytes_per=2):
    """Lower bound for the whole workload on this device."""
    L, hd, heads, kvh = shape["layers"], shape["head_dim"], shape["heads"], shape["kv_heads"]
    prefill_flops = 0.0
    for n in in_lens:
        prefill_flops += 2 * shape["matmul_params"] * n + 2 * L * heads * hd * n * n  # causal QK^T+PV once
    t = prefill_flops / (tflops * 1e12)
    weight_bytes = shape["params"] * bytes_per
    # Decode: sequences run max_num_seqs at a time; each step reads the weights once and the
    # KV of every running sequence.
    order = sorted(range(len(in_lens)), key=lambda i: -out_lens[i])
    for g in range(0, len(order), max_num_seqs):
        group = order[g : g + max_num_seqs]
        steps = max(out_lens[i] for i in group)
        for s in range(steps):
            alive = [i for i in group if out_lens[i] > s]
            ctx = sum(in_lens[i] + s for i in alive)
            kv_bytes = 2 * L * kvh * hd * bytes_per * ctx
            flops = 2 * shape["matmul_params"] * len(alive) + 4 * L * heads * hd * ctx
            t += max((weight_bytes + kv_bytes) / (bw_gbps * 1e9), flops / (tflops * 1e12))
    return t
