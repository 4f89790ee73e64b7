"""Child processes that cannot outlive their parent.

Every fastserve child (tensor-parallel worker, data-parallel replica) gets one end of a
pipe whose other end only the parent holds. A watchdog thread in the child blocks reading
it: EOF (the parent exited, was killed, or closed the pipe in shutdown) or a "stop" message
ends the child with os._exit at once. No orphan survives a crashed or Ctrl+C'd driver, and
no child needs a collective to be told to stop.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

STOP = "stop"


def start_parent_watchdog(conn) -> None:
    def watch():
        try:
            while conn.recv() != STOP:
                pass
        except (EOFError, OSError):
            pass
        os._exit(0)

    threading.Thread(target=watch, name="fastserve-parent-watchdog", daemon=True).start()


def ignore_sigint() -> None:
    """Ctrl+C reaches the whole foreground process group; the driver decides what it means
    (its shutdown closes the pipes), so children must not die half-way on their own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_process(proc, conn, timeout: float = 5.0) -> None:
    """Ask (pipe), then terminate, then kill."""
    if conn is not None:
        try:
            conn.send(STOP)
        except (OSError, ValueError, BrokenPipeError):
            pass
        try:
            conn.close()
        except OSError:
            pass
    if proc is None:
        return
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)


_start_lock = threading.Lock()


@contextmanager
def child_start_context(env: dict[str, str | None] | None = None):
    """Around Process.start() of a spawn child:
    - the child must not re-run the user's main script: spawn re-imports __main__ in every
      child, which in a script without an `if __name__ == "__main__":` guard would build the
      LLM again, recursively. fastserve children run only fastserve code, so the parent's
      main module is hidden from spawn's preparation data while the child starts;
    - `env` entries (None = unset) are what the child sees in os.environ (a GPU set)."""
    main = sys.modules.get("__main__")
    with _start_lock:
        saved_env = {k: os.environ.get(k) for k in (env or {})}
        saved_main = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
        try:
            for k, v in (env or {}).items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if main is not None:
                main.__dict__.pop("__file__", None)
                if "__spec__" in saved_main:
                    main.__spec__ = None
            yield
        finally:
            if main is not None:
                main.__dict__.update(saved_main)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
