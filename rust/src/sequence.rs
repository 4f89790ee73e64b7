//! Request and sequence state. A request owns `n` sequences (one until its prompt is
//! prefilled, then forked); each sequence walks Waiting -> Running -> Finished, and may go
//! back to Waiting when preempted (its KV is dropped and recomputed later).

use std::sync::Arc;

use crate::block_manager::chain_hash;
use crate::sampling_params::RequestParams;
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

pub struct Sequence {
    pub req: u32,
    pub sample_index: u32,
    pub status: SeqStatus,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    pub num_prompt: usize,
    /// Tokens whose KV is in `block_table` (a prefix of `tokens`).
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    /// Chained prefix-cache hashes of the full blocks of `tokens` computed so far.
    pub block_hashes: Vec<u64>,
    pub seed: i64,
    /// Prompt positions whose prompt logprob was already requested (recomputes skip them).
    pub prompt_logprobs_done: usize,
    pub num_cached_tokens: Option<usize>,
    pub detok: Option<IncrementalDetokenizer>,
    /// Set when scheduled in the current step: its row in the pending batch.
    pub scheduled: bool,
    pub finish_reason: Option<FinishReason>,
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
        while self.block_hashes.len() < num_blocks {
            let i = self.block_hashes.len();
            let parent = if i == 0 { 0 } else { self.block_hashes[i - 1] };
            let h = chain_hash(parent, &self.tokens[i * block_size..(i + 1) * block_size]);
            self.block_hashes.push(h);
        }
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
