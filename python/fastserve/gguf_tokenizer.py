"""The tokenizer of a GGUF file, as the Hugging Face tokenizer directory fastserve's Rust
Tokenizer reads (tokenizer.json + tokenizer_config.json + generation_config.json), written
once into the cache (~/.cache/fastserve/gguf-tokenizers/, $FASTSERVE_CACHE overrides).

Two `tokenizer.ggml.model` kinds:
- "gpt2": byte-level BPE from `tokens` + `merges`, with the pre-tokenizer llama.cpp applies
  for `tokenizer.ggml.pre` (the regex split of the original tokenizer.json: "smollm" splits
  digits one by one before the GPT-2 regex, "llama-bpe" is Llama 3's regex with
  ignore_merges, "qwen2" Qwen's regex, ...). transformers' own GGUF conversion uses the
  GPT-2 regex for every llama-architecture file; llama.cpp and the original tokenizers
  differ from it only where a run of two or more whitespace characters precedes a digit
  (SmolLM) or on numbers and newlines (Llama 3), and fastserve follows llama.cpp there.
- "llama": SentencePiece BPE (Llama 2, Mistral v0.1) as a byte-fallback BPE whose merges
  are ranked by the merged piece's score, the way transformers converts it.

Token types (llama.cpp's): CONTROL tokens become special added tokens (skipped by
skip_special_tokens, matched in prompt text as llama.cpp's parse_special does),
USER_DEFINED ones non-special added tokens. BOS/EOS come from `add_bos_token` /
`add_eos_token` (a TemplateProcessing post-processor), the chat template from
`tokenizer.chat_template`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("fastserve")

# Bump when the files written below change, so cached conversions are rebuilt.
_CONVERTER_VERSION = 1

# llama.cpp's llama_token_type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_DIGITS_THEN_GPT2 = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)],
}
_LLAMA3 = {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_REGEX), _byte_level(False)]}
_QWEN2 = {"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _byte_level(False)]}

# tokenizer.ggml.pre -> (pre_tokenizer, normalizer, ignore_merges), grouped as llama.cpp's
# llm_tokenizer_bpe groups them (the same regexes).
_PRE_TOKENIZERS: dict[str, tuple[dict, dict | None, bool]] = {}
for _name in ("gpt2", "mpt", "olmo", "jais"):
    _PRE_TOKENIZERS[_name] = (_byte_level(True), None, False)
for _name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"):
    _PRE_TOKENIZERS[_name] = (_DIGITS_THEN_GPT2, None, False)
for _name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"):
    _PRE_TOKENIZERS[_name] = (_LLAMA3, None, True)
for _name in ("qwen2", "stablelm2", "deepseek-r1-qwen"):
    # Qwen's tokenizer.json normalizes to NFC first (llama.cpp has no normalizers).
    _PRE_TOKENIZERS[_name] = (_QWEN2, {"type": "NFC"}, False)

# Control tokens llama.cpp also treats as end of generation when the file's eos id is
# another one (e.g. a Llama 3 instruct file whose eos is <|end_of_text|>).
_EOG_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|end_of_text|>",
)


def _fields(reader) -> dict[str, Any]:
    from fastserve.gguf_loader import field_value

    names = (
        "model",
        "pre",
        "tokens",
        "token_type",
        "scores",
        "merges",
        "bos_token_id",
        "eos_token_id",
        "eot_token_id",
        "eom_token_id",
        "unknown_token_id",
        "padding_token_id",
        "add_bos_token",
        "add_eos_token",
        "add_space_prefix",
    )
    out = {n: field_value(reader, f"tokenizer.ggml.{n}") for n in names}
    out["chat_template"] = field_value(reader, "tokenizer.chat_template")
    if not out["tokens"]:
        raise ValueError(
            "the GGUF file has no tokenizer (tokenizer.ggml.tokens): pass --tokenizer with a "
            "Hugging Face tokenizer directory"
        )
    n = len(out["tokens"])
    if out["token_type"] is None:
        out["token_type"] = [_NORMAL] * n
    return out


def end_of_generation_ids(reader) -> list[int]:
    """eos, eot and eom ids from the metadata, then the named control tokens llama.cpp also
    stops at; in that order, without repeats."""
    f = _fields(reader)
    ids = [f[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if f[k] is not None]
    tokens, types = f["tokens"], f["token_type"]
    index = {t: i for i, t in enumerate(tokens) if types[i] == _CONTROL and t in _EOG_TEXTS}
    ids += [index[t] for t in _EOG_TEXTS if t in index]
    return list(dict.fromkeys(int(i) for i in ids))


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    out = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty in (_CONTROL, _UNKNOWN, _USER_DEFINED):
            out.append(
                {
                    "id": i,
                    "content": tok,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": ty != _USER_DEFINED,
                }
            )
    return out


def _post_processor(f: dict, add_bos: bool, add_eos: bool) -> dict | None:
    if not (add_bos or add_eos):
        return None
    special: dict[str, dict] = {}
    ends: list[str] = []
    for flag, key in ((add_bos, "bos_token_id"), (add_eos, "eos_token_id")):
        if not flag:
            ends.append("")
            continue
        if f[key] is None or not 0 <= f[key] < len(f["tokens"]):
            raise ValueError(f"the GGUF tokenizer asks for {key[:3].upper()} but has no valid tokenizer.ggml.{key}")
        tok = f["tokens"][f[key]]
        special[tok] = {"id": tok, "ids": [int(f[key])], "tokens": [tok]}
        ends.append(tok)

    def seq(name: str, type_id: int) -> list[dict]:
        out = [{"Sequence": {"id": name, "type_id": type_id}}]
        if ends[0]:
            out.insert(0, {"SpecialToken": {"id": ends[0], "type_id": type_id}})
        if ends[1]:
            out.append({"SpecialToken": {"id": ends[1], "type_id": type_id}})
        return out

    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": special,
    }


def _bpe_model(
    vocab: dict[str, int], merges: list[list[str]], *, unk: str | None, byte_fallback: bool, ignore_merges: bool
) -> dict:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": unk,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": byte_fallback,
        "byte_fallback": byte_fallback,
        "ignore_merges": ignore_merges,
        "vocab": vocab,
        "merges": merges,
    }


def _gpt2_tokenizer(f: dict) -> tuple[dict, bool]:
    pre = f["pre"] or "default"
    if pre not in _PRE_TOKENIZERS:
        logger.warning(
            "GGUF tokenizer.ggml.pre=%r is not one fastserve knows; splitting with the GPT-2 regex "
            "(as transformers does), which may tokenize some text differently from the original",
            pre,
        )
    pre_tokenizer, normalizer, ignore_merges = _PRE_TOKENIZERS.get(pre, (_byte_level(True), None, False))
    merges = []
    for m in f["merges"] or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF merge {m!r} is not two space-separated tokens")
        merges.append(parts)
    vocab = {t: i for i, t in enumerate(f["tokens"])}
    # llama.cpp adds BOS for llama-bpe files whatever add_bos_token says; others default off.
    add_bos = f["add_bos_token"] if f["add_bos_token"] is not None else pre in ("llama3", "llama-v3", "llama-bpe")
    tok = {
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": _bpe_model(vocab, merges, unk=None, byte_fallback=False, ignore_merges=ignore_merges),
    }
    return tok, bool(add_bos)


def _spm_merges(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """Merges for a SentencePiece vocabulary: every split of a piece into two pieces, ranked
    by the merged piece's score (transformers' GGUFTokenizerSkeleton order, so the ranks
    and hence the ids equal transformers' conversion)."""
    score = {t: s for t, s in zip(tokens, scores)}
    merges = []
    for piece, piece_score in score.items():
        local = [
            (piece[:i], piece[i:], piece_score)
            for i in range(1, len(piece))
            if piece[:i] in score and piece[i:] in score
        ]
        local.sort(key=lambda m: (score[m[0]], score[m[1]]), reverse=True)
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: keeps each piece's splits in order
    return [[a, b] for a, b, _ in merges]


