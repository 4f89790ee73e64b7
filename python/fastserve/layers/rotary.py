"""Rotary position embeddings, neox layout (rotate_half over the two halves of the rotated
dims), as Llama, Mistral, Qwen and GPT-NeoX use, with rope_scaling "linear", "dynamic" and
"llama3".

Partial rotary (GPT-NeoX's `rotary_pct`, HF's `partial_rotary_factor`): only the first
`rotary_dim` features of each head rotate, the rest pass through; every frequency formula
uses rotary_dim where a full rotary uses head_dim (as HF does).

Dynamic NTK follows Hugging Face, not vLLM: vLLM builds one table with the base stretched
for max_position_embeddings * factor, which changes outputs even for short prompts; HF keeps
the original frequencies while a sequence fits in max_position_embeddings and, past it,
rotates with the base stretched for the sequence's current length (max position + 1 of the
forward). We do the same per token, using the length of the token's own sequence after
this step, so a long sequence in a batch does not change the others (HF would stretch the
whole batch by its longest row; per sequence is what HF gives for that sequence alone).
As in HF with a KV cache, keys already cached keep the rotation they were written with.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(base: float, dim: int, scaling: dict) -> torch.Tensor:
    inv_freq = _default_inv_freq(base, dim)
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos/sin [T, D/2] already in x's dtype (HF casts them before multiplying).
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotate_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    # HF's order: rotate x[..., :rotary_dim], then cat the untouched rest back on.
    return torch.cat((_rotate(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)


class RotaryEmbedding(nn.Module):
    """forward(positions[T], q[T, Hq, D], k[T, Hkv, D], token_seq_lens[T] | None) -> (q, k).

    rotary_dim (default head_dim): how many leading features of each head rotate.

    `needs_seq_lens` is True only for dynamic NTK, whose rotation depends on the length of
    each token's sequence; the model passes those lengths only then."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict | None = None,
        max_position_embeddings: int | None = None,
        rotary_dim: int | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(
                f"rotary dim {rotary_dim} (head_dim x partial_rotary_factor) must be even and in "
                f"(0, head_dim={head_dim}]"
            )
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.rope_type = "default" if rope_scaling is None else rope_scaling["rope_type"]
        self.scaling = rope_scaling or {}
        self.max_position_embeddings = max_position_embeddings or max_position
        self.needs_seq_lens = self.rope_type == "dynamic"
        if self.rope_type in ("default", "dynamic"):
            inv_freq = _default_inv_freq(self.base, rotary_dim)
        elif self.rope_type == "linear":
            inv_freq = _default_inv_freq(self.base, rotary_dim) / float(self.scaling["factor"])
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(self.base, rotary_dim, self.scaling)
        else:
            raise ValueError(
                f"rope_scaling type {self.rope_type!r} is not supported: use default, linear, dynamic or llama3"
            )
        # The table is float32 whatever the model dtype: HF computes angles in float32 too.
        table_len = max(max_position, self.max_position_embeddings)
        freqs = torch.outer(torch.arange(table_len, dtype=torch.float32), inv_freq)
        # [max_position, rotary_dim] rows of [cos | sin]: vLLM's layout, which
        # fastserve.kernels.rotary_embedding reads directly.
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        self.register_buffer("inv_freq_exponent", exponent, persistent=False)

    def _cos_sin(self, positions: torch.Tensor, token_seq_lens: torch.Tensor | None):
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        if self.rope_type == "dynamic":
            if token_seq_lens is None:
                raise ValueError("dynamic rope_scaling needs token_seq_lens (each token's sequence length)")
            factor = float(self.scaling["factor"])
            maxpos = self.max_position_embeddings
            lens = token_seq_lens.to(torch.float32)
            stretched = lens > maxpos
            dim = self.rotary_dim
            base = self.base * ((factor * lens / maxpos) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (base.unsqueeze(-1) ** self.inv_freq_exponent)
            freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
            cos = torch.where(stretched.unsqueeze(-1), freqs.cos(), cos)
            sin = torch.where(stretched.unsqueeze(-1), freqs.sin(), sin)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, token_seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda and not self.needs_seq_lens:
            from fastserve.kernels.rotary import rotary_embedding

            # In place, q and k in one launch. Dynamic NTK stays on the torch path below: its
            # angles depend on each token's sequence length, not on a table row. A partial
            # rotary needs nothing more: the kernel rotates the cache's width of each head.
            return rotary_embedding(positions, q, k, self.cos_sin_cache, is_neox=True)
        cos, sin = self._cos_sin(positions, token_seq_lens)
        if self.rotary_dim != self.head_dim:
            return (
                _rotate_partial(q, cos.to(q.dtype), sin.to(q.dtype), self.rotary_dim),
                _rotate_partial(k, cos.to(k.dtype), sin.to(k.dtype), self.rotary_dim),
            )
        return _rotate(q, cos.to(q.dtype), sin.to(q.dtype)), _rotate(k, cos.to(k.dtype), sin.to(k.dtype))


def get_rope(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None = None,
    max_position_embeddings: int | None = None,
    rotary_dim: int | None = None,
) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_position, base, rope_scaling, max_position_embeddings, rotary_dim)
