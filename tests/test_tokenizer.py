"""fastserve._core.Tokenizer against Hugging Face on the real Llama 3 and Qwen tokenizers."""

import json
import random
import shutil
import threading
import time

import pytest
from fastserve._core import Tokenizer
from tiny_models import SHARED_MODELS as MODELS

LLAMA3 = MODELS / "llama3-tokenizer"
QWEN3 = MODELS / "qwen3-tokenizer"
REAL = [pytest.param(LLAMA3, id="llama3"), pytest.param(QWEN3, id="qwen3")]

TEXTS = [
    "Hello, world!",
    " leading space and trailing space ",
    "Die Straße ist naß. Ça va? ¿Qué tal? Ελληνικά κείμενα. Привет, мир!",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 🤖🚀👨‍👩‍👧‍👦 🇫🇷 ✨ — and a lone surrogate-free 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 line",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x != 0: print(f'{x=}')",
    'fn main() { let v: Vec<u8> = vec![0xFF, 0x10]; println!("{:?}", v); }',
    "Line one\r\nLine two\n\n\n    indented\t\ttabs",
    "مرحبا بالعالم — हिन्दी पाठ — ภาษาไทย",
    "<|im_start|>user\nwhat is 2+2?<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "",
    "   ",
    "a" * 300,
]


def hf(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module", params=REAL)
def pair(request):
    path = request.param
    return Tokenizer(str(path)), hf(path), path


def test_special_token_facts():
    llama = Tokenizer(str(LLAMA3))
    assert llama.bos_token_id == 128000
    assert llama.bos_token == "<|begin_of_text|>"
    assert llama.eos_token == "<|eot_id|>"
    # tokenizer_config's eos_token first, then generation_config's list.
    assert llama.eos_token_ids == [128009, 128001]
    assert llama.vocab_size == 128256
    assert "<|start_header_id|>" in llama.chat_template

    qwen = Tokenizer(str(QWEN3))
    assert qwen.bos_token_id is None and qwen.bos_token is None
    assert qwen.eos_token == "<|im_end|>"
    assert qwen.eos_token_ids == [151645, 151643]
    assert qwen.pad_token_id == 151643
    assert qwen.vocab_size == 151669
    assert "<|im_start|>" in qwen.chat_template


def test_properties_match_hf(pair):
    ours, theirs, _ = pair
    assert ours.vocab_size == len(theirs)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.pad_token_id == theirs.pad_token_id
    assert theirs.eos_token_id in ours.eos_token_ids
    hf_special = sorted(i for i, t in theirs.backend_tokenizer.get_added_tokens_decoder().items() if t.special)
    assert ours.special_token_ids == hf_special
    assert set(theirs.all_special_ids) <= set(ours.special_token_ids)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_hf(pair, add_special_tokens):
    ours, theirs, _ = pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special_tokens) == theirs.encode(
            text, add_special_tokens=add_special_tokens
        ), text


def test_encode_batch_equals_encode(pair):
    ours, _, _ = pair
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    assert ours.encode_batch(TEXTS, add_special_tokens=False) == [ours.encode(t, False) for t in TEXTS]
    assert ours.encode_batch([]) == []


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_hf_on_text(pair, skip_special_tokens):
    ours, theirs, _ = pair
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        expected = theirs.decode(ids, skip_special_tokens=skip_special_tokens)
        for spaces in (True, False):
            assert ours.decode(ids, skip_special_tokens, spaces) == expected, text
        if not skip_special_tokens:
            assert expected == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_hf_on_random_ids(pair, skip_special_tokens):
    ours, theirs, _ = pair
    rng = random.Random(1234)
    specials = ours.special_token_ids
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        # Special tokens are rare among 150k ids: mix some in.
        for _ in range(rng.randrange(3)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        assert ours.decode(ids, skip_special_tokens) == theirs.decode(ids, skip_special_tokens=skip_special_tokens)


def test_token_lookup(pair):
    ours, theirs, _ = pair
    rng = random.Random(7)
    for i in [rng.randrange(ours.vocab_size) for _ in range(50)] + ours.special_token_ids[:5]:
        token = theirs.convert_ids_to_tokens(i)
        assert ours.id_to_token(i) == token
        assert ours.token_to_id(token) == i
    assert ours.id_to_token(ours.vocab_size + 10_000) is None
    assert ours.token_to_id("this is surely not one token") is None


def test_llama3_template_post_processor_adds_bos(tmp_path):
    """Meta's released tokenizer.json adds <|begin_of_text|> through a TemplateProcessing
    post-processor (the shared copy has a bare ByteLevel one, so neither HF nor we add it)."""
    for f in LLAMA3.iterdir():
        shutil.copy(f, tmp_path / f.name)
    spec = json.loads((LLAMA3 / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                ],
                "pair": [
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {
                    "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}
                },
            },
        ],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ours, theirs = Tokenizer(str(tmp_path)), hf(tmp_path)
    for text in TEXTS:
        with_bos = ours.encode(text)
        assert with_bos == theirs.encode(text)
        assert with_bos[0] == 128000
        assert with_bos[1:] == ours.encode(text, add_special_tokens=False)
    # Plain shared copy: HF adds nothing, and neither do we.
    assert Tokenizer(str(LLAMA3)).encode("hi")[0] != 128000
    assert Tokenizer(str(QWEN3)).encode("hi") == Tokenizer(str(QWEN3)).encode("hi", add_special_tokens=False)


def test_generation_config_and_config_eos(tmp_path):
    shutil.copy(QWEN3 / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [151643, 151644], "pad_token_id": 151643}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    tok = Tokenizer(str(tmp_path))
    assert tok.eos_token_ids == [151645, 151643, 151644]
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == 151643
    assert tok.chat_template == "{{ messages }}"


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        Tokenizer(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken"):
        Tokenizer(str(broken))
    bad_cfg = tmp_path / "bad_cfg"
    bad_cfg.mkdir()
    shutil.copy(QWEN3 / "tokenizer.json", bad_cfg / "tokenizer.json")
    (bad_cfg / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer(str(bad_cfg))


def test_negative_ids_are_value_errors():
    tok = Tokenizer(str(QWEN3))
    with pytest.raises(ValueError, match="ids"):
        tok.decode([1, -5])


def test_encode_batch_releases_the_gil():
    tok = Tokenizer(str(QWEN3))
    rng = random.Random(0)
    texts = [" ".join(rng.choice(TEXTS) for _ in range(40)) for _ in range(400)]
    t0 = time.perf_counter()
    tok.encode_batch(texts)
    call_s = time.perf_counter() - t0

    done = threading.Event()
    worker = threading.Thread(target=lambda: (tok.encode_batch(texts), done.set()))
    ticks = []
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # Holding the GIL would freeze this loop for the whole call.
    assert len(ticks) > 3 and max(gaps) < max(0.5 * call_s, 0.05), (call_s, max(gaps))
