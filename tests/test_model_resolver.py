"""Model IDs (`org/name`) through the Hugging Face hub's cache and ModelScope's, with the hub
unreachable: caches are laid out as a finished download leaves them (tests/hub_cache.py),
checked first with huggingface_hub's / modelscope's own readers, then loaded by LLM(...) and
`python -m fastserve`. Also trust_remote_code (accepted; never runs checkpoint code) and the
one-line errors for IDs that are neither cached nor reachable."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
from fastserve import LLM, SamplingParams
from fastserve.model_resolver import resolve_model, resolve_tokenizer
from hub_cache import add_to_hf_cache, add_to_modelscope_cache
from hub_server import HubServer
from server_harness import free_port, subprocess_env
from tiny_models import SHARED_MODELS, make_tiny_checkpoint

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fib(n):"]
HF_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HOME",
    "HF_ENDPOINT",
    "VLLM_USE_MODELSCOPE",
    "FASTSERVE_USE_MODELSCOPE",
    "MODELSCOPE_CACHE",
    "MODELSCOPE_ENDPOINT",
    "MODELSCOPE_DOMAIN",
)


def closed_endpoint() -> str:
    """An http URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in HF_ENV:
        monkeypatch.delenv(name, raising=False)
    # Under .ci/run (HF_HUB_OFFLINE=1 exported before huggingface_hub is imported) the download
    # tests check that fastserve honours the variable as it is at the call, not at import.


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama architecture with the real Llama 3 tokenizer (tied embedding to stay small)."""
    return make_tiny_checkpoint(
        "LlamaForCausalLM",
        tmp_path_factory.mktemp("llama"),
        tokenizer_dir=SHARED_MODELS / "llama3-tokenizer",
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def llama_other(tmp_path_factory):
    """The same shapes, other weights: a second revision."""
    return make_tiny_checkpoint(
        "LlamaForCausalLM",
        tmp_path_factory.mktemp("llama2"),
        tokenizer_dir=SHARED_MODELS / "llama3-tokenizer",
        tie_word_embeddings=True,
        seed=7,
    )


@pytest.fixture(scope="module")
def reference(llama):
    """Greedy tokens of the local checkpoint directory."""
    llm = LLM(model=str(llama), device="cpu", dtype="float32")
    outs = generate(llm)
    llm.shutdown()
    return outs


def generate(llm) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


# -- the cache layout is the real one ----------------------------------------------------------


def test_hf_cache_layout_is_what_huggingface_hub_reads(tmp_path, llama):
    import huggingface_hub

    cache = tmp_path / "hub"
    snapshot = add_to_hf_cache(cache, "NousResearch/Meta-Llama-3-8B-Instruct", llama)
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "NousResearch/Meta-Llama-3-8B-Instruct" and set(repo.refs) == {"main"}
    (rev,) = repo.revisions
    assert {f.file_name for f in rev.files} == {p.name for p in llama.iterdir()}
    assert all(f.blob_path.parent.name == "blobs" for f in rev.files)
    assert huggingface_hub.try_to_load_from_cache(
        "NousResearch/Meta-Llama-3-8B-Instruct", "config.json", cache_dir=cache
    ) == str(snapshot / "config.json")
    assert huggingface_hub.snapshot_download(
        "NousResearch/Meta-Llama-3-8B-Instruct", cache_dir=cache, local_files_only=True
    ) == str(snapshot)


@pytest.mark.parametrize("legacy", [False, True], ids=["layout-1.38", "legacy-layout"])
def test_modelscope_cache_layout_is_what_modelscope_reads(tmp_path, llama, legacy):
    modelscope = pytest.importorskip("modelscope")

    target = add_to_modelscope_cache(tmp_path / "ms", "qwen/Qwen2.5-7B-Instruct", llama, legacy=legacy)
    assert modelscope.snapshot_download(
        "qwen/Qwen2.5-7B-Instruct", cache_dir=str(tmp_path / "ms"), local_files_only=True
    ) == str(target)


# -- Hugging Face IDs --------------------------------------------------------------------------


def test_llm_resolves_id_offline(tmp_path, monkeypatch, llama, reference):
    """`LLM(model="facebook/opt-125m")` with HF_HUB_OFFLINE=1: the cached snapshot loads (a Llama
    tiny checkpoint under that ID), tokens equal the local directory's, the served name is the ID."""
    cache = tmp_path / "hub"
    snapshot = add_to_hf_cache(cache, "facebook/opt-125m", llama)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    llm = LLM(model="facebook/opt-125m", device="cpu", dtype="float32")
    try:
        assert llm.engine.args.model == str(snapshot)
        assert llm.engine.served_model_names == ["facebook/opt-125m"]
        assert generate(llm) == reference
    finally:
        llm.shutdown()


