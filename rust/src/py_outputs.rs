//! The Python view of one update(): `StepOutputs` (the reported rows as columns, the finished
//! sequences as `FinishedOutput`s) and `StepOutput`, a per-row object built only on demand
//! (iteration, indexing) for callers that want one; the engine reads the columns.

use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1, PyArrayMethods};
use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};
use pyo3::IntoPyObjectExt;

use crate::batch::EmptyArrays;
use crate::scheduler::{FinishedSeq, StepResult};
use crate::sequence::{FinishReason, StopReason};

type A1<T> = Py<PyArray1<T>>;

fn stop_reason_py(py: Python<'_>, stop: &StopReason) -> PyResult<PyObject> {
    match stop {
        StopReason::None => Ok(py.None()),
        StopReason::TokenId(t) => t.into_py_any(py),
        StopReason::Text(s) => s.into_py_any(py),
    }
}

fn stop_reason_repr(stop: &StopReason) -> String {
    match stop {
        StopReason::None => "None".to_string(),
        StopReason::TokenId(t) => t.to_string(),
        StopReason::Text(s) => format!("{s:?}"),
    }
}

/// A sequence that finished (or was aborted), with its whole output.
#[pyclass(frozen, module = "fastserve._core")]
pub struct FinishedOutput {
    request_id: Arc<str>,
    #[pyo3(get)]
    sample_index: u32,
    finish: FinishReason,
    stop: StopReason,
    #[pyo3(get)]
    text: String,
    #[pyo3(get)]
    token_ids: Vec<u32>,
    #[pyo3(get)]
    num_prompt_tokens: usize,
    #[pyo3(get)]
    num_cached_tokens: usize,
    first_token_time: f64,
    final_only: bool,
    row: Option<u32>,
}

impl From<FinishedSeq> for FinishedOutput {
    fn from(f: FinishedSeq) -> Self {
        FinishedOutput {
            request_id: f.request_id,
            sample_index: f.sample_index,
            finish: f.finish_reason,
            stop: f.stop_reason,
            text: f.text,
            token_ids: f.token_ids,
            num_prompt_tokens: f.num_prompt_tokens,
            num_cached_tokens: f.num_cached_tokens,
            first_token_time: f.first_token_time,
            final_only: f.final_only,
            row: f.row,
        }
    }
}

#[pymethods]
impl FinishedOutput {
    #[getter]
    fn request_id(&self) -> &str {
        &self.request_id
    }
    #[getter]
    fn finish_reason(&self) -> &'static str {
        self.finish.as_str()
    }
    #[getter]
    fn stop_reason(&self, py: Python<'_>) -> PyResult<PyObject> {
        stop_reason_py(py, &self.stop)
    }
    /// The `now` of the update() that appended the first token (None: no token).
    #[getter]
    fn first_token_time(&self) -> Option<f64> {
        (!self.token_ids.is_empty()).then_some(self.first_token_time)
    }
    fn __repr__(&self) -> String {
        format!(
            "FinishedOutput(request_id={:?}, sample_index={}, finish_reason={:?}, stop_reason={}, text={:?}, token_ids={:?})",
            &*self.request_id,
            self.sample_index,
            self.finish.as_str(),
            stop_reason_repr(&self.stop),
            self.text,
            self.token_ids
        )
    }
}

/// One update()'s outputs. Rows (sequences of requests without `final_only`) come as
/// columns: `request_ids[j]`, `sample_indices[j]`, `sample_rows[j]` (the batch's sample row,
/// -1 for none), `token_ids[j]` and `text[text_offsets[j]:text_offsets[j + 1]]`. Every
/// sequence that finished is in `finished`, whether or not it has a row.
#[pyclass(frozen, module = "fastserve._core")]
pub struct StepOutputs {
    #[pyo3(get)]
    num_new_tokens: usize,
    #[pyo3(get)]
    num_rows: usize,
    #[pyo3(get)]
    request_ids: Py<PyList>,
    #[pyo3(get)]
    sample_indices: A1<i32>,
    #[pyo3(get)]
    sample_rows: A1<i32>,
    #[pyo3(get)]
    token_ids: A1<i64>,
    #[pyo3(get)]
    text: Py<PyString>,
    /// Code-point offsets into `text`, num_rows + 1 of them.
    #[pyo3(get)]
    text_offsets: A1<i64>,
    #[pyo3(get)]
    finished: Py<PyList>,
    // For the per-row views only.
    rows: RowsForViews,
}

