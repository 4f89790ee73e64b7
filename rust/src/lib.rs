//! fastserve._core: the Python-facing classes, nothing else. Each module registers its own.
use pyo3::prelude::*;

pub mod tokenizer;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