def test_hub_unreachable_falls_back_to_cache_under_hf_home(tmp_path, monkeypatch, llama):
    """Not offline, but the endpoint refuses connections: the cache under HF_HOME/hub is used."""
    snapshot = add_to_hf_cache(tmp_path / "home" / "hub", "org/tiny", llama)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint())
    t0 = time.perf_counter()
    assert resolve_model("org/tiny") == str(snapshot)
    assert time.perf_counter() - t0 < 20


def test_revision_and_download_dir(tmp_path, monkeypatch, llama, llama_other, reference):
    """revision picks refs/<branch> or a commit; download_dir overrides HF_HUB_CACHE."""
    cache = tmp_path / "custom"
    main = add_to_hf_cache(cache, "org/tiny", llama)
    v2 = add_to_hf_cache(cache, "org/tiny", llama_other, revision="v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert resolve_model("org/tiny", download_dir=str(cache)) == str(main)
    assert resolve_model("org/tiny", revision="v2", download_dir=str(cache)) == str(v2)
    assert resolve_model("org/tiny", revision=main.name, download_dir=str(cache)) == str(main)
    llm = LLM(model="org/tiny", revision="v2", download_dir=str(cache), device="cpu", dtype="float32")
    try:
        assert llm.engine.args.model == str(v2)
        assert generate(llm) != reference  # the other weights
    finally:
        llm.shutdown()
    with pytest.raises(ValueError, match="revision v3"):
        resolve_model("org/tiny", revision="v3", download_dir=str(cache))


def test_tokenizer_id_resolves_tokenizer_files_only(tmp_path, monkeypatch, llama, reference):
    """tokenizer="org/tok" (a cache holding only tokenizer files) next to a model directory
    without any; tokenizer=None is the model's own; a tokenizer-only snapshot is no model."""
    cache = tmp_path / "hub"
    # What fastserve fetches for a tokenizer ID (config.json included: the tokenizer reads it).
    tok_files = ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"]
    tok_snapshot = add_to_hf_cache(cache, "meta-llama/Meta-Llama-3-8B-Instruct", llama, files=tok_files)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in llama.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json"):
            (bare / f.name).symlink_to(f)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_tokenizer("meta-llama/Meta-Llama-3-8B-Instruct") == str(tok_snapshot)
    llm = LLM(model=str(bare), tokenizer="meta-llama/Meta-Llama-3-8B-Instruct", device="cpu", dtype="float32")
    try:
        assert llm.engine.args.tokenizer == str(tok_snapshot)
        assert generate(llm) == reference
    finally:
        llm.shutdown()
    with pytest.raises(ValueError, match="holds no weight files") as e:
        resolve_model("meta-llama/Meta-Llama-3-8B-Instruct")
    assert "\n" not in str(e.value)


def test_incomplete_snapshot_names_the_missing_shards(tmp_path, monkeypatch):
    sharded = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    keep = [p.name for p in sharded.iterdir() if p.name != shards[-1]]
    add_to_hf_cache(tmp_path / "hub", "org/sharded", sharded, files=keep)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=shards[-1]):
        resolve_model("org/sharded")
    assert resolve_model("org/sharded", load_format="dummy")  # random weights need no shards


def test_not_cached_offline_fails_in_one_line(tmp_path, monkeypatch):
    cache = tmp_path / "empty-cache"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ValueError) as e:
        LLM(model="org/not-downloaded", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "org" / "not-downloaded") in msg  # the local path it tried
    assert str(cache / "models--org--not-downloaded") in msg  # the cache it looked in
    assert "HF_HUB_OFFLINE=1" in msg and "HF_HUB_CACHE" in msg  # why not the hub, and what to do


