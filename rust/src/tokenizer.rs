//! Tokenizer: tokenizer.json through the `tokenizers` crate, plus the special-token facts
//! (BOS, EOS ids, added tokens) read from tokenizer_config.json / generation_config.json /
//! config.json, the way Hugging Face `transformers` reads them.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::AddedToken;

pub use crate::detokenizer::IncrementalDetokenizer;

/// Why a tokenizer directory could not be loaded; the Python layer maps `NotFound` to
/// FileNotFoundError and `Invalid` to ValueError.
#[derive(Debug)]
pub enum LoadError {
    NotFound(String),
    Invalid(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::NotFound(m) | LoadError::Invalid(m) => f.write_str(m),
        }
    }
}

/// The Rust-side tokenizer shared (behind an Arc) by the Python `Tokenizer`, every
/// `IncrementalDetokenizer` and the scheduler.
pub struct CoreTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token_id: Option<u32>,
    pub chat_template: Option<String>,
    /// Base vocabulary plus added tokens.
    pub vocab_size: usize,
    /// Indexed by id: added token marked special (dropped by skip_special_tokens).
    special: Vec<bool>,
    /// Indexed by id: any added token (kept verbatim; separated from the text around it by
    /// spaces_between_special_tokens=False decoding).
    added: Vec<bool>,
    /// Indexed by id: a SentencePiece byte-fallback piece `<0xHH>`, present only when the
    /// decoder turns those into bytes. Their text depends on the neighbouring byte pieces, so
    /// the incremental detokenizer must not cut a run of them.
    byte_piece: Vec<bool>,
    /// When the decoder is plain byte-level BPE (GPT-2 / Llama 3 / Qwen), the bytes of every
    /// token laid end to end: decoding is then byte concatenation plus lossy UTF-8, which the
    /// incremental detokenizer does per token without calling the decoder at all.
    byte_level: Option<ByteTable>,
    /// When the decoder is the Llama / Mistral SentencePiece one (`▁`→space, byte fallback,
    /// fuse, optionally strip the first space), every token's text with `▁` already replaced
    /// (a byte piece holds its one byte), and whether the leading space is stripped: the
    /// incremental detokenizer then follows the decoder's rules token by token.
    sentencepiece: Option<(ByteTable, bool)>,
}

pub(crate) struct ByteTable {
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    /// Bit `id` set when token `id`'s bytes are valid UTF-8 on their own (most are): its
    /// text is then taken without validating it per step (16 KB for 128K tokens, so it
    /// stays cached where the per-token check would touch every byte).
    whole_utf8: Vec<u64>,
}

impl ByteTable {
    fn new(bytes: Vec<u8>, offsets: Vec<u32>) -> Self {
        let n = offsets.len().saturating_sub(1);
        let mut whole_utf8 = vec![0u64; n.div_ceil(64)];
        for id in 0..n {
            if std::str::from_utf8(&bytes[offsets[id] as usize..offsets[id + 1] as usize]).is_ok() {
                whole_utf8[id / 64] |= 1 << (id % 64);
            }
        }
        ByteTable { bytes, offsets, whole_utf8 }
    }

    /// Token `id`'s text when its bytes are valid UTF-8 by themselves.
    #[inline]
    pub(crate) fn get_str(&self, id: u32) -> Option<&str> {
        let i = id as usize;
        let word = *self.whole_utf8.get(i / 64)?;
        if word & (1 << (i % 64)) == 0 {
            return None;
        }
        let bytes = &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize];
        // SAFETY: the bit is set only for ids whose bytes passed from_utf8 in `new`, and the
        // table is never modified after that.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    }

    /// Cache hint for `get(id)`: first its offset, then (once that is cached) its bytes.
    #[inline]
    pub(crate) fn prefetch(&self, id: u32, bytes: bool) {
        let i = id as usize;
        if i + 1 >= self.offsets.len() {
            return;
        }
        if bytes {
            crate::scheduler::prefetch(self.bytes.as_ptr().wrapping_add(self.offsets[i] as usize));
        } else {
            crate::scheduler::prefetch(self.offsets.as_ptr().wrapping_add(i));
        }
    }

