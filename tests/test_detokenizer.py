"""fastserve._core.Detokenizer: streamed deltas equal the full decode, stop strings hold back
and cut right. Real byte-level tokenizers (Llama 3, Qwen) and a real SentencePiece model
(Mistral's, shipped in mistral_common) converted to tokenizer.json."""

import itertools
import json
import random
from pathlib import Path

import pytest
from fastserve._core import Detokenizer, Tokenizer
from tiny_models import SHARED_MODELS as MODELS

LLAMA3 = MODELS / "llama3-tokenizer"
QWEN3 = MODELS / "qwen3-tokenizer"
FLAGS = list(itertools.product([True, False], [True, False]))  # (skip_special, spaces_between)

TEXTS = [
    "Hello, world! This is a streaming test.",
    "Die Straße ist naß. Ça va? ¿Qué tal? Ελληνικά. Привет, мир!",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 🤖🚀👨‍👩‍👧‍👦 🇫🇷 ✨ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tprint(f'{x=}')",
    "   leading spaces and   runs   of spaces  ",
    "मराठी, ภาษาไทย, עברית, العربية — mixed scripts",
]


def stream(tok, ids, prompt=(), skip=True, spaces=True, stop=(), include=False):
    d = Detokenizer(tok, list(prompt), skip, spaces, list(stop), include)
    deltas, matched = [], None
    for i in ids:
        delta, m = d.push(i)
        deltas.append(delta)
        if m is not None:
            matched = m
            break
    tail = d.flush() if matched is None else ""
    assert d.text == "".join(deltas) + tail
    return deltas, matched, tail


@pytest.fixture(scope="module", params=[LLAMA3, QWEN3], ids=["llama3", "qwen3"])
def byte_level(request):
    return Tokenizer(str(request.param))


def with_specials(tok, ids, rng):
    ids = list(ids)
    for _ in range(3):
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(tok.special_token_ids))
    return ids


@pytest.mark.parametrize("skip,spaces", FLAGS)
def test_stream_equals_decode_on_text(byte_level, skip, spaces):
    rng = random.Random(3)
    for text in TEXTS:
        ids = with_specials(byte_level, byte_level.encode(text, add_special_tokens=False), rng)
        deltas, matched, tail = stream(byte_level, ids, skip=skip, spaces=spaces)
        assert matched is None
        assert "".join(deltas) + tail == byte_level.decode(ids, skip, spaces)
        # Complete text never leaves anything to flush, and no delta carries a broken char.
        assert tail == ""
        # A special token dropped into the middle of a character's bytes breaks it in the full
        # decode too; otherwise no delta may carry half a character.
        if "\ufffd" not in byte_level.decode(ids, skip, spaces):
            assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("skip,spaces", FLAGS)
def test_stream_equals_decode_on_random_ids(byte_level, skip, spaces):
    rng = random.Random(99)
    for _ in range(100):
        ids = with_specials(byte_level, [rng.randrange(byte_level.vocab_size) for _ in range(60)], rng)
        prompt = [rng.randrange(byte_level.vocab_size) for _ in range(rng.randrange(8))]
        deltas, _, tail = stream(byte_level, ids, prompt=prompt, skip=skip, spaces=spaces)
        assert "".join(deltas) + tail == byte_level.decode(ids, skip, spaces)


def test_multibyte_char_split_across_tokens_is_held(byte_level):
    # Rare CJK / emoji are several byte tokens each in both vocabularies.
    text = "𝔘𝔫𝔦 🦩🦫 龘"
    ids = byte_level.encode(text, add_special_tokens=False)
    pieces = [byte_level.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "test text must split a character across tokens"
    deltas, _, tail = stream(byte_level, ids)
    assert "".join(deltas) == text and tail == ""
    assert "" in deltas  # held back at least once
    assert not any("\ufffd" in d for d in deltas)


def test_incomplete_utf8_at_finish_flushes_replacement(byte_level):
    ids = byte_level.encode("🦩", add_special_tokens=False)
    assert len(ids) > 1
    deltas, _, tail = stream(byte_level, ids[:-1])
    assert deltas == [""] * (len(ids) - 1)
    assert tail == byte_level.decode(ids[:-1]) and tail.endswith("\ufffd")


# --- SentencePiece (`▁` spaces, byte fallback) ---------------------------------------------


def sentencepiece_model():
    mistral_common = pytest.importorskip("mistral_common")
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"mistral_common has no {path.name}")
    return path


@pytest.fixture(scope="module")
def sp_pair(tmp_path_factory):
    """Mistral 7B's SentencePiece BPE model, and the tokenizer.json that transformers'
    LlamaConverter makes of it (legacy Llama/Mistral layout: Prepend+Replace normalizer,
    byte-fallback BPE, Replace/ByteFallback/Fuse/Strip decoder, `<s>` post-processor).
    Built from the model's pieces directly: LlamaConverter itself needs protobuf."""
    spm = pytest.importorskip("sentencepiece")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, normalizers, processors

    model = sentencepiece_model()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # transformers' generate_merges: every split of a piece into two pieces, best score first,
    # ties broken by the longer left part (a reversed sort, which keeps the id order within).
    merges = []
    for piece in vocab:
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += [(left, right, sp.get_score(vocab[piece])) for left, right in local]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    bpe = models.BPE(
        vocab=vocab,
        merges=[(m[0], m[1]) for m in merges],
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    out = tmp_path_factory.mktemp("mistral_sp")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True})
    )
    return Tokenizer(str(out)), sp, tok


