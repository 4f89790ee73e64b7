//! Incremental detokenizer for one output sequence, with stop strings applied to its text.
//!
//! Three strategies, picked per tokenizer:
//! - byte-level BPE (Llama 3, Qwen, GPT-2): a token is a fixed byte string, so decoding is
//!   appending bytes and cutting off a trailing incomplete UTF-8 sequence; O(token length),
//!   no decoder call. Equals `decode(output_ids)` exactly, lossy replacement included.
//! - the Llama 2 / Mistral SentencePiece decoder (`▁`→space, byte fallback, fuse, strip the
//!   first space): its rules applied token by token, also without decoder calls. A run of
//!   byte pieces is held until it ends (the decoder judges the run as a whole).
//! - any other decoder (Metaspace, WordPiece, ...): vLLM's prefix_offset/read_offset window.
//!   The text of the newest tokens is the difference between decoding the window with and
//!   without them, so decoder rules that look at neighbouring tokens see the same context as
//!   a full decode; the window holds only the tokens since the last emitted chunk.
//!
//! For the last two the prompt is left context: the output is the text it adds to the
//! prompt's, so the first output token keeps the leading space it has after the prompt (which
//! decoding the output alone would strip).

use std::sync::Arc;

use crate::stop::{StopMatcher, StopSet};
use crate::tokenizer::CoreTokenizer;

/// Prompt tokens decoded as left context for the first output token: as in vLLM, enough for
/// any decoder rule that depends on the previous token.
const PROMPT_CONTEXT_TOKENS: usize = 5;

enum Strategy {
    /// Bytes of an incomplete trailing UTF-8 sequence (at most 3).
    Bytes { pending: Vec<u8> },
    /// SentencePiece decoder followed token by token. `group` holds the bytes of the current
    /// run of byte pieces (`group_from_prompt` of them continue the prompt's last run: the
    /// decoder judges a run as a whole); `at_start`: nothing decoded yet in this run of text,
    /// so its first space is the one the decoder strips.
    Pieces { group: Vec<u8>, group_len: usize, group_from_prompt: usize, at_start: bool },
    /// `ids[..read]` were already emitted and decode to `prefix_text`; `ids[read..]` not yet.
    /// `in_byte_group`: the last token pushed is a byte-fallback piece.
    Window { ids: Vec<u32>, read: usize, prefix_text: String, in_byte_group: bool },
}

/// Incremental detokenizer + stop-string matcher for one output sequence.
pub struct IncrementalDetokenizer {
    tok: Arc<CoreTokenizer>,
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool,
    strategy: Strategy,
    stop: StopMatcher,
    text: String,
    /// Whether `text` is kept. The scheduler turns it off: appending to 1,024 scattered
    /// buffers costs a cache miss each per step, and `replay` rebuilds the text at finish.
    keep_text: bool,
    stop_reason: Option<String>,
    finished: bool,
    /// Stop strings are not matched before this many tokens were pushed (vLLM's min_tokens).
    min_tokens: usize,
    num_pushed: usize,
}

impl IncrementalDetokenizer {
    pub fn new(
        tok: Arc<CoreTokenizer>,
        prompt_token_ids: &[u32],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
        stop: Vec<String>,
        include_stop_str_in_output: bool,
    ) -> Self {
        let stop = Arc::new(StopSet::new(stop));
        Self::with_stop_set(
            tok,
            prompt_token_ids,
            skip_special_tokens,
            spaces_between_special_tokens,
            stop,
            include_stop_str_in_output,
        )
    }

    /// As `new`, with stop strings shared between the sequences of one request.
    pub fn with_stop_set(
        tok: Arc<CoreTokenizer>,
        prompt_token_ids: &[u32],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
        stop: Arc<StopSet>,
        include_stop_str_in_output: bool,
    ) -> Self {
        let stop = StopMatcher::shared(stop, include_stop_str_in_output);
        Self::build(tok, prompt_token_ids, skip_special_tokens, spaces_between_special_tokens, stop)
    }

