"""GPT-NeoX (EleutherAI Pythia, GPT-NeoX-20B, ...): partial rotary, LayerNorm, GELU MLP.

Flags from config.json, with HF's GPTNeoXConfig defaults:
- partial rotary: rope_parameters' `partial_rotary_factor` (transformers 5) or `rotary_pct`
  (4.x), default 0.25; theta from `rope_theta` / `rotary_emb_base` (ModelConfig resolves both).
- use_parallel_residual (True): x + attn(ln1(x)) + mlp(ln2(x)); False: the sequential
  h = x + attn(ln1(x)); h + mlp(ln2(h)).
- attention_bias (True) on query_key_value and dense; the MLP always has biases.
- hidden_act ("gelu", exact erf GELU as HF's ACT2FN), layer_norm_eps (1e-5).
- the LM head `embed_out` is its own matrix unless tie_word_embeddings.
`attention_dropout` / `hidden_dropout` are training-only and ignored.

HF's fused `query_key_value` interleaves per head: its output rows are [heads, 3, head_dim]
(q, k, v of head 0, then head 1, ...). The loader regroups them into q, k and v and feeds the
shared QKVParallelLinear shard by shard, so each rank gets whole heads and the forward is the
same contiguous [q | k | v] split as every other model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fastserve.config import ModelConfig
from fastserve.layers.activation import get_act_fn
from fastserve.layers.attention import Attention, AttentionMetadata
from fastserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from fastserve.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from fastserve.layers.norm import LayerNorm
from fastserve.layers.rotary import get_rope

# Buffers old checkpoints saved (causal-mask tables, rotary frequencies): recomputed, not loaded.
_SKIPPED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        quant = config.quant_config
        hidden, heads = config.hidden_size, config.num_attention_heads
        bias = bool(config.hf_config.get("attention_bias", True))
        self.head_dim = config.head_dim
        self.total_num_heads = heads
        self.query_key_value = QKVParallelLinear(
            hidden, self.head_dim, heads, heads, bias=bias, quant_config=quant, prefix=f"{prefix}.query_key_value"
        )
        self.num_heads = self.query_key_value.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.dense = RowParallelLinear(
            heads * self.head_dim, hidden, bias=bias, quant_config=quant, prefix=f"{prefix}.dense"
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            config.max_model_len,
            config.rope_theta,
            config.rope_scaling,
            config.max_position_embeddings,
            rotary_dim=int(self.head_dim * config.partial_rotary_factor),
        )
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_heads)

    def load_fused_qkv(self, tensor: torch.Tensor) -> None:
        """HF's interleaved [heads * 3 * head_dim, ...] weight or bias -> the q, k, v shards."""
        if tensor.dim() not in (1, 2) or tensor.shape[0] != 3 * self.total_num_heads * self.head_dim:
            raise ValueError(
                f"weight shape mismatch for query_key_value: checkpoint has {tuple(tensor.shape)}, "
                f"expected {3 * self.total_num_heads * self.head_dim} rows (3 x hidden_size)"
            )
        per_head = tensor.view(self.total_num_heads, 3, self.head_dim, *tensor.shape[1:])
        param = self.query_key_value.weight if tensor.dim() == 2 else self.query_key_value.bias
        for i, shard_id in enumerate("qkv"):
            param.weight_loader(
                param, per_head[:, i].reshape(self.total_num_heads * self.head_dim, *tensor.shape[1:]), shard_id
            )

    def forward(self, positions, hidden, kv_cache, meta, token_seq_lens):
        q, k, v = self.query_key_value(hidden).split([self.q_size] * 3, dim=-1)
        shape = (-1, self.num_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q.view(shape), k.view(shape), token_seq_lens)
        return self.dense(self.attn(q, k, v.view(shape), kv_cache, meta))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        quant = config.quant_config
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size,
            config.intermediate_size,
            bias=True,
            quant_config=quant,
            prefix=f"{prefix}.dense_h_to_4h",
        )
        self.dense_4h_to_h = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=True,
            quant_config=quant,
            prefix=f"{prefix}.dense_4h_to_h",
        )
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str):
        super().__init__()
        self.use_parallel_residual = bool(config.hf_config.get("use_parallel_residual", True))
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, f"{prefix}.attention")
        self.mlp = GPTNeoXMLP(config, f"{prefix}.mlp")

    def forward(self, positions, hidden, kv_cache, meta, token_seq_lens):
        attn = self.attention(positions, self.input_layernorm(hidden), kv_cache, meta, token_seq_lens)
        # HF's summation order, so float32 matches bit for bit where the matmuls do.
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(hidden)) + attn + hidden
        attn = attn + hidden
        return self.mlp(self.post_attention_layernorm(attn)) + attn


class GPTNeoXModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GPTNeoXLayer(config, f"gpt_neox.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        token_seq_lens = None
        if self.layers[0].attention.rotary_emb.needs_seq_lens:
            qsl = meta.query_start_loc.to(torch.int64)
            token_seq_lens = torch.repeat_interleave(meta.seq_lens, qsl[1:] - qsl[:-1], output_size=input_ids.shape[0])
        hidden = self.embed_in(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(positions, hidden, kv_cache, meta, token_seq_lens)
        return self.final_layer_norm(hidden)


class GPTNeoXForCausalLM(nn.Module):
    """model = GPTNeoXForCausalLM(model_config);
    hidden[T, H] = model(input_ids[T], positions[T], attn_meta, kv_caches);
    logits[S, vocab_size] (float32) = model.compute_logits(hidden[S, H])."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, attn_meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_out(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named tensors in through each parameter's weight_loader; returns the names of
        our parameters loaded. ValueError on an unknown name or a parameter left unloaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_SKIPPED_SUFFIXES):
                continue
            if name == "lm_head.weight":
                name = "embed_out.weight"  # transformers 5's in-memory name for the head
            if name == "embed_out.weight" and self.config.tie_word_embeddings:
                continue  # the tied head is the embedding, loaded under its own name
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {self.config.architecture}")
            if ".attention.query_key_value." in name:
                layer = int(name.split(".")[2])
                self.gpt_neox.layers[layer].attention.load_fused_qkv(tensor)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        # Optional quantization tensors (g_idx, ...) may be absent; their method fills them in.
        missing = {n for n, p in self.named_parameters() if not getattr(p, "optional", False)} - loaded
        if missing:
            raise ValueError(
                f"checkpoint is missing weights for: {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}"
            )
        return loaded