SP_TEXTS = TEXTS + ["Hello world", " two  spaces", "龘 rare char and 🦩 flamingo", "x"]


def test_sentencepiece_conversion_matches_sentencepiece(sp_pair):
    ours, sp, _ = sp_pair
    assert ours.bos_token_id == sp.bos_id() and ours.eos_token_ids == [sp.eos_id()]
    for text in SP_TEXTS:
        ids = sp.encode(text)
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.encode(text) == [sp.bos_id()] + ids
        assert ours.decode(ids) == sp.decode(ids), text
        assert ours.decode([sp.bos_id()] + ids) == sp.decode(ids)


def test_sentencepiece_has_byte_fallback_and_spaces(sp_pair):
    ours, sp, _ = sp_pair
    ids = sp.encode("🦩 flies")
    pieces = [sp.id_to_piece(i) for i in ids]
    assert any(p.startswith("<0x") for p in pieces) and any(p.startswith("▁") for p in pieces)


@pytest.mark.parametrize("skip,spaces", FLAGS)
def test_sentencepiece_stream_equals_decode(sp_pair, skip, spaces):
    ours, sp, _ = sp_pair
    for text in SP_TEXTS:
        ids = [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
        deltas, _, tail = stream(ours, ids, skip=skip, spaces=spaces)
        assert "".join(deltas) + tail == ours.decode(ids, skip, spaces), text
        if skip:
            assert "".join(deltas) + tail == sp.decode(ids)


@pytest.mark.parametrize("skip,spaces", FLAGS)
def test_sentencepiece_stream_after_prompt_keeps_leading_space(sp_pair, skip, spaces):
    """Output after a prompt is the text the output adds to the prompt's: the first token's
    `▁` is a real space there, which decoding the output alone would strip."""
    ours, sp, _ = sp_pair
    rng = random.Random(5)
    for text in SP_TEXTS:
        prompt = [sp.bos_id()] + sp.encode("Question: say it")
        out = sp.encode(text)[:]
        deltas, _, tail = stream(ours, out, prompt=prompt, skip=skip, spaces=spaces)
        full = ours.decode(prompt + out, skip, spaces)
        head = ours.decode(prompt, skip, spaces)
        assert full.startswith(head)
        assert "".join(deltas) + tail == full[len(head) :], text
    deltas, _, _ = stream(ours, sp.encode("world"), prompt=sp.encode("Hello"))
    assert deltas[0] == " world"
    # Random ids: no byte group is cut, nothing lost or doubled.
    for _ in range(60):
        prompt = [sp.bos_id()] + [rng.randrange(sp.get_piece_size()) for _ in range(rng.randrange(6))]
        out = [rng.randrange(sp.get_piece_size()) for _ in range(50)]
        # Byte pieces (ids 3..258) are a small part of the vocabulary: add runs of them.
        for _ in range(4):
            pos = rng.randrange(len(out) + 1)
            out[pos:pos] = [rng.randrange(3, 259) for _ in range(rng.randrange(1, 4))]
        deltas, _, tail = stream(ours, out, prompt=prompt, skip=skip, spaces=spaces)
        full = ours.decode(prompt + out, skip, spaces)
        head = ours.decode(prompt, skip, spaces)
        if full.startswith(head):
            assert "".join(deltas) + tail == full[len(head) :]


@pytest.mark.parametrize("skip,spaces", FLAGS)
def test_sentencepiece_random_ids_no_prompt(sp_pair, skip, spaces):
    ours, sp, hf_tok = sp_pair
    rng = random.Random(11)
    for _ in range(80):
        out = [rng.randrange(sp.get_piece_size()) for _ in range(40)]
        for _ in range(4):
            pos = rng.randrange(len(out) + 1)
            out[pos:pos] = [rng.randrange(3, 259) for _ in range(rng.randrange(1, 4))]
        # Special tokens inside byte runs: skipped ones must not end a byte group.
        for _ in range(3):
            out.insert(rng.randrange(len(out) + 1), rng.choice([0, 1, 2]))
        deltas, _, tail = stream(ours, out, skip=skip, spaces=spaces)
        assert "".join(deltas) + tail == ours.decode(out, skip, spaces)
        if spaces:
            assert ours.decode(out, skip, spaces) == hf_tok.decode(out, skip_special_tokens=skip)


def test_spaces_between_special_tokens_false_drops_decoder_space(sp_pair):
    ours, sp, _ = sp_pair
    ids = [sp.bos_id()] + sp.encode("Hello") + [sp.eos_id()]
    assert ours.decode(ids, False, True) == "<s> Hello</s>"  # == HF fast decode
    assert ours.decode(ids, False, False) == "<s>Hello</s>"  # == HF slow tokenizer


# --- stop strings ----------------------------------------------------------------------------


def assert_never_retracted(deltas, final):
    emitted = ""
    for d in deltas:
        emitted += d
        assert final.startswith(emitted)
    assert emitted == final


def stop_case(tok, text, stop):
    ids = tok.encode(text, add_special_tokens=False)
    # The stop string must really straddle a token boundary for the test to mean anything.
    pieces = [tok.decode([i]) for i in ids]
    for s in stop:
        if s in text:
            assert not any(s in p for p in pieces), (s, pieces)
    return ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(byte_level, include):
    text = "The answer is forty-two. ENDOFANSWER and then more text follows"
    ids = stop_case(byte_level, text, ["ENDOFANSWER"])
    deltas, matched, tail = stream(byte_level, ids, stop=["ENDOFANSWER"], include=include)
    assert matched == "ENDOFANSWER" and tail == ""
    cut = text.index("ENDOFANSWER") + (len("ENDOFANSWER") if include else 0)
    assert_never_retracted(deltas, text[:cut])
    # Held back while the stop string was still only a possibility (not with include).
    if not include:
        assert "E" not in "".join(deltas)[len("The answer is forty-two. ") :]


def test_partial_stop_is_held_then_released(byte_level):
    text = "ENDOFANSWE is not the stop string, nor is ENDOFANSWR"
    ids = stop_case(byte_level, text, [])
    d = Detokenizer(byte_level, [], stop=["ENDOFANSWER"])
    emitted = ""
    saw_holdback = False
    for i in ids:
        delta, m = d.push(i)
        assert m is None
        emitted += delta
        decoded = byte_level.decode(ids[: ids.index(i) + 1])
        saw_holdback |= len(emitted) < len(decoded)
    emitted += d.flush()
    assert emitted == text and saw_holdback


def test_several_stop_strings_first_to_complete_wins(byte_level):
    text = "alpha beta gamma delta"
    ids = stop_case(byte_level, text, [])
    deltas, matched, _ = stream(byte_level, ids, stop=["delta", "gamma", "zeta"])
    assert matched == "gamma"
    assert_never_retracted(deltas, "alpha beta ")


def test_stop_string_prefix_of_another(byte_level):
    text = "count: one two three four"
    ids = stop_case(byte_level, text, [])
    deltas, matched, _ = stream(byte_level, ids, stop=["three four", "three"])
    assert matched == "three"
    assert_never_retracted(deltas, "count: one two ")
    deltas, matched, _ = stream(byte_level, ids, stop=["three four", "three"], include=True)
    assert matched == "three"
    assert_never_retracted(deltas, "count: one two three")


def test_stop_inside_one_delta_and_multibyte(byte_level):
    text = "résumé: 🦩 fin 🦫 suite"
    ids = byte_level.encode(text, add_special_tokens=False)
    deltas, matched, _ = stream(byte_level, ids, stop=["🦫"])
    assert matched == "🦫"
    assert_never_retracted(deltas, "résumé: 🦩 fin ")


def test_no_match_flushes_held_text(byte_level):
    text = "ends with a partial sto"
    ids = byte_level.encode(text, add_special_tokens=False)
    deltas, matched, tail = stream(byte_level, ids, stop=["stop"])
    assert matched is None
    assert tail.endswith("sto") and "".join(deltas) + tail == text


def test_push_after_stop_is_inert(byte_level):
    ids = byte_level.encode("a b STOP c d", add_special_tokens=False)
    d = Detokenizer(byte_level, [], stop=["STOP"])
    results = [d.push(i) for i in ids]
    assert [m for _, m in results if m] == ["STOP"]
    assert d.text == "a b " and d.flush() == ""


def test_stop_on_random_text_matches_reference(byte_level):
    """Random words from a tiny alphabet make stop strings hit anywhere, across any boundary."""
    rng = random.Random(2024)
    words = ["ab", "ba", "a", "b", " ", "aab", "€", "ü"]
    for _ in range(200):
        text = "".join(rng.choice(words) for _ in range(rng.randrange(1, 30)))
        stops = ["".join(rng.choice("ab€") for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 4))]
        include = rng.random() < 0.5
        ids = byte_level.encode(text, add_special_tokens=False)
        deltas, matched, tail = stream(byte_level, ids, stop=stops, include=include)
        # Reference: the first stop string to be complete when reading char by char.
        expected, expected_match = text, None
        for end in range(1, len(text) + 1):
            hits = [s for s in stops if text[:end].endswith(s)]
            if hits:
                s = max(hits, key=len)
                expected, expected_match = (text[:end] if include else text[: end - len(s)]), s
                break
        assert matched == expected_match, (text, stops)
        assert_never_retracted(deltas + [tail], expected)


def test_bad_ids_are_value_errors(byte_level):
    d = Detokenizer(byte_level)
    with pytest.raises(ValueError, match="token_id"):
        d.push(-1)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Detokenizer(byte_level, [-3])