    #[inline]
    pub(crate) fn get(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.offsets.len() {
            return &[];
        }
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

impl CoreTokenizer {
    pub fn from_dir(path: &str) -> Result<Self, String> {
        Self::load(path).map_err(|e| e.to_string())
    }

    /// `path` is a directory holding tokenizer.json (a path to the tokenizer.json file itself
    /// is accepted too).
    pub fn load(path: &str) -> Result<Self, LoadError> {
        let given = Path::new(path);
        let dir: PathBuf = if given.is_file() {
            given.parent().map(Path::to_path_buf).unwrap_or_default()
        } else if given.is_dir() {
            given.to_path_buf()
        } else {
            return Err(LoadError::NotFound(format!(
                "tokenizer path {path:?} does not exist: pass a directory holding tokenizer.json"
            )));
        };
        let tok_file = if given.is_file() { given.to_path_buf() } else { dir.join("tokenizer.json") };
        if !tok_file.is_file() {
            return Err(LoadError::NotFound(format!(
                "no tokenizer.json in {:?}: a fast (tokenizer.json) Hugging Face tokenizer is required",
                dir
            )));
        }
        let tok_json_text = std::fs::read_to_string(&tok_file)
            .map_err(|e| LoadError::Invalid(format!("cannot read {:?}: {e}", tok_file)))?;
        let mut inner: tokenizers::Tokenizer = tok_json_text
            .parse()
            .map_err(|e| LoadError::Invalid(format!("cannot parse {:?} as a tokenizer.json: {e}", tok_file)))?;
        let tok_json: Value = serde_json::from_str(&tok_json_text)
            .map_err(|e| LoadError::Invalid(format!("cannot parse {:?}: {e}", tok_file)))?;

        let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json(&dir.join("generation_config.json"))?;
        let model_config = read_json(&dir.join("config.json"))?;

        register_config_tokens(&mut inner, &tok_config);

        let token_id = |tok: &tokenizers::Tokenizer, v: Option<&Value>| -> Option<(String, u32)> {
            let content = token_content(v?)?;
            let id = tok.token_to_id(&content)?;
            Some((content, id))
        };
        let bos = token_id(&inner, tok_config.get("bos_token"));
        let eos = token_id(&inner, tok_config.get("eos_token"));
        let pad = token_id(&inner, tok_config.get("pad_token"));

        let mut eos_token_ids: Vec<u32> = Vec::new();
        if let Some((_, id)) = &eos {
            eos_token_ids.push(*id);
        }
        for cfg in [&gen_config, &model_config] {
            for id in ids_of(cfg.get("eos_token_id")) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let pad_token_id = pad.as_ref().map(|p| p.1).or_else(|| {
            [&gen_config, &model_config].iter().find_map(|c| ids_of(c.get("pad_token_id")).first().copied())
        });

        let chat_template = chat_template(&tok_config, &dir)?;

        let vocab_size = inner.get_vocab_size(true);
        let added_tokens = inner.get_added_tokens_decoder();
        let table_len = added_tokens
            .keys()
            .map(|&id| id as usize + 1)
            .chain([vocab_size, inner.get_vocab_size(false)])
            .max()
            .unwrap_or(0);
        let mut special = vec![false; table_len];
        let mut added = vec![false; table_len];
        for (id, t) in added_tokens {
            if (id as usize) < table_len {
                added[id as usize] = true;
                special[id as usize] = t.special;
            }
        }
        let decoder = tok_json.get("decoder").cloned().unwrap_or(Value::Null);
        let byte_level = if is_pure_byte_level(&decoder) { Some(build_byte_table(&inner, table_len)) } else { None };
        let sentencepiece =
            sentencepiece_strip_first(&decoder).map(|strip| (build_piece_table(&inner, table_len), strip));
        let mut byte_piece = vec![false; table_len];
        if has_decoder_type(&decoder, "ByteFallback") {
            for (id, flag) in byte_piece.iter_mut().enumerate() {
                if let Some(t) = inner.id_to_token(id as u32) {
                    *flag = parse_byte_piece(&t).is_some();
                }
            }
        }

        Ok(CoreTokenizer {
            inner,
            eos_token_ids,
            bos_token_id: bos.as_ref().map(|b| b.1),
            bos_token: bos.map(|b| b.0),
            eos_token: eos.map(|e| e.0),
            pad_token_id,
            chat_template,
            vocab_size,
            special,
            added,
            byte_piece,
            byte_level,
            sentencepiece,
        })
    }

    /// Cache hint for detokenizing `id` soon (see `ByteTable::prefetch`).
    #[inline]
    pub fn prefetch_token(&self, id: u32, bytes: bool) {
        if let Some(t) = &self.byte_level {
            t.prefetch(id, bytes);
        }
        if !bytes {
            crate::scheduler::prefetch(self.special.as_ptr().wrapping_add(id as usize));
        }
    }

    #[inline]
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    #[inline]
    pub fn is_added(&self, id: u32) -> bool {
        self.added.get(id as usize).copied().unwrap_or(false)
    }

    #[inline]
    pub(crate) fn is_byte_piece(&self, id: u32) -> bool {
        self.byte_piece.get(id as usize).copied().unwrap_or(false)
    }

    pub(crate) fn byte_table(&self) -> Option<&ByteTable> {
        self.byte_level.as_ref()
    }

    pub(crate) fn sentencepiece_table(&self) -> Option<(&ByteTable, bool)> {
        self.sentencepiece.as_ref().map(|(t, strip)| (t, *strip))
    }

    /// Ids of added tokens marked special, ascending.
    pub fn special_token_ids(&self) -> Vec<u32> {
        (0..self.special.len() as u32).filter(|&i| self.special[i as usize]).collect()
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("cannot encode text: {e}"))
    }

    /// Encodes in parallel (the crate's rayon pool).
    pub fn encode_batch(&self, texts: Vec<String>, add_special_tokens: bool) -> Result<Vec<Vec<u32>>, String> {
        let inputs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        self.inner
            .encode_batch(inputs, add_special_tokens)
            .map(|encs| encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
            .map_err(|e| format!("cannot encode texts: {e}"))
    }

    /// Equals Hugging Face's fast-tokenizer `decode(ids, skip_special_tokens)` when
    /// `spaces_between_special_tokens` is true (the default, as in vLLM). When false, each added
    /// token is emitted verbatim and the text between them is decoded on its own, as the slow
    /// (Python) tokenizers do, so no decoder-inserted space separates an added token from its
    /// neighbours. For byte-level BPE both are identical. Unknown ids are dropped, as HF does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool, spaces_between_special_tokens: bool) -> String {
        if let Some(table) = &self.byte_level {
            let mut bytes = Vec::with_capacity(ids.len() * 4);
            for &id in ids {
                if !(skip_special_tokens && self.is_special(id)) {
                    bytes.extend_from_slice(table.get(id));
                }
            }
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        if spaces_between_special_tokens {
            return self.inner.decode(ids, skip_special_tokens).unwrap_or_default();
        }
        let mut out = String::new();
        let mut run_start = 0;
        for (i, &id) in ids.iter().enumerate() {
            if self.is_added(id) && !(skip_special_tokens && self.is_special(id)) {
                if run_start < i {
                    out.push_str(&self.inner.decode(&ids[run_start..i], skip_special_tokens).unwrap_or_default());
                }
                if let Some(t) = self.inner.id_to_token(id) {
                    out.push_str(&t);
                }
                run_start = i + 1;
            }
        }
        if run_start < ids.len() {
            out.push_str(&self.inner.decode(&ids[run_start..], skip_special_tokens).unwrap_or_default());
        }
        out
    }
}

fn read_json(path: &Path) -> Result<Value, LoadError> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Invalid(format!("cannot read {:?}: {e}", path)))?;
    serde_json::from_str(&text).map_err(|e| LoadError::Invalid(format!("{:?} is not valid JSON: {e}", path)))
}

/// A special token in tokenizer_config.json is either its string or a serialized AddedToken.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

/// transformers registers tokenizer_config's added_tokens_decoder and named special tokens
/// that tokenizer.json lacks in its added vocabulary; do the same so encode/decode agree.
fn register_config_tokens(inner: &mut tokenizers::Tokenizer, cfg: &Value) {
    let known = inner.get_added_tokens_decoder();
    let is_added = |content: &str| known.values().any(|t| t.content == content);
    let mut to_add: Vec<AddedToken> = Vec::new();
    if let Some(Value::Object(dec)) = cfg.get("added_tokens_decoder") {
        let mut entries: Vec<(u32, &Value)> =
            dec.iter().filter_map(|(k, v)| k.parse::<u32>().ok().map(|id| (id, v))).collect();
        entries.sort_by_key(|e| e.0);
        for (id, v) in entries {
            let Some(content) = token_content(v) else { continue };
            // Only tokens the vocabulary already places at that id, or that land exactly there
            // when appended: anything else would shift ids away from the checkpoint's.
            let existing = inner.token_to_id(&content);
            let next = inner.get_vocab_size(true) as u32;
            if is_added(&content) || !(existing == Some(id) || (existing.is_none() && id == next)) {
                continue;
            }
            let special = v.get("special").and_then(Value::as_bool).unwrap_or(false);
            let mut t = AddedToken::from(content, special);
            t.lstrip = v.get("lstrip").and_then(Value::as_bool).unwrap_or(false);
            t.rstrip = v.get("rstrip").and_then(Value::as_bool).unwrap_or(false);
            t.single_word = v.get("single_word").and_then(Value::as_bool).unwrap_or(false);
            t.normalized = v.get("normalized").and_then(Value::as_bool).unwrap_or(!special);
            if special {
                inner.add_special_tokens(&[t]);
            } else {
                inner.add_tokens(&[t]);
            }
        }
    }
    let mut named: Vec<String> =
        ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"]
            .iter()
            .filter_map(|k| cfg.get(*k).and_then(token_content))
            .collect();
    if let Some(Value::Array(extra)) = cfg.get("additional_special_tokens").or_else(|| cfg.get("extra_special_tokens"))
    {
        named.extend(extra.iter().filter_map(token_content));
    }
    let known = inner.get_added_tokens_decoder();
    for content in named {
        if inner.token_to_id(&content).is_some() && !known.values().any(|t| t.content == content) {
            to_add.push(AddedToken::from(content, true));
        }
    }
    if !to_add.is_empty() {
        inner.add_special_tokens(&to_add);
    }
}

fn chat_template(cfg: &Value, dir: &Path) -> Result<Option<String>, LoadError> {
    match cfg.get("chat_template") {
        Some(Value::String(s)) => return Ok(Some(s.clone())),
        // Several named templates: "default" is the one transformers applies.
        Some(Value::Array(list)) => {
            let pick =
                list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default")).or_else(|| list.first());
            return Ok(pick.and_then(|t| t.get("template")).and_then(Value::as_str).map(str::to_owned));
        }
        _ => {}
    }
    let file = dir.join("chat_template.jinja");
    if file.is_file() {
        return std::fs::read_to_string(&file)
            .map(Some)
            .map_err(|e| LoadError::Invalid(format!("cannot read {:?}: {e}", file)));
    }
    Ok(None)
}

fn is_pure_byte_level(decoder: &Value) -> bool {
    match decoder.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => true,
        Some("Sequence") => decoder
            .get("decoders")
            .and_then(Value::as_array)
            .is_some_and(|ds| !ds.is_empty() && ds.iter().all(is_pure_byte_level)),
        _ => false,
    }
}

