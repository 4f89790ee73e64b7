"""The engine's error types, importable without torch (the server imports them before the
model loads).

- `InvalidRequest`: the client's input breaks a documented rule; carries the request field it
  is about (`field`, the offline/SamplingParams name; the server maps it to the wire name) so
  no layer recovers it from the message. A `ValueError`, so offline callers keep catching
  what vLLM raises.
- `RequestError`: a failure that belongs to one request; the engine fails that request alone
  and keeps serving the rest (HTTP 500 for that request only).
- `InternalError`: an engine invariant broke (a bug, not the client's input): never reported
  as a `ValueError` (which would become the client's 400). `StepLimitError` is the one the
  worker raises, before running anything, when a step exceeds a buffer it sized from the
  scheduler's limits; it names the first row past the limit so the engine can fail that
  row's request alone.
- `EngineDeadError`: the step loop stopped; every waiting caller gets it.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """Bad input: `field` names the parameter (None: the request as a whole)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self):
        return (type(self), (self.message, self.field))


class RequestError(RuntimeError):
    """A failure that belongs to one request: the engine fails that request alone and keeps
    serving the rest of the batch. Per-request work (the step hook when it targets a row,
    routing a request's outputs, a step the worker refused because of this request's rows)
    raises or is wrapped into this; any other exception in a step cannot be attributed and
    stops the engine."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"request {request_id!r}: {message}")
        self.request_id = request_id
        self.message = message

    def __reduce__(self):
        # Data-parallel replicas send it through a pipe; the default would call cls(str).
        return (type(self), (self.request_id, self.message))


class InternalError(RuntimeError):
    """An engine invariant broke: a bug to report, never the client's fault."""


class StepLimitError(InternalError):
    """A step's arrays exceed a per-step buffer. Raised before any copy or kernel, so the
    step can be dropped (`Scheduler.discard_pending`) and run again without `row`'s request.

    quantity: the limit's name ("sample rows", "tokens", ...); needed / capacity: the step's
    count and the buffer's size; row: the first sequence row of the batch past the limit;
    shapes: the step's array shapes, for the log."""

    def __init__(self, quantity: str, needed: int, capacity: int, row: int, shapes: dict) -> None:
        super().__init__(
            f"internal error: this step has {needed} {quantity} but the worker's buffer holds {capacity} "
            f"(first row past it: {row}; step shapes {shapes}); the scheduler should have deferred it"
        )
        self.quantity = quantity
        self.needed = needed
        self.capacity = capacity
        self.row = row
        self.shapes = shapes

    def __reduce__(self):
        return (type(self), (self.quantity, self.needed, self.capacity, self.row, self.shapes))


class EngineDeadError(RuntimeError):
    """The engine's step loop stopped after an error; nothing more will run."""


__all__ = ["EngineDeadError", "InternalError", "InvalidRequest", "RequestError", "StepLimitError"]