    fn build(
        tok: Arc<CoreTokenizer>,
        prompt_token_ids: &[u32],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
        stop: StopMatcher,
    ) -> Self {
        let strategy = if tok.byte_table().is_some() {
            Strategy::Bytes { pending: Vec::with_capacity(8) }
        } else if let Some((table, _)) = tok.sentencepiece_table() {
            let visible: Vec<u32> = prompt_token_ids
                .iter()
                .copied()
                .filter(|&id| !(table.get(id).is_empty() || skip_special_tokens && tok.is_special(id)))
                .collect();
            let mut group: Vec<u8> = visible
                .iter()
                .rev()
                .take_while(|&&id| tok.is_byte_piece(id) && (spaces_between_special_tokens || !tok.is_added(id)))
                .map(|&id| table.get(id)[0])
                .collect();
            group.reverse();
            // Whether the text before the prompt's trailing byte run is empty (so far as the
            // Strip decoder is concerned).
            let at_start = match visible[..visible.len() - group.len()].last() {
                Some(&last) => !spaces_between_special_tokens && tok.is_added(last),
                None => true,
            };
            Strategy::Pieces { group_len: group.len(), group_from_prompt: group.len(), group, at_start }
        } else {
            let mut start = prompt_token_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS);
            // Byte-fallback pieces decode as a group: start the context at a group boundary.
            while start > 0 && tok.is_byte_piece(prompt_token_ids[start]) {
                start -= 1;
            }
            let ids = prompt_token_ids[start..].to_vec();
            let prefix_text = tok.decode(&ids, skip_special_tokens, spaces_between_special_tokens);
            Strategy::Window { read: ids.len(), ids, prefix_text, in_byte_group: false }
        };
        IncrementalDetokenizer {
            tok,
            skip_special_tokens,
            spaces_between_special_tokens,
            strategy,
            stop,
            text: String::new(),
            keep_text: true,
            stop_reason: None,
            finished: false,
            min_tokens: 0,
            num_pushed: 0,
        }
    }

    /// Stop strings only end the sequence from its `min_tokens`-th output token on (a stop
    /// string completed earlier is streamed as ordinary text), as in vLLM.
    pub fn with_min_tokens(mut self, min_tokens: usize) -> Self {
        self.min_tokens = min_tokens;
        self
    }

    /// Returns (delta safe to emit, stop string matched by this token). After a match the
    /// sequence is finished and later pushes return nothing.
    pub fn push(&mut self, token_id: u32) -> (String, Option<String>) {
        let mut out = String::new();
        let matched = self.push_into(token_id, &mut out);
        (out, matched.map(|i| self.stop.stop(i).to_owned()))
    }

    /// `push` without allocating: appends the delta to `out` (the scheduler's one text buffer
    /// for the whole step) and returns the index of the stop string matched, if any.
    pub fn push_into(&mut self, token_id: u32, out: &mut String) -> Option<usize> {
        if self.finished {
            return None;
        }
        self.num_pushed += 1;
        let start = out.len();
        self.decode_into(token_id, out);
        self.emit_into(out, start)
    }

    /// `out[start..]` is newly decoded text: cuts it at a stop string (holding back a
    /// possible start of one), keeps what is emitted when `keep_text`, and finishes the
    /// sequence on a match, whose stop-string index it returns.
    fn emit_into(&mut self, out: &mut String, start: usize) -> Option<usize> {
        let matched = self.stop.feed_into(out, start, self.num_pushed >= self.min_tokens);
        if self.keep_text {
            self.text.push_str(&out[start..]);
        }
        if let Some(i) = matched {
            self.finished = true;
            self.stop_reason = Some(self.stop.stop(i).to_owned());
        }
        matched
    }

    /// Cache hint: this detokenizer's own state, which `push_into` is about to read.
    #[inline]
    pub fn prefetch_state(&self) {
        let p = self as *const Self as *const u8;
        for line in 0..std::mem::size_of::<Self>().div_ceil(64) {
            crate::scheduler::prefetch(p.wrapping_add(line * 64));
        }
    }

    /// Stops keeping `text` (see `keep_text`).
    pub fn without_text(mut self) -> Self {
        self.keep_text = false;
        self
    }

    /// The text that a fresh detokenizer with these settings emits for `outputs` after
    /// `prompt`, flushed or not: what this one streamed, since detokenizing is deterministic.
    pub fn replay(&self, prompt: &[u32], outputs: &[u32], flush: bool) -> String {
        let mut d = Self::build(
            self.tok.clone(),
            prompt,
            self.skip_special_tokens,
            self.spaces_between_special_tokens,
            self.stop.fresh(),
        )
        .with_min_tokens(self.min_tokens)
        .without_text();
        let mut out = String::new();
        for &t in outputs {
            d.push_into(t, &mut out);
        }
        if flush {
            out.push_str(&d.flush());
        }
        out
    }

    /// Held-back text, at finish without a stop match (an incomplete UTF-8 tail decodes to
    /// U+FFFD, as a full decode gives). Finishes the sequence.
    pub fn flush(&mut self) -> String {
        if self.finished {
            return String::new();
        }
        let rest = match &mut self.strategy {
            Strategy::Bytes { pending } => {
                let s = String::from_utf8_lossy(pending).into_owned();
                pending.clear();
                s
            }
            Strategy::Pieces { group, group_len, group_from_prompt, at_start } => {
                let mut out = String::new();
                let strip = self.tok.sentencepiece_table().is_some_and(|(_, s)| s);
                close_group(group, group_len, group_from_prompt, at_start, strip, &mut out);
                out
            }
            Strategy::Window { ids, read, prefix_text, .. } => {
                if *read < ids.len() {
                    let full = self.tok.decode(ids, self.skip_special_tokens, self.spaces_between_special_tokens);
                    let delta = suffix_after(&full, prefix_text).to_owned();
                    ids.drain(..*read);
                    *read = ids.len();
                    *prefix_text = full;
                    delta
                } else {
                    String::new()
                }
            }
        };
        let mut out = rest;
        self.emit_into(&mut out, 0);
        if !self.finished {
            let held = self.stop.flush();
            if self.keep_text {
                self.text.push_str(&held);
            }
            out.push_str(&held);
        }
        self.finished = true;
        out
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The stop string that ended the sequence, if one did.
    pub fn stop_reason(&self) -> Option<&str> {
        self.stop_reason.as_deref()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn decode_into(&mut self, id: u32, out: &mut String) {
        if let Strategy::Bytes { pending } = &mut self.strategy {
            let tok = &*self.tok;
            if self.skip_special_tokens && tok.is_special(id) {
                return;
            }
            let table = tok.byte_table().expect("byte strategy only with a byte table");
            if pending.is_empty() {
                if let Some(s) = table.get_str(id) {
                    out.push_str(s);
                    return;
                }
            }
            pending.extend_from_slice(table.get(id));
            let consumed = decode_complete_utf8(pending, out);
            pending.drain(..consumed);
            return;
        }
        let delta = self.decode_next(id);
        out.push_str(&delta);
    }

    /// The SentencePiece and window strategies (the byte strategy is `decode_into`'s).
    fn decode_next(&mut self, id: u32) -> String {
        let tok = &*self.tok;
        match &mut self.strategy {
            Strategy::Bytes { .. } => unreachable!("decode_into handles the byte strategy"),
            Strategy::Pieces { group, group_len, group_from_prompt, at_start } => {
                let (table, strip) = tok.sentencepiece_table().expect("pieces strategy only with a piece table");
                let text = table.get(id);
                // Unknown ids and skipped special tokens never reach the decoder.
                if text.is_empty() || (self.skip_special_tokens && tok.is_special(id)) {
                    return String::new();
                }
                let verbatim = !self.spaces_between_special_tokens && tok.is_added(id);
                if tok.is_byte_piece(id) && !verbatim {
                    group.push(text[0]);
                    *group_len += 1;
                    return String::new();
                }
                let mut out = String::new();
                close_group(group, group_len, group_from_prompt, at_start, strip, &mut out);
                if verbatim {
                    // Decoded apart from the text around it: the next text starts a new run.
                    out.push_str(&tok.inner.id_to_token(id).unwrap_or_default());
                    *at_start = true;
                } else {
                    push_piece_text(std::str::from_utf8(text).unwrap_or_default(), at_start, strip, &mut out);
                }
                out
            }
            Strategy::Window { ids, read, prefix_text, in_byte_group } => {
                // The decoder never sees a skipped token; leaving it out of the window also
                // keeps a run of them from growing the window.
                if self.skip_special_tokens && tok.is_special(id) {
                    return String::new();
                }
                ids.push(id);
                // A byte piece's text depends on the pieces after it (a bad group turns every
                // one of its bytes into U+FFFD): wait for the group to end.
                *in_byte_group = tok.is_byte_piece(id);
                if *in_byte_group {
                    return String::new();
                }
                let full = tok.decode(ids, self.skip_special_tokens, self.spaces_between_special_tokens);
                // A trailing U+FFFD may be an incomplete character that the next token completes.
                if full.len() <= prefix_text.len() || full.ends_with('\u{FFFD}') {
                    return String::new();
                }
                let delta = suffix_after(&full, prefix_text).to_owned();
                ids.drain(..*read);
                *read = ids.len();
                *prefix_text = tok.decode(ids, self.skip_special_tokens, self.spaces_between_special_tokens);
                delta
            }
        }
    }
}

/// Text of a finished run of byte pieces, as ByteFallback decodes it: the run's string when it
/// is valid UTF-8, else U+FFFD for every piece. Only what the pieces after the prompt add to
/// the prompt's part of the run is emitted.
fn close_group(
    group: &mut Vec<u8>,
    group_len: &mut usize,
    group_from_prompt: &mut usize,
    at_start: &mut bool,
    strip: bool,
    out: &mut String,
) {
    if *group_len == 0 {
        return;
    }
    if *group_len > *group_from_prompt {
        let text = |bytes: &[u8], n: usize| -> String {
            let s = match std::str::from_utf8(bytes) {
                Ok(s) => s.to_owned(),
                Err(_) => "\u{FFFD}".repeat(n),
            };
            match s.strip_prefix(' ') {
                Some(rest) if *at_start && strip => rest.to_owned(),
                _ => s,
            }
        };
        let all = text(group, *group_len);
        let prompt_part =
            if *group_from_prompt > 0 { text(&group[..*group_from_prompt], *group_from_prompt) } else { String::new() };
        out.push_str(suffix_after(&all, &prompt_part));
    }
    *at_start = false;
    group.clear();
    *group_len = 0;
    *group_from_prompt = 0;
}

/// The Strip decoder removes one space from the very start of the decoded text.
fn push_piece_text(text: &str, at_start: &mut bool, strip: bool, out: &mut String) {
    if *at_start && !text.is_empty() {
        *at_start = false;
        if strip {
            out.push_str(text.strip_prefix(' ').unwrap_or(text));
            return;
        }
    }
    out.push_str(text);
}

/// Appends the text of `bytes` up to a trailing incomplete UTF-8 sequence, replacing invalid
/// sequences with U+FFFD exactly as `String::from_utf8_lossy` does; returns bytes consumed.
fn decode_complete_utf8(bytes: &[u8], out: &mut String) -> usize {
    let mut pos = 0;
    loop {
        match std::str::from_utf8(&bytes[pos..]) {
            Ok(s) => {
                out.push_str(s);
                return bytes.len();
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // SAFETY-free: from_utf8 just validated this prefix.
                out.push_str(std::str::from_utf8(&bytes[pos..pos + valid]).unwrap_or_default());
                pos += valid;
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        pos += n;
                    }
                    None => return pos,
                }
            }
        }
    }
}

