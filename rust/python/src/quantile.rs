//! Bindings of `nlrw_core::quantile`: `quantile_normalize`, `quantile_tables` and the
//! `QuantileSketch` class.
//!
//! Arrays must be C-contiguous with the exact dtypes below (the Python wrappers in
//! `nlrw.quantiles` convert array-likes first); the core's typed errors become
//! `ValueError` with the core's message, which names the argument, latent or index.

use nlrw_core::quantile::{self, QuantileError, Reference, SketchState, Table, Total};
use numpy::{
    ndarray::Dimension, Element, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray,
    PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn to_py(e: QuantileError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn contiguous<'a, T: Element, D: Dimension>(
    a: &'a PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    // `as_slice` accepts a Fortran-ordered block too, whose memory is the transpose: a
    // table read that way would be silently wrong (its rows checked as columns).
    if !a.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name} must be a C-contiguous array, got strides {:?} (use numpy.ascontiguousarray)",
            a.strides()
        )));
    }
    a.as_slice().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be a C-contiguous array (use numpy.ascontiguousarray)"
        ))
    })
}

/// `[L, Q]` float32 table as `(slice, L, Q)`.
fn table<'a>(a: &'a PyReadonlyArray2<'_, f32>, name: &str) -> PyResult<(&'a [f32], usize, usize)> {
    let (rows, cols) = (a.shape()[0], a.shape()[1]);
    Ok((contiguous(a, name)?, rows, cols))
}

/// `[L, Q]` row-major values as a numpy array.
fn table_out(
    py: Python<'_>,
    v: Vec<f32>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'_, PyArray2<f32>>> {
    PyArray1::from_vec(py, v).reshape([rows, cols])
}

/// A `total`/`counts` argument: `None`, a non-negative int, or a uint64 array `[L]`.
enum TotalArg<'py> {
    Samples,
    All(u64),
    PerLatent(PyReadonlyArray1<'py, u64>),
}

impl<'py> TotalArg<'py> {
    fn extract(obj: Option<&Bound<'py, PyAny>>, name: &str) -> PyResult<Self> {
        let Some(obj) = obj.filter(|o| !o.is_none()) else {
            return Ok(Self::Samples);
        };
        if let Ok(n) = obj.extract::<u64>() {
            return Ok(Self::All(n));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, u64>>() {
            return Ok(Self::PerLatent(a));
        }
        Err(PyTypeError::new_err(format!(
            "{name} must be None, a non-negative int or a 1-D uint64 array"
        )))
    }

    fn get<'a>(&'a self, name: &str) -> PyResult<Total<'a>> {
        Ok(match self {
            Self::Samples => Total::Samples,
            Self::All(n) => Total::All(*n),
            Self::PerLatent(a) => Total::PerLatent(contiguous(a, name)?),
        })
    }
}

/// Quantile normalization `F_real⁻¹(F_sim(score) + offset·w)` per `(latent_id, score)`.
///
/// latent_ids: uint32 [m]; scores: float32 [m]; sim_table: float32 [L, Qs] (rows ascending,
/// entry i at the mid-rank position (i + ½) / Qs); active_table: float32 [L, Qr] (quantiles
/// of each latent's active values, entry i at i / (Qr − 1)); frequency: float32 [L] (each
/// latent's active frequency, in [0, 1]); offsets: None or float32 [m] in [−½, ½]. Returns
/// float32 [m]. C-contiguous arrays only (the error names the argument otherwise).
#[pyfunction]
#[pyo3(signature = (latent_ids, scores, sim_table, active_table, frequency, offsets=None))]
fn quantile_normalize<'py>(
    py: Python<'py>,
    latent_ids: PyReadonlyArray1<'py, u32>,
    scores: PyReadonlyArray1<'py, f32>,
    sim_table: PyReadonlyArray2<'py, f32>,
    active_table: PyReadonlyArray2<'py, f32>,
    frequency: PyReadonlyArray1<'py, f32>,
    offsets: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let ids = contiguous(&latent_ids, "latent_ids")?;
    let s = contiguous(&scores, "scores")?;
    let (sim, sl, sq) = table(&sim_table, "sim_table")?;
    let (active, al, aq) = table(&active_table, "active_table")?;
    let freq = contiguous(&frequency, "frequency")?;
    let off = match &offsets {
        Some(o) => Some(contiguous(o, "offsets")?),
        None => None,
    };
    // numpy allocates the output: for large arrays it asks the kernel for huge pages, so
    // the first touch of a fresh output takes far fewer page faults than a Vec's 4 KiB
    // pages (with a Vec, faults and page clearing were a fifth of a 32M-score call).
    let out = PyArray1::<f32>::zeros(py, s.len(), false);
    // SAFETY: `out` is a fresh, contiguous array that nothing else references yet.
    let out_slice =
        unsafe { out.as_slice_mut() }.map_err(|e| PyValueError::new_err(e.to_string()))?;
    py.detach(|| {
        let sim = Table::new("sim_table", sim, sl, sq)?;
        let active = Table::new("active_table", active, al, aq)?;
        let reference = Reference::new(active, freq)?;
        quantile::quantile_normalize_into(ids, s, off, &sim, &reference, out_slice)
    })
    .map_err(to_py)?;
    Ok(out)
}

