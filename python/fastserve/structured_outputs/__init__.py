"""Structured outputs (vLLM's `structured_outputs`, OpenAI's `response_format`): the output
is constrained to a JSON schema, regex, choice, grammar or structural tag, with xgrammar.

params.py    StructuredOutputsParams (vLLM's), the cache key, StructuredOutputsError
request.py   every request spelling (response_format, structured_outputs, guided_*) -> params
compiler.py  xgrammar compilation in a thread pool, LRU-cached by constraint
manager.py   the engine side: matchers per sequence, the step's bitmask, advancing
bitmask.py   applying the bitmask to logits (Triton on CUDA, torch on CPU)
"""

from .params import StructuredOutputsError, StructuredOutputsParams

__all__ = ["StructuredOutputsError", "StructuredOutputsParams"]
