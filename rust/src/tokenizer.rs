//! Tokenizer: tokenizer.json through the `tokenizers` crate, plus the special-token facts
//! (BOS, EOS ids, added tokens) read from tokenizer_config.json / generation_config.json.
//! SKELETON: signatures fixed for the scheduler; bodies are being written.

use std::sync::Arc;

/// The Rust-side tokenizer shared (behind an Arc) by the Python `Tokenizer`, every
/// `IncrementalDetokenizer` and the scheduler.
pub struct CoreTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub eos_token_ids: Vec<u32>,
}

impl CoreTokenizer {
    pub fn from_dir(_path: &str) -> Result<Self, String> {
        unimplemented!()
    }
    pub fn is_special(&self, _id: u32) -> bool {
        unimplemented!()
    }
}

/// Incremental detokenizer + stop-string matcher for one output sequence.
pub struct IncrementalDetokenizer {
    _tok: Arc<CoreTokenizer>,
}

impl IncrementalDetokenizer {
    pub fn new(
        tok: Arc<CoreTokenizer>,
        _prompt_token_ids: &[u32],
        _skip_special_tokens: bool,
        _spaces_between_special_tokens: bool,
        _stop: Vec<String>,
        _include_stop_str_in_output: bool,
    ) -> Self {
        IncrementalDetokenizer { _tok: tok }
    }
    /// Returns (delta safe to emit, stop string matched by this token).
    pub fn push(&mut self, _token_id: u32) -> (String, Option<String>) {
        unimplemented!()
    }
    /// Held-back text, at finish without a stop match.
    pub fn flush(&mut self) -> String {
        unimplemented!()
    }
}
