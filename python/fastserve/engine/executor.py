"""The executor seam: what runs a scheduled Batch on the model and returns its samples.

`Engine.step` is schedule -> `executor.execute(batch)` -> update, whatever the executor is:
- `UniprocExecutor`: the model runner in this process (one device);
- `distributed.executor.TensorParallelExecutor`: this process is rank 0 of a
  tensor-parallel group; it sends each Batch to the other ranks before its own forward pass.
A process boundary (the step loop in one process, the runners in others) would be a third
implementation of the same three members.

Contract: `execute` raises `StepLimitError` before anything runs (or is sent) when the
batch exceeds a step buffer, so the engine can drop the step (`Scheduler.discard_pending`)."""

from __future__ import annotations

from typing import Protocol

from fastserve.worker.model_runner import ModelRunner, StepResult


class Executor(Protocol):
    model_config: object
    num_blocks: int  # KV-cache blocks every rank holds (the scheduler's pool)

    def execute(self, batch, prompt_logprobs_k: int = 0, grammar=None) -> StepResult:
        """grammar: the step's structured-outputs rows (structured_outputs.manager.StepGrammar)."""
        ...

    def shutdown(self) -> None: ...


class UniprocExecutor:
    def __init__(self, args, model_config):
        self.model_config = model_config
        self.runner = ModelRunner(args, model_config)
        self.num_blocks = self.runner.num_blocks

    def execute(self, batch, prompt_logprobs_k: int = 0, grammar=None) -> StepResult:
        self.runner.check(batch)
        return self.runner.execute(batch, prompt_logprobs_k, grammar)

    def shutdown(self) -> None:
        pass


def make_executor(args, model_config) -> Executor:
    if args.tensor_parallel_size > 1:
        from fastserve.distributed.executor import TensorParallelExecutor

        return TensorParallelExecutor(args, model_config)
    return UniprocExecutor(args, model_config)


__all__ = ["Executor", "UniprocExecutor", "make_executor"]
