//! Stop-string matching over streamed text. Only the newly decoded text plus a short tail is
//! searched each step (never the whole output), and text that could still turn into a stop
//! string is held back so that nothing streamed ever has to be retracted.

use std::sync::Arc;

/// Result of feeding one decoded delta through the matcher.
#[derive(Debug, PartialEq, Eq)]
pub struct StopFeed {
    /// Text now safe to emit.
    pub emit: String,
    /// Index into the stop list of the string that matched (the sequence is then finished).
    pub matched: Option<usize>,
}

/// A request's stop strings, shared by its sequences.
pub struct StopSet {
    stops: Vec<String>,
    /// Longest stop string, in bytes: bounds both the hold-back and the search tail.
    max_len: usize,
    /// Bit b set when some stop string starts with byte b. A match, or a held suffix that
    /// may grow into one, must start at such a byte, so a delta without any (the common
    /// case) is emitted without a search.
    first: [u64; 4],
}

impl StopSet {
    /// Empty stop strings are ignored: they would match before any text.
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut first = [0u64; 4];
        for s in &stops {
            let b = s.as_bytes()[0];
            first[(b >> 6) as usize] |= 1 << (b & 63);
        }
        StopSet { stops, max_len, first }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    #[inline]
    fn any_first_byte(&self, text: &[u8]) -> bool {
        text.iter().any(|&b| self.first[(b >> 6) as usize] & (1 << (b & 63)) != 0)
    }
}

pub struct StopMatcher {
    set: Arc<StopSet>,
    include_stop_str_in_output: bool,
    /// Not yet emitted: the longest suffix that is a proper prefix of some stop string.
    held: String,
    /// With include_stop_str_in_output nothing is held (the stop string is emitted anyway),
    /// but a match may start in text already emitted: keep its last max_len - 1 bytes, from
    /// the first byte that can start a stop string on (empty when none can).
    tail: String,
    finished: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>, include_stop_str_in_output: bool) -> Self {
        Self::shared(Arc::new(StopSet::new(stops)), include_stop_str_in_output)
    }

    pub fn shared(set: Arc<StopSet>, include_stop_str_in_output: bool) -> Self {
        StopMatcher { set, include_stop_str_in_output, held: String::new(), tail: String::new(), finished: false }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// A matcher with the same stop strings and mode, in its initial state.
    pub fn fresh(&self) -> Self {
        Self::shared(self.set.clone(), self.include_stop_str_in_output)
    }

    pub fn stop(&self, index: usize) -> &str {
        &self.set.stops[index]
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    /// `out[start..]` is a new delta: leaves in its place the part safe to emit and returns
    /// the index of the stop string it completed. Searches and allocates only when the delta
    /// holds a byte that can start a stop string or text is already held.
    pub fn feed_into(&mut self, out: &mut String, start: usize, check: bool) -> Option<usize> {
        if self.finished {
            out.truncate(start);
            return None;
        }
        if self.set.is_empty()
            || (self.held.is_empty() && self.tail.is_empty() && !self.set.any_first_byte(&out.as_bytes()[start..]))
        {
            return None;
        }
        let delta = out.split_off(start);
        let fed = self.feed_checked(delta, check);
        out.push_str(&fed.emit);
        fed.matched
    }

    pub fn feed(&mut self, delta: String) -> StopFeed {
        self.feed_checked(delta, true)
    }

    /// With `check` false (below min_tokens, as vLLM does) no match is reported, but a
    /// possible start of a stop string is still held, so that it can complete later.
    pub fn feed_checked(&mut self, delta: String, check: bool) -> StopFeed {
        if self.finished || delta.is_empty() {
            return StopFeed { emit: String::new(), matched: None };
        }
        if self.set.is_empty() {
            return StopFeed { emit: delta, matched: None };
        }
        // `tail` is empty unless include_stop_str_in_output, `held` empty when it is set; in the
        // common case both are empty and `delta` is searched in place.
        let skip = self.tail.len();
        let mut text = if self.tail.is_empty() && self.held.is_empty() {
            delta
        } else {
            let mut t = std::mem::take(if self.include_stop_str_in_output { &mut self.tail } else { &mut self.held });
            t.push_str(&delta);
            t
        };

        // The match that completes first wins, as if the text had arrived one char at a time;
        // among those ending together the longest one (it started first).
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, stop index)
        for (i, s) in self.set.stops.iter().enumerate().filter(|_| check) {
            if let Some(start) = find_bytes(text.as_bytes(), s.as_bytes()) {
                let end = start + s.len();
                let better = match best {
                    None => true,
                    Some((be, bs, _)) => end < be || (end == be && start < bs),
                };
                if better {
                    best = Some((end, start, i));
                }
            }
        }
        if let Some((end, start, i)) = best {
            self.finished = true;
            let cut = if self.include_stop_str_in_output { end } else { start };
            // A match is never found wholly inside `tail` (it would have matched earlier),
            // so `cut >= skip`.
            text.truncate(cut);
            let emit = if skip == 0 { text } else { text[skip.min(cut)..].to_owned() };
            self.held.clear();
            self.tail.clear();
            return StopFeed { emit, matched: Some(i) };
        }

        if self.include_stop_str_in_output {
            let keep = floor_char_boundary(&text, text.len().saturating_sub(self.set.max_len - 1));
            let from = text.as_bytes()[keep..]
                .iter()
                .position(|&b| self.set.any_first_byte(&[b]))
                .map_or(text.len(), |i| keep + i);
            self.tail = text[from..].to_owned();
            let emit = if skip == 0 { text } else { text[skip..].to_owned() };
            return StopFeed { emit, matched: None };
        }

        let hold = self.partial_match_len(&text);
        if hold > 0 {
            self.held = text.split_off(text.len() - hold);
        }
        StopFeed { emit: text, matched: None }
    }

    /// At finish without a match: whatever was held back can go out now.
    pub fn flush(&mut self) -> String {
        self.tail.clear();
        std::mem::take(&mut self.held)
    }

    /// Bytes of the longest suffix of `text` that is a proper prefix of some stop string.
    fn partial_match_len(&self, text: &str) -> usize {
        let bytes = text.as_bytes();
        let from = bytes.len().saturating_sub(self.set.max_len - 1);
        // Earliest start first: the longest suffix wins. Stop strings are valid UTF-8, so a
        // byte-wise prefix match can only begin at a char boundary.
        for start in from..bytes.len() {
            let suffix = &bytes[start..];
            if self.set.stops.iter().any(|s| s.len() > suffix.len() && s.as_bytes().starts_with(suffix)) {
                return suffix.len();
            }
        }
        0
    }
}

