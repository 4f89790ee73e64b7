//! Batch building: the flat arrays of one step (model inputs, sample rows, and the sampler
//! state of sequences the worker has not seen), from the rows the policy picked.

use super::{prefetch_seq, req_ref, seq_ref, Scheduled, Scheduler, Stage, AHEAD};
use crate::sequence::{child_seed, Sequence};

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

impl Scheduler {
    pub(super) fn build_batch(&self, rows: &[Scheduled], num_decodes: usize) -> BatchData {
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
}
