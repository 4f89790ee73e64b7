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
    sample_seq_slots: A1<i32>,
    #[pyo3(get)]
    sample_steps: A1<i64>,
    #[pyo3(get)]
    fork_sample_rows: A1<i64>,
    #[pyo3(get)]
    fork_seeds: A1<i64>,
    #[pyo3(get)]
    banned_rows: A1<i64>,
    #[pyo3(get)]
    banned_token_ids: A1<i64>,

    #[pyo3(get)]
    new_seq_slots: A1<i32>,
    #[pyo3(get)]
    new_temperature: A1<f32>,
    #[pyo3(get)]
    new_top_p: A1<f32>,
    #[pyo3(get)]
    new_top_k: A1<i32>,
    #[pyo3(get)]
    new_min_p: A1<f32>,
    #[pyo3(get)]
    new_presence_penalty: A1<f32>,
    #[pyo3(get)]
    new_frequency_penalty: A1<f32>,
    #[pyo3(get)]
    new_repetition_penalty: A1<f32>,
    #[pyo3(get)]
    new_seeds: A1<i64>,
    #[pyo3(get)]
    new_num_logprobs: A1<i32>,
    #[pyo3(get)]
    new_min_tokens: A1<i32>,
    #[pyo3(get)]
    new_prompt_offsets: A1<i32>,
    #[pyo3(get)]
    new_prompt_token_ids: A1<i64>,
    #[pyo3(get)]
    new_output_offsets: A1<i32>,
    #[pyo3(get)]
    new_output_token_ids: A1<i64>,
    #[pyo3(get)]
    new_ban_offsets: A1<i32>,
    #[pyo3(get)]
    new_ban_token_ids: A1<i64>,
    #[pyo3(get)]
    new_min_ban_offsets: A1<i32>,
    #[pyo3(get)]
    new_min_ban_token_ids: A1<i64>,
    #[pyo3(get)]
    new_bias_offsets: A1<i32>,
    #[pyo3(get)]
    new_bias_token_ids: A1<i64>,
    #[pyo3(get)]
    new_bias_values: A1<f32>,
    #[pyo3(get)]
    new_allow_offsets: A1<i32>,
    #[pyo3(get)]
    new_allow_token_ids: A1<i64>,
    #[pyo3(get)]
    freed_seq_slots: A1<i32>,

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

/// Zero-length arrays shared by every batch: most steps have no new sequences, penalties,
/// bans or prompt logprobs, and a fresh empty array per field per step is pure overhead.
/// Sharing is safe because a zero-length array has nothing to write.
pub struct EmptyArrays {
    i64: A1<i64>,
    i32: A1<i32>,
    f32: A1<f32>,
}

impl EmptyArrays {
    pub fn new(py: Python<'_>) -> Self {
        EmptyArrays { i64: arr(py, Vec::new()), i32: arr(py, Vec::new()), f32: arr(py, Vec::new()) }
    }
    pub fn i64(&self, py: Python<'_>, v: Vec<i64>) -> A1<i64> {
        if v.is_empty() {
            self.i64.clone_ref(py)
        } else {
            arr(py, v)
        }
    }
    pub fn i32(&self, py: Python<'_>, v: Vec<i32>) -> A1<i32> {
        if v.is_empty() {
            self.i32.clone_ref(py)
        } else {
            arr(py, v)
        }
    }
    pub fn f32(&self, py: Python<'_>, v: Vec<f32>) -> A1<f32> {
        if v.is_empty() {
            self.f32.clone_ref(py)
        } else {
            arr(py, v)
        }
    }
}

fn arr<T: numpy::Element>(py: Python<'_>, v: Vec<T>) -> A1<T> {
    v.into_pyarray(py).unbind()
}

impl Batch {
    pub fn from_data(
        py: Python<'_>,
        d: BatchData,
        empty: &EmptyArrays,
        sched: Py<Scheduler>,
        step: u64,
    ) -> PyResult<Batch> {
        let (b, m) = (d.num_seqs, d.max_blocks);
        let block_tables = d.block_tables.into_pyarray(py).reshape([b, m])?.unbind();
        let (e64, e32, ef) = (|v| empty.i64(py, v), |v| empty.i32(py, v), |v| empty.f32(py, v));
        Ok(Batch {
            num_seqs: d.num_seqs,
            num_tokens: d.num_tokens,
            num_samples: d.num_samples,
            num_decodes: d.num_decodes,
            max_query_len: d.max_query_len,
            max_seq_len: d.max_seq_len,
            input_ids: arr(py, d.input_ids),
            positions: arr(py, d.positions),
            slot_mapping: arr(py, d.slot_mapping),
            query_start_loc: arr(py, d.query_start_loc),
            seq_lens: arr(py, d.seq_lens),
            block_tables,
            logits_indices: arr(py, d.logits_indices),
            sample_seq_slots: arr(py, d.sample_seq_slots),
            sample_steps: arr(py, d.sample_steps),
            fork_sample_rows: e64(d.fork_sample_rows),
            fork_seeds: e64(d.fork_seeds),
            banned_rows: e64(d.banned_rows),
            banned_token_ids: e64(d.banned_token_ids),
            new_seq_slots: e32(d.new_seq_slots),
            new_temperature: ef(d.new_temperature),
            new_top_p: ef(d.new_top_p),
            new_top_k: e32(d.new_top_k),
            new_min_p: ef(d.new_min_p),
            new_presence_penalty: ef(d.new_presence_penalty),
            new_frequency_penalty: ef(d.new_frequency_penalty),
            new_repetition_penalty: ef(d.new_repetition_penalty),
            new_seeds: e64(d.new_seeds),
            new_num_logprobs: e32(d.new_num_logprobs),
            new_min_tokens: e32(d.new_min_tokens),
            new_prompt_offsets: e32(d.new_prompt_offsets),
            new_prompt_token_ids: e64(d.new_prompt_token_ids),
            new_output_offsets: e32(d.new_output_offsets),
            new_output_token_ids: e64(d.new_output_token_ids),
            new_ban_offsets: e32(d.new_ban_offsets),
            new_ban_token_ids: e64(d.new_ban_token_ids),
            new_min_ban_offsets: e32(d.new_min_ban_offsets),
            new_min_ban_token_ids: e64(d.new_min_ban_token_ids),
            new_bias_offsets: e32(d.new_bias_offsets),
            new_bias_token_ids: e64(d.new_bias_token_ids),
            new_bias_values: ef(d.new_bias_values),
            new_allow_offsets: e32(d.new_allow_offsets),
            new_allow_token_ids: e64(d.new_allow_token_ids),
            freed_seq_slots: e32(d.freed_seq_slots),
            prompt_logprob_indices: e64(d.prompt_logprob_indices),
            prompt_logprob_targets: e64(d.prompt_logprob_targets),
            prompt_logprob_rows: e32(d.prompt_logprob_rows),
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
