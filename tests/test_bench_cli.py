"""`fastserve bench throughput | serve | latency` end to end on CPU: real engines on tiny
checkpoints, the HF baseline through transformers, a real server for `bench serve` (its plot
opened as an image), and the workload samplers against vLLM's algorithm run with the HF
tokenizer."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys

import pytest
from fastserve.__main__ import main as fastserve_main
from tiny_models import SHARED_MODELS, make_tiny_checkpoint

TOKENIZER = SHARED_MODELS / "llama3-tokenizer"
THROUGHPUT_LINE = re.compile(
    r"^Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s$", re.M
)
ENGINE = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "128", "--num-gpu-blocks-override", "64"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """1000-token vocabulary (fast sampling), the llama3 tokenizer beside it."""
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("bench"), vocab_size=1000)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, path / f)
    return path


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The llama3 tokenizer's whole vocabulary, for text prompts."""
    return make_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("bench-full"), tokenizer_dir=TOKENIZER)


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial kings".split()


def sharegpt_file(path, n: int = 8, seed: int = 3):
    rng = random.Random(seed)
    data = [{"id": "not a conversation"}, {"conversations": [{"from": "human", "value": "hi"}]}]
    for i in range(n):
        data.append(
            {
                "id": str(i),
                "conversations": [
                    {"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(1 if i == 0 else 6, 30)))},
                    {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(4, 20)))},
                ],
            }
        )
    path.write_text(json.dumps(data))
    return path


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = fastserve_main(list(map(str, argv)))
    return code, capsys.readouterr().out


def test_throughput_fastserve_prints_vllms_line_and_json(small, tmp_path, capsys):
    out = tmp_path / "t.json"
    code, text = run_cli(
        capsys,
        "bench",
        "throughput",
        "--model",
        small,
        "--input-len",
        8,
        "--output-len",
        6,
        "--num-prompts",
        5,
        "--seed",
        2024,
        *ENGINE,
        "--output-json",
        out,
    )
    assert code == 0
    m = THROUGHPUT_LINE.search(text)
    assert m, text
    assert "Total num prompt tokens:  40" in text and "Total num output tokens:  30" in text
    res = json.loads(out.read_text())
    assert res["num_requests"] == 5 and res["total_num_tokens"] == 70 and res["total_output_tokens"] == 30
    assert res["requests_per_second"] == pytest.approx(5 / res["elapsed_time"])
    assert res["tokens_per_second"] == pytest.approx(70 / res["elapsed_time"])
    assert float(m.group(1)) == pytest.approx(res["requests_per_second"], abs=0.006)
    assert res["backend"] == "fastserve" and res["device"]["gpu"] is None
    assert "Device: CPU" in text


def test_throughput_reports_device_ceilings_and_roofline(small, tmp_path, capsys):
    """The GPU report, from an H200's device_info measured in an earlier run (committed)."""
    from pathlib import Path

    from fastserve.benchmarks.roofline import model_shape, roofline_seconds

    committed = Path(__file__).resolve().parents[1] / "bench/results/throughput-llama3-8b-1000x512x256-h200.json"
    info = json.loads(committed.read_text())["device"]
    (tmp_path / "info.json").write_text(json.dumps(info))
    out = tmp_path / "t.json"
    code, text = run_cli(
        capsys,
        "bench",
        "throughput",
        "--model",
        small,
        "--input-len",
        8,
        "--output-len",
        6,
        "--num-prompts",
        3,
        *ENGINE,
        "--info",
        tmp_path / "info.json",
        "--output-json",
        out,
    )
    assert code == 0
    assert f"Device: {info['gpu']}" in text and "measured copy bandwidth" in text
    res = json.loads(out.read_text())
    shape = model_shape(json.loads((small / "config.json").read_text()))
    bound = roofline_seconds(shape, [8] * 3, [6] * 3, 256, info["copy_bandwidth_gbps"], info["matmul_bf16_tflops"], 4)
    assert res["roofline_s"] == pytest.approx(bound) and bound > 0
    assert res["fraction_of_roofline"] == pytest.approx(bound / res["elapsed_time"])
    assert f"Roofline (lower bound) for this workload: {bound:.2f} s" in text