/// Exact per-latent quantile tables (numpy's linear method) from samples.
///
/// latent_ids: uint32 [m]; values: float32 [m]; total: None, an int, or uint64 [L]
/// observations per latent (the ones not sampled are zeros). Returns float32 [L, Q].
#[pyfunction]
#[pyo3(signature = (latent_ids, values, num_latents, num_quantiles, total=None))]
fn quantile_tables<'py>(
    py: Python<'py>,
    latent_ids: PyReadonlyArray1<'py, u32>,
    values: PyReadonlyArray1<'py, f32>,
    num_latents: usize,
    num_quantiles: usize,
    total: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let ids = contiguous(&latent_ids, "latent_ids")?;
    let vals = contiguous(&values, "values")?;
    let total = TotalArg::extract(total, "total")?;
    let total = total.get("total")?;
    let out = py
        .detach(|| quantile::quantile_tables(ids, vals, num_latents, num_quantiles, total))
        .map_err(to_py)?;
    table_out(py, out, num_latents, num_quantiles)
}

/// Mergeable per-latent quantile sketch (DDSketch) with relative accuracy `alpha`.
#[pyclass(name = "QuantileSketch", module = "nlrw._core")]
#[derive(Clone)]
struct PyQuantileSketch {
    inner: quantile::QuantileSketch,
}

fn state_array<'py, T: Element + Copy>(state: &Bound<'py, PyDict>, key: &str) -> PyResult<Vec<T>> {
    let item = state.get_item(key)?.ok_or_else(|| {
        PyValueError::new_err(format!("invalid sketch state: missing array {key:?}"))
    })?;
    let a: PyReadonlyArray1<'py, T> = item.extract().map_err(|_| {
        PyValueError::new_err(format!(
            "invalid sketch state: {key:?} must be a 1-D {} array",
            std::any::type_name::<T>()
        ))
    })?;
    Ok(a.as_array().iter().copied().collect())
}

#[pymethods]
impl PyQuantileSketch {
    #[new]
    #[pyo3(signature = (num_latents, alpha=0.01))]
    fn new(num_latents: usize, alpha: f64) -> PyResult<Self> {
        Ok(Self {
            inner: quantile::QuantileSketch::new(num_latents, alpha).map_err(to_py)?,
        })
    }

    #[getter]
    fn num_latents(&self) -> usize {
        self.inner.num_latents()
    }

    #[getter]
    fn alpha(&self) -> f64 {
        self.inner.alpha()
    }

    /// Adds uint32 latent_ids [m] with float32 values [m]; total: None, an int or uint64 [L]
    /// observations per latent in this batch (the ones not sampled are zeros).
    #[pyo3(signature = (latent_ids, values, total=None))]
    fn update<'py>(
        &mut self,
        py: Python<'py>,
        latent_ids: PyReadonlyArray1<'py, u32>,
        values: PyReadonlyArray1<'py, f32>,
        total: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<()> {
        let ids = contiguous(&latent_ids, "latent_ids")?;
        let vals = contiguous(&values, "values")?;
        let total = TotalArg::extract(total, "total")?;
        let total = total.get("total")?;
        let inner = &mut self.inner;
        py.detach(|| inner.update(ids, vals, total)).map_err(to_py)
    }

