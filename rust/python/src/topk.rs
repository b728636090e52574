//! Bindings of `nlrw_core::topk`: `topk_encode`, `decode`, `topk_replace`, `LatentStats`.
//!
//! Layout policy, per entry point: `topk_encode`, `decode`, `topk_replace` and
//! `LatentStats.update` refuse any array that is not C-contiguous (a transposed,
//! Fortran-ordered, strided or negatively strided view) with a `ValueError` naming the
//! argument, and never copy; `LatentStats.from_arrays` copies its 1-D arrays whatever their
//! strides. Dtypes must match exactly (native byte order); anything else is a `TypeError`
//! naming the argument. The typed errors of the core become `ValueError` (bad values or
//! shapes) with the core's message.

use half::{bf16, f16};
use nlrw_core::topk::{self, LatentStats as CoreStats, TopkError};
use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

fn to_py(e: TopkError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The array's memory as a row-major slice, or a `ValueError` naming the argument.
///
/// `as_slice` alone also accepts a Fortran-ordered array (any contiguous block), whose
/// memory read as row-major is the transpose: so C order is checked first. Nothing is
/// copied here; the Python wrappers decide where a copy is worth it.
fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    let refuse = || {
        PyValueError::new_err(format!(
            "{name} must be a C-contiguous array, got strides {:?} for shape {:?} (a \
             transposed, Fortran-ordered or strided view); use numpy.ascontiguousarray({name})",
            a.strides(),
            a.shape()
        ))
    };
    if !a.is_c_contiguous() {
        return Err(refuse());
    }
    a.as_slice().map_err(|_| refuse())
}

/// Sparse latents come as two arrays of one shape [n, k].
fn same_shape(
    values: &PyReadonlyArray2<'_, f32>,
    indices: &PyReadonlyArray2<'_, u32>,
) -> PyResult<()> {
    if indices.shape() != values.shape() {
        return Err(PyValueError::new_err(format!(
            "indices has shape {:?}, values has shape {:?}: they must match",
            indices.shape(),
            values.shape()
        )));
    }
    Ok(())
}

type Sparse<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<u32>>);

fn sparse_out(
    py: Python<'_>,
    values: Vec<f32>,
    indices: Vec<u32>,
    k: usize,
) -> PyResult<Sparse<'_>> {
    let n = values.len() / k.max(1);
    Ok((
        PyArray1::from_vec(py, values).reshape([n, k])?,
        PyArray1::from_vec(py, indices).reshape([n, k])?,
    ))
}

fn encode<'py, T: topk::Element + numpy::Element>(
    py: Python<'py>,
    a: PyReadonlyArray2<'py, T>,
    k: usize,
    convert: impl Fn(&[T]) -> &[T] + Send,
) -> PyResult<Sparse<'py>> {
    let [n, d] = [a.shape()[0], a.shape()[1]];
    let x = convert(contiguous(&a, "pre_acts")?);
    let (values, indices) = py.detach(|| topk::topk_encode(x, n, d, k)).map_err(to_py)?;
    sparse_out(py, values, indices, k)
}

/// Fused ReLU + top-k per row of a C-contiguous [n, d] array.
///
/// Accepts float32, float16, or uint16 holding bfloat16 bits (`tensor.view(torch.uint16)`).
/// Returns (values float32 [n, k] sorted descending, ties to the lower index; indices
/// uint32 [n, k]); rows with fewer than k positive entries are padded with zeros at the
/// lowest unused indices.
#[pyfunction]
fn topk_encode<'py>(
    py: Python<'py>,
    pre_acts: &Bound<'py, PyAny>,
    k: usize,
) -> PyResult<Sparse<'py>> {
    if let Ok(a) = pre_acts.extract::<PyReadonlyArray2<'py, f32>>() {
        return encode(py, a, k, |x| x);
    }
    if let Ok(a) = pre_acts.extract::<PyReadonlyArray2<'py, f16>>() {
        return encode(py, a, k, |x| x);
    }
    if let Ok(a) = pre_acts.extract::<PyReadonlyArray2<'py, u16>>() {
        let [n, d] = [a.shape()[0], a.shape()[1]];
        let bits = contiguous(&a, "pre_acts")?;
        // bf16 is a transparent wrapper of u16 bits; `half` provides the checked cast.
        let x: &[bf16] = half::slice::HalfBitsSliceExt::reinterpret_cast(bits);
        let (values, indices) = py.detach(|| topk::topk_encode(x, n, d, k)).map_err(to_py)?;
        return sparse_out(py, values, indices, k);
    }
    let desc = pre_acts
        .getattr("dtype")
        .map(|d| d.to_string())
        .unwrap_or_else(|_| pre_acts.get_type().to_string());
    let ndim = pre_acts
        .getattr("ndim")
        .and_then(|n| n.extract::<usize>())
        .ok();
    Err(PyTypeError::new_err(match ndim {
        Some(nd) if nd != 2 => format!("pre_acts must be a 2-D [n, d] array, got {nd} dimensions"),
        _ => format!(
            "pre_acts must be a numpy array of float32, float16 or uint16 (bfloat16 bits), got {desc}"
        ),
    }))
}