/// Naive search: texts here are a few bytes (one token's delta plus a held tail), where setting
/// up `str::find`'s two-way searcher costs more than scanning.
fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > haystack.len() {
        return None;
    }
    let first = needle[0];
    (0..=haystack.len() - needle.len()).find(|&i| haystack[i] == first && haystack[i..].starts_with(needle))
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stops: &[&str], include: bool, pieces: &[&str]) -> (Vec<String>, Option<String>, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut out = Vec::new();
        for p in pieces {
            let f = m.feed(p.to_string());
            out.push(f.emit);
            if let Some(i) = f.matched {
                return (out, Some(m.stop(i).to_owned()), String::new());
            }
        }
        let rest = m.flush();
        (out, None, rest)
    }

    #[test]
    fn holds_back_partial_stop_across_pieces() {
        let (out, matched, _) = run(&["END"], false, &["abc E", "N", "D tail"]);
        assert_eq!(out, vec!["abc ", "", ""]);
        assert_eq!(matched.as_deref(), Some("END"));
    }

    #[test]
    fn releases_false_partial_match() {
        let (out, matched, rest) = run(&["END"], false, &["abc E", "N", "x"]);
        assert_eq!(out, vec!["abc ", "", "ENx"]);
        assert_eq!(matched, None);
        assert_eq!(rest, "");
    }

    #[test]
    fn include_stop_emits_through_stop() {
        let (out, matched, _) = run(&["END"], true, &["abc E", "N", "D tail"]);
        assert_eq!(out.concat(), "abc END");
        assert_eq!(matched.as_deref(), Some("END"));
    }

    #[test]
    fn prefix_stop_completes_first() {
        let (out, matched, _) = run(&["abc", "ab"], false, &["x a", "bc"]);
        assert_eq!(out.concat(), "x ");
        assert_eq!(matched.as_deref(), Some("ab"));
    }

    #[test]
    fn unchecked_feed_holds_but_never_matches() {
        let mut m = StopMatcher::new(vec!["STOP".into()], false);
        assert_eq!(m.feed_checked("a STOP b ST".into(), false), StopFeed { emit: "a STOP b ".into(), matched: None });
        assert_eq!(m.feed_checked("O".into(), true), StopFeed { emit: "".into(), matched: None });
        assert_eq!(m.feed_checked("P!".into(), true), StopFeed { emit: "".into(), matched: Some(0) });
    }

    #[test]
    fn flush_releases_held() {
        let (out, matched, rest) = run(&["stop"], false, &["hello st"]);
        assert_eq!(out, vec!["hello "]);
        assert_eq!(matched, None);
        assert_eq!(rest, "st");
    }

    #[test]
    fn multibyte_stop() {
        let (out, matched, _) = run(&["終了"], false, &["これで終", "了です"]);
        assert_eq!(out.concat(), "これで");
        assert_eq!(matched.as_deref(), Some("終了"));
    }

    /// `run` through `feed_into`: the pieces arrive appended to one growing buffer.
    fn run_into(stops: &[&str], include: bool, pieces: &[&str], check_from: usize) -> (String, Option<String>, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut out = String::from("prefix|");
        for (k, p) in pieces.iter().enumerate() {
            let start = out.len();
            out.push_str(p);
            if let Some(i) = m.feed_into(&mut out, start, k >= check_from) {
                return (out, Some(m.stop(i).to_owned()), String::new());
            }
        }
        let rest = m.flush();
        (out, None, rest)
    }

    proptest! {
        // The in-place feed (with its no-search fast path) emits exactly what `feed` emits.
        #[test]
        fn feed_into_equals_feed(
            pieces in proptest::collection::vec("[abcx€ ]{0,6}", 0..12),
            stops in proptest::collection::vec("[ab€]{1,3}", 1..4),
            include in any::<bool>(),
            check_from in 0usize..4,
        ) {
            let piece_refs: Vec<&str> = pieces.iter().map(|s| s.as_str()).collect();
            let stop_refs: Vec<&str> = stops.iter().map(|s| s.as_str()).collect();
            let mut m = StopMatcher::new(stops.clone(), include);
            let mut emitted = String::from("prefix|");
            let mut matched = None;
            for (k, p) in piece_refs.iter().enumerate() {
                let f = m.feed_checked(p.to_string(), k >= check_from);
                emitted.push_str(&f.emit);
                if let Some(i) = f.matched {
                    matched = Some(m.stop(i).to_owned());
                    break;
                }
            }
            let rest = if matched.is_none() { m.flush() } else { String::new() };
            let (out2, matched2, rest2) = run_into(&stop_refs, include, &piece_refs, check_from);
            prop_assert_eq!(out2, emitted);
            prop_assert_eq!(matched2, matched);
            prop_assert_eq!(rest2, rest);
        }

        // Streaming in arbitrary pieces gives exactly the cut of the whole text at the
        // first-completing stop string, whatever the split points.
        #[test]
        fn streaming_equals_whole_text(
            text in "[ab€ ]{0,40}",
            cuts in proptest::collection::vec(0usize..40, 0..10),
            stops in proptest::collection::vec("[ab€]{1,3}", 1..4),
            include in any::<bool>(),
        ) {
            let chars: Vec<char> = text.chars().collect();
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(chars.len())).collect();
            bounds.push(0);
            bounds.push(chars.len());
            bounds.sort();
            let pieces: Vec<String> = bounds.windows(2)
                .map(|w| chars[w[0]..w[1]].iter().collect()).collect();
            let piece_refs: Vec<&str> = pieces.iter().map(|s| s.as_str()).collect();
            let stop_refs: Vec<&str> = stops.iter().map(|s| s.as_str()).collect();
            let (out, matched, rest) = run(&stop_refs, include, &piece_refs);
            let streamed = out.concat() + &rest;

            // Reference: scan char by char for the first position where some stop ends.
            let mut expected = text.clone();
            let mut expected_match = None;
            let mut prefix = String::new();
            'outer: for c in text.chars() {
                prefix.push(c);
                let mut best: Option<(usize, &str)> = None;
                for s in &stops {
                    if prefix.ends_with(s.as_str()) && best.is_none_or(|(l, _)| s.len() > l) {
                        best = Some((s.len(), s.as_str()));
                    }
                }
                if let Some((l, s)) = best {
                    expected = if include { prefix.clone() } else { prefix[..prefix.len() - l].to_owned() };
                    expected_match = Some(s.to_owned());
                    break 'outer;
                }
            }
            prop_assert_eq!(streamed, expected);
            prop_assert_eq!(matched, expected_match);
        }
    }
}
