//! RequestParams: the SamplingParams fields the core needs, as plain typed values.
//! User-facing validation lives in Python; the checks here guard the core's own invariants
//! (a value the scheduler could not honour) and name the field like the Python side does.

use pyo3::prelude::*;

use crate::errors::AdmissionError;

#[pyclass(frozen, module = "fastserve._core")]
#[derive(Clone, Debug)]
pub struct RequestParams {
    #[pyo3(get)]
    pub n: u32,
    #[pyo3(get)]
    pub max_tokens: u32,
    #[pyo3(get)]
    pub min_tokens: u32,
    #[pyo3(get)]
    pub temperature: f32,
    #[pyo3(get)]
    pub top_p: f32,
    #[pyo3(get)]
    pub top_k: i32,
    #[pyo3(get)]
    pub min_p: f32,
    #[pyo3(get)]
    pub presence_penalty: f32,
    #[pyo3(get)]
    pub frequency_penalty: f32,
    #[pyo3(get)]
    pub repetition_penalty: f32,
    #[pyo3(get)]
    pub seed: Option<i64>,
    #[pyo3(get)]
    pub stop: Vec<String>,
    #[pyo3(get)]
    pub stop_token_ids: Vec<u32>,
    #[pyo3(get)]
    pub bad_words_token_ids: Vec<Vec<u32>>,
    #[pyo3(get)]
    pub ignore_eos: bool,
    #[pyo3(get)]
    pub include_stop_str_in_output: bool,
    #[pyo3(get)]
    pub skip_special_tokens: bool,
    #[pyo3(get)]
    pub spaces_between_special_tokens: bool,
    #[pyo3(get)]
    pub detokenize: bool,
    #[pyo3(get)]
    pub logprobs: Option<u32>,
    #[pyo3(get)]
    pub prompt_logprobs: Option<u32>,
    /// Report this request's sequences only when they finish (vLLM's FINAL_ONLY output
    /// kind): update() then hands Python nothing for them on the other steps.
    #[pyo3(get)]
    pub final_only: bool,
    /// (token, value) added to the logits of every step (OpenAI's logit_bias); kept in the
    /// worker's sampler state, sent once per sequence.
    #[pyo3(get)]
    pub vocab_bias: Vec<(u32, f32)>,
    /// When non-empty, the only tokens that may be sampled (vLLM's allowed_token_ids).
    #[pyo3(get)]
    pub vocab_allow: Vec<u32>,
    /// A grammar constrains this request's tokens (structured outputs): the engine asks for
    /// its sample rows each step (`Scheduler.pending_structured_samples`) to mask them.
    #[pyo3(get)]
    pub structured_output: bool,
}

impl Default for RequestParams {
    fn default() -> Self {
        RequestParams {
            n: 1,
            max_tokens: 16,
            min_tokens: 0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            stop: vec![],
            stop_token_ids: vec![],
            bad_words_token_ids: vec![],
            ignore_eos: false,
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            detokenize: true,
            logprobs: None,
            prompt_logprobs: None,
            final_only: false,
            vocab_bias: vec![],
            vocab_allow: vec![],
            structured_output: false,
        }
    }
}

impl RequestParams {
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    // `!(x >= 0.0)` on purpose: it also rejects NaN, which `x < 0.0` would let through.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<(), AdmissionError> {
        if self.n < 1 {
            return Err(AdmissionError::invalid("n", format!("n must be at least 1, got {}", self.n)));
        }
        if self.max_tokens < 1 {
            return Err(AdmissionError::invalid(
                "max_tokens",
                format!("max_tokens must be at least 1, got {}", self.max_tokens),
            ));
        }
        if self.min_tokens > self.max_tokens {
            return Err(AdmissionError::invalid(
                "min_tokens",
                format!(
                    "min_tokens ({}) must not exceed max_tokens ({}); lower min_tokens or raise max_tokens",
                    self.min_tokens, self.max_tokens
                ),
            ));
        }
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(AdmissionError::invalid(
                "temperature",
                format!("temperature must be a finite number >= 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(AdmissionError::invalid("top_p", format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(AdmissionError::invalid("min_p", format!("min_p must be in [0, 1], got {}", self.min_p)));
        }
        if !(self.repetition_penalty > 0.0) || !self.repetition_penalty.is_finite() {
            return Err(AdmissionError::invalid(
                "repetition_penalty",
                format!("repetition_penalty must be > 0, got {}", self.repetition_penalty),
            ));
        }
        for (field, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !v.is_finite() {
                return Err(AdmissionError::invalid(
                    field,
                    "presence_penalty and frequency_penalty must be finite numbers",
                ));
            }
        }
        if self.bad_words_token_ids.iter().any(|w| w.is_empty()) {
            return Err(AdmissionError::invalid(
                "bad_words",
                "bad_words_token_ids must not contain an empty token list",
            ));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(AdmissionError::invalid("stop", "stop must not contain an empty string"));
        }
        if self.vocab_bias.iter().any(|&(_, v)| v.is_nan()) {
            return Err(AdmissionError::invalid("logit_bias", "vocab_bias values must be numbers, not NaN"));
        }
        Ok(())
    }
}

#[pymethods]
impl RequestParams {
    #[new]
    #[pyo3(signature = (
        *, n = 1, max_tokens = 16, min_tokens = 0, temperature = 1.0, top_p = 1.0, top_k = 0,
        min_p = 0.0, presence_penalty = 0.0, frequency_penalty = 0.0, repetition_penalty = 1.0,
        seed = None, stop = vec![], stop_token_ids = vec![], bad_words_token_ids = vec![],
        ignore_eos = false, include_stop_str_in_output = false, skip_special_tokens = true,
        spaces_between_special_tokens = true, detokenize = true, logprobs = None,
        prompt_logprobs = None, final_only = false, vocab_bias = vec![], vocab_allow = vec![],
        structured_output = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn py_new(
        n: u32,
        max_tokens: u32,
        min_tokens: u32,
        temperature: f32,
        top_p: f32,
        top_k: i32,
        min_p: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        repetition_penalty: f32,
        seed: Option<i64>,
        stop: Vec<String>,
        stop_token_ids: Vec<u32>,
        bad_words_token_ids: Vec<Vec<u32>>,
        ignore_eos: bool,
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
        detokenize: bool,
        logprobs: Option<u32>,
        prompt_logprobs: Option<u32>,
        final_only: bool,
        vocab_bias: Vec<(u32, f32)>,
        vocab_allow: Vec<u32>,
        structured_output: bool,
    ) -> PyResult<Self> {
        let p = RequestParams {
            n,
            max_tokens,
            min_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            seed,
            stop,
            stop_token_ids,
            bad_words_token_ids,
            ignore_eos,
            include_stop_str_in_output,
            skip_special_tokens,
            spaces_between_special_tokens,
            detokenize,
            logprobs,
            prompt_logprobs,
            final_only,
            vocab_bias,
            vocab_allow,
            structured_output,
        };
        p.validate()?;
        Ok(p)
    }

    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}
