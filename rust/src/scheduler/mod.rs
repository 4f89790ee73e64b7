//! Continuous-batching scheduler policy: what runs this step. FCFS queues, a per-step token
//! budget, chunked prefill, preemption by recompute, and the per-step row, token and
//! sample-row limits. The rest of a request's life sits beside it, one concern a file:
//! `admission` (checking and queueing a request), the block manager's prefix match,
//! `batch_builder` (the step's flat arrays), `update` (applying samples, n > 1 forking) and
//! `finish` (the stop rules and finished outputs).
//! Pure Rust (no Python types) so it is unit-testable and the binding stays a thin shell.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::block_manager::{BlockManager, PrefixHit};
use crate::sequence::{splitmix64, Request, SeqStatus, Sequence};
use crate::tokenizer::CoreTokenizer;

mod admission;
mod batch_builder;
mod finish;
mod update;

pub use batch_builder::BatchData;
pub use finish::{FinishedSeq, StepResult};

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

    pub(super) fn insert_seq(&mut self, s: Sequence) -> u32 {
        if let Some(i) = self.free_seqs.pop() {
            self.seqs[i as usize] = Some(s);
            i
        } else {
            self.seqs.push(Some(s));
            (self.seqs.len() - 1) as u32
        }
    }

    pub(super) fn release_request(&mut self, r: u32) {
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
            let first_schedule = seq.num_computed == 0 && seq.block_table.is_empty();
            let use_cache = self.cfg.enable_prefix_caching && !seq.sp.prompt_logprobs;
            let hit = if first_schedule && use_cache {
                // At least one token must be computed to produce logits.
                let max_hit = (seq.tokens.len() - 1) / bs;
                self.bm.match_prefix(&seq.tokens, &mut seq.block_hashes, max_hit)
            } else {
                PrefixHit::default()
            };
            let computed = seq.num_computed.max(hit.num_cached_tokens);
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
            let need = blocks - hit.blocks.len() - seq.block_table.len() + hit.num_free;
            if need > self.bm.num_free_blocks() {
                break;
            }
            self.bm.acquire_prefix(&hit, &mut seq.block_table);
            let grown = self.bm.grow(&mut seq.block_table, blocks);
            debug_assert!(grown);
            let hit_tokens = hit.num_cached_tokens;
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
mod tests;

#[cfg(test)]
mod timing;
