//! Applying a step's samples: tokens appended, prefix-cache blocks registered, prompts of
//! n > 1 forked into their children, finished requests released.

use super::{prefetch_seq, req_ref, seq_mut, seq_ref, Scheduler, Stage, StepResult, AHEAD};
use crate::sequence::{child_seed, SampleParams, SeqStatus, Sequence};

impl Scheduler {
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
}
