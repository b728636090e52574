//! (being written)
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    nlrw,
    ShardError,
    PyException,
    "A shard set is missing, truncated, corrupt or disagrees with its manifest."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ShardError", m.py().get_type::<ShardError>())?;
    Ok(())
}
