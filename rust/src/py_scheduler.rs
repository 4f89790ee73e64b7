//! The Python-facing `Scheduler`: argument conversion and error mapping around
//! `scheduler::Scheduler`, nothing else.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::batch::{Batch, EmptyArrays};
use crate::errors::AdmissionError;
use crate::py_outputs::{FinishedOutput, StepOutput, StepOutputs};
use crate::py_tokenizer::PyTokenizer;
use crate::sampling_params::RequestParams;
use crate::scheduler::{Scheduler as CoreScheduler, SchedulerConfig};

/// Sample rows a step may add past its max_num_seqs one-sample rows when no limit is given:
/// one request of the server's largest n / best_of (128) finishing its prompt.
const DEFAULT_MAX_N: usize = 128;

#[pyclass(module = "fastserve._core")]
pub struct Scheduler {
    core: CoreScheduler,
    empty: EmptyArrays,
    /// Python request id per request slot: a reported row hands out a reference to it.
    ids: Vec<Option<Py<PyString>>>,
    /// Counts schedule() and update() calls: a Batch may name its rows' requests only while
    /// the count is the one it was made at.
    step: u64,
}

impl Scheduler {
    pub fn request_id_of_slot(&self, py: Python<'_>, slot: u32, step: u64) -> PyResult<Py<PyString>> {
        if step != self.step {
            return Err(PyRuntimeError::new_err(
                "this Batch is no longer pending: read its request ids before passing its samples to update()",
            ));
        }
        Ok(self.ids[slot as usize].as_ref().expect("a scheduled request has an id").clone_ref(py))
    }
}

/// `field`: the request field the ids come from (see `AdmissionError::field`).
fn to_token_ids(name: &str, field: &'static str, v: impl Iterator<Item = i64>) -> PyResult<Vec<u32>> {
    v.map(|x| {
        u32::try_from(x).map_err(|_| {
            AdmissionError::invalid(field, format!("{name} holds {x}, which is not a token id (0 <= id < 2**32)"))
                .into()
        })
    })
    .collect()
}