/// `Some(strip_first_space)` for exactly [Replace("▁", " "), ByteFallback, Fuse] optionally
/// followed by Strip(" ", 1, 0): what transformers' LlamaConverter writes for Llama 2, Mistral,
/// Gemma-style SentencePiece BPE models.
fn sentencepiece_strip_first(decoder: &Value) -> Option<bool> {
    if decoder.get("type")?.as_str()? != "Sequence" {
        return None;
    }
    let ds = decoder.get("decoders")?.as_array()?;
    let ty = |d: &Value| d.get("type").and_then(Value::as_str).unwrap_or("").to_owned();
    if ds.len() < 3 || ds.len() > 4 {
        return None;
    }
    let replace_ok = ty(&ds[0]) == "Replace"
        && ds[0].get("pattern").and_then(|p| p.get("String")).and_then(Value::as_str) == Some("▁")
        && ds[0].get("content").and_then(Value::as_str) == Some(" ");
    if !replace_ok || ty(&ds[1]) != "ByteFallback" || ty(&ds[2]) != "Fuse" {
        return None;
    }
    match ds.get(3) {
        None => Some(false),
        Some(d)
            if ty(d) == "Strip"
                && d.get("content").and_then(Value::as_str) == Some(" ")
                && d.get("start").and_then(Value::as_u64) == Some(1)
                && d.get("stop").and_then(Value::as_u64) == Some(0) =>
        {
            Some(true)
        }
        _ => None,
    }
}