/// What only the views need besides the columns (moved, not copied, out of the result).
struct RowsForViews {
    num_prompt: Vec<u32>,
    num_cached: Vec<u32>,
    finished: Vec<i32>,
}

impl StepOutputs {
    /// `ids[slot]` is the Python request id of request slot `slot` (kept by the Scheduler
    /// binding, so a row costs a reference count, not a new string).
    pub fn from_result(
        py: Python<'_>,
        r: StepResult,
        ids: &[Option<Py<PyString>>],
        empty: &EmptyArrays,
    ) -> PyResult<StepOutputs> {
        let n = r.num_rows();
        let request_ids = PyList::new(
            py,
            r.row_req
                .iter()
                .map(|&slot| ids[slot as usize].as_ref().expect("a reported row's request has an id").clone_ref(py)),
        )?
        .unbind();
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0i64);
        if r.text.is_ascii() {
            offsets.extend(r.row_text_end.iter().map(|&e| e as i64));
        } else {
            let (mut prev, mut chars) = (0usize, 0i64);
            for &e in &r.row_text_end {
                chars += r.text[prev..e as usize].chars().count() as i64;
                offsets.push(chars);
                prev = e as usize;
            }
        }
        let finished = PyList::new(py, r.finished.into_iter().map(FinishedOutput::from))?.unbind();
        let rows =
            RowsForViews { num_prompt: r.row_num_prompt, num_cached: r.row_num_cached, finished: r.row_finished };
        let text = PyString::new(py, &r.text).unbind();
        let (sample_indices, sample_rows, token_ids, text_offsets) = if n == 0 {
            (empty.i32(py, vec![]), empty.i32(py, vec![]), empty.i64(py, vec![]), offsets.into_pyarray(py).unbind())
        } else {
            (
                r.row_sample_index.into_pyarray(py).unbind(),
                r.row_sample_row.into_pyarray(py).unbind(),
                r.row_token.into_pyarray(py).unbind(),
                offsets.into_pyarray(py).unbind(),
            )
        };
        Ok(StepOutputs {
            num_new_tokens: r.num_new_tokens,
            num_rows: n,
            request_ids,
            sample_indices,
            sample_rows,
            token_ids,
            text,
            text_offsets,
            finished,
            rows,
        })
    }

    /// Finished sequences without a row (aborts, final-only requests) come first, then rows.
    fn views(&self, py: Python<'_>) -> PyResult<Vec<StepOutput>> {
        let finished = self.finished.bind(py);
        let mut out = Vec::with_capacity(finished.len() + self.num_rows);
        for f in finished.iter() {
            let f = f.downcast::<FinishedOutput>()?.get();
            if f.row.is_some() {
                continue;
            }
            // A final-only sequence reports everything now; an aborted streamed one has
            // already reported its tokens.
            let (tokens, text) =
                if f.final_only { (f.token_ids.clone(), f.text.clone()) } else { (vec![], String::new()) };
            out.push(StepOutput {
                request_id: PyString::new(py, &f.request_id).unbind(),
                sample_index: f.sample_index,
                sample_row: -1,
                new_token_ids: tokens,
                text_delta: text,
                finish: Some(f.finish),
                stop: f.stop.clone(),
                num_prompt_tokens: f.num_prompt_tokens,
                num_cached_tokens: f.num_cached_tokens,
            });
        }
        let ids = self.request_ids.bind(py);
        let rows = &self.rows;
        let sample_index = self.sample_indices.bind(py).readonly();
        let sample_row = self.sample_rows.bind(py).readonly();
        let token = self.token_ids.bind(py).readonly();
        let offsets = self.text_offsets.bind(py).readonly();
        let (sample_index, sample_row, token, offsets) =
            (sample_index.as_slice()?, sample_row.as_slice()?, token.as_slice()?, offsets.as_slice()?);
        let text: Vec<char> = self.text.bind(py).to_str()?.chars().collect();
        for j in 0..self.num_rows {
            let fin = usize::try_from(rows.finished[j]).ok().map(|k| finished.get_item(k)).transpose()?;
            let fin = fin.as_ref().map(|f| f.downcast::<FinishedOutput>()).transpose()?.map(|f| f.get());
            out.push(StepOutput {
                request_id: ids.get_item(j)?.downcast_into::<PyString>()?.unbind(),
                sample_index: sample_index[j] as u32,
                sample_row: sample_row[j],
                new_token_ids: vec![token[j] as u32],
                text_delta: text[offsets[j] as usize..offsets[j + 1] as usize].iter().collect(),
                finish: fin.map(|f| f.finish),
                stop: fin.map_or(StopReason::None, |f| f.stop.clone()),
                num_prompt_tokens: rows.num_prompt[j] as usize,
                num_cached_tokens: rows.num_cached[j] as usize,
            });
        }
        Ok(out)
    }
}

