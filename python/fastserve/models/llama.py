"""Llama-family decoder: Llama 2/3, Mistral, Qwen2/Qwen2.5 and Qwen3 in one file.

The families differ only in flags, read from the architecture and config.json:
- qkv_bias: Qwen2 always; Llama/Qwen3 when `attention_bias` (Llama's also biases o_proj)
- qk_norm: Qwen3's per-head RMSNorm of q and k before rotary
- head_dim: explicit in the config (Qwen3, Mistral Nemo) or hidden_size / num_heads
- tie_word_embeddings: the LM head is the embedding matrix
- mlp_bias: Llama's optional bias on gate/up/down
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from fastserve.config import ModelConfig
from fastserve.distributed.parallel_state import tp_rank_and_size
from fastserve.layers.activation import get_act_and_mul
from fastserve.layers.attention import Attention, AttentionMetadata
from fastserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from fastserve.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    default_weight_loader,
)
from fastserve.layers.norm import RMSNorm
from fastserve.layers.rotary import get_rope


def _arch_flags(config: ModelConfig) -> dict:
    hf = config.hf_config
    arch = config.architecture
    attention_bias = bool(hf.get("attention_bias", False))
    return {
        "qkv_bias": True if arch == "Qwen2ForCausalLM" else attention_bias,
        "o_bias": attention_bias if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") else False,
        "qk_norm": arch == "Qwen3ForCausalLM",
        "mlp_bias": bool(hf.get("mlp_bias", False)) if arch == "LlamaForCausalLM" else False,
    }


# Checkpoint names of FP8 KV-cache scales -> which scales they set (vLLM's remapping).
_KV_SCALE_SUFFIXES = {
    ".self_attn.k_scale": ("k",),
    ".self_attn.v_scale": ("v",),
    ".self_attn.attn.k_scale": ("k",),
    ".self_attn.attn.v_scale": ("v",),
    ".self_attn.k_proj.output_scale": ("k",),
    ".self_attn.v_proj.output_scale": ("v",),
    ".self_attn.kv_scale": ("k", "v"),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, flags: dict, prefix: str):
        super().__init__()
        self.head_dim = config.head_dim
        quant = config.quant_config
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_kv_heads,
            bias=flags["qkv_bias"],
            quant_config=quant,
            prefix=f"{prefix}.qkv_proj",
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=flags["o_bias"],
            quant_config=quant,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim, config.max_model_len, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads)
        self.qk_norm = flags["qk_norm"]
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions, hidden, kv_cache, meta, token_seq_lens):
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k, token_seq_lens)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, flags: dict, prefix: str):
        super().__init__()
        inter = config.intermediate_size
        quant = config.quant_config
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [inter, inter],
            bias=flags["mlp_bias"],
            quant_config=quant,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            inter, config.hidden_size, bias=flags["mlp_bias"], quant_config=quant, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = get_act_and_mul(config.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, flags: dict, prefix: str):
        super().__init__()
        self.self_attn = LlamaAttention(config, flags, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, flags, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, meta, token_seq_lens):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, token_seq_lens)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, flags: dict):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, flags, f"model.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches: list[torch.Tensor]):
        token_seq_lens = None
        if self.layers[0].self_attn.rotary_emb.needs_seq_lens:
            qsl = meta.query_start_loc.to(torch.int64)
            token_seq_lens = torch.repeat_interleave(meta.seq_lens, qsl[1:] - qsl[:-1], output_size=input_ids.shape[0])
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, token_seq_lens)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """model = LlamaForCausalLM(model_config);
    hidden[T, H] = model(input_ids[T], positions[T], attn_meta, kv_caches);
    logits[S, vocab_size] (float32) = model.compute_logits(hidden[S, H])."""

    # HF checkpoint name -> (our packed parameter, shard id for its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        flags = _arch_flags(config)
        self.model = LlamaModel(config, flags)
        qc = config.quant_config
        if qc is not None and getattr(qc, "quantizes_lm_head", lambda: False)():
            # A quantized LM head (GPTQ `lm_head: true`) is a quantized linear whose output is the vocabulary.
            if tp_rank_and_size()[1] > 1:
                raise ValueError("a quantized lm_head (GPTQ lm_head: true) runs with tensor_parallel_size=1 only")
            self.lm_head = ReplicatedLinear(config.hidden_size, config.vocab_size, quant_config=qc, prefix="lm_head")
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        return self.model(input_ids, positions, attn_meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _load_kv_scale(self, name: str, tensor: torch.Tensor) -> bool:
        """An FP8 KV-cache scale (llm-compressor / AutoFP8 spellings, as vLLM reads them) onto
        its layer's Attention; the runner keeps them only for an FP8 cache. False: not one."""
        kinds = next((k for suffix, k in _KV_SCALE_SUFFIXES.items() if name.endswith(suffix)), None)
        if kinds is None:
            return False
        match = re.search(r"layers\.(\d+)\.", name)
        if match is None or int(match.group(1)) >= len(self.model.layers):
            raise ValueError(f"checkpoint tensor {name!r}: a KV-cache scale of no decoder layer")
        if tensor.numel() != 1:
            raise ValueError(
                f"checkpoint tensor {name!r}: a KV-cache scale must be one value, got {tuple(tensor.shape)}"
            )
        value = float(tensor.float().item())
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"checkpoint tensor {name!r}: a KV-cache scale must be positive and finite, got {value}")
        attn = self.model.layers[int(match.group(1))].self_attn.attn
        for kind in kinds:
            setattr(attn, f"{kind}_scale", value)
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors in through each parameter's weight_loader; returns the names
        of our parameters that were loaded. ValueError on an unknown name or a parameter the
        checkpoint did not provide."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
                continue  # recomputed from the config (old checkpoints saved these buffers)
            if self._load_kv_scale(name, tensor):
                continue
            if name.endswith((".q_scale", ".prob_scale")):
                continue  # attention-input FP8 scales (FlashInfer / ROCm backends in vLLM): no use here
            tied = self.config.tie_word_embeddings and isinstance(self.lm_head, ParallelLMHead)
            if name == "lm_head.weight" and tied:
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


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
