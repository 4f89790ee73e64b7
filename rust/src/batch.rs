//! The Python view of one step's input: `Batch` (numpy arrays moved out of the Rust Vecs, so
//! the hand-off costs one small allocation per array, not a copy per element).

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods};
use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::py_scheduler::Scheduler;
use crate::scheduler::BatchData;

type A1<T> = Py<PyArray1<T>>;

#[pyclass(frozen, module = "fastserve._core")]
pub struct Batch {
    #[pyo3(get)]
    num_seqs: usize,
    #[pyo3(get)]
    num_tokens: usize,
    #[pyo3(get)]
    num_samples: usize,
    #[pyo3(get)]
    num_decodes: usize,
    #[pyo3(get)]
    max_query_len: usize,
    #[pyo3(get)]
    max_seq_len: usize,
    #[pyo3(get)]
    all_greedy: bool,
    #[pyo3(get)]
    any_penalties: bool,
    #[pyo3(get)]
    max_num_logprobs: usize,

    #[pyo3(get)]
    input_ids: A1<i64>,
    #[pyo3(get)]
    positions: A1<i64>,
    #[pyo3(get)]
    slot_mapping: A1<i64>,
    #[pyo3(get)]
    query_start_loc: A1<i32>,
    #[pyo3(get)]
    seq_lens: A1<i32>,
    #[pyo3(get)]
    block_tables: Py<PyArray2<i32>>,
    #[pyo3(get)]
    logits_indices: A1<i64>,

    #[pyo3(get)]
    temperature: A1<f32>,
    #[pyo3(get)]
    top_p: A1<f32>,
    #[pyo3(get)]
    top_k: A1<i32>,
    #[pyo3(get)]
    min_p: A1<f32>,
    #[pyo3(get)]
    presence_penalty: A1<f32>,
    #[pyo3(get)]
    frequency_penalty: A1<f32>,
    #[pyo3(get)]
    repetition_penalty: A1<f32>,
    #[pyo3(get)]
    seeds: A1<i64>,
    #[pyo3(get)]
    sample_steps: A1<i64>,
    #[pyo3(get)]
    num_logprobs: A1<i32>,

    #[pyo3(get)]
    prompt_token_ids: A1<i64>,
    #[pyo3(get)]
    prompt_offsets: A1<i32>,
    #[pyo3(get)]
    output_token_ids: A1<i64>,
    #[pyo3(get)]
    output_offsets: A1<i32>,

    #[pyo3(get)]
    banned_rows: A1<i64>,
    #[pyo3(get)]
    banned_token_ids: A1<i64>,

    #[pyo3(get)]
    prompt_logprob_indices: A1<i64>,
    #[pyo3(get)]
    prompt_logprob_targets: A1<i64>,
    #[pyo3(get)]
    prompt_logprob_rows: A1<i32>,

    row_req_slots: Vec<u32>,
    sample_rows: Vec<u32>,
    /// The scheduler and its step count when this batch was made: request ids are looked up
    /// there (a row costs no string), and only while this batch is the pending one.
    sched: Py<Scheduler>,
    step: u64,
}

/// Zero-length arrays shared by every batch: most steps have no penalties, bans or prompt
/// logprobs, and a fresh empty array per field per step is pure overhead. Sharing is safe
/// because a zero-length array has nothing to write.
pub struct EmptyArrays {
    i64: A1<i64>,
    i32: A1<i32>,
}

impl EmptyArrays {
    pub fn new(py: Python<'_>) -> Self {
        EmptyArrays { i64: arr(py, Vec::new()), i32: arr(py, Vec::new()) }
    }
    pub fn i64(&self, py: Python<'_>, v: Vec<i64>) -> A1<i64> {
        if v.is_empty() { self.i64.clone_ref(py) } else { arr(py, v) }
    }
    pub fn i32(&self, py: Python<'_>, v: Vec<i32>) -> A1<i32> {
        if v.is_empty() { self.i32.clone_ref(py) } else { arr(py, v) }
    }
}

fn arr<T: numpy::Element>(py: Python<'_>, v: Vec<T>) -> A1<T> {
    v.into_pyarray(py).unbind()
}

impl Batch {
    pub fn from_data(py: Python<'_>, d: BatchData, empty: &EmptyArrays, sched: Py<Scheduler>, step: u64) -> PyResult<Batch> {
        let (b, m) = (d.num_seqs, d.max_blocks);
        let block_tables = d.block_tables.into_pyarray(py).reshape([b, m])?.unbind();
        Ok(Batch {
            num_seqs: d.num_seqs,
            num_tokens: d.num_tokens,
            num_samples: d.num_samples,
            num_decodes: d.num_decodes,
            max_query_len: d.max_query_len,
            max_seq_len: d.max_seq_len,
            all_greedy: d.all_greedy,
            any_penalties: d.any_penalties,
            max_num_logprobs: d.max_num_logprobs,
            input_ids: arr(py, d.input_ids),
            positions: arr(py, d.positions),
            slot_mapping: arr(py, d.slot_mapping),
            query_start_loc: arr(py, d.query_start_loc),
            seq_lens: arr(py, d.seq_lens),
            block_tables,
            logits_indices: arr(py, d.logits_indices),
            temperature: arr(py, d.temperature),
            top_p: arr(py, d.top_p),
            top_k: arr(py, d.top_k),
            min_p: arr(py, d.min_p),
            presence_penalty: arr(py, d.presence_penalty),
            frequency_penalty: arr(py, d.frequency_penalty),
            repetition_penalty: arr(py, d.repetition_penalty),
            seeds: arr(py, d.seeds),
            sample_steps: arr(py, d.sample_steps),
            num_logprobs: arr(py, d.num_logprobs),
            prompt_token_ids: empty.i64(py, d.prompt_token_ids),
            prompt_offsets: empty.i32(py, d.prompt_offsets),
            output_token_ids: empty.i64(py, d.output_token_ids),
            output_offsets: empty.i32(py, d.output_offsets),
            banned_rows: empty.i64(py, d.banned_rows),
            banned_token_ids: empty.i64(py, d.banned_token_ids),
            prompt_logprob_indices: empty.i64(py, d.prompt_logprob_indices),
            prompt_logprob_targets: empty.i64(py, d.prompt_logprob_targets),
            prompt_logprob_rows: empty.i32(py, d.prompt_logprob_rows),
            row_req_slots: d.row_req_slots,
            sample_rows: d.sample_rows,
            sched,
            step,
        })
    }
}

#[pymethods]
impl Batch {
    /// Request id of sequence row `row` (until this batch's update()).
    fn request_id(&self, py: Python<'_>, row: usize) -> PyResult<Py<PyString>> {
        let slot = *self
            .row_req_slots
            .get(row)
            .ok_or_else(|| PyIndexError::new_err(format!("row {row} is out of range for {} rows", self.num_seqs)))?;
        self.sched.bind(py).try_borrow()?.request_id_of_slot(py, slot, self.step)
    }

    fn sample_request_id(&self, py: Python<'_>, sample: usize) -> PyResult<Py<PyString>> {
        let row = *self.sample_rows.get(sample).ok_or_else(|| {
            PyIndexError::new_err(format!("sample {sample} is out of range for {} samples", self.num_samples))
        })?;
        self.request_id(py, row as usize)
    }

    fn __repr__(&self) -> String {
        format!(
            "Batch(num_seqs={}, num_decodes={}, num_tokens={}, num_samples={})",
            self.num_seqs, self.num_decodes, self.num_tokens, self.num_samples
        )
    }
}
