//! Finishing: appending a sampled token, the stop rules and their precedence, and the
//! outputs of finished and aborted sequences.

use std::sync::Arc;

use super::{req_ref, seq_mut, seq_ref, Scheduler, SeqStatus};
use crate::sequence::{FinishReason, StopReason};

/// A sequence that finished this step (or was aborted since the last update), with its
/// whole output: a final-only request is reported through this alone.
#[derive(Debug)]
pub struct FinishedSeq {
    pub request_id: Arc<str>,
    pub sample_index: u32,
    pub finish_reason: FinishReason,
    pub stop_reason: StopReason,
    /// For a final-only request, all text emitted (for a stop string: up to it, or through
    /// it when it is included); empty otherwise (the rows carried it as deltas).
    pub text: String,
    pub token_ids: Vec<u32>,
    pub num_prompt_tokens: usize,
    pub num_cached_tokens: usize,
    /// The `now` given to the update() that appended the first output token (0: none yet).
    pub first_token_time: f64,
    /// The request asked for its output only at the end (RequestParams.final_only).
    pub final_only: bool,
    /// This sequence's row among the step's reported rows, if it has one.
    pub row: Option<u32>,
}

/// What one update() produced, column by column, so that handing it to Python costs a few
/// arrays instead of an object per sequence. Rows are reported only for sequences whose
/// request wants per-step output; every sequence that finished is in `finished`.
#[derive(Debug, Default)]
pub struct StepResult {
    /// Tokens appended this step, reported or not (for throughput counters).
    pub num_new_tokens: usize,
    /// Per reported row: request slot (see `Scheduler::add_request`), sample index, sample
    /// row of the batch, the token appended, and the end of its text delta in `text`.
    pub row_req: Vec<u32>,
    pub row_sample_index: Vec<i32>,
    pub row_sample_row: Vec<i32>,
    pub row_token: Vec<i64>,
    pub row_text_end: Vec<u32>,
    pub row_num_prompt: Vec<u32>,
    pub row_num_cached: Vec<u32>,
    /// Index into `finished` of the row's sequence when it finished this step, else -1.
    pub row_finished: Vec<i32>,
    /// The reported rows' text deltas, concatenated.
    pub text: String,
    pub finished: Vec<FinishedSeq>,
}

impl StepResult {
    /// Room for `rows` reported rows, taken at the first one: a step reports all of its
    /// rows or few, and growing eight vectors by doubling costs more than the guess.
    fn reserve(&mut self, rows: usize) {
        self.row_req.reserve(rows);
        self.row_sample_index.reserve(rows);
        self.row_sample_row.reserve(rows);
        self.row_token.reserve(rows);
        self.row_text_end.reserve(rows);
        self.row_num_prompt.reserve(rows);
        self.row_num_cached.reserve(rows);
        self.row_finished.reserve(rows);
        self.text.reserve(rows * 8);
    }

    pub fn num_rows(&self) -> usize {
        self.row_req.len()
    }
    /// Text delta of reported row `j`.
    pub fn row_text(&self, j: usize) -> &str {
        let start = if j == 0 { 0 } else { self.row_text_end[j - 1] as usize };
        &self.text[start..self.row_text_end[j] as usize]
    }
}

