//! fastserve._core: the Python-facing classes, nothing else. Each module registers its own.
use pyo3::prelude::*;

pub mod detokenizer;
pub mod py_tokenizer;
pub mod stop;
pub mod tokenizer;

pub mod batch;
pub mod block_manager;
pub mod errors;
pub mod py_outputs;
pub mod py_scheduler;
pub mod sampling_params;
pub mod scheduler;
pub mod sequence;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    py_tokenizer::register(m)?;
    py_scheduler::register(m)?;
    Ok(())
}
