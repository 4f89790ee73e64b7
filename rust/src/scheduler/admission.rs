//! Admission: checking a request against the engine's limits and queueing it.

use std::sync::Arc;

use super::Scheduler;
use crate::errors::AdmissionError;
use crate::sampling_params::RequestParams;
use crate::sequence::{child_seed, splitmix64, Request, SampleParams, SeqStatus, Sequence};
use crate::stop::StopSet;
use crate::tokenizer::IncrementalDetokenizer;

impl Scheduler {
    pub(super) fn make_detok(
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
    pub fn add_request(
        &mut self,
        request_id: &str,
        prompt: Vec<u32>,
        params: RequestParams,
    ) -> Result<u32, AdmissionError> {
        if self.ids.contains_key(request_id) {
            return Err(AdmissionError::DuplicateRequestId { request_id: request_id.to_owned() });
        }
        if prompt.is_empty() {
            return Err(AdmissionError::EmptyPrompt);
        }
        let (p, max_len) = (prompt.len(), self.cfg.max_model_len);
        if p >= max_len {
            return Err(AdmissionError::PromptTooLong { num_tokens: p, max_model_len: max_len });
        }
        params.validate()?;
        if params.n as usize > self.cfg.max_num_sample_rows {
            return Err(AdmissionError::TooManySequences {
                n: params.n,
                max_num_sample_rows: self.cfg.max_num_sample_rows,
            });
        }
        if !params.stop.is_empty() && (self.tokenizer.is_none() || !params.detokenize) {
            return Err(AdmissionError::StopNeedsText);
        }
        let longest = (p + params.max_tokens as usize).min(max_len);
        let need = self.bm.blocks_for(longest);
        if need > self.cfg.num_blocks {
            return Err(AdmissionError::ExceedsKvCache {
                num_tokens: longest,
                blocks: need,
                block_size: self.cfg.block_size,
                num_blocks: self.cfg.num_blocks,
                prompt_alone: self.bm.blocks_for(p) > self.cfg.num_blocks,
            });
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
}