def _spm_tokenizer(f: dict) -> tuple[dict, bool]:
    tokens = f["tokens"]
    scores = f["scores"] or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = f["unknown_token_id"]
    unk = tokens[unk_id] if unk_id is not None else None
    # A file may carry its merges; transformers derives them from the scores otherwise.
    merges = [m.split(" ") for m in f["merges"]] if f["merges"] else _spm_merges(tokens, scores)
    prefix = True if f["add_space_prefix"] is None else bool(f["add_space_prefix"])
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = (
        {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]} if prefix else replace
    )
    decoders = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    tok = {
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": _bpe_model(vocab, merges, unk=unk, byte_fallback=True, ignore_merges=False),
    }
    add_bos = True if f["add_bos_token"] is None else f["add_bos_token"]
    return tok, bool(add_bos)


def tokenizer_files(reader) -> dict[str, dict]:
    """{file name: JSON object} of the tokenizer directory for this GGUF file."""
    f = _fields(reader)
    kind = f["model"]
    if kind == "gpt2":
        tok, add_bos = _gpt2_tokenizer(f)
    elif kind == "llama":
        tok, add_bos = _spm_tokenizer(f)
    else:
        raise ValueError(
            f"GGUF tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
            "'llama' SentencePiece); pass --tokenizer with a Hugging Face tokenizer directory"
        )
    add_eos = bool(f["add_eos_token"])
    tokens = f["tokens"]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(tokens, f["token_type"]),
        "normalizer": tok["normalizer"],
        "pre_tokenizer": tok["pre_tokenizer"],
        "post_processor": _post_processor(f, add_bos, add_eos),
        "decoder": tok["decoder"],
        "model": tok["model"],
    }

    def name(key: str) -> str | None:
        i = f[key]
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "unk_token": name("unknown_token_id"),
        "pad_token": name("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if f["chat_template"]:
        config["chat_template"] = f["chat_template"]
    generation = {"eos_token_id": end_of_generation_ids(reader)}
    for key, out in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        if f[key] is not None:
            generation[out] = int(f[key])
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config, "generation_config.json": generation}


