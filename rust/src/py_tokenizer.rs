//! PLACEHOLDER for the `sched` branch only: the tokenizer branch owns this file and its
//! version replaces this one at merge. It exists so py_scheduler.rs compiles against the
//! agreed shape `Tokenizer { pub core: Arc<CoreTokenizer> }`.
use std::sync::Arc;

use pyo3::prelude::*;

use crate::tokenizer::CoreTokenizer;

#[pyclass(frozen, module = "fastserve._core")]
pub struct Tokenizer {
    pub core: Arc<CoreTokenizer>,
}
