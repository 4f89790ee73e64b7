"""OPT (facebook/opt-*): learned absolute positions, LayerNorm, a plain ReLU MLP.

Flags from config.json, with HF's OPTConfig defaults:
- do_layer_norm_before (True): pre-LN; False (opt-350m) normalizes after each residual add
  and has no final LayerNorm (nor does `_remove_final_layer_norm`).
- word_embed_proj_dim (hidden_size): embeddings and LM head live in this width; when it
  differs, project_in / project_out map to and from hidden_size (opt-350m).
- enable_bias (True): bias on q/k/v/out_proj and fc1/fc2.
- layer_norm_elementwise_affine (True): LayerNorms with weight and bias.
- activation_function ("relu"), read as ModelConfig.hidden_act; ffn_dim as intermediate_size.
- tie_word_embeddings (True): the LM head is the token embedding.
Positions index the learned table at position + 2 (OPT's offset: HF's
OPTLearnedPositionalEmbedding has max_position_embeddings + 2 rows). LayerNorm eps is torch's
default 1e-5, as HF's OPT hard-codes it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastserve.config import ModelConfig
from fastserve.layers.activation import get_act_fn
from fastserve.layers.attention import Attention, AttentionMetadata
from fastserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from fastserve.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    default_weight_loader,
)
from fastserve.layers.norm import LayerNorm

_POSITION_OFFSET = 2
_LN_EPS = 1e-5


def _arch_flags(config: ModelConfig) -> dict:
    hf = config.hf_config
    return {
        "pre_ln": bool(hf.get("do_layer_norm_before", True)),
        "final_ln": bool(hf.get("do_layer_norm_before", True)) and not hf.get("_remove_final_layer_norm", False),
        "bias": bool(hf.get("enable_bias", True)),
        "affine": bool(hf.get("layer_norm_elementwise_affine", True)),
        "embed_dim": int(hf.get("word_embed_proj_dim") or config.hidden_size),
    }


class OPTLearnedPositionalEmbedding(nn.Module):
    """positions[T] (0-based) -> [T, hidden]; replicated on every rank (small, and a
    vocab-style split would cost an all-reduce per step)."""

    def __init__(self, num_positions: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_positions + _POSITION_OFFSET, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + _POSITION_OFFSET, self.weight)


class OPTAttention(nn.Module):
    def __init__(self, config: ModelConfig, flags: dict, prefix: str):
        super().__init__()
        quant = config.quant_config
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden, self.head_dim, heads, heads, bias=flags["bias"], quant_config=quant, prefix=f"{prefix}.qkv_proj"
        )
        self.num_heads = self.qkv_proj.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.out_proj = RowParallelLinear(
            heads * self.head_dim, hidden, bias=flags["bias"], quant_config=quant, prefix=f"{prefix}.out_proj"
        )
        # HF scales q before the matmul; folding the scale into attention is the same math.
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_heads)

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size] * 3, dim=-1)
        shape = (-1, self.num_heads, self.head_dim)
        return self.out_proj(self.attn(q.view(shape), k.view(shape), v.view(shape), kv_cache, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, flags: dict, prefix: str):
        super().__init__()
        quant = config.quant_config
        hidden = config.hidden_size
        self.pre_ln = flags["pre_ln"]
        self.self_attn = OPTAttention(config, flags, f"{prefix}.self_attn")
        self.self_attn_layer_norm = LayerNorm(hidden, _LN_EPS, elementwise_affine=flags["affine"])
        self.fc1 = ColumnParallelLinear(
            hidden, config.intermediate_size, bias=flags["bias"], quant_config=quant, prefix=f"{prefix}.fc1"
        )
        self.fc2 = RowParallelLinear(
            config.intermediate_size, hidden, bias=flags["bias"], quant_config=quant, prefix=f"{prefix}.fc2"
        )
        self.act = get_act_fn(config.hidden_act, "activation_function")
        self.final_layer_norm = LayerNorm(hidden, _LN_EPS, elementwise_affine=flags["affine"])

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.pre_ln:
            hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), kv_cache, meta)
            return hidden + self.fc2(self.act(self.fc1(self.final_layer_norm(hidden))))
        hidden = self.self_attn_layer_norm(hidden + self.self_attn(hidden, kv_cache, meta))
        return self.final_layer_norm(hidden + self.fc2(self.act(self.fc1(hidden))))


class OPTDecoder(nn.Module):
    def __init__(self, config: ModelConfig, flags: dict):
        super().__init__()
        quant = config.quant_config
        hidden, embed_dim = config.hidden_size, flags["embed_dim"]
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, hidden)
        if embed_dim != hidden:
            self.project_in = ReplicatedLinear(
                embed_dim, hidden, bias=False, quant_config=quant, prefix="model.decoder.project_in"
            )
            self.project_out = ReplicatedLinear(
                hidden, embed_dim, bias=False, quant_config=quant, prefix="model.decoder.project_out"
            )
        else:
            self.project_in = self.project_out = None
        self.final_layer_norm = (
            LayerNorm(hidden, _LN_EPS, elementwise_affine=flags["affine"]) if flags["final_ln"] else None
        )
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, flags, f"model.decoder.layers.{i}") for i in range(config.num_hidden_layers)
        )

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, meta)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    # Only a holder, so parameter names are HF's `model.decoder.*`.
    def __init__(self, config: ModelConfig, flags: dict):
        super().__init__()
        self.decoder = OPTDecoder(config, flags)


class OPTForCausalLM(nn.Module):
    """model = OPTForCausalLM(model_config);
    hidden[T, word_embed_proj_dim] = model(input_ids[T], positions[T], attn_meta, kv_caches);
    logits[S, vocab_size] (float32) = model.compute_logits(hidden[S, word_embed_proj_dim])."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        flags = _arch_flags(config)
        self.model = OPTModel(config, flags)
        self.lm_head = ParallelLMHead(config.vocab_size, flags["embed_dim"])
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, attn_meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named tensors in through each parameter's weight_loader; returns the names of
        our parameters loaded. ValueError on an unknown name or a parameter left unloaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("decoder."):
                name = "model." + name  # facebook's checkpoints were saved from OPTModel
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the tied head is the embedding, loaded under its own name
            target, shard_id = name, None
            for hf_name, (packed, sid) in self.packed_modules_mapping.items():
                if f".{hf_name}." in name:
                    target, shard_id = name.replace(f".{hf_name}.", f".{packed}."), sid
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {self.config.architecture}")
            if shard_id is None:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
            loaded.add(target)
        # Optional quantization tensors (g_idx, ...) may be absent; their method fills them in.
        missing = {n for n, p in self.named_parameters() if not getattr(p, "optional", False)} - loaded
        if missing:
            raise ValueError(
                f"checkpoint is missing weights for: {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}"
            )
        return loaded
