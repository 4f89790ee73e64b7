//! Continuous-batching scheduler: FCFS queues, a per-step token budget, chunked prefill,
//! preemption by recompute, n > 1 forking, and the flat per-step arrays (`BatchData`).
//! Pure Rust (no Python types) so it is unit-testable and the binding stays a thin shell.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::block_manager::BlockManager;
use crate::sampling_params::RequestParams;
use crate::sequence::{child_seed, splitmix64, FinishReason, Request, SampleParams, SeqStatus, Sequence, StopReason};
use crate::stop::StopSet;
use crate::tokenizer::{CoreTokenizer, IncrementalDetokenizer};

/// The per-step limits are the bounds the worker sizes its fixed per-step buffers from
/// (`fastserve/worker/step_buffers.py` lists each buffer with the limit that makes it safe):
/// a step never holds more than `max_num_seqs` rows, `max_num_batched_tokens` tokens or
/// `max_num_sample_rows` sample rows. Work past a limit waits for the next step.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_model_len: usize,
    /// Rows (sequences) per step.
    pub max_num_seqs: usize,
    /// Tokens per step (the sum of the rows' query lengths).
    pub max_num_batched_tokens: usize,
    /// Sample rows (logits rows sampled) per step. A row yields one sample, except the row
    /// that finishes an n > 1 prompt, which yields n (one per child): n prompts finishing in
    /// one step would otherwise multiply a step's sample rows without bound. Deferral, not a
    /// growing buffer: a prompt whose last chunk would pass the limit computes all but its
    /// last token now and finishes in a later step, so the logits and sampler buffers keep a
    /// fixed size and the memory profile covers them. At least the largest n it admits.
    pub max_num_sample_rows: usize,
    pub enable_prefix_caching: bool,
    pub enable_chunked_prefill: bool,
    pub eos_token_ids: Vec<u32>,
    pub seed: u64,
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.num_blocks == 0 {
            return Err("num_blocks must be at least 1; raise --gpu-memory-utilization".into());
        }
        if !self.block_size.is_power_of_two() || self.block_size > 1024 {
            return Err(format!("block_size must be a power of two up to 1024 (e.g. 16), got {}", self.block_size));
        }
        if self.max_model_len < 2 {
            return Err(format!("max_model_len must be at least 2, got {}", self.max_model_len));
        }
        if self.max_num_seqs == 0 {
            return Err("max_num_seqs must be at least 1".into());
        }
        if self.max_num_batched_tokens == 0 {
            return Err("max_num_batched_tokens must be at least 1".into());
        }
        if self.max_num_sample_rows == 0 {
            return Err("max_num_sample_rows must be at least 1".into());
        }
        if !self.enable_chunked_prefill && self.max_num_batched_tokens < self.max_model_len {
            return Err(format!(
                "max_num_batched_tokens ({}) is smaller than max_model_len ({}): without chunked \
                 prefill a long prompt could never be scheduled; raise --max-num-batched-tokens, \
                 lower --max-model-len, or enable chunked prefill",
                self.max_num_batched_tokens, self.max_model_len
            ));
        }
        Ok(())
    }
}

/// One scheduled row of the pending batch.
#[derive(Clone, Copy, Debug)]
pub struct Scheduled {
    pub seq: u32,
    pub num_new: u32,
    /// Sample rows this row produces: 0 (mid-prefill), 1, or n (a prompt finishing for n > 1).
    pub num_samples: u32,
}

/// One step's arrays, laid out as `fastserve._core.Batch` documents them.
///
/// The sampler's per-sequence state lives in the worker, keyed by sequence slot: a
/// sequence's parameters, seed, ban lists and (when penalized) prompt and output tokens
/// travel once, in the `new_*` columns of the first batch that names it; every batch after
/// that carries only a slot and a step counter per sample row, plus the slots released
/// since the last batch that ran (vLLM v1's NewRequestData / CachedRequestData split).
#[derive(Default, Debug)]
pub struct BatchData {
    pub num_seqs: usize,
    pub num_tokens: usize,
    pub num_samples: usize,
    pub num_decodes: usize,
    pub max_query_len: usize,
    pub max_seq_len: usize,
    pub max_blocks: usize,

    pub input_ids: Vec<i64>,
    pub positions: Vec<i64>,
    pub slot_mapping: Vec<i64>,
    pub query_start_loc: Vec<i32>,
    pub seq_lens: Vec<i32>,
    pub block_tables: Vec<i32>,
    pub logits_indices: Vec<i64>,

    /// Per sample row: the sequence slot whose sampler state applies, and its output count
    /// (the noise counter; also what min_tokens compares against).
    pub sample_seq_slots: Vec<i32>,
    pub sample_steps: Vec<i64>,
    /// Sample rows of children 1..n of a prompt finishing this step: they sample from the
    /// parent's logits row and state but with their own seed, and are not the parent's
    /// output (their own slots get their first token in `new_output_token_ids`).
    pub fork_sample_rows: Vec<i64>,
    pub fork_seeds: Vec<i64>,
    /// (sample row, token) pairs banned this step alone: multi-token bad words whose prefix
    /// the sequence's outputs end with (the only ban that depends on the step).
    pub banned_rows: Vec<i64>,
    pub banned_token_ids: Vec<i64>,

    /// Sequences the worker has not seen (first scheduled, or forked children).
    pub new_seq_slots: Vec<i32>,
    pub new_temperature: Vec<f32>,
    pub new_top_p: Vec<f32>,
    pub new_top_k: Vec<i32>,
    pub new_min_p: Vec<f32>,
    pub new_presence_penalty: Vec<f32>,
    pub new_frequency_penalty: Vec<f32>,
    pub new_repetition_penalty: Vec<f32>,
    pub new_seeds: Vec<i64>,
    pub new_num_logprobs: Vec<i32>,
    pub new_min_tokens: Vec<i32>,
    /// CSR by new sequence: prompt tokens (repetition penalty only), outputs so far (any
    /// penalty), single-token bad words, and the ids banned below min_tokens.
    pub new_prompt_offsets: Vec<i32>,
    pub new_prompt_token_ids: Vec<i64>,
    pub new_output_offsets: Vec<i32>,
    pub new_output_token_ids: Vec<i64>,
    pub new_ban_offsets: Vec<i32>,
    pub new_ban_token_ids: Vec<i64>,
    pub new_min_ban_offsets: Vec<i32>,
    pub new_min_ban_token_ids: Vec<i64>,
    /// CSR by new sequence: (token, value) logit biases, and the allow-list (empty: all).
    pub new_bias_offsets: Vec<i32>,
    pub new_bias_token_ids: Vec<i64>,
    pub new_bias_values: Vec<f32>,
    pub new_allow_offsets: Vec<i32>,
    pub new_allow_token_ids: Vec<i64>,
    /// Sequence slots released since the last batch that ran (their state may go).
    pub freed_seq_slots: Vec<i32>,

    pub prompt_logprob_indices: Vec<i64>,
    pub prompt_logprob_targets: Vec<i64>,
    pub prompt_logprob_rows: Vec<i32>,

    /// Request slot of each row (see `Scheduler::add_request`).
    pub row_req_slots: Vec<u32>,
    pub sample_rows: Vec<u32>,
}

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

pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub bm: BlockManager,
    tokenizer: Option<Arc<CoreTokenizer>>,
    eos: Vec<u32>,
    /// The tokenizer's own EOS (vLLM's `eos_token_id`): ending on it reports no stop_reason;
    /// the other EOS ids (the generation config's) are stop tokens and report their id.
    primary_eos: Option<u32>,
    requests: Vec<Option<Request>>,
    free_requests: Vec<u32>,
    seqs: Vec<Option<Sequence>>,
    free_seqs: Vec<u32>,
    ids: ahash::AHashMap<Arc<str>, u32>,
    waiting: VecDeque<u32>,
    running: Vec<u32>,
    rng: u64,
    pending: Option<Vec<Scheduled>>,
    pending_samples: usize,
    /// Sample rows of the step being scheduled so far (bounded by max_num_sample_rows).
    step_samples: usize,
    /// Abort outputs waiting for the next update(); their slots are released once no
    /// pending batch can still name them.
    abort_outputs: Vec<FinishedSeq>,
    deferred_requests: Vec<u32>,
    /// Sequence slots released but not yet reported to the worker; the first
    /// `pending_freed` of them ride in the pending batch.
    freed_seqs: Vec<u32>,
    pending_freed: usize,
    // Reused across steps so scheduling allocates nothing per sequence.
    decode_rows: Vec<Scheduled>,
    prefill_rows: Vec<Scheduled>,
    hit_buf: Vec<u32>,
    partial: Vec<u32>,
    pub num_preemptions: u64,
    pub prefix_cache_queried_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
}

/// Look-ahead (in sequences) for software prefetch: a 1,024-sequence step touches a few
/// scattered cache lines per sequence (its struct, token tail, block table, id), and fetching
/// them a few iterations early overlaps the misses instead of paying them one by one.
const AHEAD: usize = 8;

#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unused_unsafe)]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch(p as *const i8, core::arch::x86_64::_MM_HINT_T0)
    }
}

/// What of a sequence to prefetch: its slot (first stage), or, once that is cached, the heap
/// lines it points to (the block table's tail, and the token buffer's when `update` will
/// append to it).
#[derive(Clone, Copy, PartialEq)]
enum Stage {
    Slot,
    Heap { tokens: bool },
}

#[inline(always)]
fn prefetch_seq(seqs: &[Option<Sequence>], s: u32, stage: Stage) {
    let Some(slot) = seqs.get(s as usize) else { return };
    let Stage::Heap { tokens } = stage else {
        let p = slot as *const Option<Sequence> as *const u8;
        for line in 0..std::mem::size_of::<Option<Sequence>>().div_ceil(64) {
            prefetch(p.wrapping_add(line * 64));
        }
        return;
    };
    if let Some(q) = slot {
        if tokens {
            prefetch(q.tokens.as_ptr().wrapping_add(q.tokens.len().saturating_sub(1)));
        }
        prefetch(q.block_table.as_ptr().wrapping_add(q.block_table.len().saturating_sub(1)));
    }
}

