"""The server's model and engine flags (`--model`, `--dtype`, `--tensor-parallel-size`, ...)
on another command's parser, so that `fastserve bench ...` and `fastserve run-batch` take
exactly the flags `fastserve serve` takes, with the same names, defaults and help, and a new
engine flag reaches every command at once."""

from __future__ import annotations

import argparse
import dataclasses


def add_engine_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Copy the "model" and "engine" groups of `fastserve serve`'s parser onto `parser`
    (actions whose dest is in `exclude` are left out)."""
    from fastserve.server.cli import make_parser

    source = make_parser()
    for group in source._action_groups:  # argparse keeps a parser's groups here
        if group.title not in ("model", "engine"):
            continue
        target = parser.add_argument_group(group.title)
        for action in group._group_actions:
            if action.dest in exclude:
                parser.set_defaults(**{action.dest: action.default})  # still there for EngineArgs
            else:
                target._add_action(action)


def engine_args_from_cli(args: argparse.Namespace, **overrides):
    """EngineArgs from parsed flags (the server's own mapping); ValueError on a bad value."""
    from fastserve.server.app import engine_args_from

    if getattr(args, "model", None) is None:
        raise ValueError("--model is required: the path of a Hugging Face model directory")
    if getattr(args, "trust_remote_code", False):
        raise ValueError(
            "--trust-remote-code is refused: fastserve never runs code shipped inside a checkpoint. Drop the flag."
        )
    engine_args = engine_args_from(args)
    for name, value in overrides.items():
        setattr(engine_args, name, value)
    return engine_args


def llm_from_cli(args: argparse.Namespace, **overrides):
    """An offline `LLM` built from the flags."""
    from fastserve.engine.llm import LLM

    engine_args = engine_args_from_cli(args, **overrides)
    kwargs = {f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)}
    return LLM(**kwargs)
