"""Tensor parallelism (executor.py: worker processes; batch_transport.py: each step's Batch
to the workers; parallel_state.py: process groups; node.py: ranks on other nodes) and data
parallelism (replicas.py: replica processes; offline_replicas.py: LLM; async_replicas.py:
the server). messages.py: the typed messages of the engine inbox and of every pipe between
these processes. process_utils.py keeps every child tied to its parent's life."""
