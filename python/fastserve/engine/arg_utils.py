"""EngineArgs: every engine knob in one validated place, shared by LLM(...), the CLI and the
server. Names and defaults follow vLLM so that a vLLM script runs unchanged."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class EngineArgs:
    model: str = ""
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    # Sample rows per step (None: max_num_seqs + the largest n, 128); see worker/step_buffers.py.
    max_num_sample_rows: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    load_format: str = "auto"
    block_size: int = 16
    # "auto" (the model's dtype) or "fp8" / "fp8_e4m3" / "fp8_e5m2": worker/kv_cache.py.
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: int | None = None
    # CPU KV cache budget (vLLM reads VLLM_CPU_KVCACHE_SPACE for this); None = 4 GiB.
    cpu_kv_cache_space_gb: float | None = None
    device: str = "auto"
    quantization: str | None = None
    trust_remote_code: bool = False
    served_model_name: list[str] | str | None = None
    # Hub IDs (model_resolver.py): the model's branch/tag/commit, the tokenizer's (default:
    # revision), the cache to download into (default: the hub's own), a hub token.
    revision: str | None = None
    tokenizer_revision: str | None = None
    # vLLM's revision of a checkpoint's own code: accepted, never used (no checkpoint code runs).
    code_revision: str | None = None
    download_dir: str | None = None
    hf_token: str | bool | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    disable_log_stats: bool = True
    max_seq_len_to_capture: int | None = None
    # Sampling defaults from generation_config.json ("auto"), none ("vllm"), or a directory's.
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    # Test hook: called with the Batch before each model step (lets a test inject a fault
    # into the step loop without mocking the engine).
    step_hook: object = field(default=None, repr=False)
    # Test hook: on CPU, run decode-only steps through the CUDA-graph input path (padded
    # static buffers) eagerly, so CPU tests cover what only the GPU would otherwise run.
    emulate_decode_graphs: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a Hugging Face model directory, a model ID (org/name) or a .gguf file")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be one of auto, float32, float16, bfloat16 (got {self.dtype!r})")
        if not (
            isinstance(self.gpu_memory_utilization, (int, float))
            and math.isfinite(self.gpu_memory_utilization)
            and 0 < self.gpu_memory_utilization <= 1
        ):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("data_parallel_size", self.data_parallel_size)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        _positive("max_num_sample_rows", self.max_num_sample_rows, allow_none=True)
        _positive("max_model_len", self.max_model_len, allow_none=True)
        _positive("num_gpu_blocks_override", self.num_gpu_blocks_override, allow_none=True)
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size!r}")
        from fastserve.worker.kv_cache import KV_CACHE_DTYPES

        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (got {self.kv_cache_dtype!r})"
            )
        if self.load_format not in ("auto", "safetensors", "pt", "gguf", "dummy"):
            raise ValueError(
                f"load_format must be one of auto, safetensors, pt, gguf, dummy (got {self.load_format!r})"
            )
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu (got {self.device!r})")
        from fastserve.quantization import normalize_quantization

        # Names are checked here; whether the checkpoint agrees is checked when its config is read.
        normalize_quantization(self.quantization)
        # trust_remote_code=True is accepted: model_resolver.check_remote_code says that fastserve
        # runs its own implementation and never the checkpoint's code.
        for name in ("revision", "tokenizer_revision", "code_revision", "download_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}