/// Token ids from a numpy integer array (without a Python object per element) or any sequence.
fn extract_ids(name: &str, field: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if let Ok(a) = obj.extract::<PyReadonlyArray1<i64>>() {
        return to_token_ids(name, field, a.as_array().iter().copied());
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<i32>>() {
        return to_token_ids(name, field, a.as_array().iter().map(|&x| x as i64));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<u32>>() {
        return Ok(a.as_array().to_vec());
    }
    let v: Vec<i64> = obj.extract().map_err(|_| {
        PyErr::from(AdmissionError::invalid(field, format!("{name} must be a sequence of ints or a 1-D integer array")))
    })?;
    to_token_ids(name, field, v.into_iter())
}

#[pymethods]
impl Scheduler {
    #[new]
    #[pyo3(signature = (
        *, num_blocks, max_model_len, block_size = 16, max_num_seqs = 256,
        max_num_batched_tokens = 8192, max_num_sample_rows = None, enable_prefix_caching = true,
        enable_chunked_prefill = true, tokenizer = None, eos_token_ids = vec![], seed = 0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn py_new(
        py: Python<'_>,
        num_blocks: usize,
        max_model_len: usize,
        block_size: usize,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
        max_num_sample_rows: Option<usize>,
        enable_prefix_caching: bool,
        enable_chunked_prefill: bool,
        tokenizer: Option<PyRef<'_, PyTokenizer>>,
        eos_token_ids: Vec<u32>,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let cfg = SchedulerConfig {
            num_blocks,
            block_size,
            max_model_len,
            max_num_seqs,
            max_num_batched_tokens,
            max_num_sample_rows: max_num_sample_rows.unwrap_or(max_num_seqs + DEFAULT_MAX_N),
            enable_prefix_caching,
            enable_chunked_prefill,
            eos_token_ids,
            seed: seed.unwrap_or(0),
        };
        let core = CoreScheduler::new(cfg, tokenizer.map(|t| t.core.clone())).map_err(PyValueError::new_err)?;
        Ok(Scheduler { core, empty: EmptyArrays::new(py), ids: vec![], step: 0 })
    }

    fn add_request(
        &mut self,
        request_id: &Bound<'_, PyString>,
        prompt_token_ids: &Bound<'_, PyAny>,
        params: RequestParams,
    ) -> PyResult<()> {
        let prompt = extract_ids("prompt_token_ids", "prompt", prompt_token_ids)?;
        let slot = self.core.add_request(request_id.to_str()?, prompt, params)? as usize;
        if self.ids.len() <= slot {
            self.ids.resize_with(slot + 1, || None);
        }
        self.ids[slot] = Some(request_id.clone().unbind());
        Ok(())
    }

    fn abort_request(&mut self, request_id: &str) -> bool {
        self.core.abort_request(request_id)
    }

    /// Drops the pending batch unrun (the worker refused it before running anything): its
    /// sequences are scheduled again next step. True if a batch was pending.
    fn discard_pending(&mut self) -> bool {
        let dropped = self.core.discard_pending();
        if dropped {
            self.step += 1;
        }
        dropped
    }

    fn schedule(slf: &Bound<'_, Self>) -> PyResult<Option<Batch>> {
        let py = slf.py();
        let mut me = slf.borrow_mut();
        let data = me.core.schedule().map_err(PyRuntimeError::new_err)?;
        me.step += 1;
        match data {
            Some(d) => Ok(Some(Batch::from_data(py, d, &me.empty, slf.clone().unbind(), me.step)?)),
            None => Ok(None),
        }
    }

    /// `now`: the time stamped on each sequence's first token (the engine passes time.time()).
    #[pyo3(signature = (sampled_token_ids, now = 0.0))]
    fn update(&mut self, py: Python<'_>, sampled_token_ids: &Bound<'_, PyAny>, now: f64) -> PyResult<StepOutputs> {
        let res = if let Ok(a) = sampled_token_ids.extract::<PyReadonlyArray1<i64>>() {
            if a.is_c_contiguous() {
                self.core.update(a.as_slice()?, now)
            } else {
                self.core.update(&a.as_array().to_vec(), now)
            }
        } else {
            let v: Vec<i64> = sampled_token_ids.extract().map_err(|_| {
                PyValueError::new_err("sampled_token_ids must be a 1-D int64 array (one id per sample row)")
            })?;
            self.core.update(&v, now)
        }
        .map_err(PyValueError::new_err)?;
        self.step += 1;
        StepOutputs::from_result(py, res, &self.ids, &self.empty)
    }

    /// (sample rows int64 [C], sample indices int32 [C]) of the pending batch's
    /// grammar-constrained requests (RequestParams.structured_output), in sample-row order;
    /// `Batch.sample_request_id(row)` names each row's request.
    fn pending_structured_samples<'py>(
        &self,
        py: Python<'py>,
    ) -> (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i32>>) {
        let (rows, indices) = self.core.pending_structured_samples();
        (rows.into_pyarray(py), indices.into_pyarray(py))
    }

    fn has_unfinished(&self) -> bool {
        self.core.has_unfinished()
    }
    #[getter]
    fn num_running(&self) -> usize {
        self.core.num_running()
    }
    #[getter]
    fn num_waiting(&self) -> usize {
        self.core.num_waiting()
    }
    #[getter]
    fn num_free_blocks(&self) -> usize {
        self.core.bm.num_free_blocks()
    }
    #[getter]
    fn num_total_blocks(&self) -> usize {
        self.core.bm.num_total_blocks()
    }
    #[getter]
    fn num_preemptions(&self) -> u64 {
        self.core.num_preemptions
    }
    #[getter]
    fn prefix_cache_queried_tokens(&self) -> u64 {
        self.core.prefix_cache_queried_tokens
    }
    #[getter]
    fn prefix_cache_hit_tokens(&self) -> u64 {
        self.core.prefix_cache_hit_tokens
    }
    #[getter]
    fn max_num_seqs(&self) -> usize {
        self.core.cfg.max_num_seqs
    }
    #[getter]
    fn max_num_batched_tokens(&self) -> usize {
        self.core.cfg.max_num_batched_tokens
    }
    #[getter]
    fn max_num_sample_rows(&self) -> usize {
        self.core.cfg.max_num_sample_rows
    }
    #[getter]
    fn max_model_len(&self) -> usize {
        self.core.cfg.max_model_len
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.core.cfg.block_size
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.core.eos_token_ids().to_vec()
    }
    /// Drops the prefix cache (only when no block is in use); True if it was reset.
    fn reset_prefix_cache(&mut self) -> bool {
        self.core.bm.reset_prefix_cache()
    }
    /// Verifies the block bookkeeping; raises RuntimeError naming the broken invariant.
    fn check_invariants(&self) -> PyResult<()> {
        self.core.check_invariants().map_err(PyRuntimeError::new_err)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RequestParams>()?;
    m.add_class::<Batch>()?;
    m.add_class::<StepOutput>()?;
    m.add_class::<StepOutputs>()?;
    m.add_class::<FinishedOutput>()?;
    m.add_class::<Scheduler>()?;
    Ok(())
}
