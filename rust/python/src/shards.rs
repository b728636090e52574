//! Python bindings of `nlrw_core::shards`: the writer, the reader and its batch iterator.
//!
//! Rows cross the boundary as `uint8` arrays of shape `[rows, width * itemsize]`; the Python
//! wrapper (`nlrw.shards`) checks dtypes and views them as float32/float16/bfloat16 (as
//! uint16). Keeping this layer byte-typed means one code path for every dtype and no copy:
//! writes borrow the caller's buffer with the GIL released, and reads hand out owned buffers
//! or zero-copy views of the memory-mapped shards.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use nlrw_core::shards::{
    Batch, Batches, ReadOptions, ShardDtype, ShardError as CoreError, ShardReader, ShardWriter,
    TimedOut, WriteMode,
};
use numpy::ndarray::{Array2, ArrayView2};
use numpy::{PyArray2, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileExistsError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    nlrw,
    ShardError,
    PyException,
    "A shard set is missing, truncated, corrupt or disagrees with its manifest."
);

/// Bad arguments become ValueError, an existing set FileExistsError, everything about the
/// files themselves `nlrw.ShardError`; every message names the file or directory.
fn to_py(err: CoreError) -> PyErr {
    match err {
        CoreError::InvalidArgument { .. } => PyValueError::new_err(err.to_string()),
        CoreError::AlreadyExists { .. } => PyFileExistsError::new_err(err.to_string()),
        _ => ShardError::new_err(err.to_string()),
    }
}

fn parse_dtype(dtype: &str) -> PyResult<ShardDtype> {
    ShardDtype::parse(dtype).ok_or_else(|| {
        PyValueError::new_err(format!(
            "dtype must be 'float32', 'float16' or 'bfloat16', not {dtype:?}"
        ))
    })
}

/// Writer of a shard set (see `nlrw.shards.ShardWriter`).
#[pyclass(module = "nlrw._core", name = "_ShardWriter")]
pub struct PyShardWriter {
    inner: ShardWriter,
}

#[pymethods]
impl PyShardWriter {
    #[new]
    #[pyo3(signature = (path, width, dtype, rows_per_shard, mode = "new"))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        width: usize,
        dtype: &str,
        rows_per_shard: usize,
        mode: &str,
    ) -> PyResult<Self> {
        let dtype = parse_dtype(dtype)?;
        let mode = match mode {
            "new" => WriteMode::New,
            "resume" => WriteMode::Resume,
            "overwrite" => WriteMode::Overwrite,
            other => {
                return Err(PyValueError::new_err(format!(
                    "mode must be 'new', 'resume' or 'overwrite', not {other:?}"
                )))
            }
        };
        let inner = py
            .detach(|| ShardWriter::create(&path, width, dtype, rows_per_shard, mode))
            .map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Appends rows given as a C-contiguous uint8 array `[n, width * itemsize]`; any other
    /// layout is refused (`ValueError` naming `rows`), never copied.
    fn write(&mut self, py: Python<'_>, rows: PyReadonlyArray2<'_, u8>) -> PyResult<()> {
        let row_bytes = self.inner.row_bytes();
        if rows.shape()[1] != row_bytes {
            return Err(PyValueError::new_err(format!(
                "rows: expected {row_bytes} bytes per row, got {}",
                rows.shape()[1]
            )));
        }
        // `as_slice` alone would also take a Fortran-ordered block (its memory is the
        // transpose): the set would silently hold scrambled rows.
        let refuse = || {
            PyValueError::new_err(format!(
                "rows must be a C-contiguous array, got strides {:?} for shape {:?}; use \
                 numpy.ascontiguousarray(rows)",
                rows.strides(),
                rows.shape()
            ))
        };
        if !rows.is_c_contiguous() {
            return Err(refuse());
        }
        let bytes = rows.as_slice().map_err(|_| refuse())?;
        let inner = &mut self.inner;
        // The numpy buffer stays borrowed (readonly) for the call; other Python threads could
        // still mutate it while the GIL is released, as with any numpy routine that drops it.
        py.detach(|| inner.write_bytes(bytes)).map_err(to_py)
    }

    /// Writes the final shard and marks the set complete.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        py.detach(|| inner.close()).map_err(to_py)
    }

    /// Stops without completing the set (written shards stay, buffered rows are dropped).
    fn abort(&mut self) {
        self.inner.abort();
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir().to_path_buf()
    }

    #[getter]
    fn width(&self) -> usize {
        self.inner.manifest().width
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.manifest().dtype.name()
    }

    #[getter]
    fn rows_per_shard(&self) -> usize {
        self.inner.manifest().rows_per_shard
    }

    #[getter]
    fn rows_written(&self) -> u64 {
        self.inner.rows_written()
    }

    #[getter]
    fn rows_committed(&self) -> u64 {
        self.inner.rows_committed()
    }

    #[getter]
    fn num_shards(&self) -> usize {
        self.inner.manifest().shards.len()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// An opened shard set (see `nlrw.shards.ShardReader`).
#[pyclass(module = "nlrw._core", name = "_ShardReader", frozen)]
pub struct PyShardReader {
    inner: ShardReader,
}

#[pymethods]
impl PyShardReader {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| ShardReader::open(&path)).map_err(to_py)?;
        Ok(Self { inner })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir().to_path_buf()
    }

    #[getter]
    fn width(&self) -> usize {
        self.inner.manifest().width
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.manifest().dtype.name()
    }

    #[getter]
    fn rows_per_shard(&self) -> usize {
        self.inner.manifest().rows_per_shard
    }

    #[getter]
    fn num_rows(&self) -> u64 {
        self.inner.num_rows()
    }

    #[getter]
    fn num_shards(&self) -> usize {
        self.inner.manifest().shards.len()
    }

    #[getter]
    fn complete(&self) -> bool {
        self.inner.manifest().complete
    }

    fn num_batches(&self, batch_rows: usize, drop_last: bool) -> u64 {
        self.inner.num_batches(batch_rows, drop_last)
    }

    /// Checks every shard's size, checksum and header.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.verify()).map_err(to_py)
    }

    /// Starts a pass over the set on a background thread.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (
        batch_rows, shuffle = false, seed = 0, epoch = 0, verify = true, drop_last = false,
        prefetch = 4, shuffle_buffer_rows = None
    ))]
    fn batches(
        &self,
        batch_rows: usize,
        shuffle: bool,
        seed: u64,
        epoch: u64,
        verify: bool,
        drop_last: bool,
        prefetch: usize,
        shuffle_buffer_rows: Option<usize>,
    ) -> PyResult<PyBatches> {
        if prefetch == 0 {
            return Err(PyValueError::new_err("prefetch must be positive"));
        }
        let options = ReadOptions {
            batch_rows,
            shuffle,
            seed,
            epoch,
            verify,
            drop_last,
            prefetch,
            shuffle_buffer_rows,
        };
        let batches = self.inner.batches(options).map_err(to_py)?;
        Ok(PyBatches {
            inner: Mutex::new(Some(batches)),
            row_bytes: self.inner.manifest().row_bytes(),
        })
    }
}