/// `full` minus its leading `prefix`; when a decoder rewrote the end of the prefix (it should
/// not), everything after the common part, cut at a char boundary.
fn suffix_after<'a>(full: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = full
        .char_indices()
        .zip(prefix.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8());
    &full[common..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Feeding bytes in arbitrary chunks gives exactly from_utf8_lossy of the whole.
        #[test]
        fn chunked_utf8_equals_lossy(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(0usize..64, 0..12),
        ) {
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            bounds.push(0);
            bounds.push(bytes.len());
            bounds.sort();
            let mut pending: Vec<u8> = Vec::new();
            let mut out = String::new();
            for w in bounds.windows(2) {
                pending.extend_from_slice(&bytes[w[0]..w[1]]);
                let n = decode_complete_utf8(&pending, &mut out);
                pending.drain(..n);
                prop_assert!(pending.len() <= 3);
            }
            out.push_str(&String::from_utf8_lossy(&pending));
            prop_assert_eq!(out, String::from_utf8_lossy(&bytes).into_owned());
        }
    }

    #[test]
    fn holds_split_multibyte_char() {
        let euro = "€".as_bytes();
        let mut out = String::new();
        assert_eq!(decode_complete_utf8(&euro[..2], &mut out), 0);
        assert_eq!(out, "");
        assert_eq!(decode_complete_utf8(euro, &mut out), 3);
        assert_eq!(out, "€");
    }

    #[test]
    fn suffix_after_handles_rewritten_prefix() {
        assert_eq!(suffix_after("hello world", "hello"), " world");
        assert_eq!(suffix_after("héllo", "hé\u{FFFD}"), "llo");
    }
}
