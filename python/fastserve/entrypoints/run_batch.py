"""`fastserve run-batch -i in.jsonl -o out.jsonl --model M`: vLLM's `run_batch`, an OpenAI
Batch file run on the offline engine.

Each input line is one request of the OpenAI Batch format:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}

(`url` is `/v1/chat/completions` or `/v1/completions`; `body` is what that route takes, with
the server's validation and sampling defaults). Each output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`: `body`
holds the same JSON the server would answer and `error` is null, or, for a request that
cannot run, `status_code` is the HTTP status the server would give, `body` is null and
`error` is `{"message", "type", "param", "code"}`. A line that is not even a request (bad
JSON, no custom_id) is recorded the same way, with `"line"` giving its line number; the job
goes on.

- Throughput: requests go to the engine final-only (no per-token output), kept topped up to
  2 x --max-num-seqs waiting or running, so every step runs a full batch; with
  --data-parallel-size they are dealt to the replicas in chunks.
- Outputs are appended as requests finish (so not in input order: match by custom_id, as
  the OpenAI Batch API says), flushed every second.
- Resumable: custom_ids already in the output file are skipped (a half-written last line
  from an interrupted run is cut off first); --overwrite starts over.
- Progress: a bar over the input's requests with input/output tokens/s; at the end a summary
  JSON (--summary-file, default OUTPUT.summary.json, also printed): total_samples,
  completed, failed, skipped, inference_time_seconds, throughput_samples_per_sec,
  input/output tokens and tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fastserve.entrypoints.engine_flags import add_engine_args
from fastserve.errors import InvalidRequest

logger = logging.getLogger("fastserve")

ROUTES = ("/v1/chat/completions", "/v1/completions")
# Output lines are flushed to disk at least this often (seconds), so a crash loses little.
_FLUSH_INTERVAL_S = 1.0


class BatchRequestInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input-file", required=True, help="The OpenAI Batch JSONL file to run.")
    p.add_argument(
        "-o",
        "--output-file",
        required=True,
        help="JSONL file the results are appended to (ids already there are skipped).",
    )
    p.add_argument(
        "--summary-file", default=None, help="Where the run's summary JSON goes. Default: OUTPUT.summary.json."
    )
    p.add_argument("--overwrite", action="store_true", help="Start over: truncate the output file instead of resuming.")
    p.add_argument("--response-role", default="assistant", help="Role of the chat completions' message.")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="Requests handed to the engine at once (default 2 x --max-num-seqs x replicas).",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    add_engine_args(p)


# -- one line ---------------------------------------------------------------------------------


class LineError(Exception):
    """This line cannot run: recorded as its error with the status the server would answer."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        from fastserve.server.errors import APIError

        self.api = APIError(message, status, param=param, code=code, type=type_)

    @classmethod
    def of(cls, err) -> LineError:
        e = cls.__new__(cls)
        Exception.__init__(e, err.message)
        e.api = err
        return e


@dataclass
class Job:
    """One input line being run: its plan (the server's own preparation of the body: prompts,
    SamplingParams, what formatting the answer needs), one engine request per prompt, and
    their outputs."""

    line: int
    custom_id: str
    url: str
    model: str
    plan: Any  # serving_chat.ChatPlan or serving_completions.CompletionPlan
    finals: dict[int, Any] = field(default_factory=dict)
    error: Exception | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def is_chat(self) -> bool:
        return self.url == ROUTES[0]

    @property
    def prompts(self) -> list[tuple[list[int], Any, str | None]]:
        """(token ids, SamplingParams, text) per engine request."""
        p = self.plan
        if self.is_chat:
            return [(p.prompt_ids, p.params, p.text)]
        return list(zip(p.prompt_ids, p.params, p.texts))


