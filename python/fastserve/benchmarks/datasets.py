"""Benchmark workloads sampled the way vLLM's benchmarks sample them
(`vllm/benchmarks/datasets`): a ShareGPT JSON file, or random prompts.

ShareGPT: the file is a JSON list of `{"conversations": [{"value": prompt}, {"value":
answer}, ...]}`; entries with fewer than two turns are dropped, the rest shuffled with the
seed (the same permutation vLLM's `random.seed(seed); random.shuffle(data)` gives), and taken
in order while prompt >= 4 tokens, answer >= 4 tokens (unless --output-len fixes the output),
prompt <= 1024 and prompt + output <= 2048 tokens (here also <= max_model_len, so a short
context skips what cannot run instead of failing). The output length is the answer's token
count (both counted with special tokens, as vLLM does) or --output-len. Too few valid
entries are topped up by drawing from them again (vLLM's oversampling).

Random: lengths uniform in [len * (1 - ratio), len * (1 + ratio)] from a numpy generator of
the seed; prompt i is the non-special vocabulary read from offset + i, kept as token ids so
its length is exact on every backend (vLLM decodes these to text and re-encodes).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("fastserve")

SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass
class SampleRequest:
    """One benchmark request: the prompt as token ids (and its text when it came from text),
    and the number of tokens to generate."""

    prompt_token_ids: list[int]
    expected_output_len: int
    prompt: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def add_dataset_args(
    parser: argparse.ArgumentParser, *, default_input_len: int | None = None, default_output_len: int | None = None
) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument(
        "--dataset-name",
        choices=["sharegpt", "random"],
        default=None,
        help="sharegpt = --dataset-path is a ShareGPT JSON file; random = random token "
        "prompts. Default: sharegpt when a path is given, else random.",
    )
    g.add_argument(
        "--dataset-path",
        "--dataset",
        dest="dataset_path",
        default=None,
        help='ShareGPT JSON file (vLLM\'s --dataset): a list of {"conversations": '
        '[{"value": prompt}, {"value": answer}, ...]}.',
    )
    g.add_argument("--num-prompts", type=int, default=1000, help="Number of requests.")
    g.add_argument(
        "--input-len",
        "--random-input-len",
        dest="input_len",
        type=int,
        default=default_input_len,
        help="Prompt tokens of each random request.",
    )
    g.add_argument(
        "--output-len",
        "--random-output-len",
        "--sharegpt-output-len",
        dest="output_len",
        type=int,
        default=default_output_len,
        help="Tokens to generate per request (ShareGPT: overrides the answer's length).",
    )
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="Random lengths uniform in [len * (1 - r), len * (1 + r)]; r in [0, 1).",
    )
    g.add_argument(
        "--prefix-len",
        type=int,
        default=0,
        help="Random requests start with the same this many tokens (prefix caching).",
    )


def check_dataset_args(args: argparse.Namespace) -> None:
    """vLLM's rules, as ValueErrors naming the flag."""
    if args.dataset_name is None:
        args.dataset_name = "sharegpt" if args.dataset_path else "random"
    if args.dataset_name == "sharegpt" and not args.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path (a ShareGPT JSON file)")
    if args.dataset_name == "random" and args.input_len is None:
        raise ValueError(
            "--input-len must be provided for a random dataset (or pass --dataset-path with a ShareGPT JSON file)"
        )
    if args.dataset_name == "random" and args.output_len is None:
        raise ValueError("--output-len must be provided for a random dataset")
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    for name in ("input_len", "output_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    if args.prefix_len < 0:
        raise ValueError("--prefix-len must be >= 0")


def get_requests(
    args: argparse.Namespace, tokenizer, max_model_len: int | None = None, vocab_size: int | None = None
) -> list[SampleRequest]:
    """The workload the flags describe. vocab_size: ids random prompts may use (the model's
    embedding rows when smaller than the tokenizer's vocabulary)."""
    check_dataset_args(args)
    if args.dataset_name == "sharegpt":
        return sample_sharegpt(
            args.dataset_path,
            tokenizer,
            args.num_prompts,
            seed=args.seed,
            output_len=args.output_len,
            max_model_len=max_model_len,
        )
    return sample_random(
        tokenizer,
        args.num_prompts,
        args.input_len,
        args.output_len,
        range_ratio=args.random_range_ratio,
        prefix_len=args.prefix_len,
        seed=args.seed,
        vocab_size=vocab_size,
    )


def is_valid_sequence(
    prompt_len: int,
    output_len: int,
    skip_min_output_len_check: bool = False,
    max_total_len: int = SHAREGPT_MAX_TOTAL_LEN,
) -> bool:
    return not (
        prompt_len < SHAREGPT_MIN_LEN
        or (not skip_min_output_len_check and output_len < SHAREGPT_MIN_LEN)
        or prompt_len > SHAREGPT_MAX_PROMPT_LEN
        or prompt_len + output_len > max_total_len
    )


def load_sharegpt(path: str, seed: int) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the ShareGPT file {path!r}: {e}") from None
    except ValueError as e:
        raise ValueError(
            f'{path!r} is not JSON ({e}); a ShareGPT file is a JSON list of {{"conversations": [...]}}'
        ) from None
    if not isinstance(data, list):
        raise ValueError(f'{path!r} must hold a JSON list of {{"conversations": [...]}} entries')
    data = [
        e
        for e in data
        if isinstance(e, dict) and isinstance(e.get("conversations"), list) and len(e["conversations"]) >= 2
    ]
    random.Random(seed).shuffle(data)
    return data


def sample_sharegpt(
    path: str,
    tokenizer,
    num_requests: int,
    *,
    seed: int = 0,
    output_len: int | None = None,
    max_model_len: int | None = None,
    chunk: int = 256,
) -> list[SampleRequest]:
    data = load_sharegpt(path, seed)
    max_total = SHAREGPT_MAX_TOTAL_LEN if max_model_len is None else min(SHAREGPT_MAX_TOTAL_LEN, max_model_len)
    samples: list[SampleRequest] = []
    # Encoded a chunk at a time (the Rust encoder batches in parallel); only as many entries
    # as it takes to fill num_requests are encoded.
    for start in range(0, len(data), chunk):
        if len(samples) >= num_requests:
            break
        pairs = []
        for entry in data[start : start + chunk]:
            turns = entry["conversations"]
            prompt, completion = turns[0].get("value"), turns[1].get("value")
            if isinstance(prompt, str) and isinstance(completion, str):
                pairs.append((prompt, completion))
        if not pairs:
            continue
        prompt_ids = tokenizer.encode_batch([p for p, _ in pairs], True)
        completion_ids = tokenizer.encode_batch([c for _, c in pairs], True) if output_len is None else None
        for i, (prompt, _) in enumerate(pairs):
            if len(samples) >= num_requests:
                break
            out_len = len(completion_ids[i]) if output_len is None else output_len
            if not is_valid_sequence(len(prompt_ids[i]), out_len, output_len is not None, max_total):
                continue
            samples.append(SampleRequest(prompt_ids[i], out_len, prompt))
    if not samples:
        raise ValueError(
            f"no usable conversation in {path!r}: each needs a prompt of 4..1024 tokens "
            f"and prompt + output <= {max_total} tokens"
        )
    if len(samples) < num_requests:
        extra = random.Random(seed).choices(samples, k=num_requests - len(samples))
        logger.info(
            "ShareGPT: %d usable conversations for %d requests; %d drawn again", len(samples), num_requests, len(extra)
        )
        samples += [SampleRequest(list(s.prompt_token_ids), s.expected_output_len, s.prompt) for s in extra]
    return samples


def sample_random(
    tokenizer,
    num_requests: int,
    input_len: int,
    output_len: int,
    *,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
    vocab_size: int | None = None,
) -> list[SampleRequest]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("range_ratio must be in [0, 1)")
    rng = np.random.default_rng(seed)
    in_lo, in_hi = math.floor(input_len * (1 - range_ratio)), math.ceil(input_len * (1 + range_ratio))
    out_lo = max(1, math.floor(output_len * (1 - range_ratio)))
    out_hi = max(1, math.ceil(output_len * (1 + range_ratio)))
    vocab = vocab_size or tokenizer.vocab_size
    special = set(tokenizer.special_token_ids) | set(tokenizer.eos_token_ids)
    if tokenizer.bos_token_id is not None:
        special.add(tokenizer.bos_token_id)
    allowed = np.setdiff1d(np.arange(vocab), np.fromiter(special, dtype=np.int64, count=len(special)))
    input_lens = rng.integers(max(in_lo, 1), in_hi + 1, size=num_requests)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num_requests)
    offsets = rng.integers(0, len(allowed), size=num_requests)
    prefix = allowed[rng.integers(0, len(allowed), size=prefix_len)].tolist() if prefix_len else []
    out = []
    for i in range(num_requests):
        window = (int(offsets[i]) + i + np.arange(int(input_lens[i]))) % len(allowed)
        out.append(SampleRequest(prefix + allowed[window].tolist(), int(output_lens[i])))
    return out