fn build_piece_table(inner: &tokenizers::Tokenizer, table_len: usize) -> ByteTable {
    let mut bytes = Vec::new();
    let mut offsets = Vec::with_capacity(table_len + 1);
    offsets.push(0u32);
    for id in 0..table_len as u32 {
        if let Some(token) = inner.id_to_token(id) {
            match parse_byte_piece(&token) {
                Some(b) => bytes.push(b),
                None => bytes.extend_from_slice(token.replace('▁', " ").as_bytes()),
            }
        }
        offsets.push(bytes.len() as u32);
    }
    ByteTable::new(bytes, offsets)
}

fn has_decoder_type(decoder: &Value, ty: &str) -> bool {
    match decoder.get("type").and_then(Value::as_str) {
        Some(t) if t == ty => true,
        Some("Sequence") => decoder
            .get("decoders")
            .and_then(Value::as_array)
            .is_some_and(|ds| ds.iter().any(|d| has_decoder_type(d, ty))),
        _ => false,
    }
}

fn parse_byte_piece(token: &str) -> Option<u8> {
    let b = token.as_bytes();
    if b.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
        u8::from_str_radix(&token[3..5], 16).ok()
    } else {
        None
    }
}

/// GPT-2's byte <-> printable-char map, as the crate's ByteLevel decoder uses it.
fn char_to_byte() -> ahash::AHashMap<char, u8> {
    let mut bs: Vec<u32> = Vec::new();
    bs.extend(u32::from(b'!')..=u32::from(b'~'));
    bs.extend(0xA1..=0xAC);
    bs.extend(0xAE..=0xFF);
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter().zip(cs).map(|(b, c)| (char::from_u32(c).expect("valid code point"), b as u8)).collect()
}