def test_throughput_hf_backend(small, tmp_path, capsys):
    out = tmp_path / "hf.json"
    code, text = run_cli(
        capsys,
        "bench",
        "throughput",
        "--backend",
        "hf",
        "--hf-max-batch-size",
        3,
        "--model",
        small,
        "--input-len",
        8,
        "--output-len",
        6,
        "--num-prompts",
        5,
        "--seed",
        2024,
        *ENGINE,
        "--output-json",
        out,
    )
    assert code == 0 and THROUGHPUT_LINE.search(text), text
    res = json.loads(out.read_text())
    assert res["backend"] == "hf" and res["num_requests"] == 5 and res["total_num_tokens"] == 70


def test_throughput_flag_errors_are_vllms(small, capsys, caplog):
    assert (
        fastserve_main(
            [
                "bench",
                "throughput",
                "--backend",
                "hf",
                "--model",
                str(small),
                "--input-len",
                "8",
                "--output-len",
                "4",
                *ENGINE,
            ]
        )
        == 2
    )
    assert "--hf-max-batch-size" in caplog.text
    assert fastserve_main(["bench", "throughput", "--model", str(small), "--output-len", "4", *ENGINE]) == 2
    assert "--input-len must be provided for a random dataset" in caplog.text
    assert (
        fastserve_main(
            [
                "bench",
                "throughput",
                "--model",
                str(small),
                "--input-len",
                "100",
                "--output-len",
                "100",
                "--num-prompts",
                "1",
                *ENGINE,
            ]
        )
        == 2
    )
    assert "max_model_len" in caplog.text


def test_hf_backend_needs_transformers_only_when_used(monkeypatch, small):
    from fastserve._core import Tokenizer
    from fastserve.benchmarks.datasets import SampleRequest
    from fastserve.benchmarks.throughput import run_hf

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ValueError, match="needs transformers"):
        run_hf([SampleRequest([1, 2, 3], 2)], str(small), Tokenizer(str(small)), 1, 1)


def test_throughput_sharegpt_dataset(full, tmp_path, capsys):
    data = sharegpt_file(tmp_path / "sharegpt.json")
    out = tmp_path / "sg.json"
    code, text = run_cli(
        capsys,
        "bench",
        "throughput",
        "--model",
        full,
        "--dataset",
        data,
        "--num-prompts",
        3,
        "--output-len",
        4,
        "--seed",
        1,
        *ENGINE,
        "--output-json",
        out,
    )
    assert code == 0 and THROUGHPUT_LINE.search(text), text
    res = json.loads(out.read_text())
    expected = vllm_sharegpt_reference(data, full, num=3, seed=1, output_len=4)
    assert res["total_prompt_tokens"] == sum(p for p, _ in expected)
    assert res["total_output_tokens"] == 12