#[pymethods]
impl StepOutputs {
    /// Number of per-sequence views (finished sequences without a row, plus rows).
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        let finished = self.finished.bind(py);
        let mut rowless = 0;
        for f in finished.iter() {
            rowless += f.downcast::<FinishedOutput>()?.get().row.is_none() as usize;
        }
        Ok(rowless + self.num_rows)
    }

    fn __getitem__(&self, py: Python<'_>, index: isize) -> PyResult<StepOutput> {
        let mut v = self.views(py)?;
        let n = v.len() as isize;
        let i = if index < 0 { index + n } else { index };
        if !(0..n).contains(&i) {
            return Err(PyIndexError::new_err(format!("index {index} is out of range for {n} outputs")));
        }
        Ok(v.swap_remove(i as usize))
    }

    fn __iter__(&self, py: Python<'_>) -> PyResult<PyObject> {
        let list = PyList::new(py, self.views(py)?)?;
        Ok(list.as_any().try_iter()?.into_any().unbind())
    }

    fn __bool__(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.__len__(py)? > 0)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "StepOutputs(num_rows={}, num_finished={}, num_new_tokens={})",
            self.num_rows,
            self.finished.bind(py).len(),
            self.num_new_tokens
        )
    }
}

/// One sequence's output of one step, as a single object (see `StepOutputs`).
#[pyclass(frozen, module = "fastserve._core")]
pub struct StepOutput {
    #[pyo3(get)]
    request_id: Py<PyString>,
    #[pyo3(get)]
    sample_index: u32,
    #[pyo3(get)]
    sample_row: i32,
    #[pyo3(get)]
    new_token_ids: Vec<u32>,
    #[pyo3(get)]
    text_delta: String,
    finish: Option<FinishReason>,
    stop: StopReason,
    #[pyo3(get)]
    num_prompt_tokens: usize,
    #[pyo3(get)]
    num_cached_tokens: usize,
}

#[pymethods]
impl StepOutput {
    #[getter]
    fn finished(&self) -> bool {
        self.finish.is_some()
    }
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        self.finish.map(|f| f.as_str())
    }
    #[getter]
    fn stop_reason(&self, py: Python<'_>) -> PyResult<PyObject> {
        stop_reason_py(py, &self.stop)
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "StepOutput(request_id={:?}, sample_index={}, new_token_ids={:?}, text_delta={:?}, finish_reason={}, stop_reason={})",
            self.request_id.bind(py).to_string(),
            self.sample_index,
            self.new_token_ids,
            self.text_delta,
            self.finish.map_or("None".to_string(), |f| format!("{:?}", f.as_str())),
            stop_reason_repr(&self.stop)
        )
    }
}