def _cache_key(path: str) -> str:
    st = os.stat(path)
    ident = f"{_CONVERTER_VERSION}\0{path}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def gguf_tokenizer_dir(path: str | os.PathLike) -> str:
    """The directory holding this GGUF file's converted tokenizer, written on first use
    (atomically: a temporary directory renamed into place, so concurrent starts are safe)."""
    from fastserve.demo import cache_root
    from fastserve.gguf_loader import open_gguf

    real = os.path.realpath(os.fspath(path))
    stem = Path(real).stem[:64]
    target = cache_root() / "gguf-tokenizers" / f"{stem}-{_cache_key(real)}"
    if (target / "tokenizer.json").is_file():
        return str(target)
    t0 = time.perf_counter()
    files = tokenizer_files(open_gguf(real))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    except OSError as e:  # read-only cache: convert into a private temporary directory instead
        logger.warning("cannot write the tokenizer cache %s (%s); using a temporary directory", target.parent, e)
        target = tmp = Path(tempfile.mkdtemp(prefix="fastserve-gguf-tokenizer-"))
    try:
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
        if tmp != target:
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "tokenizer.json").is_file():  # not a concurrent writer's win
                    raise
    finally:
        if tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "converted the GGUF tokenizer (%s, %d tokens) into %s in %.1f s",
        files["tokenizer.json"]["model"]["type"],
        len(files["tokenizer.json"]["model"]["vocab"]),
        target,
        time.perf_counter() - t0,
    )
    return str(target)
