"""Command-line entry points beside `fastserve serve`: `fastserve run-batch` (run_batch.py)
and the flags they share with the server (engine_flags.py)."""