def test_not_cached_unreachable_names_the_endpoint(tmp_path, monkeypatch):
    endpoint = closed_endpoint()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(ValueError) as e:
        resolve_model("org/not-downloaded")
    msg = str(e.value)
    assert "\n" not in msg and f"the hub at {endpoint} could not be reached" in msg
    assert str(tmp_path / "hub" / "models--org--not-downloaded") in msg


def test_neither_directory_nor_id(tmp_path):
    with pytest.raises(ValueError, match="neither a local directory") as e:
        resolve_model(str(tmp_path / "no" / "such" / "dir"))
    assert "\n" not in str(e.value)


# -- downloads (a local server speaking the hub's protocol; the real hub is unreachable) ------


def _repo_with_extras(tmp_path, src, extras: dict[str, bytes]):
    repo = tmp_path / "repo"
    shutil.copytree(src, repo)
    for name, data in extras.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    return repo


def test_download_fetches_only_what_the_engine_reads(tmp_path, monkeypatch, llama, reference):
    """LLM(model=ID) against the hub protocol: config, tokenizer files and the safetensors are
    fetched (not the .bin beside them, nor original/, nor the README), huggingface_hub writes its
    cache, and the same ID then resolves offline to the same snapshot."""
    import huggingface_hub

    repo = _repo_with_extras(
        tmp_path,
        llama,
        {
            "pytorch_model.bin": b"must not be fetched",
            "original/consolidated.00.pth": b"nor this",
            "README.md": b"# x",
            ".gitattributes": b"*.safetensors filter=lfs",
        },
    )
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with HubServer({"NousResearch/Meta-Llama-3-8B-Instruct": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        llm = LLM(model="NousResearch/Meta-Llama-3-8B-Instruct", device="cpu", dtype="float32")
        try:
            assert generate(llm) == reference
            snapshot = llm.engine.args.model
        finally:
            llm.shutdown()
        fetched = sorted(f.split("/", 2)[2] for f in hub.fetched)
    assert fetched == sorted(p.name for p in llama.iterdir())
    assert not huggingface_hub.scan_cache_dir(cache).warnings
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("NousResearch/Meta-Llama-3-8B-Instruct") == snapshot


@pytest.mark.parametrize("layout", ["sharded+consolidated", "bin-only"])
def test_download_picks_the_weight_files(tmp_path, monkeypatch, layout):
    """Sharded safetensors fetch the index's shards only (a consolidated copy beside them stays
    on the hub, as in Mistral's repositories); a repository without safetensors fetches its .bin."""
    if layout == "bin-only":
        ckpt = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, save_format="bin")
        repo, weights = ckpt, ["pytorch_model.bin"]
    else:
        ckpt = make_tiny_checkpoint("LlamaForCausalLM", tmp_path, max_shard_size="100KB")
        weights = sorted(p.name for p in ckpt.glob("model-*.safetensors")) + ["model.safetensors.index.json"]
        repo = _repo_with_extras(tmp_path, ckpt, {"consolidated.safetensors": (ckpt / weights[0]).read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with HubServer({"org/tiny": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        snapshot = resolve_model("org/tiny")
        fetched = {f.split("/", 2)[2] for f in hub.fetched}
    assert fetched == {"config.json", "generation_config.json", *weights}
    assert sorted(os.listdir(snapshot)) == sorted(fetched)


def test_download_tokenizer_id_fetches_no_weights(tmp_path, monkeypatch, llama):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with HubServer({"org/tok": llama}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        resolve_tokenizer("org/tok")
        fetched = {f.split("/", 2)[2] for f in hub.fetched}
    assert fetched == {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"}


def test_download_unknown_id_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with HubServer({}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        with pytest.raises(ValueError) as e:
            resolve_model("org/typo")
    msg = str(e.value)
    assert "\n" not in msg and f"the hub at {hub.endpoint} refused 'org/typo'" in msg and "hf auth login" in msg


# -- ModelScope --------------------------------------------------------------------------------

WALKTHROUGH_MODELSCOPE = """
import os
os.environ["VLLM_USE_MODELSCOPE"] = "True"
from fastserve import LLM, SamplingParams
llm = LLM(model="qwen/Qwen2-7B-Instruct", trust_remote_code=True, tokenizer=None, max_model_len=2048)
out = llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
print("RESULT", llm.engine.args.model, llm.engine.served_model_names[0], len(out[0].outputs[0].token_ids))
"""


def test_modelscope_walkthrough(tmp_path):
    """The issue's script, as a user runs it: ModelScope unreachable, its cache pre-filled with a
    Qwen2-architecture tiny checkpoint (real Qwen tokenizer) under qwen/Qwen2-7B-Instruct."""
    pytest.importorskip("modelscope")
    ckpt = make_tiny_checkpoint(
        "Qwen2ForCausalLM",
        tmp_path,
        tokenizer_dir=SHARED_MODELS / "qwen3-tokenizer",
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    target = add_to_modelscope_cache(tmp_path / "ms", "qwen/Qwen2-7B-Instruct", ckpt)
    env = {k: v for k, v in subprocess_env().items() if k not in HF_ENV}
    env.update(
        MODELSCOPE_CACHE=str(tmp_path / "ms"),
        MODELSCOPE_ENDPOINT=closed_endpoint(),
        MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS="1",
        MODELSCOPE_API_MAX_RETRIES="1",
        HF_HUB_CACHE=str(tmp_path / "hf-empty"),
    )
    proc = subprocess.run(
        [sys.executable, "-c", WALKTHROUGH_MODELSCOPE],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"RESULT {target} qwen/Qwen2-7B-Instruct 5" in proc.stdout
    notes = [line for line in proc.stderr.splitlines() if "trust_remote_code=True" in line]
    assert len(notes) == 1 and "own Qwen2ForCausalLM implementation" in notes[0], proc.stderr[-3000:]


def test_modelscope_offline_and_not_cached(tmp_path, monkeypatch, llama):
    pytest.importorskip("modelscope")
    monkeypatch.setenv("FASTSERVE_USE_MODELSCOPE", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    target = add_to_modelscope_cache(tmp_path / "ms", "org/cached", llama)
    assert resolve_model("org/cached") == str(target)
    with pytest.raises(ValueError) as e:
        resolve_model("org/missing")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "ms" / "models" / "org--missing") in msg
    assert "ModelScope cache" in msg and "MODELSCOPE_CACHE" in msg


# -- the server: `python -m fastserve ID --api-key ...` ----------------------------------------


def test_serve_hub_id_with_api_key(tmp_path, llama):
    """`python -m fastserve NousResearch/Meta-Llama-3-8B-Instruct --api-key token-abc123` with the
    hub unreachable and the model in the HF cache: /v1/models names the ID, a chat request with
    the key is answered, one without it is refused."""
    import aiohttp

    cache = tmp_path / "hub"
    add_to_hf_cache(cache, "NousResearch/Meta-Llama-3-8B-Instruct", llama)
    env = {k: v for k, v in subprocess_env().items() if k not in HF_ENV}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=closed_endpoint())
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastserve",
            "NousResearch/Meta-Llama-3-8B-Instruct",
            "--api-key",
            "token-abc123",
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer token-abc123"}
    body = {
        "model": "NousResearch/Meta-Llama-3-8B-Instruct",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hello"}],
    }

    async def talk():
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, "server exited before it was ready"
                try:
                    async with s.get(base + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "server not ready within 180 s"
                await asyncio.sleep(0.5)
            async with s.get(base + "/v1/models", headers=auth) as r:
                models = await r.json()
            async with s.post(base + "/v1/chat/completions", json=body, headers=auth) as r:
                chat = (r.status, await r.json())
            async with s.post(base + "/v1/chat/completions", json=body) as r:
                refused = r.status
            return models, chat, refused

    try:
        models, (status, chat), refused = asyncio.run(talk())
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert [m["id"] for m in models["data"]] == ["NousResearch/Meta-Llama-3-8B-Instruct"], out[-2000:]
    assert status == 200, chat
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] > 0
    assert refused == 401


def test_serve_unresolvable_id_exits_with_one_line(tmp_path):
    env = {k: v for k, v in subprocess_env().items() if k not in HF_ENV}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastserve",
            "serve",
            "org/not-downloaded",
            "--port",
            str(free_port()),
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "could not be resolved" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(tmp_path / "hub" / "models--org--not-downloaded") in lines[0]


# -- trust_remote_code -------------------------------------------------------------------------

REMOTE_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("checkpoint code ran")
"""


def test_trust_remote_code_runs_own_implementation(tmp_path, caplog, monkeypatch, reference, llama):
    """A checkpoint whose config points auto_map at its own modeling file (which would leave a
    marker file if imported) loads with fastserve's Llama; the note is logged once."""
    import fastserve.model_resolver as resolver

    monkeypatch.setattr(resolver, "_remote_code_noted", set())
    ckpt = tmp_path / "remote"
    ckpt.mkdir()
    for f in llama.iterdir():
        (ckpt / f.name).symlink_to(f)
    marker = tmp_path / "marker"
    (ckpt / "modeling_custom.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((llama / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="fastserve"):
        for _ in range(2):
            llm = LLM(model=str(ckpt), trust_remote_code=True, device="cpu", dtype="float32")
            outs = generate(llm)
            llm.shutdown()
    assert outs == reference
    assert not marker.exists()
    notes = [r.getMessage() for r in caplog.records if "trust_remote_code=True" in r.getMessage()]
    assert len(notes) == 1
    assert "own LlamaForCausalLM implementation" in notes[0] and "auto_map is ignored" in notes[0]


def test_trust_remote_code_unsupported_architecture(tmp_path, llama):
    from fastserve.models.registry import supported_architectures

    ckpt = tmp_path / "custom-arch"
    ckpt.mkdir()
    for f in llama.iterdir():
        if f.name != "config.json":
            (ckpt / f.name).symlink_to(f)
    config = json.loads((llama / "config.json").read_text())
    config["architectures"] = ["MyCustomForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        LLM(model=str(ckpt), trust_remote_code=True, device="cpu")
    msg = str(e.value)
    assert "MyCustomForCausalLM" in msg and all(a in msg for a in supported_architectures())
    assert "never runs code" in msg


def test_cli_flags():
    from fastserve.server.app import engine_args_from
    from fastserve.server.cli import parse_args

    args = parse_args(
        [
            "serve",
            "org/name",
            "--trust-remote-code",
            "--revision",
            "v1",
            "--tokenizer-revision",
            "t1",
            "--download-dir",
            "/tmp/dl",
            "--code-revision",
            "c1",
            "--hf-token",
            "hf_x",
        ]
    )
    ea = engine_args_from(args)
    assert (
        ea.model,
        ea.trust_remote_code,
        ea.revision,
        ea.tokenizer_revision,
        ea.download_dir,
        ea.code_revision,
        ea.hf_token,
    ) == ("org/name", True, "v1", "t1", "/tmp/dl", "c1", "hf_x")


# -- OPT, once the registry has it (another branch adds the architecture) ----------------------


def test_opt_checkpoint_under_its_id(tmp_path, monkeypatch):
    from fastserve.models.registry import supported_architectures

    if "OPTForCausalLM" not in supported_architectures():
        pytest.skip("OPTForCausalLM is not in the registry on this branch")
    import torch
    import transformers

    config = transformers.OPTConfig(
        vocab_size=1000,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        init_std=0.3,
    )  # larger than HF's 0.02 so greedy tokens vary
    config.architectures = ["OPTForCausalLM"]
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():  # HF's init (norms 1, biases 0) would hide a mis-loaded norm or bias
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    src = tmp_path / "opt"
    hf.save_pretrained(src)
    add_to_hf_cache(tmp_path / "hub", "facebook/opt-125m", src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    prompt = [2, 100, 200, 300]
    # OPT's GPT-2 tokenizer is not committed: token ids in, token ids compared.
    llm = LLM(
        model="facebook/opt-125m", tokenizer=str(SHARED_MODELS / "llama3-tokenizer"), device="cpu", dtype="float32"
    )
    try:
        out = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    assert list(out) == ref