impl Scheduler {
    /// Appends `tok` to sequence `s`, detokenizes it into `res.text`, applies the stop rules
    /// and reports the row (unless final-only) and the finish; true when it finished.
    pub(super) fn append_token(&mut self, s: u32, tok: u32, sample_row: i32, now: f64, res: &mut StepResult) -> bool {
        let seq = self.seqs[s as usize].as_mut().expect("live sequence slot");
        let p = seq.sp;
        seq.tokens.push(tok);
        seq.last_token = tok;
        res.num_new_tokens += 1;
        let nout = seq.num_outputs();
        if nout == 1 {
            seq.first_token_time = now;
        }
        let start = res.text.len();
        let is_eos = !p.ignore_eos && self.eos.contains(&tok);
        let is_stop_id = p.has_stop_ids && req_ref(&self.requests, seq.req).stop_ids.contains(&tok);
        // vLLM leaves the EOS or stop token that ends a sequence out of its text (unless
        // include_stop_str_in_output), so it can neither show up nor complete a stop string.
        let skip_text = (is_eos || is_stop_id) && !req_ref(&self.requests, seq.req).params.include_stop_str_in_output;
        let matched = match seq.detok.as_mut() {
            Some(d) if !skip_text => d.push_into(tok, &mut res.text).is_some(),
            _ => false,
        };
        let may_stop = nout >= p.min_tokens as usize;
        // vLLM's precedence (v1 check_stop, then the detokenizer's stop strings): a stop
        // string wins, then EOS, then stop_token_ids, then length, so a last allowed token that
        // is EOS reports "stop". EOS and stop ids end the sequence even below min_tokens, as in
        // vLLM: the sampler bans them there, so one shows up only when a grammar allowed
        // nothing else, and the grammar wins.
        let (finish, stop_reason) = if may_stop && matched {
            let text = seq.detok.as_ref().and_then(|d| d.stop_reason()).unwrap_or_default().to_owned();
            (Some(FinishReason::Stop), StopReason::Text(text))
        } else if is_eos {
            let reason = if self.primary_eos == Some(tok) { StopReason::None } else { StopReason::TokenId(tok) };
            (Some(FinishReason::Stop), reason)
        } else if is_stop_id {
            (Some(FinishReason::Stop), StopReason::TokenId(tok))
        } else if nout >= p.max_tokens as usize || seq.tokens.len() >= self.cfg.max_model_len {
            (Some(FinishReason::Length), StopReason::None)
        } else {
            (None, StopReason::None)
        };
        if let Some(f) = finish {
            if !matches!(stop_reason, StopReason::Text(_)) {
                if let Some(d) = seq.detok.as_mut() {
                    res.text.push_str(&d.flush());
                }
            }
            seq.status = SeqStatus::Finished;
            seq.finish_reason = finish;
            self.bm.free(&mut seq.block_table);
            let row = (!p.final_only).then_some(res.row_req.len() as u32);
            res.finished.push(FinishedSeq {
                request_id: seq.request_id.clone(),
                sample_index: seq.sample_index,
                finish_reason: f,
                stop_reason,
                // A streamed sequence's text went out as deltas: only a final-only one needs it.
                text: match &seq.detok {
                    Some(d) if p.final_only => {
                        let outs = seq.outputs();
                        d.replay(&seq.tokens[..seq.num_prompt], &outs[..outs.len() - skip_text as usize], true)
                    }
                    _ => String::new(),
                },
                token_ids: seq.outputs().to_vec(),
                num_prompt_tokens: seq.num_prompt,
                num_cached_tokens: seq.num_cached_tokens.unwrap_or(0),
                first_token_time: seq.first_token_time,
                final_only: p.final_only,
                row,
            });
        }
        if p.final_only {
            // Detokenized all the same (stop strings and the final text need it); the delta
            // just does not travel.
            res.text.truncate(start);
        } else {
            if res.row_req.capacity() == 0 {
                res.reserve(self.pending_samples);
            }
            res.row_req.push(seq.req);
            res.row_sample_index.push(seq.sample_index as i32);
            res.row_sample_row.push(sample_row);
            res.row_token.push(tok as i64);
            res.row_text_end.push(res.text.len() as u32);
            res.row_num_prompt.push(seq.num_prompt as u32);
            res.row_num_cached.push(seq.num_cached_tokens.unwrap_or(0) as u32);
            res.row_finished.push(if finish.is_some() { res.finished.len() as i32 - 1 } else { -1 });
        }
        finish.is_some()
    }

    /// Frees every block of the request now; its "abort" outputs come with the next update().
    pub fn abort_request(&mut self, request_id: &str) -> bool {
        let Some(r) = self.ids.remove(request_id) else { return false };
        let req = self.requests[r as usize].as_mut().expect("live request slot");
        req.aborted = true;
        let mut any = false;
        for i in 0..req.params.n {
            let alive = match req.seqs.get(i as usize) {
                Some(&s) => {
                    let seq = seq_mut(&mut self.seqs, s);
                    if seq.status == SeqStatus::Finished {
                        false
                    } else {
                        self.bm.free(&mut seq.block_table);
                        seq.status = SeqStatus::Finished;
                        seq.finish_reason = Some(FinishReason::Abort);
                        seq.scheduled = false;
                        any = true;
                        true
                    }
                }
                None => true,
            };
            if alive {
                let seq = req.seqs.get(i as usize).map(|&s| seq_mut(&mut self.seqs, s));
                let (text, token_ids, num_cached, first) = match seq {
                    Some(q) => (
                        match &q.detok {
                            Some(d) if req.params.final_only => d.replay(&q.tokens[..q.num_prompt], q.outputs(), false),
                            _ => String::new(),
                        },
                        q.outputs().to_vec(),
                        q.num_cached_tokens.unwrap_or(0),
                        q.first_token_time,
                    ),
                    None => (String::new(), vec![], 0, 0.0),
                };
                self.abort_outputs.push(FinishedSeq {
                    request_id: req.request_id.clone(),
                    sample_index: i,
                    finish_reason: FinishReason::Abort,
                    stop_reason: StopReason::None,
                    text,
                    token_ids,
                    num_prompt_tokens: req.num_prompt_tokens,
                    num_cached_tokens: num_cached,
                    first_token_time: first,
                    final_only: req.params.final_only,
                    row: None,
                });
            }
        }
        if any {
            let seqs = &self.seqs;
            let live = |s: &u32| seq_ref(seqs, *s).status != SeqStatus::Finished;
            self.running.retain(live);
            self.waiting.retain(live);
        }
        req.num_unfinished = 0;
        self.deferred_requests.push(r);
        true
    }
}