/// Iterator over the batches of one pass: uint8 arrays `[rows, width * itemsize]`.
#[pyclass(module = "nlrw._core", name = "_ShardBatches")]
pub struct PyBatches {
    /// `None` once the pass ended (exhausted, failed or closed). The mutex only makes the
    /// receiver `Sync`; `&mut self` already gives exclusive access.
    inner: Mutex<Option<Batches>>,
    row_bytes: usize,
}

#[pymethods]
impl PyBatches {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray2<u8>>>> {
        let slot = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        let Some(batches) = slot.as_mut() else {
            return Ok(None);
        };
        // Wait for the prefetch thread without holding the GIL, waking up now and then so
        // that Ctrl-C interrupts a long wait (a slow disk) instead of being deferred.
        let item = loop {
            match py.detach(|| batches.next_timeout(Duration::from_millis(100))) {
                Ok(item) => break item,
                Err(TimedOut) => py.check_signals()?,
            }
        };
        match item {
            None => {
                *slot = None;
                Ok(None)
            }
            Some(Err(e)) => {
                *slot = None;
                Err(to_py(e))
            }
            Some(Ok(batch)) => batch_to_numpy(py, batch, self.row_bytes).map(Some),
        }
    }

    /// Stops the background thread early (also done when the iterator is garbage-collected).
    fn close(&mut self) {
        let slot = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        *slot = None;
    }
}

/// Keeps the memory of a zero-copy batch (its shard's mapping) alive as the numpy base.
#[pyclass(module = "nlrw._core", name = "_ShardBatchMemory", frozen)]
struct BatchMemory {
    _batch: Batch,
}

fn batch_to_numpy(
    py: Python<'_>,
    batch: Batch,
    row_bytes: usize,
) -> PyResult<Bound<'_, PyArray2<u8>>> {
    match batch {
        Batch::Owned { data, rows } => {
            let array = Array2::from_shape_vec((rows, row_bytes), data)
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            Ok(PyArray2::from_owned_array(py, array))
        }
        mut batch => {
            let rows = batch.rows();
            let ptr = batch.as_mut_ptr();
            let owner = Bound::new(py, BatchMemory { _batch: batch })?;
            // SAFETY: `ptr` addresses `rows * row_bytes` bytes of a shard mapping that
            // `owner` keeps alive (the mapping never moves); numpy holds `owner` as the
            // array's base for as long as the array or any view of it lives. The core crate
            // hands each mapped row out once, so these bytes are not read or written by Rust
            // elsewhere, and numpy may write them (the mapping is private copy-on-write).
            let array = unsafe {
                let view = ArrayView2::from_shape_ptr((rows, row_bytes), ptr.cast_const());
                PyArray2::borrow_from_array(&view, owner.into_any())
            };
            Ok(array)
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ShardError", m.py().get_type::<ShardError>())?;
    m.add_class::<PyShardWriter>()?;
    m.add_class::<PyShardReader>()?;
    m.add_class::<PyBatches>()?;
    m.add_class::<BatchMemory>()?;
    Ok(())
}
