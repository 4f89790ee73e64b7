"""render_chat: Hugging Face chat templates rendered like transformers' apply_chat_template,
in a sandbox, with the tokenizer's BOS/EOS and the usual template globals."""

from __future__ import annotations

import pytest
from fastserve.chat_template import TemplateError, load_chat_template, render_chat
from tiny_models import SHARED_MODELS as MODELS

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  and 3+3? 你好 🙂 "},
    ],
]


@pytest.fixture(scope="module", params=["qwen3-tokenizer", "llama3-tokenizer"])
def tokenizers(request):
    """(fastserve's Rust tokenizer, transformers' tokenizer) for the same directory."""
    from fastserve._core import Tokenizer
    from transformers import AutoTokenizer

    path = MODELS / request.param
    return Tokenizer(str(path)), AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(tokenizers, messages, add_generation_prompt):
    ours, hf = tokenizers
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render_chat(ours, messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_kwargs(tokenizers):
    ours, hf = tokenizers
    messages = CONVERSATIONS[0]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    got = render_chat(ours, messages, chat_template_kwargs={"enable_thinking": False})
    assert got == expected
    if "im_start" in got:  # Qwen: thinking off writes the empty think block
        assert got.endswith("<think>\n\n</think>\n\n")


def test_bos_eos_globals(tokenizers):
    ours, _ = tokenizers
    template = "{{ bos_token }}|{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    got = render_chat(ours, [{"role": "user", "content": "x"}], chat_template=template)
    assert got == f"{ours.bos_token or ''}|x{ours.eos_token}"


def test_override_and_strftime():
    class Tok:  # a tokenizer without a template: only the override can render
        chat_template = None
        bos_token = "<s>"
        eos_token = "</s>"

    import datetime

    out = render_chat(
        Tok(), [{"role": "user", "content": "q"}], chat_template="{{ strftime_now('%Y') }}:{{ messages[0].content }}"
    )
    assert out == f"{datetime.datetime.now().year}:q"
    with pytest.raises(ValueError, match="--chat-template"):
        render_chat(Tok(), [{"role": "user", "content": "q"}])


def test_template_errors():
    class Tok:
        chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
        bos_token = eos_token = None

    assert render_chat(Tok(), [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError, match="first must be user"):
        render_chat(Tok(), [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="not valid Jinja"):
        render_chat(Tok(), [{"role": "user", "content": "x"}], chat_template="{% for %}")


def test_sandbox_blocks_python_internals():
    class Tok:
        chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
        bos_token = eos_token = None

    with pytest.raises(ValueError):
        render_chat(Tok(), [{"role": "user", "content": "x"}])


def test_continue_final_message(tokenizers):
    ours, hf = tokenizers
    messages = [{"role": "user", "content": "Finish my sentence"}, {"role": "assistant", "content": "The sky is"}]
    got = render_chat(ours, messages, add_generation_prompt=False, continue_final_message=True)
    expected = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert got == expected and got.endswith("The sky is")


def test_load_chat_template(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}!")
    assert load_chat_template(str(f)) == "{{ messages[0]['content'] }}!"
    assert load_chat_template("{{ 'inline' }}") == "{{ 'inline' }}"
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="does not exist"):
        load_chat_template(str(tmp_path / "missing.jinja"))