class Preparer:
    """Request bodies -> engine prompts and SamplingParams by the server's own code (decode,
    render, build parameters: server/serving_chat.prepare and serving_completions.prepare),
    and response bodies by the server's formatter (server/responses.py)."""

    def __init__(self, llm, args) -> None:
        from fastserve.chat_template import load_chat_template
        from fastserve.server.reasoning import get_reasoning_parser
        from fastserve.server.state import Serving

        engine = llm.engine
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.served = list(args.served_model_name or [args.model])
        self.serving = Serving(
            tokenizer=engine.tokenizer,
            max_model_len=engine.model_config.max_model_len,
            vocab_size=engine.model_config.vocab_size,
            chat_template=load_chat_template(args.chat_template),
            reasoning_parser=get_reasoning_parser(args.reasoning_parser),
            generation_defaults=llm.default_sampling_params,
            structured=engine.structured,
        )
        # The preparation is the server's coroutine (it may encode a long prompt or compile a
        # grammar off the calling thread); one loop runs it for every line.
        self._loop = asyncio.new_event_loop()

    def close(self) -> None:
        self._loop.close()

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.served:
            return self.served[0] if name is None else name
        raise LineError(
            f"The model `{name}` does not exist; this batch runs {', '.join(self.served)}",
            404,
            param="model",
            code="model_not_found",
        )

    def prepare(self, line_no: int, envelope: BatchRequestInput) -> Job:
        from fastserve.server import protocol, serving_chat, serving_completions
        from fastserve.server.errors import api_error

        if envelope.method.upper() != "POST":
            raise LineError(f"method must be POST, got {envelope.method!r}", param="method")
        if envelope.url not in ROUTES:
            raise LineError(f"url {envelope.url!r} is not supported; supported: {', '.join(ROUTES)}", param="url")
        chat = envelope.url == ROUTES[0]
        req = None
        try:
            req = msgspec.convert(
                envelope.body, type=protocol.ChatCompletionRequest if chat else protocol.CompletionRequest
            )
            req.check()
            if req.stream:
                raise LineError("stream must be false in a batch: the result is written whole", param="stream")
            model = self.check_model(req.model)
            route = serving_chat if chat else serving_completions
            plan = self._loop.run_until_complete(route.prepare(self.serving, req))
            fields = ["messages"] if chat else plan.fields
            job = Job(line_no, envelope.custom_id, envelope.url, model, plan)
            for field_name, (ids, sp, _) in zip(fields, job.prompts):
                self._validate(ids, sp, field_name)
        except LineError:
            raise
        except Exception as e:  # noqa: BLE001 - the server's one mapping decides: a 400 naming the field, or a bug
            err = api_error(e, req)
            if err is None:
                raise
            raise LineError.of(err) from None
        return job

    def _validate(self, ids: list[int], params, field_name: str) -> None:
        """The engine's own prompt checks, here so a line that cannot run fails before any
        of its prompts is queued."""
        try:
            self.engine.validate_prompt(ids, params)
        except InvalidRequest as e:
            # The prompt's field is this line's (prompt[i] / messages); other fields keep their name.
            raise InvalidRequest(e.message, field_name if e.field == "prompt" else e.field) from None

    def body(self, job: Job, response_role: str) -> tuple[dict, int, int]:
        """(response body, prompt tokens, completion tokens): the server's own formatting."""
        from fastserve.server.responses import random_id

        if job.is_chat:
            fmt = job.plan.formatter(self.tokenizer, random_id("chatcmpl"), job.created, job.model, role=response_role)
            body, completion_tokens = fmt.body(job.finals[0])
        else:
            fmt = job.plan.formatter(self.tokenizer, random_id("cmpl"), job.created, job.model)
            body, completion_tokens = fmt.body(job.finals)
        return body, sum(len(ids) for ids, _, _ in job.prompts), completion_tokens


def _record(custom_id: str | None, status: int, body: dict | None, error: dict | None, line: int | None = None) -> dict:
    rec = {
        "id": f"fastserve-{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"fastserve-batch-{uuid.uuid4().hex}", "body": body},
        "error": error,
    }
    if line is not None:
        rec["line"] = line
    return rec


