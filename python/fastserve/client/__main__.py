"""Batch jobs against any OpenAI-compatible server:

    python -m fastserve.client --base-url http://127.0.0.1:8000 \\
        --input prompts.jsonl --output results.jsonl --concurrency 128

Each input line is a JSON object with "messages" (chat) or "prompt" (completions), an
optional "id" (default: the line number) and optional request parameters ("max_tokens",
"temperature", ...) that override the command-line ones. Each result is appended to the
output as soon as it arrives: {"id", "text", "finish_reason", "usage", "error", ...}.
Resumable: ids that already have a successful result in the output are skipped, so an
interrupted job continues where it stopped and a re-run retries only the failures."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from .async_client import AsyncClient, Result


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastserve.client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="Server root (with or without /v1).")
    p.add_argument(
        "--api-key",
        default=os.environ.get("FASTSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="Bearer key (default: $FASTSERVE_API_KEY or $OPENAI_API_KEY).",
    )
    p.add_argument("--model", default=None, help="Default: the first of GET /v1/models.")
    p.add_argument("--input", required=True, help="JSONL file of requests.")
    p.add_argument("--output", required=True, help="JSONL file results are appended to.")
    p.add_argument("--concurrency", type=int, default=64, help="Requests in flight at once.")
    p.add_argument(
        "--max-retries", type=int, default=3, help="Retries per request on connection errors, timeouts, 429 and 5xx."
    )
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds per request attempt.")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return p


def read_requests(path: str) -> list[tuple[str, dict]]:
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(item, dict) or ("messages" in item) == ("prompt" in item):
                raise SystemExit(f'{path}:{lineno}: each line needs exactly one of "messages" or "prompt"')
            rid = str(item.pop("id", lineno))
            if rid in seen:
                raise SystemExit(f"{path}:{lineno}: duplicate id {rid!r}")
            seen.add(rid)
            out.append((rid, item))
    return out


def done_ids(path: str) -> set[str]:
    """Ids with a successful result already in the output (a torn last line is ignored)."""
    done: set[str] = set()
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("error") is None and "id" in rec:
                done.add(str(rec["id"]))
    return done


async def run(args) -> int:
    requests = read_requests(args.input)
    finished = done_ids(args.output)
    todo = [(rid, item) for rid, item in requests if rid not in finished]
    print(f"{len(requests)} requests, {len(requests) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    defaults = {
        k: v
        for k, v in (
            ("max_tokens", args.max_tokens),
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("seed", args.seed),
        )
        if v is not None
    }
    # A torn last line from an interrupted run must not glue onto the first new record.
    if os.path.exists(args.output) and os.path.getsize(args.output) > 0:
        with open(args.output, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    else:
        needs_newline = False
    failures = 0
    with open(args.output, "a", encoding="utf-8") as out:
        if needs_newline:
            out.write("\n")

        def write(i: int, r: Result) -> None:
            nonlocal failures
            failures += r.error is not None
            rid, item = todo[i]
            out.write(
                json.dumps(
                    {
                        "id": rid,
                        "text": r.text,
                        "texts": r.texts,
                        "finish_reason": r.finish_reason,
                        "reasoning_content": r.reasoning_content,
                        "usage": r.usage,
                        "error": r.error,
                        "latency": round(r.latency, 4),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
            out.flush()

        async with AsyncClient(
            args.base_url,
            api_key=args.api_key,
            model=args.model,
            max_concurrency=args.concurrency,
            timeout=args.timeout,
            max_retries=args.max_retries,
        ) as client:

            def call(pair):
                _, item = pair
                item = {**defaults, **item}
                if "messages" in item:
                    return client.chat(item.pop("messages"), **item)
                return client.complete(item.pop("prompt"), **item)

            await client._map(todo, call, not args.no_progress, "batch", on_result=write)
    print(f"done: {len(todo) - failures} ok, {failures} failed (re-run to retry them)", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