def vllm_sharegpt_reference(path, tokenizer_dir, num: int, seed: int, output_len: int | None):
    """vLLM's ShareGPTDataset.sample, written out with the HF tokenizer: [(prompt_len, output_len)]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = [e for e in json.loads(path.read_text()) if "conversations" in e and len(e["conversations"]) >= 2]
    random.seed(seed)
    random.shuffle(data)
    out = []
    for e in data:
        if len(out) >= num:
            break
        p = len(tok(e["conversations"][0]["value"]).input_ids)
        c = len(tok(e["conversations"][1]["value"]).input_ids) if output_len is None else output_len
        if p < 4 or (output_len is None and c < 4) or p > 1024 or p + c > 2048:
            continue
        out.append((p, c))
    return out


def test_sharegpt_sampling_matches_vllms(full, tmp_path):
    from fastserve._core import Tokenizer
    from fastserve.benchmarks.datasets import sample_sharegpt

    data = sharegpt_file(tmp_path / "sharegpt.json", n=12, seed=9)
    tok = Tokenizer(str(full))
    for seed in (0, 5):
        got = sample_sharegpt(str(data), tok, 6, seed=seed, chunk=4)
        assert [(s.prompt_len, s.expected_output_len) for s in got] == vllm_sharegpt_reference(
            data, full, 6, seed, None
        )
        assert all(s.prompt is not None for s in got)
    # More requests than usable conversations: drawn again from them (vLLM's oversampling).
    many = sample_sharegpt(str(data), tok, 30, seed=0)
    assert len(many) == 30 and len({s.prompt for s in many}) < 30


def test_random_sampling_lengths_and_tokens(small):
    from fastserve._core import Tokenizer
    from fastserve.benchmarks.datasets import sample_random

    tok = Tokenizer(str(small))
    reqs = sample_random(tok, 50, 20, 10, range_ratio=0.5, prefix_len=4, seed=7, vocab_size=1000)
    assert all(4 + 10 <= r.prompt_len <= 4 + 30 and 5 <= r.expected_output_len <= 15 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 3
    assert all(0 <= t < 1000 for r in reqs for t in r.prompt_token_ids)
    assert len({tuple(r.prompt_token_ids[:4]) for r in reqs}) == 1  # the shared prefix
    again = sample_random(tok, 50, 20, 10, range_ratio=0.5, prefix_len=4, seed=7, vocab_size=1000)
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in reqs]
    full = sample_random(tok, 20, 30, 5, seed=1)
    special = set(tok.special_token_ids) | set(tok.eos_token_ids) | {tok.bos_token_id}
    assert not special & {t for r in full for t in r.prompt_token_ids}


def test_latency_batch_size_sweep(small, tmp_path, capsys):
    out = tmp_path / "lat.json"
    code, text = run_cli(
        capsys,
        "bench",
        "latency",
        "--model",
        small,
        "--input-len",
        6,
        "--output-len",
        4,
        "--batch-size",
        1,
        3,
        "--num-iters-warmup",
        1,
        "--num-iters",
        2,
        *ENGINE,
        "--output-json",
        out,
    )
    assert code == 0
    assert "Batch size 1: Avg latency:" in text and "Batch size 3: Avg latency:" in text
    res = json.loads(out.read_text())
    assert [r["batch_size"] for r in res["results"]] == [1, 3]
    for r in res["results"]:
        assert len(r["latencies"]) == 2 and r["avg_latency"] > 0
        assert r["decode_steps"] == 3  # output_len - 1 steps after the prefill
        assert 0 < r["prefill_latency_s"] < r["avg_latency"]
        assert r["decode_step_ms"]["50"] > 0 and r["decode_tokens_per_s"] > 0


def test_bench_serve_sweep_sharegpt_and_plot(full, tmp_path, capsys):
    from PIL import Image
    from server_harness import ServerThread

    server = ServerThread(["--model", str(full), *ENGINE, "--served-model-name", "tiny"]).start()
    try:
        result, png = tmp_path / "serve.json", tmp_path / "serve.png"
        code, _ = run_cli(
            capsys,
            "bench",
            "serve",
            "--base-url",
            server.base_url,
            "--num-prompts",
            3,
            "--input-len",
            8,
            "--output-len",
            4,
            "--request-rate",
            "inf",
            50,
            "--warmup",
            0,
            "--result",
            result,
            "--plot",
            png,
        )
        assert code == 0
        res = json.loads(result.read_text())
        assert res["model"] == "tiny" and [r["request_rate"] for r in res["runs"]] == ["inf", 50.0]
        for r in res["runs"]:
            assert r["completed"] == 3 and r["errors"] == 0 and r["total_output_tokens"] == 12
            assert r["total_input_tokens"] == 24
            assert r["ttft_s"]["p50"] > 0 and r["tpot_s"]["p50"] > 0 and r["output_token_throughput"] > 0
        from fastserve.benchmarks.plot import DPI, FIGSIZE

        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
            colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colors is None or len(colors) > 50  # lines, text and axes, not a blank canvas

        # ShareGPT, counted through the server's /tokenize, with a burstier arrival.
        data = sharegpt_file(tmp_path / "sharegpt.json")
        code, _ = run_cli(
            capsys,
            "bench",
            "serve",
            "--base-url",
            server.base_url,
            "--dataset-path",
            data,
            "--num-prompts",
            2,
            "--sharegpt-output-len",
            3,
            "--request-rate",
            20,
            "--burstiness",
            0.5,
            "--warmup",
            0,
            "--result",
            result,
        )
        assert code == 0
        res = json.loads(result.read_text())
        (run,) = res["runs"]
        expected = vllm_sharegpt_reference(data, full, num=2, seed=0, output_len=3)
        assert run["completed"] == 2 and run["total_output_tokens"] == 6
        assert run["total_input_tokens"] == sum(p for p, _ in expected)
    finally:
        server.stop()


def test_commands_are_wired_into_the_console_script():
    from server_harness import subprocess_env

    for argv in (["bench", "--help"], ["bench", "throughput", "--help"], ["run-batch", "--help"]):
        r = subprocess.run(
            [sys.executable, "-m", "fastserve", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=subprocess_env(),
        )
        assert r.returncode == 0, r.stderr
    assert "--tensor-parallel-size" in r.stdout and "--input-file" in r.stdout
