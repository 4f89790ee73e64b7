//! PLACEHOLDER for the `sched` branch only: the tokenizer branch owns this file and its
//! version replaces this one at merge. It exists so py_scheduler.rs compiles against the
//! tokenizer branch's shape `PyTokenizer { pub core: Arc<CoreTokenizer> }` (Python name
//! "Tokenizer").
use std::sync::Arc;

use pyo3::prelude::*;

use crate::tokenizer::CoreTokenizer;

#[pyclass(name = "Tokenizer", frozen, module = "fastserve._core")]
pub struct PyTokenizer {
    pub core: Arc<CoreTokenizer>,
}