/// Scatter sparse latents (values f32 [n, k], indices u32 [n, k]) into a dense [n, d] array.
#[pyfunction]
fn decode<'py>(
    py: Python<'py>,
    values: PyReadonlyArray2<'py, f32>,
    indices: PyReadonlyArray2<'py, u32>,
    d: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let [n, k] = [values.shape()[0], values.shape()[1]];
    same_shape(&values, &indices)?;
    let v = contiguous(&values, "values")?;
    let i = contiguous(&indices, "indices")?;
    let dense = py.detach(|| topk::decode(v, i, n, k, d)).map_err(to_py)?;
    PyArray1::from_vec(py, dense).reshape([n, d])
}

/// Re-apply top-k (k_out slots) after setting `latents[m]` of row `rows[m]` to `new_values[m]`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn topk_replace<'py>(
    py: Python<'py>,
    values: PyReadonlyArray2<'py, f32>,
    indices: PyReadonlyArray2<'py, u32>,
    rows: PyReadonlyArray1<'py, u64>,
    latents: PyReadonlyArray1<'py, u32>,
    new_values: PyReadonlyArray1<'py, f32>,
    k_out: usize,
    d: usize,
) -> PyResult<Sparse<'py>> {
    let [n, k] = [values.shape()[0], values.shape()[1]];
    same_shape(&values, &indices)?;
    let (v, i) = (
        contiguous(&values, "values")?,
        contiguous(&indices, "indices")?,
    );
    let r = contiguous(&rows, "rows")?;
    let l = contiguous(&latents, "latents")?;
    let nv = contiguous(&new_values, "new_values")?;
    let (ov, oi) = py
        .detach(|| topk::topk_replace(v, i, n, k, r, l, nv, k_out, d))
        .map_err(to_py)?;
    sparse_out(py, ov, oi, k_out)
}

/// Per-latent running statistics (count of activations > 0, max, sum, sum of squares).
#[pyclass(module = "nlrw._core")]
struct LatentStats {
    inner: CoreStats,
}

#[pymethods]
impl LatentStats {
    #[new]
    fn new(num_latents: usize) -> PyResult<Self> {
        if num_latents == 0 {
            return Err(PyValueError::new_err("num_latents must be at least 1"));
        }
        Ok(LatentStats {
            inner: CoreStats::new(num_latents),
        })
    }

    /// Add a batch of sparse latents (values f32 [n, k], indices u32 [n, k]).
    fn update(
        &mut self,
        py: Python<'_>,
        values: PyReadonlyArray2<'_, f32>,
        indices: PyReadonlyArray2<'_, u32>,
    ) -> PyResult<()> {
        let [n, k] = [values.shape()[0], values.shape()[1]];
        same_shape(&values, &indices)?;
        let (v, i) = (
            contiguous(&values, "values")?,
            contiguous(&indices, "indices")?,
        );
        let inner = &mut self.inner;
        py.detach(|| inner.update(v, i, n, k)).map_err(to_py)
    }

    /// Fold another `LatentStats` over the same latents into this one.
    fn merge(&mut self, other: PyRef<'_, LatentStats>) -> PyResult<()> {
        self.inner.merge(&other.inner).map_err(to_py)
    }

    /// Rebuild from saved arrays (the inverse of reading the attributes).
    #[staticmethod]
    fn from_arrays(
        rows: u64,
        count: PyReadonlyArray1<'_, u64>,
        max: PyReadonlyArray1<'_, f32>,
        sum: PyReadonlyArray1<'_, f64>,
        sum_sq: PyReadonlyArray1<'_, f64>,
    ) -> PyResult<Self> {
        let count = count.as_array().to_vec();
        let l = count.len();
        for (name, len) in [
            ("max", max.len()),
            ("sum", sum.len()),
            ("sum_sq", sum_sq.len()),
        ] {
            if len != l {
                return Err(PyValueError::new_err(format!(
                    "{name} has {len} latents but count has {l}"
                )));
            }
        }
        Ok(LatentStats {
            inner: CoreStats {
                rows,
                count,
                max: max.as_array().to_vec(),
                sum: sum.as_array().to_vec(),
                sum_sq: sum_sq.as_array().to_vec(),
            },
        })
    }

    #[getter]
    fn num_latents(&self) -> usize {
        self.inner.num_latents()
    }
    #[getter]
    fn rows(&self) -> u64 {
        self.inner.rows
    }
    #[getter]
    fn count<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        PyArray1::from_slice(py, &self.inner.count)
    }
    #[getter]
    fn max<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_slice(py, &self.inner.max)
    }
    #[getter]
    fn sum<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, &self.inner.sum)
    }
    #[getter]
    fn sum_sq<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, &self.inner.sum_sq)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(topk_encode, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(topk_replace, m)?)?;
    m.add_class::<LatentStats>()?;
    Ok(())
}