#[inline]
fn seq_mut(seqs: &mut [Option<Sequence>], i: u32) -> &mut Sequence {
    seqs[i as usize].as_mut().expect("live sequence slot")
}
#[inline]
fn seq_ref(seqs: &[Option<Sequence>], i: u32) -> &Sequence {
    seqs[i as usize].as_ref().expect("live sequence slot")
}
#[inline]
fn req_ref(reqs: &[Option<Request>], i: u32) -> &Request {
    reqs[i as usize].as_ref().expect("live request slot")
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, tokenizer: Option<Arc<CoreTokenizer>>) -> Result<Self, String> {
        cfg.validate()?;
        let mut eos: Vec<u32> = tokenizer.as_ref().map(|t| t.eos_token_ids.clone()).unwrap_or_default();
        for &e in &cfg.eos_token_ids {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        let primary_eos = match &tokenizer {
            Some(t) => t.eos_token.as_ref().and_then(|_| t.eos_token_ids.first().copied()),
            None => cfg.eos_token_ids.first().copied(),
        };
        Ok(Scheduler {
            bm: BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching),
            tokenizer,
            eos,
            primary_eos,
            requests: vec![],
            free_requests: vec![],
            seqs: vec![],
            free_seqs: vec![],
            ids: Default::default(),
            waiting: VecDeque::new(),
            running: vec![],
            rng: splitmix64(cfg.seed),
            pending: None,
            pending_samples: 0,
            step_samples: 0,
            abort_outputs: vec![],
            deferred_requests: vec![],
            freed_seqs: vec![],
            pending_freed: 0,
            decode_rows: vec![],
            prefill_rows: vec![],
            hit_buf: vec![],
            partial: vec![],
            num_preemptions: 0,
            prefix_cache_queried_tokens: 0,
            prefix_cache_hit_tokens: 0,
            cfg,
        })
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Aborted requests do not count: their outputs ride along with the next update(), and
    /// counting them would keep an engine loop spinning on steps that schedule nothing.
    pub fn has_unfinished(&self) -> bool {
        !self.ids.is_empty()
    }
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    fn insert_seq(&mut self, s: Sequence) -> u32 {
        if let Some(i) = self.free_seqs.pop() {
            self.seqs[i as usize] = Some(s);
            i
        } else {
            self.seqs.push(Some(s));
            (self.seqs.len() - 1) as u32
        }
    }

    fn make_detok(
        &self,
        params: &RequestParams,
        prompt: &[u32],
        stop: &Arc<StopSet>,
    ) -> Option<Box<IncrementalDetokenizer>> {
        let tok = self.tokenizer.as_ref()?;
        if !params.detokenize {
            return None;
        }
        Some(Box::new(
            IncrementalDetokenizer::with_stop_set(
                tok.clone(),
                prompt,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
                stop.clone(),
                params.include_stop_str_in_output,
            )
            // vLLM checks no stop string before min_tokens: the detokenizer must not cut there.
            .with_min_tokens(params.min_tokens as usize)
            .without_text(),
        ))
    }

    /// Queues a request; returns its slot, which names it in `StepResult::row_req` until it
    /// is released (the update() that reports it finished is the last to name it).
    pub fn add_request(&mut self, request_id: &str, prompt: Vec<u32>, params: RequestParams) -> Result<u32, String> {
        if self.ids.contains_key(request_id) {
            return Err(format!("request_id {request_id:?} is already in use; give each request a unique id"));
        }
        if prompt.is_empty() {
            return Err("prompt_token_ids is empty; a prompt needs at least one token".into());
        }
        let (p, max_len) = (prompt.len(), self.cfg.max_model_len);
        if p >= max_len {
            return Err(format!(
                "prompt_token_ids has {p} tokens but max_model_len is {max_len}: the prompt plus at \
                 least one generated token must fit; shorten the prompt or raise --max-model-len"
            ));
        }
        params.validate()?;
        if params.n as usize > self.cfg.max_num_sample_rows {
            return Err(format!(
                "n (sequences per request, best_of when set) is {} but one step samples at most {} rows \
                 (max_num_sample_rows): lower n / best_of or raise max_num_sample_rows",
                params.n, self.cfg.max_num_sample_rows
            ));
        }
        if !params.stop.is_empty() && (self.tokenizer.is_none() || !params.detokenize) {
            return Err("stop strings need detokenized text: pass a tokenizer to the Scheduler and keep \
                        detokenize=True, or use stop_token_ids"
                .into());
        }
        let longest = (p + params.max_tokens as usize).min(max_len);
        let need = self.bm.blocks_for(longest);
        if need > self.cfg.num_blocks {
            return Err(format!(
                "a sequence of {longest} tokens needs {need} KV-cache blocks of {} tokens but only {} \
                 exist: raise --gpu-memory-utilization or lower --max-model-len (or max_tokens)",
                self.cfg.block_size, self.cfg.num_blocks
            ));
        }
        let seed = match params.seed {
            Some(s) => s,
            None => {
                self.rng = splitmix64(self.rng);
                (self.rng >> 1) as i64
            }
        };
        let eos: &[u32] = if params.ignore_eos { &[] } else { &self.eos };
        let mut min_tokens_banned = eos.to_vec();
        min_tokens_banned.extend(params.stop_token_ids.iter().copied().filter(|t| !eos.contains(t)));
        let bad_single = params.bad_words_token_ids.iter().filter(|w| w.len() == 1).map(|w| w[0]).collect();
        let bad_multi = params.bad_words_token_ids.iter().filter(|w| w.len() > 1).cloned().collect();
        let stop_set = Arc::new(StopSet::new(params.stop.clone()));
        let detok = self.make_detok(&params, &prompt, &stop_set);
        let n = params.n;
        let request_id: Arc<str> = Arc::from(request_id);
        let req_slot = match self.free_requests.pop() {
            Some(i) => i,
            None => {
                self.requests.push(None);
                (self.requests.len() - 1) as u32
            }
        };
        let seq = Sequence {
            num_computed: 0,
            last_token: *prompt.last().expect("prompt checked non-empty"),
            tokens: prompt,
            block_table: vec![],
            sp: SampleParams::of(&params),
            status: SeqStatus::Waiting,
            scheduled: false,
            pending_fork: n > 1,
            req: req_slot,
            sample_index: 0,
            num_prompt: p,
            seed: if n > 1 { child_seed(seed, 0) } else { seed },
            request_id: request_id.clone(),
            block_hashes: vec![],
            prompt_logprobs_done: 0,
            num_cached_tokens: None,
            detok,
            finish_reason: None,
            first_token_time: 0.0,
            sent: false,
        };
        let s = self.insert_seq(seq);
        self.requests[req_slot as usize] = Some(Request {
            request_id: request_id.clone(),
            stop_ids: params.stop_token_ids.clone(),
            min_tokens_banned,
            bad_single,
            bad_multi,
            seed,
            num_prompt_tokens: p,
            seqs: vec![s],
            num_unfinished: n,
            aborted: false,
            params,
            stop_set,
        });
        self.ids.insert(request_id, req_slot);
        self.waiting.push_back(s);
        Ok(req_slot)
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

    fn release_request(&mut self, r: u32) {
        let req = self.requests[r as usize].take().expect("live request slot");
        for s in req.seqs {
            self.seqs[s as usize] = None;
            self.free_seqs.push(s);
            self.freed_seqs.push(s);
        }
        self.free_requests.push(r);
    }

    /// Drops a running sequence's KV (recompute later) and puts it at the head of waiting.
    fn preempt(&mut self, s: u32, budget: &mut usize) {
        let seq = seq_mut(&mut self.seqs, s);
        self.bm.free(&mut seq.block_table);
        seq.num_computed = 0;
        seq.status = SeqStatus::Waiting;
        if seq.scheduled {
            seq.scheduled = false;
            for rows in [&mut self.decode_rows, &mut self.prefill_rows] {
                if let Some(k) = rows.iter().rposition(|r| r.seq == s) {
                    *budget += rows[k].num_new as usize;
                    self.step_samples -= rows[k].num_samples as usize;
                    rows.remove(k);
                }
            }
        }
        self.waiting.push_front(s);
        self.num_preemptions += 1;
    }

    /// Schedules running sequence `s` for up to `budget` tokens, preempting the newest running
    /// sequences (possibly `s` itself) while the pool is short of blocks.
    fn schedule_running(&mut self, s: u32, budget: &mut usize, preempted: &mut bool) {
        let seq = seq_ref(&self.seqs, s);
        let rem = seq.num_remaining();
        let mut num_new = rem.min(*budget);
        if num_new < rem && !self.cfg.enable_chunked_prefill {
            return;
        }
        if !self.fits_samples(seq, rem, &mut num_new) {
            return;
        }
        let need = self.bm.blocks_for(seq.num_computed + num_new);
        loop {
            let seq = seq_mut(&mut self.seqs, s);
            if self.bm.grow(&mut seq.block_table, need) {
                seq.scheduled = true;
                let end = seq.num_computed + num_new;
                let num_samples = self.samples_for(seq_ref(&self.seqs, s), end);
                let row = Scheduled { seq: s, num_new: num_new as u32, num_samples };
                if rem == 1 {
                    self.decode_rows.push(row)
                } else {
                    self.prefill_rows.push(row)
                }
                *budget -= num_new;
                self.step_samples += num_samples as usize;
                return;
            }
            let victim = self.running.pop().expect("the sequence at hand is running");
            self.preempt(victim, budget);
            *preempted = true;
            if victim == s {
                return;
            }
        }
    }

    /// Whether `seq`'s chunk of `num_new` tokens (of `rem` left) keeps the step within
    /// max_num_sample_rows; a chunk that would finish the prompt past the limit is cut one
    /// token short (no sample this step, the last token next step) when chunked prefill allows.
    fn fits_samples(&self, seq: &Sequence, rem: usize, num_new: &mut usize) -> bool {
        let k = self.samples_for(seq, seq.num_computed + *num_new) as usize;
        if self.step_samples + k <= self.cfg.max_num_sample_rows {
            return true;
        }
        if *num_new > 1 && *num_new == rem && self.cfg.enable_chunked_prefill {
            *num_new -= 1;
            return true;
        }
        false
    }

    fn samples_for(&self, seq: &Sequence, end: usize) -> u32 {
        if end < seq.tokens.len() {
            return 0;
        }
        if seq.pending_fork {
            seq.sp.n
        } else {
            1
        }
    }

    /// Picks this step's work and assembles its arrays; None when nothing is runnable.
    pub fn schedule(&mut self) -> Result<Option<BatchData>, String> {
        if self.pending.is_some() {
            return Err("schedule() called twice without update(): pass the sampled ids of the \
                        previous batch to update() first"
                .into());
        }
        for r in std::mem::take(&mut self.deferred_requests) {
            self.release_request(r);
        }
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_num_batched_tokens;
        self.decode_rows.clear();
        self.prefill_rows.clear();
        self.step_samples = 0;
        let mut preempted = false;

        // Running sequences first (decodes, then unfinished prefills), oldest first; when the
        // pool runs dry the newest running sequence is preempted, possibly the one at hand.
        // One walk finds the decodes; only the few sequences still prefilling are revisited.
        let mut partial = std::mem::take(&mut self.partial);
        partial.clear();
        let mut i = 0;
        while i < self.running.len() {
            if budget == 0 || self.decode_rows.len() >= self.cfg.max_num_seqs {
                break;
            }
            if let Some(&f) = self.running.get(i + 3 * AHEAD) {
                prefetch_seq(&self.seqs, f, Stage::Slot);
            }
            if let Some(&f) = self.running.get(i + AHEAD) {
                prefetch_seq(&self.seqs, f, Stage::Heap { tokens: false });
            }
            let s = self.running[i];
            i += 1;
            if seq_ref(&self.seqs, s).num_remaining() != 1 {
                partial.push(s);
                continue;
            }
            // When `s` preempts itself it was the tail, so the walk ends there.
            self.schedule_running(s, &mut budget, &mut preempted);
        }
        for &s in &partial {
            if budget == 0 || self.decode_rows.len() + self.prefill_rows.len() >= self.cfg.max_num_seqs {
                break;
            }
            if seq_ref(&self.seqs, s).status == SeqStatus::Running {
                self.schedule_running(s, &mut budget, &mut preempted);
            }
        }
        self.partial = partial;

        // Waiting requests, FCFS, only while nothing had to be preempted this step.
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&s) = self.waiting.front() else { break };
            if self.decode_rows.len() + self.prefill_rows.len() >= self.cfg.max_num_seqs {
                break;
            }
            let seq = seq_mut(&mut self.seqs, s);
            self.hit_buf.clear();
            let first_schedule = seq.num_computed == 0 && seq.block_table.is_empty();
            let use_cache = self.cfg.enable_prefix_caching && !seq.sp.prompt_logprobs;
            if first_schedule && use_cache {
                // At least one token must be computed to produce logits.
                let max_hit = (seq.tokens.len() - 1) / bs;
                for j in 0..max_hit {
                    seq.ensure_hashes(j + 1, bs);
                    match self.bm.lookup(seq.block_hashes[j], &seq.tokens[j * bs..(j + 1) * bs]) {
                        Some(b) => self.hit_buf.push(b),
                        None => break,
                    }
                }
            }
            let computed = seq.num_computed.max(self.hit_buf.len() * bs);
            let rem = seq.tokens.len() - computed;
            let mut num_new = if self.cfg.enable_chunked_prefill {
                rem.min(budget)
            } else if rem <= budget {
                rem
            } else {
                break;
            };
            let k = if computed + num_new < seq.tokens.len() {
                0
            } else if seq.pending_fork {
                seq.sp.n as usize
            } else {
                1
            };
            if self.step_samples + k > self.cfg.max_num_sample_rows {
                if num_new > 1 && num_new == rem && self.cfg.enable_chunked_prefill {
                    num_new -= 1;
                } else {
                    break;
                }
            }
            let blocks = self.bm.blocks_for(computed + num_new);
            let need = blocks - self.hit_buf.len() - seq.block_table.len() + self.bm.free_among(&self.hit_buf);
            if need > self.bm.num_free_blocks() {
                break;
            }
            for &b in &self.hit_buf {
                self.bm.acquire(b);
                seq.block_table.push(b);
            }
            let grown = self.bm.grow(&mut seq.block_table, blocks);
            debug_assert!(grown);
            let hit_tokens = self.hit_buf.len() * bs;
            if first_schedule && use_cache {
                self.prefix_cache_queried_tokens += seq.tokens.len() as u64;
                self.prefix_cache_hit_tokens += hit_tokens as u64;
            }
            if seq.num_cached_tokens.is_none() {
                seq.num_cached_tokens = Some(hit_tokens.min(seq.num_prompt));
            }
            seq.num_computed = computed;
            seq.status = SeqStatus::Running;
            seq.scheduled = true;
            self.waiting.pop_front();
            self.running.push(s);
            let num_samples = self.samples_for(seq_ref(&self.seqs, s), computed + num_new);
            let row = Scheduled { seq: s, num_new: num_new as u32, num_samples };
            if num_new == 1 && rem == 1 {
                self.decode_rows.push(row)
            } else {
                self.prefill_rows.push(row)
            }
            budget -= num_new;
            self.step_samples += num_samples as usize;
        }

        if self.decode_rows.is_empty() && self.prefill_rows.is_empty() {
            return Ok(None);
        }
        let mut rows = std::mem::take(&mut self.decode_rows);
        let num_decodes = rows.len();
        rows.extend_from_slice(&self.prefill_rows);
        let batch = self.build_batch(&rows, num_decodes);
        self.pending_samples = batch.num_samples;
        self.pending_freed = batch.freed_seq_slots.len();
        self.pending = Some(rows);
        Ok(Some(batch))
    }

    fn build_batch(&self, rows: &[Scheduled], num_decodes: usize) -> BatchData {
        let bs = self.cfg.block_size;
        let b = rows.len();
        // Sizes first, so every per-token and per-sample array is allocated once at its size.
        let (mut t, mut s_total, mut max_blocks, mut max_q, mut max_seq) = (0usize, 0usize, 0usize, 0usize, 0usize);
        let mut any_prompt_lp = false;
        let mut any_new = false;
        for r in rows {
            let seq = seq_ref(&self.seqs, r.seq);
            let end = seq.num_computed + r.num_new as usize;
            t += r.num_new as usize;
            s_total += r.num_samples as usize;
            max_blocks = max_blocks.max(self.bm.blocks_for(end));
            max_q = max_q.max(r.num_new as usize);
            max_seq = max_seq.max(end);
            any_prompt_lp |= seq.sp.prompt_logprobs;
            any_new |= !seq.sent;
        }
        let mut d = BatchData {
            num_seqs: b,
            num_tokens: t,
            num_samples: s_total,
            num_decodes,
            max_query_len: max_q,
            max_seq_len: max_seq,
            max_blocks,
            input_ids: Vec::with_capacity(t),
            positions: Vec::with_capacity(t),
            slot_mapping: Vec::with_capacity(t),
            query_start_loc: Vec::with_capacity(b + 1),
            seq_lens: Vec::with_capacity(b),
            block_tables: vec![0; b * max_blocks],
            logits_indices: Vec::with_capacity(s_total),
            sample_seq_slots: Vec::with_capacity(s_total),
            sample_steps: Vec::with_capacity(s_total),
            row_req_slots: Vec::with_capacity(b),
            sample_rows: Vec::with_capacity(s_total),
            freed_seq_slots: self.freed_seqs.iter().map(|&x| x as i32).collect(),
            ..Default::default()
        };
        if any_new {
            for v in [
                &mut d.new_prompt_offsets,
                &mut d.new_output_offsets,
                &mut d.new_ban_offsets,
                &mut d.new_min_ban_offsets,
                &mut d.new_bias_offsets,
                &mut d.new_allow_offsets,
            ] {
                v.push(0);
            }
        }
        d.query_start_loc.push(0);
        for (row, r) in rows.iter().enumerate() {
            if let Some(f) = rows.get(row + 3 * AHEAD) {
                prefetch_seq(&self.seqs, f.seq, Stage::Slot);
            }
            if let Some(f) = rows.get(row + AHEAD) {
                prefetch_seq(&self.seqs, f.seq, Stage::Heap { tokens: f.num_new > 1 });
            }
            let seq = seq_ref(&self.seqs, r.seq);
            let p = &seq.sp;
            let start = seq.num_computed;
            let end = start + r.num_new as usize;
            let tok0 = d.input_ids.len();
            if end - start == 1 && end == seq.tokens.len() {
                d.input_ids.push(seq.last_token as i64);
            } else {
                d.input_ids.extend(seq.tokens[start..end].iter().map(|&x| x as i64));
            }
            d.positions.extend((start..end).map(|x| x as i64));
            let table = &seq.block_table;
            let (sh, mask) = (self.bm.block_shift, bs - 1);
            d.slot_mapping.extend((start..end).map(|pos| (((table[pos >> sh] as usize) << sh) | (pos & mask)) as i64));
            let nb = self.bm.blocks_for(end);
            let dst = &mut d.block_tables[row * max_blocks..row * max_blocks + nb];
            for (o, &blk) in dst.iter_mut().zip(&table[..nb]) {
                *o = blk as i32;
            }
            d.query_start_loc.push((tok0 + r.num_new as usize) as i32);
            d.seq_lens.push(end as i32);
            d.row_req_slots.push(seq.req);
            if !seq.sent {
                self.push_new_seq(&mut d, r.seq, seq);
            }

            if any_prompt_lp && p.prompt_logprobs {
                let first = start.max(seq.prompt_logprobs_done);
                let last = end.min(seq.num_prompt.saturating_sub(1));
                for pos in first..last {
                    d.prompt_logprob_indices.push((tok0 + pos - start) as i64);
                    d.prompt_logprob_targets.push(seq.tokens[pos + 1] as i64);
                    d.prompt_logprob_rows.push(row as i32);
                }
            }

            let steps = seq.num_outputs() as i64;
            for child in 0..r.num_samples {
                let srow = d.logits_indices.len() as i64;
                d.logits_indices.push((tok0 + r.num_new as usize - 1) as i64);
                d.sample_rows.push(row as u32);
                d.sample_seq_slots.push(r.seq as i32);
                d.sample_steps.push(steps);
                if child > 0 {
                    d.fork_sample_rows.push(srow);
                    d.fork_seeds.push(child_seed(req_ref(&self.requests, seq.req).seed, child));
                }
                if p.has_bans {
                    let req = req_ref(&self.requests, seq.req);
                    let outs = seq.outputs();
                    for w in &req.bad_multi {
                        let (prefix, last) = w.split_at(w.len() - 1);
                        if outs.ends_with(prefix) {
                            d.banned_rows.push(srow);
                            d.banned_token_ids.push(last[0] as i64);
                        }
                    }
                }
            }
        }
        d
    }

    /// Appends sequence `s`'s sampler state to the batch's `new_*` columns.
    fn push_new_seq(&self, d: &mut BatchData, s: u32, seq: &Sequence) {
        let p = &seq.sp;
        let req = req_ref(&self.requests, seq.req);
        d.new_seq_slots.push(s as i32);
        d.new_temperature.push(p.temperature);
        d.new_top_p.push(p.top_p);
        d.new_top_k.push(p.top_k);
        d.new_min_p.push(p.min_p);
        d.new_presence_penalty.push(p.presence_penalty);
        d.new_frequency_penalty.push(p.frequency_penalty);
        d.new_repetition_penalty.push(p.repetition_penalty);
        d.new_seeds.push(seq.seed);
        d.new_num_logprobs.push(p.num_logprobs);
        d.new_min_tokens.push(p.min_tokens as i32);
        if p.repetition_penalty != 1.0 {
            d.new_prompt_token_ids.extend(seq.tokens[..seq.num_prompt].iter().map(|&x| x as i64));
        }
        if p.has_penalties {
            d.new_output_token_ids.extend(seq.outputs().iter().map(|&x| x as i64));
        }
        if p.has_bans {
            d.new_ban_token_ids.extend(req.bad_single.iter().map(|&x| x as i64));
            if p.min_tokens > 0 {
                d.new_min_ban_token_ids.extend(req.min_tokens_banned.iter().map(|&x| x as i64));
            }
        }
        for &(t, v) in &req.params.vocab_bias {
            d.new_bias_token_ids.push(t as i64);
            d.new_bias_values.push(v);
        }
        d.new_allow_token_ids.extend(req.params.vocab_allow.iter().map(|&x| x as i64));
        d.new_bias_offsets.push(d.new_bias_token_ids.len() as i32);
        d.new_allow_offsets.push(d.new_allow_token_ids.len() as i32);
        d.new_prompt_offsets.push(d.new_prompt_token_ids.len() as i32);
        d.new_output_offsets.push(d.new_output_token_ids.len() as i32);
        d.new_ban_offsets.push(d.new_ban_token_ids.len() as i32);
        d.new_min_ban_offsets.push(d.new_min_ban_token_ids.len() as i32);
    }

    /// The pending batch's sample rows of grammar-constrained requests (`structured_output`),
    /// with each row's sample index (a prompt finishing for n > 1 yields rows 0..n), in
    /// sample-row order; empty when no batch is pending. One pass over the batch's rows.
    pub fn pending_structured_samples(&self) -> (Vec<i64>, Vec<i32>) {
        let (mut rows, mut indices) = (vec![], vec![]);
        let Some(pending) = &self.pending else { return (rows, indices) };
        let mut sample = 0i64;
        for r in pending {
            let seq = seq_ref(&self.seqs, r.seq);
            if seq.sp.structured_output && r.num_samples > 0 {
                if r.num_samples == 1 {
                    rows.push(sample);
                    indices.push(seq.sample_index as i32);
                } else {
                    for child in 0..r.num_samples {
                        rows.push(sample + child as i64);
                        indices.push(child as i32);
                    }
                }
            }
            sample += r.num_samples as i64;
        }
        (rows, indices)
    }

    /// Appends the sampled ids of the pending batch, finishes sequences, frees their blocks.
    /// `now` (any clock; the engine passes Unix time) stamps each sequence's first token.
    pub fn update(&mut self, sampled: &[i64], now: f64) -> Result<StepResult, String> {
        let Some(rows) = self.pending.take() else {
            if sampled.is_empty() {
                return Ok(StepResult { finished: std::mem::take(&mut self.abort_outputs), ..Default::default() });
            }
            return Err("update() got sampled ids but no batch is pending: call schedule() first".into());
        };
        if sampled.len() != self.pending_samples {
            let n = self.pending_samples;
            self.pending = Some(rows);
            return Err(format!(
                "sampled_token_ids has {} entries but the last batch has {n} sample rows; pass one id per row",
                sampled.len()
            ));
        }
        if let Some(bad) = sampled.iter().find(|&&x| !(0..=u32::MAX as i64).contains(&x)) {
            self.pending = Some(rows);
            return Err(format!("sampled_token_ids holds {bad}, not a token id"));
        }
        let bs = self.cfg.block_size;
        // The worker has now seen this batch: its freed slots and new sequences.
        self.freed_seqs.drain(..self.pending_freed);
        self.pending_freed = 0;
        let mut res = StepResult { finished: std::mem::take(&mut self.abort_outputs), ..Default::default() };
        let mut finished_reqs: Vec<u32> = vec![];
        let mut any_finished = false;
        let mut sample = 0usize;
        for (k, r) in rows.iter().enumerate() {
            if let Some(f) = rows.get(k + 3 * AHEAD) {
                prefetch_seq(&self.seqs, f.seq, Stage::Slot);
            }
            if let Some(f) = rows.get(k + AHEAD) {
                prefetch_seq(&self.seqs, f.seq, Stage::Heap { tokens: true });
                if let Some(Some(q)) = self.seqs.get(f.seq as usize) {
                    if let Some(d) = &q.detok {
                        d.prefetch_state();
                    }
                }
            }
            // The bytes of the token that a row a few ahead will detokenize (sample rows
            // follow rows one to one in a decode step; elsewhere the hint is merely early).
            if let Some(tok) = &self.tokenizer {
                if let Some(&id) = sampled.get(sample + 3 * AHEAD) {
                    tok.prefetch_token(id as u32, false);
                }
                if let Some(&id) = sampled.get(sample + AHEAD) {
                    tok.prefetch_token(id as u32, true);
                }
            }
            let srow0 = sample;
            sample += r.num_samples as usize;
            let seq = seq_mut(&mut self.seqs, r.seq);
            seq.sent = true;
            if seq.status != SeqStatus::Running {
                continue; // aborted after schedule()
            }
            seq.scheduled = false;
            let old = seq.num_computed;
            seq.num_computed += r.num_new as usize;
            if self.cfg.enable_prefix_caching {
                let sh = self.bm.block_shift;
                let (b0, b1) = (old >> sh, seq.num_computed >> sh);
                if b1 > b0 {
                    seq.ensure_hashes(b1, bs);
                    for j in b0..b1 {
                        self.bm.register(seq.block_table[j], seq.block_hashes[j], &seq.tokens[j * bs..(j + 1) * bs]);
                    }
                }
            }
            seq.prompt_logprobs_done = seq.prompt_logprobs_done.max(seq.num_computed);
            if r.num_samples == 0 {
                continue;
            }
            if r.num_samples > 1 {
                self.fork(r.seq);
            }
            let req_slot = seq_ref(&self.seqs, r.seq).req;
            for child in 0..r.num_samples as usize {
                let s = if r.num_samples > 1 { req_ref(&self.requests, req_slot).seqs[child] } else { r.seq };
                let srow = srow0 + child;
                if self.append_token(s, sampled[srow] as u32, srow as i32, now, &mut res) {
                    any_finished = true;
                    let req = self.requests[req_slot as usize].as_mut().expect("live request slot");
                    req.num_unfinished -= 1;
                    if req.num_unfinished == 0 {
                        finished_reqs.push(req_slot);
                    }
                }
            }
        }
        if any_finished {
            let seqs = &self.seqs;
            self.running.retain(|s| seq_ref(seqs, *s).status == SeqStatus::Running);
        }
        for r in finished_reqs {
            let id = req_ref(&self.requests, r).request_id.clone();
            self.ids.remove(&id);
            self.release_request(r);
        }
        Ok(res)
    }

    /// Drops the pending batch without running it: its sequences keep their blocks and
    /// computed tokens and are scheduled again by the next schedule(). For a step the worker
    /// refused before running anything (a request it failed alone is aborted first).
    pub fn discard_pending(&mut self) -> bool {
        let Some(rows) = self.pending.take() else { return false };
        for r in rows {
            if let Some(Some(seq)) = self.seqs.get_mut(r.seq as usize) {
                seq.scheduled = false;
            }
        }
        self.pending_samples = 0;
        self.pending_freed = 0;
        true
    }

    /// Splits a request whose prompt just finished into its n sequences: children share the
    /// parent's full prompt blocks and recompute the partial last block themselves, so no
    /// block copy is needed on the device.
    fn fork(&mut self, parent: u32) {
        let bs = self.cfg.block_size;
        let (req_slot, n_prompt) = {
            let p = seq_ref(&self.seqs, parent);
            (p.req, p.num_prompt)
        };
        let full = n_prompt / bs;
        let n = req_ref(&self.requests, req_slot).params.n;
        for i in 1..n {
            let p = seq_mut(&mut self.seqs, parent);
            p.ensure_hashes(full, bs);
            let table: Vec<u32> = p.block_table[..full].to_vec();
            for &b in &table {
                self.bm.share(b);
            }
            let tokens = p.tokens[..n_prompt].to_vec();
            let hashes = p.block_hashes[..full].to_vec();
            let num_cached = p.num_cached_tokens;
            let req = req_ref(&self.requests, req_slot);
            let detok = self.make_detok(&req.params, &tokens, &req.stop_set);
            let seed = child_seed(req.seed, i);
            let child = Sequence {
                num_computed: full * bs,
                last_token: *tokens.last().expect("a prompt is never empty"),
                tokens,
                block_table: table,
                sp: SampleParams::of(&req.params),
                status: SeqStatus::Running,
                scheduled: false,
                pending_fork: false,
                req: req_slot,
                sample_index: i,
                num_prompt: n_prompt,
                seed,
                request_id: req.request_id.clone(),
                block_hashes: hashes,
                prompt_logprobs_done: n_prompt,
                num_cached_tokens: num_cached,
                detok,
                finish_reason: None,
                first_token_time: 0.0,
                sent: false,
            };
            let s = self.insert_seq(child);
            seq_mut(&mut self.seqs, parent).pending_fork = false;
            self.requests[req_slot as usize].as_mut().expect("live request slot").seqs.push(s);
            self.running.push(s);
        }
    }

    /// Appends `tok` to sequence `s`, detokenizes it into `res.text`, applies the stop rules
    /// and reports the row (unless final-only) and the finish; true when it finished.
    fn append_token(&mut self, s: u32, tok: u32, sample_row: i32, now: f64, res: &mut StepResult) -> bool {
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

    /// Checks the bookkeeping invariants (for tests): every block reference is held by a
    /// live sequence, and free + referenced = total.
    pub fn check_invariants(&self) -> Result<(), String> {
        let free = self.bm.check_free_list()?;
        let mut refs = vec![0u32; self.bm.num_total_blocks()];
        for seq in self.seqs.iter().flatten() {
            if seq.status == SeqStatus::Finished && !seq.block_table.is_empty() {
                return Err("a finished sequence still holds blocks".into());
            }
            if seq.status == SeqStatus::Waiting && !seq.block_table.is_empty() {
                return Err("a waiting sequence holds blocks".into());
            }
            if seq.status == SeqStatus::Running
                && seq.block_table.len() < seq.num_computed.div_ceil(self.cfg.block_size)
            {
                return Err("a sequence has computed tokens without blocks".into());
            }
            for &b in &seq.block_table {
                refs[b as usize] += 1;
            }
        }
        for (b, &r) in refs.iter().enumerate() {
            if r != self.bm.ref_count(b as u32) {
                return Err(format!("block {b}: {r} tables hold it, ref count {}", self.bm.ref_count(b as u32)));
            }
        }
        let used = refs.iter().filter(|&&r| r > 0).count();
        if used + free != self.bm.num_total_blocks() {
            return Err(format!("{used} used + {free} free != {} blocks", self.bm.num_total_blocks()));
        }
        if self.running.len() + self.waiting.len()
            != self.seqs.iter().flatten().filter(|s| s.status != SeqStatus::Finished).count()
        {
            return Err("running + waiting does not match the live sequences".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(num_blocks: usize, max_num_seqs: usize, max_tokens: usize) -> SchedulerConfig {
        SchedulerConfig {
            num_blocks,
            block_size: 4,
            max_model_len: 96,
            max_num_seqs,
            max_num_batched_tokens: max_tokens,
            max_num_sample_rows: max_num_seqs + 3,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            eos_token_ids: vec![],
            seed: 7,
        }
    }

    fn params(n: u32, max_tokens: u32) -> RequestParams {
        RequestParams { n, max_tokens, ignore_eos: true, ..Default::default() }
    }

    /// Checks a batch's layout against the scheduler's own state before update().
    fn check_batch(s: &Scheduler, b: &BatchData) {
        assert_eq!(b.query_start_loc.len(), b.num_seqs + 1);
        assert_eq!(*b.query_start_loc.last().unwrap() as usize, b.num_tokens);
        assert!(b.num_tokens <= s.cfg.max_num_batched_tokens);
        assert!(b.num_seqs <= s.cfg.max_num_seqs);
        assert!(b.num_samples <= s.cfg.max_num_sample_rows);
        for row in 0..b.num_seqs {
            let (q0, q1) = (b.query_start_loc[row] as usize, b.query_start_loc[row + 1] as usize);
            assert!(q1 > q0);
            if row < b.num_decodes {
                assert_eq!(q1 - q0, 1);
            }
            assert_eq!(b.positions[q1 - 1] + 1, b.seq_lens[row] as i64);
            for t in q0..q1 {
                let pos = b.positions[t] as usize;
                let blk = b.block_tables[row * b.max_blocks + pos / 4] as i64;
                assert_eq!(b.slot_mapping[t], blk * 4 + (pos % 4) as i64);
            }
        }
        assert_eq!(b.logits_indices.len(), b.num_samples);
        assert_eq!(b.sample_seq_slots.len(), b.num_samples);
        assert_eq!(b.sample_steps.len(), b.num_samples);
        assert_eq!(b.new_seed_count(), b.new_seq_slots.len());
    }

    impl BatchData {
        fn new_seed_count(&self) -> usize {
            self.new_seeds.len()
        }
    }

    /// The worker's view of the sampler-state protocol: slot -> request id, updated from
    /// each batch that runs. Every sample row must name a slot the worker knows, holding its
    /// own request's state.
    fn apply_to_worker(s: &Scheduler, b: &BatchData, known: &mut std::collections::HashMap<i32, String>) {
        for f in &b.freed_seq_slots {
            known.remove(f);
        }
        for &slot in &b.new_seq_slots {
            let id = seq_ref(&s.seqs, slot as u32).request_id.to_string();
            known.insert(slot, id);
        }
        for j in 0..b.num_samples {
            let row = b.sample_rows[j] as usize;
            let want = req_ref(&s.requests, b.row_req_slots[row]).request_id.to_string();
            let slot = b.sample_seq_slots[j];
            assert_eq!(
                known.get(&slot),
                Some(&want),
                "sample row {j} names slot {slot} the worker does not hold for {want}"
            );
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// prompt, n, max_tokens, final_only
        Add(Vec<u32>, u32, u32, bool),
        Step,
        Abort(usize),
        /// schedule() then discard_pending(): the worker refused the batch.
        Discard,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (proptest::collection::vec(0u32..3, 1..40), 1u32..4, 1u32..12, any::<bool>())
                .prop_map(|(p, n, m, f)| Op::Add(p, n, m, f)),
            5 => Just(Op::Step),
            1 => any::<usize>().prop_map(Op::Abort),
            1 => Just(Op::Discard),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Random adds, steps and aborts against a small pool: the bookkeeping stays exact,
        /// every request that was not aborted ends with exactly max_tokens outputs per child,
        /// every block comes back, a final-only request ("f" ids) never gets a row and a
        /// streamed one gets a row per token.
        #[test]
        fn scheduler_invariants(ops in proptest::collection::vec(op(), 1..60),
                                blocks in 14usize..40, seqs in 1usize..6, budget in 1usize..40,
                                samples in 3usize..9) {
            // Sample-row limits from 3 (the largest n below) up: prompts finishing with n > 1
            // must wait for room, never overflow it.
            let mut s = Scheduler::new(SchedulerConfig { max_num_sample_rows: samples, ..cfg(blocks, seqs, budget) }, None).unwrap();
            let mut expect: std::collections::HashMap<String, (u32, u32)> = Default::default();
            let mut got: std::collections::HashMap<(String, u32), (u32, Option<FinishReason>)> = Default::default();
            let mut rows: std::collections::HashMap<(String, u32), u32> = Default::default();
            let mut next = 0;
            let mut rng = 1u64;
            let mut known: std::collections::HashMap<i32, String> = Default::default();
            let mut step = |s: &mut Scheduler, got: &mut std::collections::HashMap<(String, u32), (u32, Option<FinishReason>)>, rng: &mut u64| {
                let record = |got: &mut std::collections::HashMap<(String, u32), (u32, Option<FinishReason>)>, r: &StepResult| {
                    for f in &r.finished {
                        let e = got.entry((f.request_id.to_string(), f.sample_index)).or_default();
                        assert!(e.1.is_none(), "finished twice");
                        *e = (f.token_ids.len() as u32, Some(f.finish_reason));
                    }
                };
                let Some(b) = s.schedule().unwrap() else {
                    let r = s.update(&[], 0.0).unwrap();
                    assert_eq!(r.num_rows(), 0);
                    record(got, &r);
                    return false;
                };
                check_batch(s, &b);
                apply_to_worker(s, &b, &mut known);
                // Slots name requests only until update() releases them: read the ids now.
                let slot_ids: std::collections::HashMap<u32, String> = b.row_req_slots.iter()
                    .map(|&sl| (sl, req_ref(&s.requests, sl).request_id.to_string())).collect();
                let ids: Vec<i64> = (0..b.num_samples).map(|_| { *rng = splitmix64(*rng); (*rng % 50) as i64 }).collect();
                let r = s.update(&ids, 0.0).unwrap();
                assert!(r.num_new_tokens >= r.num_rows());
                for j in 0..r.num_rows() {
                    assert_eq!(r.row_token[j], ids[r.row_sample_row[j] as usize]);
                    let id = &slot_ids[&r.row_req[j]];
                    assert!(id.starts_with('r'), "final-only request {id} got a row");
                    *rows.entry((id.clone(), r.row_sample_index[j] as u32)).or_default() += 1;
                }
                for f in r.finished.iter().filter(|f| f.request_id.starts_with('r')) {
                    assert_eq!(rows.get(&(f.request_id.to_string(), f.sample_index)).copied().unwrap_or(0),
                               f.token_ids.len() as u32, "a streamed sequence's rows are its tokens");
                }
                record(got, &r);
                s.check_invariants().unwrap();
                true
            };
            for op in ops {
                match op {
                    Op::Add(p, n, m, final_only) => {
                        let id = format!("{}{next}", if final_only { 'f' } else { 'r' });
                        next += 1;
                        if s.add_request(&id, p, RequestParams { final_only, ..params(n, m) }).is_ok() {
                            expect.insert(id, (n, m));
                        }
                    }
                    Op::Step => { step(&mut s, &mut got, &mut rng); }
                    Op::Discard => {
                        if let Some(b) = s.schedule().unwrap() {
                            check_batch(&s, &b);
                            prop_assert!(s.discard_pending());
                        }
                        prop_assert!(!s.discard_pending());
                    }
                    Op::Abort(i) => {
                        if next > 0 {
                            for kind in ['r', 'f'] {
                                let id = format!("{kind}{}", i % next);
                                if s.abort_request(&id) {
                                    expect.get_mut(&id).unwrap().1 = 0;
                                }
                            }
                        }
                    }
                }
                s.check_invariants().unwrap();
            }
            let mut guard = 0;
            while s.has_unfinished() || guard == 0 {
                step(&mut s, &mut got, &mut rng);
                guard += 1;
                prop_assert!(guard < 5000, "no progress");
            }
            for (id, (n, m)) in expect {
                for i in 0..n {
                    let (count, fin) = got.get(&(id.clone(), i)).cloned().unwrap_or_default();
                    if m == 0 {
                        prop_assert!(fin.is_some());
                    } else {
                        prop_assert_eq!(count, m, "{} child {}", id, i);
                        prop_assert_eq!(fin, Some(FinishReason::Length));
                    }
                }
            }
            prop_assert_eq!(s.bm.num_free_blocks(), s.bm.num_total_blocks());
            prop_assert_eq!(s.num_running() + s.num_waiting(), 0);
        }
    }

    /// vLLM's order: EOS and stop ids beat max_tokens on the last allowed token (finish
    /// "stop"), the primary EOS reports no stop_reason and a further EOS its id, and both end
    /// a sequence even below min_tokens (only a grammar can make the sampler pick them there).
    #[test]
    fn eos_and_stop_ids_win_over_length_and_report_ids() {
        let mut c = cfg(64, 8, 64);
        c.eos_token_ids = vec![2, 3];
        let mut s = Scheduler::new(c, None).unwrap();
        let p = |max_tokens, min_tokens| RequestParams {
            max_tokens,
            min_tokens,
            stop_token_ids: vec![9],
            ..Default::default()
        };
        s.add_request("primary", vec![5, 6], p(1, 0)).unwrap();
        s.add_request("second_eos", vec![5, 7], p(1, 0)).unwrap();
        s.add_request("stop_id", vec![5, 8], p(1, 0)).unwrap();
        s.add_request("length", vec![5, 9], p(1, 0)).unwrap();
        s.add_request("below_min", vec![5, 10], p(8, 4)).unwrap();
        let b = s.schedule().unwrap().unwrap();
        assert_eq!(b.num_samples, 5);
        let r = s.update(&[2, 3, 9, 4, 3], 0.0).unwrap();
        let got: std::collections::HashMap<&str, (FinishReason, StopReason)> =
            r.finished.iter().map(|f| (&*f.request_id, (f.finish_reason, f.stop_reason.clone()))).collect();
        assert_eq!(got["primary"], (FinishReason::Stop, StopReason::None));
        assert_eq!(got["second_eos"], (FinishReason::Stop, StopReason::TokenId(3)));
        assert_eq!(got["stop_id"], (FinishReason::Stop, StopReason::TokenId(9)));
        assert_eq!(got["length"], (FinishReason::Length, StopReason::None));
        assert_eq!(got["below_min"], (FinishReason::Stop, StopReason::TokenId(3)));
        assert_eq!(s.bm.num_free_blocks(), s.bm.num_total_blocks());
    }

    /// Constrained requests' sample rows come back with their sample indices, a fork's
    /// children as 0..n, and nothing for unconstrained requests or mid-prefill rows.
    #[test]
    fn pending_structured_samples_name_constrained_rows() {
        let mut s = Scheduler::new(cfg(64, 8, 64), None).unwrap();
        let so = |n, max_tokens| RequestParams { structured_output: true, temperature: 1.0, ..params(n, max_tokens) };
        s.add_request("free", vec![5, 6], params(1, 4)).unwrap();
        s.add_request("json", vec![5, 7], so(1, 4)).unwrap();
        s.add_request("json_n3", vec![5, 8, 9], so(3, 4)).unwrap();
        assert_eq!(s.pending_structured_samples(), (vec![], vec![]));
        let b = s.schedule().unwrap().unwrap();
        assert_eq!(b.num_samples, 5);
        assert_eq!(s.pending_structured_samples(), (vec![1, 2, 3, 4], vec![0, 0, 1, 2]));
        s.update(&[10, 11, 12, 13, 14], 0.0).unwrap();
        assert_eq!(s.pending_structured_samples(), (vec![], vec![]));
        let b = s.schedule().unwrap().unwrap();
        let (rows, idx) = s.pending_structured_samples();
        assert_eq!(rows.len(), 4);
        let mut idx_sorted = idx.clone();
        idx_sorted.sort();
        assert_eq!(idx_sorted, vec![0, 0, 1, 2]);
        assert!(rows.iter().all(|&r| (r as usize) < b.num_samples));
    }

    #[test]
    fn decodes_first_then_chunked_prefill() {
        let mut s = Scheduler::new(cfg(64, 8, 10), None).unwrap();
        s.add_request("a", (1..=5).collect(), params(1, 5)).unwrap();
        let b = s.schedule().unwrap().unwrap();
        assert_eq!((b.num_seqs, b.num_tokens, b.num_samples), (1, 5, 1));
        s.update(&[9], 0.0).unwrap();
        s.add_request("b", (100..130).collect(), params(1, 3)).unwrap();
        let b = s.schedule().unwrap().unwrap();
        // One decode for "a" first, then 9 prompt tokens of "b" (budget 10), no sample for b yet.
        assert_eq!((b.num_decodes, b.num_seqs, b.num_tokens, b.num_samples), (1, 2, 10, 1));
        assert_eq!(b.input_ids[0], 9);
        assert_eq!(&b.input_ids[1..], &(100..109).collect::<Vec<i64>>()[..]);
        check_batch(&s, &b);
        s.update(&[3], 0.0).unwrap();
        s.check_invariants().unwrap();
    }

    #[test]
    fn prompts_finishing_with_n_wait_for_sample_rows() {
        // 9 prompts of n = 4 with room for 6 sample rows a step (the server's crash: 9 x n
        // rows in one step): each step finishes at most one prompt's 4 children on top of
        // the running decodes, and every child still gets all of its tokens.
        let mut s = Scheduler::new(SchedulerConfig { max_num_sample_rows: 6, ..cfg(400, 64, 512) }, None).unwrap();
        for i in 0..9 {
            s.add_request(&format!("r{i}"), vec![1, 2, 3, 4, 5, 6, i], params(4, 3)).unwrap();
        }
        assert!(s.add_request("too-many", vec![1], params(7, 3)).unwrap_err().contains("max_num_sample_rows"));
        let mut finished = 0;
        for _ in 0..200 {
            let Some(b) = s.schedule().unwrap() else { break };
            check_batch(&s, &b);
            assert!(b.num_samples <= 6, "{} sample rows", b.num_samples);
            let ids = vec![7i64; b.num_samples];
            finished += s.update(&ids, 0.0).unwrap().finished.len();
            s.check_invariants().unwrap();
        }
        assert_eq!(finished, 36);
        assert!(!s.has_unfinished());
    }

    #[test]
    fn preemption_recomputes_with_cache_hits() {
        // 6 blocks of 4: two 9-token prompts fit (3 blocks each) until both grow.
        let mut s = Scheduler::new(cfg(6, 4, 64), None).unwrap();
        s.add_request("a", (0..9).collect(), params(1, 10)).unwrap();
        s.add_request("b", (50..59).collect(), params(1, 10)).unwrap();
        let mut done = 0;
        let mut steps = 0;
        while s.has_unfinished() {
            let b = s.schedule().unwrap().unwrap();
            check_batch(&s, &b);
            let ids = vec![1i64; b.num_samples];
            done += s.update(&ids, 0.0).unwrap().finished.len();
            s.check_invariants().unwrap();
            steps += 1;
            assert!(steps < 200);
        }
        assert_eq!(done, 2);
        assert!(s.num_preemptions > 0);
        assert!(s.prefix_cache_hit_tokens > 0, "the recompute reuses the cached prompt blocks");
        assert_eq!(s.bm.num_free_blocks(), 6);
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release --lib timing -- --ignored --nocapture`: the core's share of a
    /// 1,024-sequence decode step, without the Python boundary.
    #[test]
    #[ignore]
    fn decode_step_1024() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                num_blocks: 200_000,
                block_size: 16,
                max_model_len: 8192,
                max_num_seqs: 1024,
                max_num_batched_tokens: 8192,
                max_num_sample_rows: 1024 + 128,
                enable_prefix_caching: true,
                enable_chunked_prefill: true,
                eos_token_ids: vec![0],
                seed: 0,
            },
            std::env::var("FASTSERVE_TIMING_TOKENIZER").ok().map(|d| Arc::new(CoreTokenizer::from_dir(&d).unwrap())),
        )
        .unwrap();
        let stop: Vec<String> =
            if s.tokenizer.is_some() { vec!["\u{2603}STOP\u{2603}".into(), "<|bench-end|>".into()] } else { vec![] };
        let mut x = 1u64;
        for i in 0..1024 {
            let p: Vec<u32> = (0..128)
                .map(|_| {
                    x = splitmix64(x);
                    100 + (x % 30000) as u32
                })
                .collect();
            s.add_request(
                &format!("r{i}"),
                p,
                RequestParams { max_tokens: 4000, ignore_eos: true, stop: stop.clone(), ..Default::default() },
            )
            .unwrap();
        }
        // Fresh random ids each step over most of the vocabulary, as a model samples them: the
        // same ids every step would keep their detokenizer table entries in cache.
        let vocab = s.tokenizer.as_ref().map_or(30_000, |t| t.vocab_size.min(120_000)) as u64;
        let mut draw = |n: usize| -> Vec<i64> {
            (0..n)
                .map(|_| {
                    x = splitmix64(x);
                    100 + (x % (vocab - 100)) as i64
                })
                .collect()
        };
        for _ in 0..40 {
            let b = s.schedule().unwrap().unwrap();
            s.update(&draw(b.num_samples), 0.0).unwrap();
        }
        let (mut ts, mut tu) = (vec![], vec![]);
        let steps: usize = std::env::var("FASTSERVE_TIMING_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
        for _ in 0..steps {
            let ids = draw(1024);
            let t0 = std::time::Instant::now();
            let b = s.schedule().unwrap().unwrap();
            let t1 = std::time::Instant::now();
            let o = s.update(&ids[..b.num_samples], 0.0).unwrap();
            let t2 = std::time::Instant::now();
            drop((b, o));
            ts.push((t1 - t0).as_nanos());
            tu.push((t2 - t1).as_nanos());
        }
        ts.sort();
        tu.sort();
        eprintln!("schedule median {} us, update median {} us", ts[steps / 2] / 1000, tu[steps / 2] / 1000);
    }
}