    /// Adds zero observations: an int for every latent, or uint64 [L] per latent.
    fn add_zeros<'py>(&mut self, py: Python<'py>, counts: &Bound<'py, PyAny>) -> PyResult<()> {
        let counts = TotalArg::extract(Some(counts), "counts")?;
        let counts = counts.get("counts")?;
        let inner = &mut self.inner;
        py.detach(|| inner.add_zeros(counts)).map_err(to_py)
    }

    /// Adds every count of `other` (same num_latents and alpha).
    fn merge(&mut self, py: Python<'_>, other: PyRef<'_, Self>) -> PyResult<()> {
        let inner = &mut self.inner;
        let other = &other.inner;
        py.detach(|| inner.merge(other)).map_err(to_py)
    }

    /// Quantile tables float32 [L, num_quantiles] of everything seen.
    fn tables<'py>(
        &self,
        py: Python<'py>,
        num_quantiles: usize,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let inner = &self.inner;
        let out = py.detach(|| inner.tables(num_quantiles)).map_err(to_py)?;
        table_out(py, out, inner.num_latents(), num_quantiles)
    }

    /// Observations per latent, uint64 [L].
    fn counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        let inner = &self.inner;
        PyArray1::from_vec(py, py.detach(|| inner.counts()))
    }

    fn copy(&self) -> Self {
        self.clone()
    }

    /// The sketch as a dict of 1-D numpy arrays (safetensors-ready).
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.inner.to_state();
        let d = PyDict::new(py);
        d.set_item("alpha", PyArray1::from_vec(py, vec![st.alpha]))?;
        d.set_item("zeros", PyArray1::from_vec(py, st.zeros))?;
        d.set_item("min", PyArray1::from_vec(py, st.min))?;
        d.set_item("max", PyArray1::from_vec(py, st.max))?;
        d.set_item("pos_start", PyArray1::from_vec(py, st.pos_start))?;
        d.set_item("pos_len", PyArray1::from_vec(py, st.pos_len))?;
        d.set_item("pos_counts", PyArray1::from_vec(py, st.pos_counts))?;
        d.set_item("neg_start", PyArray1::from_vec(py, st.neg_start))?;
        d.set_item("neg_len", PyArray1::from_vec(py, st.neg_len))?;
        d.set_item("neg_counts", PyArray1::from_vec(py, st.neg_counts))?;
        Ok(d)
    }

    /// Rebuilds a sketch from `state()`'s arrays; inconsistent arrays raise ValueError.
    #[staticmethod]
    fn from_state(state: &Bound<'_, PyDict>) -> PyResult<Self> {
        let alpha: Vec<f64> = state_array(state, "alpha")?;
        let [alpha] = alpha[..] else {
            return Err(PyValueError::new_err(
                "invalid sketch state: \"alpha\" must hold exactly one value",
            ));
        };
        let st = SketchState {
            alpha,
            zeros: state_array(state, "zeros")?,
            min: state_array(state, "min")?,
            max: state_array(state, "max")?,
            pos_start: state_array(state, "pos_start")?,
            pos_len: state_array(state, "pos_len")?,
            pos_counts: state_array(state, "pos_counts")?,
            neg_start: state_array(state, "neg_start")?,
            neg_len: state_array(state, "neg_len")?,
            neg_counts: state_array(state, "neg_counts")?,
        };
        Ok(Self {
            inner: quantile::QuantileSketch::from_state(&st).map_err(to_py)?,
        })
    }

    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.inner.to_state() == other.inner.to_state()
    }

    fn __repr__(&self) -> String {
        format!(
            "QuantileSketch(num_latents={}, alpha={})",
            self.inner.num_latents(),
            self.inner.alpha()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantile_normalize, m)?)?;
    m.add_function(wrap_pyfunction!(quantile_tables, m)?)?;
    m.add_class::<PyQuantileSketch>()?;
    Ok(())
}
