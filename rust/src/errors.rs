//! Typed request errors. An `AdmissionError` names the request field it is about (the
//! offline / SamplingParams name), so no layer above has to recover it from the message;
//! Python sees it as `fastserve.errors.InvalidRequest(message, field)`, a ValueError.

use std::fmt;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// Why a request cannot be admitted. Each variant's message says what to change.
#[derive(Clone, Debug, PartialEq)]
pub enum AdmissionError {
    /// A parameter outside its documented range.
    InvalidParam {
        field: &'static str,
        message: String,
    },
    DuplicateRequestId {
        request_id: String,
    },
    EmptyPrompt,
    PromptTooLong {
        num_tokens: usize,
        max_model_len: usize,
    },
    /// One step could not sample all of the request's sequences at once.
    TooManySequences {
        n: u32,
        max_num_sample_rows: usize,
    },
    /// Stop strings without detokenized text to match them against.
    StopNeedsText,
    /// The longest sequence the request can grow to needs more KV blocks than exist;
    /// `prompt_alone` when the prompt already does (so the prompt is the field to change).
    ExceedsKvCache {
        num_tokens: usize,
        blocks: usize,
        block_size: usize,
        num_blocks: usize,
        prompt_alone: bool,
    },
}

impl AdmissionError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        AdmissionError::InvalidParam { field, message: message.into() }
    }

    /// The request field at fault, as SamplingParams / the offline API names it.
    pub fn field(&self) -> &'static str {
        match self {
            AdmissionError::InvalidParam { field, .. } => field,
            AdmissionError::DuplicateRequestId { .. } => "request_id",
            AdmissionError::EmptyPrompt | AdmissionError::PromptTooLong { .. } => "prompt",
            // The core's n is best_of when that is set; the caller knows which it passed.
            AdmissionError::TooManySequences { .. } => "n",
            AdmissionError::StopNeedsText => "stop",
            AdmissionError::ExceedsKvCache { prompt_alone: true, .. } => "prompt",
            AdmissionError::ExceedsKvCache { prompt_alone: false, .. } => "max_tokens",
        }
    }

    /// Whether the message contains `needle` (callers and tests match on message text).
    pub fn contains(&self, needle: &str) -> bool {
        self.to_string().contains(needle)
    }
}

impl fmt::Display for AdmissionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdmissionError::InvalidParam { message, .. } => f.write_str(message),
            AdmissionError::DuplicateRequestId { request_id } => {
                write!(f, "request_id {request_id:?} is already in use; give each request a unique id")
            }
            AdmissionError::EmptyPrompt => f.write_str("prompt_token_ids is empty; a prompt needs at least one token"),
            AdmissionError::PromptTooLong { num_tokens, max_model_len } => write!(
                f,
                "prompt_token_ids has {num_tokens} tokens but max_model_len is {max_model_len}: the prompt plus at \
                 least one generated token must fit; shorten the prompt or raise --max-model-len"
            ),
            AdmissionError::TooManySequences { n, max_num_sample_rows } => write!(
                f,
                "n (sequences per request, best_of when set) is {n} but one step samples at most \
                 {max_num_sample_rows} rows (max_num_sample_rows): lower n / best_of or raise max_num_sample_rows"
            ),
            AdmissionError::StopNeedsText => f.write_str(
                "stop strings need detokenized text: pass a tokenizer to the Scheduler and keep \
                 detokenize=True, or use stop_token_ids",
            ),
            AdmissionError::ExceedsKvCache { num_tokens, blocks, block_size, num_blocks, .. } => write!(
                f,
                "a sequence of {num_tokens} tokens needs {blocks} KV-cache blocks of {block_size} tokens but only \
                 {num_blocks} exist: raise --gpu-memory-utilization or lower --max-model-len (or max_tokens)"
            ),
        }
    }
}

impl std::error::Error for AdmissionError {}

/// `fastserve.errors.InvalidRequest(message, field)`; a plain ValueError only when that
/// module cannot be imported (the extension used without its package).
impl From<AdmissionError> for PyErr {
    fn from(e: AdmissionError) -> PyErr {
        let (message, field) = (e.to_string(), e.field());
        Python::with_gil(|py| {
            let cls = py.import("fastserve.errors").and_then(|m| m.getattr("InvalidRequest"));
            match cls.and_then(|c| c.downcast_into::<PyType>().map_err(PyErr::from)) {
                Ok(cls) => PyErr::from_type(cls, (message, field)),
                Err(_) => PyValueError::new_err(message),
            }
        })
    }
}
