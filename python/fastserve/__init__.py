"""fastserve: a fast LLM inference engine with an OpenAI-compatible server.

`from fastserve import LLM, SamplingParams` works like vLLM's. Heavy modules load lazily so
that `import fastserve.client` stays light (no torch)."""

__version__ = "0.1.0"

_LAZY = {
    "LLM": ("fastserve.engine.llm", "LLM"),
    "SamplingParams": ("fastserve.sampling_params", "SamplingParams"),
    "RequestOutput": ("fastserve.outputs", "RequestOutput"),
    "CompletionOutput": ("fastserve.outputs", "CompletionOutput"),
    "StructuredOutputsParams": ("fastserve.sampling_params", "StructuredOutputsParams"),
}

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fastserve' has no attribute {name!r}")
