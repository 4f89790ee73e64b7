//! Request and sequence state. A request owns `n` sequences (one until its prompt is
//! prefilled, then forked); each sequence walks Waiting -> Running -> Finished, and may go
//! back to Waiting when preempted (its KV is dropped and recomputed later).

use std::sync::Arc;

use crate::block_manager::extend_hashes;
use crate::sampling_params::RequestParams;
use crate::stop::StopSet;
use crate::tokenizer::IncrementalDetokenizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStatus {
    Waiting,
    Running,
    Finished,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StopReason {
    None,
    TokenId(u32),
    Text(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

pub struct Request {
    pub request_id: Arc<str>,
    pub params: RequestParams,
    pub stop_set: Arc<StopSet>,
    /// Ids that end a sequence (EOS unless ignore_eos, plus stop_token_ids), checked per token.
    pub stop_ids: Vec<u32>,
    /// Ids masked while a sequence is below min_tokens.
    pub min_tokens_banned: Vec<u32>,
    pub bad_single: Vec<u32>,
    pub bad_multi: Vec<Vec<u32>>,
    pub seed: i64,
    pub num_prompt_tokens: usize,
    /// Sequence slot of each child; `seqs.len() < n` until the prompt is prefilled and forked.
    pub seqs: Vec<u32>,
    pub num_unfinished: u32,
    pub aborted: bool,
}

/// The per-token and per-sample facts of a request's params, copied into each sequence so
/// the per-step loops never chase a pointer to the request.
#[derive(Clone, Copy, Debug)]
pub struct SampleParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub num_logprobs: i32,
    pub max_tokens: u32,
    pub min_tokens: u32,
    pub n: u32,
    pub ignore_eos: bool,
    pub has_penalties: bool,
    /// min_tokens or bad words: the request's ban lists must be consulted.
    pub has_bans: bool,
    pub has_stop_ids: bool,
    pub prompt_logprobs: bool,
    pub final_only: bool,
    pub structured_output: bool,
}

impl SampleParams {
    pub fn of(p: &RequestParams) -> Self {
        SampleParams {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            min_p: p.min_p,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            repetition_penalty: p.repetition_penalty,
            num_logprobs: p.logprobs.map_or(-1, |x| x as i32),
            max_tokens: p.max_tokens,
            min_tokens: p.min_tokens,
            n: p.n,
            ignore_eos: p.ignore_eos,
            has_penalties: p.has_penalties(),
            has_bans: p.min_tokens > 0 || !p.bad_words_token_ids.is_empty(),
            has_stop_ids: !p.stop_token_ids.is_empty(),
            prompt_logprobs: p.prompt_logprobs.is_some(),
            final_only: p.final_only,
            structured_output: p.structured_output,
        }
    }
}

// repr(C) keeps the fields every step touches together at the front (two cache lines), so a
// 1,024-sequence step stays within cache.
#[repr(C)]
pub struct Sequence {
    /// Tokens whose KV is in `block_table` (a prefix of `tokens`).
    pub num_computed: usize,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    /// `tokens.last()`, kept beside the hot fields: a decode row's input is its last token,
    /// and reading it from here spares a cache miss on the token buffer per row per step.
    pub last_token: u32,
    pub block_table: Vec<u32>,
    pub sp: SampleParams,
    pub status: SeqStatus,
    /// Set when scheduled in the current step.
    pub scheduled: bool,
    /// n > 1 and the prompt not yet forked into its children.
    pub pending_fork: bool,
    pub req: u32,
    pub sample_index: u32,
    pub num_prompt: usize,
    pub seed: i64,
    pub request_id: Arc<str>,
    /// Chained prefix-cache hashes of the full blocks of `tokens` computed so far.
    pub block_hashes: Vec<u64>,
    /// Prompt positions whose prompt logprob was already requested (recomputes skip them).
    pub prompt_logprobs_done: usize,
    pub num_cached_tokens: Option<usize>,
    pub detok: Option<Box<IncrementalDetokenizer>>,
    pub finish_reason: Option<FinishReason>,
    /// The `now` of the update() that appended the first output token (0 before).
    pub first_token_time: f64,
    /// The worker holds this sequence's sampler state (a batch naming it has run).
    pub sent: bool,
}

impl Sequence {
    #[inline]
    pub fn num_outputs(&self) -> usize {
        self.tokens.len() - self.num_prompt
    }
    #[inline]
    pub fn num_remaining(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
    #[inline]
    pub fn outputs(&self) -> &[u32] {
        &self.tokens[self.num_prompt..]
    }

    /// Extends `block_hashes` to cover the first `num_blocks` full blocks.
    pub fn ensure_hashes(&mut self, num_blocks: usize, block_size: usize) {
        extend_hashes(&mut self.block_hashes, &self.tokens, num_blocks, block_size);
    }
}

/// splitmix64: a full-period mixer, used for the scheduler's seed stream and child seeds.
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seed of child `index` of a request with seed `seed` (n > 1): distinct per child and
/// non-negative so it fits torch.Generator.manual_seed.
pub fn child_seed(seed: i64, index: u32) -> i64 {
    (splitmix64((seed as u64) ^ splitmix64(index as u64 + 1)) >> 1) as i64
}