def error_record(custom_id: str | None, err: LineError, line: int | None = None) -> dict:
    return _record(custom_id, err.api.status, None, err.api.body()["error"], line)


def parse_envelope(raw: bytes, line_no: int) -> BatchRequestInput:
    """One input line -> its envelope; LineError (with whatever custom_id it has) otherwise."""
    from fastserve.server.errors import from_validation_error

    try:
        return msgspec.json.decode(raw, type=BatchRequestInput)
    except msgspec.ValidationError as e:
        raise LineError.of(from_validation_error(e)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise LineError(
            f"line {line_no} is not a JSON object ({e}); each line must be one request "
            '{"custom_id", "method", "url", "body"}'
        ) from None


def _salvage_custom_id(raw: bytes) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    cid = value.get("custom_id") if isinstance(value, dict) else None
    return cid if isinstance(cid, str) else None


# -- resume ---------------------------------------------------------------------------------------


def read_done(path: str) -> tuple[set[str], set[int]]:
    """custom_ids (and line numbers of id-less records) already in the output. A last line
    cut short by an interrupted run is removed from the file so appending stays valid JSONL."""
    done_ids: set[str] = set()
    done_lines: set[int] = set()
    if not os.path.exists(path):
        return done_ids, done_lines
    good_end = 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        chunk = data[pos:end]
        try:
            rec = json.loads(chunk)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and nl >= 0:
            if isinstance(rec.get("custom_id"), str):
                done_ids.add(rec["custom_id"])
            elif isinstance(rec.get("line"), int):
                done_lines.add(rec["line"])
            good_end = end
        elif chunk.strip() and nl >= 0:
            logger.warning("output line at byte %d is not JSON; leaving it and going on", pos)
            good_end = end
        pos = end
    if good_end < len(data):
        logger.warning(
            "cutting an incomplete last line (%d bytes) off %s (an interrupted run)", len(data) - good_end, path
        )
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done_ids, done_lines


# -- engines --------------------------------------------------------------------------------------


class StreamingRunner:
    """One engine (any tensor-parallel size): requests added final-only and stepped, their
    outputs handed back as each finishes."""

    def __init__(self, llm) -> None:
        self.engine = llm.engine
        self.in_flight = 0

    def add(self, rid: str, ids: list[int], params, text: str | None) -> None:
        self.engine.add_request(rid, ids, params, prompt=text, final_only=True)
        self.in_flight += 1

    def step(self, flush: bool = False) -> list[tuple[str, Any]]:
        if not self.engine.has_unfinished():
            return []
        done = []
        for state in self.engine.step():
            if state.finished:
                err = self.engine.request_errors.pop(state.request_id, None)
                done.append((state.request_id, err if err is not None else state.to_output()))
        self.in_flight -= len(done)
        return done

    def abort(self, rid: str) -> None:
        self.engine.abort_request(rid)
        self.in_flight -= 1

    def idle(self) -> bool:
        return not self.engine.has_unfinished()


class ChunkedRunner:
    """Data-parallel replicas: requests gathered and dealt to the replicas a chunk at a time."""

    def __init__(self, llm, chunk: int) -> None:
        self.engine = llm.engine
        self.chunk = chunk
        self.pending: list[tuple[str, list[int], Any, str | None]] = []

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def add(self, rid: str, ids: list[int], params, text: str | None) -> None:
        self.pending.append((rid, ids, params, text))

    def step(self, flush: bool = False) -> list[tuple[str, Any]]:
        if not self.pending or (len(self.pending) < self.chunk and not flush):
            return []
        batch, self.pending = self.pending, []
        try:
            outs = self.engine.generate_split(
                [b[3] for b in batch], [b[1] for b in batch], [b[2] for b in batch], use_tqdm=False
            )
        except Exception as e:  # noqa: BLE001 - this chunk fails; the job records it and goes on
            logger.error("a data-parallel chunk of %d requests failed: %s", len(batch), e)
            return [(b[0], e) for b in batch]
        return [(b[0], out) for b, out in zip(batch, outs)]

    def abort(self, rid: str) -> None:
        self.pending = [p for p in self.pending if p[0] != rid]

    def idle(self) -> bool:
        return not self.pending


# -- the job --------------------------------------------------------------------------------------


class BatchRun:
    def __init__(self, args, llm) -> None:
        self.args = args
        self.prep = Preparer(llm, args)
        dp = max(1, args.data_parallel_size)
        self.window = args.max_in_flight or 2 * args.max_num_seqs * dp
        self.runner = ChunkedRunner(llm, self.window) if dp > 1 else StreamingRunner(llm)
        self.jobs: dict[str, tuple[Job, int]] = {}  # engine request id -> (job, prompt index)
        self.open_jobs: dict[int, Job] = {}
        self.counts = {"completed": 0, "failed": 0, "skipped": 0}
        self.tokens = {"input": 0, "output": 0}
        self._next_rid = 0
        self._out = None
        self._last_flush = time.monotonic()

    def write(self, rec: dict) -> None:
        self._out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        now = time.monotonic()
        if now - self._last_flush >= _FLUSH_INTERVAL_S:
            self._out.flush()
            self._last_flush = now

    def _lines(self):
        with open(self.args.input_file, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if raw.strip():
                    yield line_no, raw.strip()

    def _finish_job(self, job: Job) -> None:
        del self.open_jobs[job.line]
        if job.error is not None:
            err = (
                job.error
                if isinstance(job.error, LineError)
                else LineError(
                    f"processing this request failed inside the engine ({job.error}); rerun to retry it",
                    500,
                    code="request_failed",
                )
            )
            self.write(error_record(job.custom_id, err))
            self.counts["failed"] += 1
            return
        body, p_tok, c_tok = self.prep.body(job, self.args.response_role)
        self.write(_record(job.custom_id, 200, body, None))
        self.counts["completed"] += 1
        self.tokens["input"] += p_tok
        self.tokens["output"] += c_tok

    def _collect(self, results, bar) -> None:
        for rid, out in results:
            job, idx = self.jobs.pop(rid)
            if isinstance(out, BaseException):
                job.error = job.error or out
            job.finals[idx] = out
            if len(job.finals) == len(job.prompts):
                self._finish_job(job)
                bar.update(1)

    def run(self, total: int, done_ids: set[str], done_lines: set[int], bar) -> None:
        seen: set[str] = set()
        lines = self._lines()
        exhausted = False
        t0 = time.perf_counter()
        while True:
            while not exhausted and self.runner.in_flight < self.window:
                item = next(lines, None)
                if item is None:
                    exhausted = True
                    break
                self._admit(*item, done_ids, done_lines, seen, bar)
            results = self.runner.step(flush=exhausted)
            self._collect(results, bar)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            if results:
                bar.set_postfix_str(
                    f"input {self.tokens['input'] / elapsed:.1f} tok/s, "
                    f"output {self.tokens['output'] / elapsed:.1f} tok/s",
                    refresh=False,
                )
            if exhausted and not self.jobs:
                break
            if not results and self.jobs and self.runner.idle() and (exhausted or self.runner.in_flight >= self.window):
                raise RuntimeError(f"the engine went idle with {len(self.jobs)} requests unanswered")

    def _admit(self, line_no: int, raw: bytes, done_ids, done_lines, seen, bar) -> None:
        try:
            envelope = parse_envelope(raw, line_no)
        except LineError as e:
            cid = _salvage_custom_id(raw)
            if (cid is not None and cid in done_ids) or (cid is None and line_no in done_lines):
                self.counts["skipped"] += 1
            else:
                self.write(error_record(cid, e, None if cid is not None else line_no))
                self.counts["failed"] += 1
            bar.update(1)
            return
        cid = envelope.custom_id
        if cid in done_ids:
            self.counts["skipped"] += 1
            bar.update(1)
            return
        if cid in seen:
            self.write(
                error_record(
                    cid,
                    LineError(
                        f"custom_id {cid!r} appears more than once in the input (line {line_no}); each request needs "
                        "its own",
                        param="custom_id",
                    ),
                    line_no,
                )
            )
            self.counts["failed"] += 1
            bar.update(1)
            return
        seen.add(cid)
        try:
            job = self.prep.prepare(line_no, envelope)
        except LineError as e:
            self.write(error_record(cid, e))
            self.counts["failed"] += 1
            bar.update(1)
            return
        self.open_jobs[line_no] = job
        added = []
        try:
            for i, (ids, sp, text) in enumerate(job.prompts):
                rid = f"batch-{self._next_rid}"
                self._next_rid += 1
                self.runner.add(rid, ids, sp, text)
                self.jobs[rid] = (job, i)
                added.append(rid)
        except ValueError as e:
            from fastserve.server.errors import api_error

            for rid in added:
                self.runner.abort(rid)
                self.jobs.pop(rid, None)
            job.error = LineError.of(api_error(e, job.plan.req))
            self._finish_job(job)
            bar.update(1)


def _count_requests(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(
        prog="fastserve run-batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_cli_args(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args, tqdm)
    except ValueError as e:  # a bad flag, model directory or input path
        logger.error("%s", e)
        return 2


def _run(args, tqdm) -> int:
    from fastserve.entrypoints.engine_flags import llm_from_cli

    if not os.path.isfile(args.input_file):
        raise ValueError(f"--input-file {args.input_file!r} is not a file")
    if os.path.abspath(args.input_file) == os.path.abspath(args.output_file):
        raise ValueError("--output-file must differ from --input-file")
    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise ValueError("--max-in-flight must be at least 1")
    summary_path = args.summary_file or os.path.splitext(args.output_file)[0] + ".summary.json"
    total = _count_requests(args.input_file)
    if args.overwrite and os.path.exists(args.output_file):
        open(args.output_file, "w").close()
    done_ids, done_lines = read_done(args.output_file)
    if done_ids or done_lines:
        logger.info(
            "resuming: %d requests of %s already answered in %s",
            len(done_ids) + len(done_lines),
            args.input_file,
            args.output_file,
        )
    llm = llm_from_cli(args)
    run = BatchRun(args, llm)
    bar = tqdm(total=total, desc="Running batch", unit="req", dynamic_ncols=True)
    t0 = time.perf_counter()
    code = 0
    try:
        with open(args.output_file, "a", encoding="utf-8") as out:
            run._out = out
            try:
                run.run(total, done_ids, done_lines, bar)
            except KeyboardInterrupt:
                logger.warning(
                    "interrupted: what finished is in %s; run the same command again to resume", args.output_file
                )
                code = 130
            except Exception:  # noqa: BLE001 - the engine failed as a whole: report, keep what finished
                logger.exception(
                    "the batch stopped: the engine failed; what finished is in %s, and running "
                    "the same command again resumes after it",
                    args.output_file,
                )
                code = 1
            finally:
                out.flush()
                os.fsync(out.fileno())
    finally:
        bar.close()
        run.prep.close()
        llm.shutdown()
    elapsed = time.perf_counter() - t0
    processed = run.counts["completed"] + run.counts["failed"]
    summary = {
        "total_samples": total,
        **run.counts,
        "inference_time_seconds": elapsed,
        "throughput_samples_per_sec": processed / elapsed if elapsed > 0 else 0.0,
        "input_tokens": run.tokens["input"],
        "output_tokens": run.tokens["output"],
        "input_tokens_per_sec": run.tokens["input"] / elapsed if elapsed > 0 else 0.0,
        "output_tokens_per_sec": run.tokens["output"] / elapsed if elapsed > 0 else 0.0,
        "input_file": args.input_file,
        "output_file": args.output_file,
        "model": args.model,
        "interrupted": code != 0,
    }
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    logger.info("summary written to %s", summary_path)
    return code
