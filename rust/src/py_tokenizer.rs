//! Python classes `Tokenizer` and `Detokenizer` (see _core.pyi).

use std::sync::Arc;

use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;

use crate::tokenizer::{CoreTokenizer, IncrementalDetokenizer, LoadError};

#[pyclass(name = "Tokenizer", module = "fastserve._core", frozen)]
pub struct PyTokenizer {
    pub core: Arc<CoreTokenizer>,
}

/// Token ids arrive as Python ints; a negative or oversized one is a caller bug worth a clear
/// message rather than pyo3's OverflowError.
fn to_u32_ids(ids: Vec<i64>, field: &str) -> PyResult<Vec<u32>> {
    ids.into_iter()
        .map(|i| {
            u32::try_from(i).map_err(|_| {
                PyValueError::new_err(format!("{field}: token id {i} is out of range; ids must be in [0, 2**32)"))
            })
        })
        .collect()
}

#[pymethods]
impl PyTokenizer {
    #[new]
    fn new(path: &str) -> PyResult<Self> {
        match CoreTokenizer::load(path) {
            Ok(core) => Ok(PyTokenizer { core: Arc::new(core) }),
            Err(LoadError::NotFound(m)) => Err(PyFileNotFoundError::new_err(m)),
            Err(LoadError::Invalid(m)) => Err(PyValueError::new_err(m)),
        }
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.core.vocab_size
    }
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.core.bos_token_id
    }
    #[getter]
    fn bos_token(&self) -> Option<String> {
        self.core.bos_token.clone()
    }
    #[getter]
    fn eos_token(&self) -> Option<String> {
        self.core.eos_token.clone()
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.core.eos_token_ids.clone()
    }
    #[getter]
    fn pad_token_id(&self) -> Option<u32> {
        self.core.pad_token_id
    }
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.core.chat_template.clone()
    }
    #[getter]
    fn special_token_ids(&self) -> Vec<u32> {
        self.core.special_token_ids()
    }

    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let core = &self.core;
        py.allow_threads(|| core.encode(text, add_special_tokens)).map_err(PyValueError::new_err)
    }

    #[pyo3(signature = (texts, add_special_tokens = true))]
    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>, add_special_tokens: bool) -> PyResult<Vec<Vec<u32>>> {
        let core = &self.core;
        py.allow_threads(|| core.encode_batch(texts, add_special_tokens)).map_err(PyValueError::new_err)
    }

    #[pyo3(signature = (ids, skip_special_tokens = true, spaces_between_special_tokens = true))]
    fn decode(
        &self,
        ids: Vec<i64>,
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
    ) -> PyResult<String> {
        let ids = to_u32_ids(ids, "ids")?;
        Ok(self.core.decode(&ids, skip_special_tokens, spaces_between_special_tokens))
    }

    fn id_to_token(&self, token_id: i64) -> Option<String> {
        u32::try_from(token_id).ok().and_then(|id| self.core.inner.id_to_token(id))
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.core.inner.token_to_id(token)
    }

    fn __len__(&self) -> usize {
        self.core.vocab_size
    }
}

#[pyclass(name = "Detokenizer", module = "fastserve._core")]
pub struct PyDetokenizer {
    inner: IncrementalDetokenizer,
}

#[pymethods]
impl PyDetokenizer {
    #[new]
    #[pyo3(signature = (
        tokenizer,
        prompt_token_ids = Vec::new(),
        skip_special_tokens = true,
        spaces_between_special_tokens = true,
        stop = Vec::new(),
        include_stop_str_in_output = false,
    ))]
    fn new(
        tokenizer: PyRef<'_, PyTokenizer>,
        prompt_token_ids: Vec<i64>,
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
        stop: Vec<String>,
        include_stop_str_in_output: bool,
    ) -> PyResult<Self> {
        let prompt = to_u32_ids(prompt_token_ids, "prompt_token_ids")?;
        Ok(PyDetokenizer {
            inner: IncrementalDetokenizer::new(
                tokenizer.core.clone(),
                &prompt,
                skip_special_tokens,
                spaces_between_special_tokens,
                stop,
                include_stop_str_in_output,
            ),
        })
    }

    fn push(&mut self, token_id: i64) -> PyResult<(String, Option<String>)> {
        let id = u32::try_from(token_id).map_err(|_| {
            PyValueError::new_err(format!("token_id: {token_id} is out of range; ids must be in [0, 2**32)"))
        })?;
        Ok(self.inner.push(id))
    }

    fn flush(&mut self) -> String {
        self.inner.flush()
    }

    #[getter]
    fn text(&self) -> String {
        self.inner.text().to_owned()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyDetokenizer>()?;
    Ok(())
}
