//! `nlrw._core`: thin PyO3 layer over `nlrw-core`.
//!
//! Each submodule converts numpy arrays to slices, runs the Rust code with the GIL
//! released (`py.detach`) and maps typed errors to Python exceptions.

use pyo3::prelude::*;

mod quantile;
mod shards;
mod topk;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    topk::register(m)?;
    quantile::register(m)?;
    shards::register(m)?;
    Ok(())
}
