"""Triton kernels, installed as fastserve.kernels.

Each function here has a plain-torch definition in `reference` with the same meaning; the
kernels need CUDA (or TRITON_INTERPRET=1 set before triton is first imported, for tests).
"""

from .activation import silu_and_mul
from .attention_decode import paged_decode_attention
from .attention_prefill import paged_prefill_attention
from .cache import write_kv_cache
from .penalties import apply_penalties
from .rmsnorm import fused_add_rms_norm, rms_norm
from .rotary import rotary_embedding
from .token_bitmask import apply_token_bitmask

__all__ = [
    "apply_penalties",
    "apply_token_bitmask",
    "fused_add_rms_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv_cache",
]
