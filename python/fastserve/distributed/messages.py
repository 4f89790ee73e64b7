"""The messages of the engine inbox and of the pipes between processes, one dataclass each.

- Engine inbox (AsyncEngine's step thread) and the async data-parallel command pipe, which
  feeds a replica's inbox unchanged: `AddRequest`, `AbortRequest`.
- Replica -> parent: `Ready` once started; then `StepOutputs` per step (async) or
  `CallResult` per generate call (offline); `RemoteError` for a failure; `ReplicaDead` when
  its step loop stopped.
- Parent -> offline replica: `GenerateCall`.
- Tensor-parallel worker -> driver (and the node launcher): `WorkerStarted`, `WorkerFailed`.

Pickled by multiprocessing; torch-free so the server can import them before the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastserve.errors import InvalidRequest, RequestError

# -- engine inbox / async replica commands ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # SamplingParams
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


# -- replica -> parent ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    dtype: Any  # torch.dtype
    stats: dict


@dataclass(frozen=True, slots=True)
class RemoteError:
    """An exception raised in another process, as what the parent needs to raise it again:
    kind "invalid" (InvalidRequest, with its field), "value" (another ValueError),
    "request" (RequestError of request_id) or "runtime"."""

    kind: str
    text: str
    request_id: str | None = None
    field: str | None = None

    @classmethod
    def of(cls, e: BaseException, tb: str | None = None) -> RemoteError:
        text = str(e) if tb is None else f"{e}\n{tb}"
        if isinstance(e, InvalidRequest):
            return cls("invalid", e.message, field=e.field)
        if isinstance(e, RequestError):
            return cls("request", e.message, request_id=e.request_id)
        return cls("value" if isinstance(e, ValueError) else "runtime", text)

    def rebuild(self) -> BaseException:
        if self.kind == "invalid":
            return InvalidRequest(self.text, self.field)
        if self.kind == "request":
            return RequestError(self.request_id, self.text)
        return ValueError(self.text) if self.kind == "value" else RuntimeError(self.text)

    def raise_in(self, context: str):
        """Raise it here: a ValueError as it was (the caller's input), anything else as a
        RuntimeError saying where it happened."""
        err = self.rebuild()
        if isinstance(err, ValueError):
            raise err
        raise RuntimeError(f"{context}: {err}") from None


@dataclass(frozen=True, slots=True)
class StepOutputs:
    """One step's outputs of an async replica: (request id, RequestOutput or RemoteError)."""

    items: list[tuple[str, Any]]
    stats: dict


@dataclass(frozen=True, slots=True)
class ReplicaDead:
    reason: str


@dataclass(frozen=True, slots=True)
class GenerateCall:
    """Offline: one LLM.generate call's share of prompts; `call_id` lets the parent drop late
    results of a call it interrupted."""

    call_id: int
    prompts: list[dict]
    params: list[Any]


@dataclass(frozen=True, slots=True)
class CallResult:
    call_id: int
    outputs: list[Any] | None = None
    error: RemoteError | None = None


# -- tensor-parallel workers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerStarted:
    rank: int


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    rank: int
    traceback: str


__all__ = [
    "AbortRequest",
    "AddRequest",
    "CallResult",
    "GenerateCall",
    "Ready",
    "RemoteError",
    "ReplicaDead",
    "StepOutputs",
    "WorkerFailed",
    "WorkerStarted",
]
