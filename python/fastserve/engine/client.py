"""`EngineClient`: what the server needs of an engine, declared once.

`AsyncEngine` (one engine, its step loop on a thread) and `DataParallelAsyncEngine` (M
replica processes behind one front end) both implement it; the server holds an
`EngineClient` and never probes which one it has. Torch-free, so the server can import it
before the model loads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from fastserve.config import ModelConfig
    from fastserve.outputs import RequestOutput
    from fastserve.sampling_params import SamplingParams
    from fastserve.structured_outputs.manager import StructuredOutputManager


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: Any  # fastserve._core.Tokenizer
    model_config: ModelConfig
    served_model_names: list[str]
    # Compiles grammars in its pool off the step thread, so the server can refuse a bad
    # constraint (a 400) before queueing the request and the engine finds it cached.
    structured: StructuredOutputManager
    # Resolves (with the error) when the engine dies: the server exits rather than linger.
    died: asyncio.Future | None

    @property
    def errored(self) -> bool:
        """The engine stopped after an error: nothing more will run."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def stats(self) -> dict: ...

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt as it will run (after truncate_prompt_tokens); InvalidRequest otherwise."""
        ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they grow, the last one finished. Raises InvalidRequest
        before anything runs, RequestError when the engine fails this request alone,
        EngineDeadError when the engine dies. Closing the iterator early aborts it."""
        ...

    async def abort(self, request_id: str) -> None: ...


__all__ = ["EngineClient"]