fn build_byte_table(inner: &tokenizers::Tokenizer, table_len: usize) -> ByteTable {
    let map = char_to_byte();
    let mut bytes = Vec::new();
    let mut offsets = Vec::with_capacity(table_len + 1);
    offsets.push(0u32);
    for id in 0..table_len as u32 {
        if let Some(token) = inner.id_to_token(id) {
            // Same rule as the crate's decoder: a token with any char outside the map (an
            // added token such as "<｜end▁of▁sentence｜>") contributes its own UTF-8 bytes.
            let mapped: Option<Vec<u8>> = token.chars().map(|c| map.get(&c).copied()).collect();
            match mapped {
                Some(b) => bytes.extend_from_slice(&b),
                None => bytes.extend_from_slice(token.as_bytes()),
            }
        }
        offsets.push(bytes.len() as u32);
    }
    ByteTable::new(bytes, offsets)
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Tiny tokenizer directories written to a temp dir, so the Rust tests need no model files.
    use serde_json::json;
    use std::path::PathBuf;

    fn write_dir(name: &str, tokenizer: serde_json::Value, config: serde_json::Value) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fastserve-tok-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_atomic(&dir.join("tokenizer.json"), &tokenizer.to_string());
        write_atomic(&dir.join("tokenizer_config.json"), &config.to_string());
        dir
    }

    /// Tests run in parallel and rebuild the same directories: a reader must never see a file
    /// half written, so each is written aside and renamed into place.
    fn write_atomic(path: &std::path::Path, text: &str) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let tmp = path.with_extension(format!("tmp{}", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn added(id: u32, content: &str, special: bool) -> serde_json::Value {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": !special, "special": special})
    }

    /// GPT-2 style byte-level BPE: the 256 byte chars, a few merges, two special tokens and a
    /// non-special added token.
    pub fn byte_level_dir() -> PathBuf {
        let mut vocab = serde_json::Map::new();
        let mut chars: Vec<(char, u8)> = super::char_to_byte().into_iter().collect();
        chars.sort_by_key(|&(_, b)| b);
        for (c, b) in chars {
            vocab.insert(c.to_string(), json!(b as u32));
        }
        for (i, t) in ["Ġt", "he", "Ġthe", "ä¸", "ĠÃ"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(256 + i as u32));
        }
        let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(261, "<|end|>", true), added(262, "<|start|>", true), added(263, "<tool>", false)],
            "normalizer": null, "pre_tokenizer": bl, "post_processor": bl, "decoder": bl,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab,
                      "merges": [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["ä", "¸"], ["Ġ", "Ã"]]}
        });
        let dir =
            write_dir("bytelevel", tokenizer, json!({"eos_token": "<|end|>", "bos_token": {"content": "<|start|>"}}));
        write_atomic(&dir.join("generation_config.json"), &json!({"eos_token_id": [262, 261]}).to_string());
        dir
    }

    /// Llama 2 / Mistral layout: `▁` spaces, byte-fallback pieces, Strip decoder, `<s>` prefix.
    pub fn sentencepiece_dir() -> PathBuf {
        let decoder = json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        sentencepiece_dir_with("sentencepiece", decoder)
    }

    /// Same model, decoders the per-token fast paths do not cover (the decode-window path).
    pub fn other_decoder_dirs() -> Vec<PathBuf> {
        let reordered = json!({"type": "Sequence", "decoders": [
            {"type": "ByteFallback"},
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        let metaspace = json!({"type": "Sequence", "decoders": [
            {"type": "ByteFallback"},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}]});
        vec![sentencepiece_dir_with("reordered", reordered), sentencepiece_dir_with("metaspace", metaspace)]
    }

    fn sentencepiece_dir_with(name: &str, decoder: serde_json::Value) -> PathBuf {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(i));
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
        }
        for (i, t) in ["▁", "a", "b", "▁a", "ab", "▁ab", "é"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(259 + i as u32));
        }
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(0, "<unk>", true), added(1, "<s>", true), added(2, "</s>", true)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": decoder,
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                      "ignore_merges": false, "vocab": vocab,
                      "merges": [["▁", "a"], ["a", "b"], ["▁a", "b"]]}
        });
        write_dir(name, tokenizer, json!({"bos_token": "<s>", "eos_token": "</s>"}))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use std::sync::Arc;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    #[test]
    fn reads_special_token_facts() {
        let tok = CoreTokenizer::from_dir(byte_level_dir().to_str().unwrap()).unwrap();
        assert_eq!(tok.eos_token_ids, vec![261, 262]);
        assert_eq!(tok.bos_token_id, Some(262));
        assert_eq!(tok.eos_token.as_deref(), Some("<|end|>"));
        assert_eq!(tok.special_token_ids(), vec![261, 262]);
        assert!(tok.is_added(263) && !tok.is_special(263));
        assert_eq!(tok.vocab_size, 264);
        assert!(tok.byte_table().is_some());

        let sp = CoreTokenizer::from_dir(sentencepiece_dir().to_str().unwrap()).unwrap();
        assert!(sp.byte_table().is_none());
        assert!(sp.sentencepiece_table().is_some());
        for dir in other_decoder_dirs() {
            let other = CoreTokenizer::from_dir(dir.to_str().unwrap()).unwrap();
            assert!(other.byte_table().is_none() && other.sentencepiece_table().is_none());
        }
        assert_eq!(sp.encode("ab a", true).unwrap(), vec![1, 264, 262]);
        assert!(sp.is_byte_piece(3 + 0xE2) && !sp.is_byte_piece(262));
    }

    #[test]
    fn load_errors_name_the_path() {
        match CoreTokenizer::load("/nonexistent/tok-dir") {
            Err(LoadError::NotFound(m)) => assert!(m.contains("/nonexistent/tok-dir")),
            _ => panic!("expected NotFound"),
        }
        let dir = std::env::temp_dir().join(format!("fastserve-tok-{}-broken", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{").unwrap();
        match CoreTokenizer::load(dir.to_str().unwrap()) {
            Err(LoadError::Invalid(m)) => assert!(m.contains("tokenizer.json")),
            _ => panic!("expected Invalid"),
        }
    }

    #[test]
    fn byte_table_decode_equals_crate_decode() {
        let tok = CoreTokenizer::from_dir(byte_level_dir().to_str().unwrap()).unwrap();
        let mut seed = 17;
        for _ in 0..500 {
            let ids: Vec<u32> = (0..lcg(&mut seed) % 12).map(|_| lcg(&mut seed) % 266).collect();
            for skip in [true, false] {
                let crate_text = tok.inner.decode(&ids, skip).unwrap();
                assert_eq!(tok.decode(&ids, skip, true), crate_text, "{ids:?}");
                assert_eq!(tok.decode(&ids, skip, false), crate_text, "{ids:?}");
            }
        }
    }

    fn stream(tok: &Arc<CoreTokenizer>, prompt: &[u32], ids: &[u32], skip: bool, spaces: bool) -> String {
        let mut d = IncrementalDetokenizer::new(tok.clone(), prompt, skip, spaces, vec![], false);
        let mut out: String = ids.iter().map(|&i| d.push(i).0).collect();
        out.push_str(&d.flush());
        assert_eq!(d.text(), out);
        out
    }

    #[test]
    fn stream_equals_decode_random_ids() {
        let mut dirs = vec![byte_level_dir(), sentencepiece_dir()];
        dirs.extend(other_decoder_dirs());
        for dir in dirs {
            let tok = Arc::new(CoreTokenizer::from_dir(dir.to_str().unwrap()).unwrap());
            let n = tok.vocab_size as u32;
            let mut seed = 5;
            // Half the draws from the first and last ids (special/added tokens, merged
            // pieces): uniform draws would be almost all single bytes.
            let draw = |seed: &mut u64| {
                let r = lcg(seed);
                if r & 1 == 0 {
                    lcg(seed) % n
                } else {
                    let k = lcg(seed) % 13;
                    if k < 3 {
                        k
                    } else {
                        n - 1 - (k - 3)
                    }
                }
            };
            for _ in 0..1000 {
                let ids: Vec<u32> = (0..lcg(&mut seed) % 16).map(|_| draw(&mut seed)).collect();
                let prompt: Vec<u32> = (0..lcg(&mut seed) % 4).map(|_| draw(&mut seed)).collect();
                for (skip, spaces) in [(true, true), (true, false), (false, true), (false, false)] {
                    let streamed = stream(&tok, &[], &ids, skip, spaces);
                    assert_eq!(streamed, tok.decode(&ids, skip, spaces), "{dir:?} {skip} {spaces} {ids:?}");
                    let full = tok.decode(&[prompt.clone(), ids.clone()].concat(), skip, spaces);
                    let head = tok.decode(&prompt, skip, spaces);
                    if tok.byte_table().is_some() {
                        assert_eq!(stream(&tok, &prompt, &ids, skip, spaces), streamed);
                    } else if let Some(rest) = full.strip_prefix(head.as_str()) {
                        assert_eq!(stream(&tok, &prompt, &ids, skip, spaces), rest, "{prompt:?} {ids:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn sentencepiece_keeps_space_after_prompt_and_holds_byte_groups() {
        let tok = Arc::new(CoreTokenizer::from_dir(sentencepiece_dir().to_str().unwrap()).unwrap());
        // "▁ab" after a prompt is " ab"; decoded alone its space is stripped.
        assert_eq!(stream(&tok, &[1, 262], &[264], true, true), " ab");
        assert_eq!(stream(&tok, &[], &[264], true, true), "ab");
        // "€" as three byte pieces: nothing until the group is complete and closed.
        let euro: Vec<u32> = "€".bytes().map(|b| 3 + b as u32).collect();
        let mut d = IncrementalDetokenizer::new(tok.clone(), &[1], true, true, vec![], false);
        assert_eq!(d.push(euro[0]).0, "");
        assert_eq!(d.push(euro[1]).0, "");
        assert_eq!(d.push(euro[2]).0, "");
        assert_eq!(d.push(260).0, "€a");
        assert_eq!(d.flush(), "");
        // spaces_between_special_tokens=false drops the decoder's space next to added tokens.
        assert_eq!(tok.decode(&[1, 264, 2], false, true), "<s> ab</s>");
        assert_eq!(tok.decode(&[1, 264, 2], false, false), "<s>ab</s>");
    }

    #[test]
    fn stop_strings_through_the_detokenizer() {
        let tok = Arc::new(CoreTokenizer::from_dir(byte_level_dir().to_str().unwrap()).unwrap());
        let ids = tok.encode("say the word then stop", false).unwrap();
        let mut d = IncrementalDetokenizer::new(tok.clone(), &[], true, true, vec!["the w".into()], false);
        let mut out = String::new();
        let mut matched = None;
        for &i in &ids {
            let (delta, m) = d.push(i);
            out.push_str(&delta);
            assert!("say ".starts_with(&out));
            if m.is_some() {
                matched = m;
                break;
            }
        }
        assert_eq!(matched.as_deref(), Some("the w"));
        assert_eq!(out, "say ");
        assert_eq!(d.stop_reason(), Some("the w"));
        assert!(d.is_finished());
        assert_eq!(d.push(ids[0]), (String::new(), None));

        // Below min_tokens the first "the w" streams as text; the second one stops.
        let ids = tok.encode("the word, the way", false).unwrap();
        let first_done = (1..=ids.len()).find(|&n| tok.decode(&ids[..n], true, true).contains("the w")).unwrap();
        let mut d = IncrementalDetokenizer::new(tok.clone(), &[], true, true, vec!["the w".into()], false)
            .with_min_tokens(first_done + 1);
        let mut out = String::new();
        let mut matched = None;
        for &i in &ids {
            let (delta, m) = d.push(i);
            out.push_str(&delta);
            if m.is_some() {
                matched = m;
                break;
            }
        }
        assert_eq!(matched.as_deref(), Some("the w"));
        assert_eq!(out, "the word, ");
    }
}
