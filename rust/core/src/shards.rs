//! Streaming activation shards: the on-disk store of the MLP activations that `collect`
//! writes and `train` streams.
//!
//! A shard set is a directory:
//!
//! ```text
//! DIR/manifest.json                  {"format": "nlrw-shards", "version": 1, "width", "dtype",
//!                                     "rows_per_shard", "total_rows", "complete",
//!                                     "shards": [{"file", "rows", "bytes", "xxh3"}]}
//! DIR/shard-000000.safetensors ...   one tensor "activations" of shape [rows, width]
//! ```
//!
//! Each shard is an ordinary safetensors file (header built with the `safetensors` crate's
//! [`Metadata`], so any safetensors reader opens it). The manifest records each shard's row
//! count, byte size and xxh3-64 checksum of the *whole file* (header included), so one flipped
//! byte anywhere is caught.
//!
//! Durability: a shard is written under a dot-prefixed temporary name, fsynced, renamed, and
//! only then listed in the manifest, which is itself replaced atomically (temp, fsync, rename,
//! directory fsync). A writer killed at any point therefore leaves a manifest that lists only
//! complete shards; [`ShardWriter`] with [`WriteMode::Resume`] continues from there.
//!
//! Reading: [`ShardReader`] validates the manifest, then [`ShardReader::batches`] starts one
//! background thread that memory-maps each shard, checks it against the manifest (size, header,
//! checksum) *before* handing out any of its rows, and sends batches through a bounded channel.
//! Without shuffling, batches inside one shard are zero-copy views of the mapping; with
//! shuffling, shards come in a seeded random order and rows pass through a bounded shuffle
//! buffer (of row *indices*: the rows themselves stay in the page cache) before being copied
//! into owned batches. Memory stays bounded by the prefetch depth and the shuffle buffer,
//! whatever the size of the set.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use memmap2::{MmapMut, MmapOptions};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3Default;

/// `format` field of the manifest and of each shard's safetensors metadata.
pub const FORMAT: &str = "nlrw-shards";
/// Manifest version this code writes and reads.
pub const VERSION: u32 = 1;
/// File name of the manifest inside a shard directory.
pub const MANIFEST: &str = "manifest.json";
/// Name of the one tensor in every shard file.
pub const TENSOR_NAME: &str = "activations";
/// Value of the `format` key in each shard's safetensors `__metadata__`. One key only: the
/// crate serializes metadata from a `HashMap`, and a single entry keeps the header bytes (and
/// so the checksums) deterministic.
const SHARD_FORMAT_TAG: &str = "nlrw-shards/1";
/// Hashing proceeds in chunks of this size so that a cancelled reader stops promptly.
const HASH_CHUNK: usize = 16 << 20;
/// Below this many bytes a shard is hashed inline rather than on a helper thread.
const PARALLEL_HASH_MIN: usize = 4 << 20;

/// Everything that can go wrong with a shard set; every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: missing manifest (not a shard set, or its writer never started)", path.display())]
    MissingManifest { path: PathBuf },
    #[error("{}: invalid manifest: {reason}", path.display())]
    InvalidManifest { path: PathBuf, reason: String },
    #[error("{}: missing shard file listed in the manifest", path.display())]
    MissingShard { path: PathBuf },
    #[error("{}: truncated: the manifest says {expected} bytes, the file has {actual}", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: checksum mismatch (xxh3 {actual}, manifest says {expected}): the file is corrupt", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: invalid safetensors shard: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: shard disagrees with the manifest: {reason}", path.display())]
    Mismatch { path: PathBuf, reason: String },
    #[error("{}: already holds a shard set; pass overwrite=True or resume=True", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    InvalidArgument { path: PathBuf, reason: String },
}

impl ShardError {
    /// The file or directory the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::MissingManifest { path }
            | Self::InvalidManifest { path, .. }
            | Self::MissingShard { path }
            | Self::Truncated { path, .. }
            | Self::Checksum { path, .. }
            | Self::Corrupt { path, .. }
            | Self::Mismatch { path, .. }
            | Self::AlreadyExists { path }
            | Self::InvalidArgument { path, .. } => path,
        }
    }

    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn arg(path: &Path, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = ShardError> = std::result::Result<T, E>;

/// Element type of the stored activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ShardDtype {
    #[serde(rename = "float32")]
    F32,
    #[serde(rename = "float16")]
    F16,
    #[serde(rename = "bfloat16")]
    BF16,
}

impl ShardDtype {
    /// Parses the numpy/torch spelling: `float32`, `float16` or `bfloat16`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "float32" => Some(Self::F32),
            "float16" => Some(Self::F16),
            "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }
}

/// One shard as listed in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the set's directory (never a path).
    pub file: String,
    pub rows: usize,
    /// Size of the whole file.
    pub bytes: u64,
    /// xxh3-64 of the whole file, 16 lowercase hex digits.
    pub xxh3: String,
}

/// Contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub width: usize,
    pub dtype: ShardDtype,
    pub rows_per_shard: usize,
    pub total_rows: u64,
    /// Set by [`ShardWriter::close`]; an incomplete set lists only full shards.
    pub complete: bool,
    pub shards: Vec<ShardEntry>,
}

impl Manifest {
    fn new(width: usize, dtype: ShardDtype, rows_per_shard: usize) -> Self {
        Self {
            format: FORMAT.to_string(),
            version: VERSION,
            width,
            dtype,
            rows_per_shard,
            total_rows: 0,
            complete: false,
            shards: Vec::new(),
        }
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.width * self.dtype.itemsize()
    }

    /// Reads and validates `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ShardError::MissingManifest { path })
            }
            Err(e) => return Err(ShardError::io(&path, e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| ShardError::InvalidManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        manifest
            .validate()
            .map_err(|reason| ShardError::InvalidManifest { path, reason })?;
        Ok(manifest)
    }

    /// Internal consistency: everything the reader relies on before touching a shard.
    fn validate(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", self.format));
        }
        if self.version != VERSION {
            return Err(format!(
                "version {} is not supported (this nlrw reads version {VERSION})",
                self.version
            ));
        }
        if self.width == 0 || self.rows_per_shard == 0 {
            return Err("width and rows_per_shard must be positive".into());
        }
        let row_bytes = self
            .width
            .checked_mul(self.dtype.itemsize())
            .ok_or("width overflows")?;
        let mut names = HashSet::new();
        let mut total: u64 = 0;
        let n = self.shards.len();
        for (i, shard) in self.shards.iter().enumerate() {
            if !valid_shard_name(&shard.file) {
                return Err(format!("invalid shard file name {:?}", shard.file));
            }
            if !names.insert(shard.file.as_str()) {
                return Err(format!("shard {:?} is listed twice", shard.file));
            }
            let last = i + 1 == n;
            if shard.rows == 0 || shard.rows > self.rows_per_shard {
                return Err(format!(
                    "shard {:?} has {} rows (rows_per_shard is {})",
                    shard.file, shard.rows, self.rows_per_shard
                ));
            }
            // Only the final shard of a completed set may be short.
            if shard.rows != self.rows_per_shard && !(last && self.complete) {
                return Err(format!(
                    "shard {:?} has {} rows but only the last shard of a complete set may have fewer than {}",
                    shard.file, shard.rows, self.rows_per_shard
                ));
            }
            let data = (shard.rows as u64)
                .checked_mul(row_bytes as u64)
                .ok_or("shard size overflows")?;
            if shard.bytes < data.saturating_add(8) || usize::try_from(shard.bytes).is_err() {
                return Err(format!(
                    "shard {:?} is listed with {} bytes, too few for {} rows",
                    shard.file, shard.bytes, shard.rows
                ));
            }
            if parse_hex64(&shard.xxh3).is_none() {
                return Err(format!(
                    "shard {:?} has an invalid xxh3 {:?}",
                    shard.file, shard.xxh3
                ));
            }
            total = total
                .checked_add(shard.rows as u64)
                .ok_or("row count overflows")?;
        }
        if total != self.total_rows {
            return Err(format!(
                "total_rows is {} but the shards hold {total}",
                self.total_rows
            ));
        }
        Ok(())
    }

    /// Writes the manifest atomically: temp file, fsync, rename, directory fsync.
    fn store(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!(".{MANIFEST}.tmp"));
        let mut text = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        text.push(b'\n');
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()
        };
        write().map_err(|e| ShardError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| ShardError::io(&path, e))?;
        sync_dir(dir)
    }
}

fn valid_shard_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.ends_with(".safetensors")
        && !name.contains(['/', '\\', '\0'])
        && name != ".."
}

fn shard_name(index: usize) -> String {
    format!("shard-{index:06}.safetensors")
}

fn is_our_shard_file(name: &str) -> bool {
    name.starts_with("shard-") && name.ends_with(".safetensors")
}

fn is_our_temp_file(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

fn hex64(x: u64) -> String {
    format!("{x:016x}")
}

fn parse_hex64(s: &str) -> Option<u64> {
    if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Persists renames/unlinks in the directory. Opening a directory for fsync is a Unix
    // idiom; elsewhere it is unsupported and rename is as durable as the platform makes it.
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ShardError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The safetensors prefix of a shard: 8-byte little-endian header length, then the JSON
/// header padded with spaces to a multiple of 8 (so the data, and numpy views of it, are
/// aligned), as the `safetensors` crate itself lays it out.
fn shard_prefix(dtype: ShardDtype, rows: usize, width: usize) -> Vec<u8> {
    let data_len = rows * width * dtype.itemsize();
    let info = TensorInfo {
        dtype: dtype.safetensors(),
        shape: vec![rows, width],
        data_offsets: (0, data_len),
    };
    let meta = HashMap::from([("format".to_string(), SHARD_FORMAT_TAG.to_string())]);
    let metadata = Metadata::new(Some(meta), vec![(TENSOR_NAME.to_string(), info)])
        .expect("a single tensor with consistent offsets is valid metadata");
    let mut header = serde_json::to_vec(&metadata).expect("metadata always serializes");
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut prefix = Vec::with_capacity(8 + header.len());
    prefix.extend_from_slice(&(header.len() as u64).to_le_bytes());
    prefix.extend_from_slice(&header);
    prefix
}

/// xxh3-64 of `parts` in sequence; `None` when `cancel` was raised meanwhile.
fn hash_parts(parts: &[&[u8]], cancel: Option<&AtomicBool>) -> Option<u64> {
    let mut hasher = Xxh3Default::new();
    for part in parts {
        for chunk in part.chunks(HASH_CHUNK) {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return None;
            }
            hasher.update(chunk);
        }
    }
    Some(hasher.digest())
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// What to do when the directory already holds a shard set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Fail with [`ShardError::AlreadyExists`] if a manifest exists.
    New,
    /// Continue an incomplete set (start a new one if there is none).
    Resume,
    /// Delete an existing set first.
    Overwrite,
}

/// Writes rows into a shard set; see the module documentation for the layout.
///
/// Only [`close`](Self::close) marks the set complete. Dropping a writer without closing it
/// (an exception, a crash) keeps the shards written so far, listed in an incomplete manifest,
/// and discards the rows buffered for the unfinished shard.
#[derive(Debug)]
pub struct ShardWriter {
    dir: PathBuf,
    manifest: Manifest,
    row_bytes: usize,
    /// Rows of the unfinished shard (fewer than `rows_per_shard`).
    buffer: Vec<u8>,
    closed: bool,
    /// Set when a write failed half-way: the on-disk set is consistent but this writer's
    /// view of which rows were committed is not, so it refuses further writes.
    failed: bool,
}

impl ShardWriter {
    pub fn create(
        dir: impl AsRef<Path>,
        width: usize,
        dtype: ShardDtype,
        rows_per_shard: usize,
        mode: WriteMode,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if width == 0 {
            return Err(ShardError::arg(&dir, "width must be positive"));
        }
        if rows_per_shard == 0 {
            return Err(ShardError::arg(&dir, "rows_per_shard must be positive"));
        }
        let row_bytes = width
            .checked_mul(dtype.itemsize())
            .filter(|&b| b.checked_mul(rows_per_shard).is_some())
            .ok_or_else(|| ShardError::arg(&dir, "width * rows_per_shard is too large"))?;
        fs::create_dir_all(&dir).map_err(|e| ShardError::io(&dir, e))?;
        let manifest_path = dir.join(MANIFEST);
        let exists = manifest_path.exists();

        let manifest = match (mode, exists) {
            (WriteMode::New, true) => return Err(ShardError::AlreadyExists { path: dir }),
            (WriteMode::Resume, true) => {
                let m = Manifest::load(&dir)?;
                if m.width != width || m.dtype != dtype || m.rows_per_shard != rows_per_shard {
                    return Err(ShardError::arg(
                        &manifest_path,
                        format!(
                            "cannot resume: the existing set has width={}, dtype={}, rows_per_shard={}, \
                             not width={width}, dtype={}, rows_per_shard={rows_per_shard}",
                            m.width,
                            m.dtype.name(),
                            m.rows_per_shard,
                            dtype.name()
                        ),
                    ));
                }
                if m.complete {
                    return Err(ShardError::arg(
                        &manifest_path,
                        "cannot resume: the set is already complete; pass overwrite=True to replace it",
                    ));
                }
                for shard in &m.shards {
                    let path = dir.join(&shard.file);
                    match fs::metadata(&path) {
                        Ok(meta) if meta.len() == shard.bytes => {}
                        Ok(meta) => {
                            return Err(ShardError::Truncated {
                                path,
                                expected: shard.bytes,
                                actual: meta.len(),
                            })
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            return Err(ShardError::MissingShard { path })
                        }
                        Err(e) => return Err(ShardError::io(&path, e)),
                    }
                }
                Some(m)
            }
            (WriteMode::Overwrite, true) => {
                // Removing the manifest first invalidates the old set atomically; the shard
                // files then go in any order.
                fs::remove_file(&manifest_path).map_err(|e| ShardError::io(&manifest_path, e))?;
                sync_dir(&dir)?;
                None
            }
            (_, false) => None,
        };
        let fresh = manifest.is_none();
        let manifest = manifest.unwrap_or_else(|| Manifest::new(width, dtype, rows_per_shard));
        remove_strays(&dir, &manifest)?;
        if fresh {
            // Mark the directory as a (still empty, incomplete) set right away, so that a
            // second writer started by mistake refuses instead of interleaving files.
            manifest.store(&dir)?;
        }
        Ok(Self {
            dir,
            manifest,
            row_bytes,
            buffer: Vec::new(),
            closed: false,
            failed: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Rows accepted so far, including rows resumed from disk and rows still buffered.
    pub fn rows_written(&self) -> u64 {
        self.manifest.total_rows + (self.buffer.len() / self.row_bytes) as u64
    }

    /// Rows in shards that are on disk and listed in the manifest: where a resumed writer
    /// continues.
    pub fn rows_committed(&self) -> u64 {
        self.manifest.total_rows
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn check_open(&self) -> Result<()> {
        if self.closed {
            return Err(ShardError::arg(&self.dir, "the writer is closed"));
        }
        if self.failed {
            return Err(ShardError::arg(
                &self.dir,
                "an earlier write failed; reopen with resume=True to continue",
            ));
        }
        Ok(())
    }

    /// Appends rows given as raw little-endian bytes, `row_bytes()` per row.
    ///
    /// Full shards are written straight from `data`; only the remainder of an unfinished
    /// shard is copied into the writer's buffer.
    pub fn write_bytes(&mut self, data: &[u8]) -> Result<()> {
        self.check_open()?;
        if data.is_empty() {
            return Err(ShardError::arg(&self.dir, "rows is empty"));
        }
        if data.len() % self.row_bytes != 0 {
            return Err(ShardError::arg(
                &self.dir,
                format!(
                    "got {} bytes, not a whole number of rows of {} bytes",
                    data.len(),
                    self.row_bytes
                ),
            ));
        }
        let shard_bytes = self.row_bytes * self.manifest.rows_per_shard;
        let mut rest = data;
        let mut buffer_full = false;
        if !self.buffer.is_empty() {
            let take = (shard_bytes - self.buffer.len()).min(rest.len());
            self.buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            buffer_full = self.buffer.len() == shard_bytes;
        }
        let (direct, tail) = rest.split_at(rest.len() / shard_bytes * shard_bytes);
        let mut pieces: Vec<&[u8]> = Vec::new();
        if buffer_full {
            pieces.push(&self.buffer);
        }
        pieces.extend(direct.chunks_exact(shard_bytes));
        if !pieces.is_empty() {
            if let Err(e) = commit_shards(&self.dir, &mut self.manifest, &pieces) {
                // The set on disk is consistent, but which of these rows made it is only in
                // the manifest now: the caller resumes from `rows_committed`.
                self.failed = true;
                return Err(e);
            }
        }
        if buffer_full {
            self.buffer.clear();
        }
        if !tail.is_empty() {
            if self.buffer.capacity() < shard_bytes {
                self.buffer.reserve_exact(shard_bytes - self.buffer.len());
            }
            self.buffer.extend_from_slice(tail);
        }
        Ok(())
    }

    /// Writes the buffered rows as the final (possibly short) shard and marks the set
    /// complete. Closing twice is a no-op.
    pub fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.check_open()?;
        if !self.buffer.is_empty() {
            if let Err(e) = commit_shards(&self.dir, &mut self.manifest, &[&self.buffer]) {
                self.failed = true;
                return Err(e);
            }
            self.buffer = Vec::new();
        }
        self.manifest.complete = true;
        if let Err(e) = self.manifest.store(&self.dir) {
            self.manifest.complete = false;
            self.failed = true;
            return Err(e);
        }
        self.closed = true;
        Ok(())
    }

    /// Stops without completing the set: buffered rows are dropped, written shards stay
    /// (resumable). What dropping an unclosed writer does, made explicit.
    pub fn abort(&mut self) {
        self.buffer = Vec::new();
        self.closed = true;
    }
}

/// A shard written to its temporary file (not yet fsynced) and hashed.
struct WrittenShard {
    file: File,
    tmp: PathBuf,
    name: String,
    rows: usize,
    bytes: u64,
    hash: u64,
}

/// Writes `pieces` (one shard each) as the next shards of the set and lists them in the
/// manifest, in order.
///
/// Pipelined: while this thread writes shard i+1 into the page cache (hashing it on a helper
/// thread at the same time), a committer thread fsyncs shard i, renames it into place and
/// rewrites the manifest. The disk flush of one shard thus overlaps the copy of the next,
/// and the order of durable steps per shard is unchanged: data fsync, rename, directory
/// fsync, manifest. On error, the shards committed so far stay listed; the rest are removed.
fn commit_shards(dir: &Path, manifest: &mut Manifest, pieces: &[&[u8]]) -> Result<()> {
    let first_index = manifest.shards.len();
    let (dtype, width) = (manifest.dtype, manifest.width);
    let row_bytes = manifest.row_bytes();
    let failed = AtomicBool::new(false);
    thread::scope(|scope| {
        // Capacity 1: at most one written shard waits for the committer, so at most two
        // shards' worth of data is dirty in the page cache at a time.
        let (tx, rx) = sync_channel::<WrittenShard>(1);
        let committer = scope.spawn(|| {
            let mut result = Ok(());
            for shard in rx {
                if result.is_ok() {
                    result = commit_written(dir, manifest, &shard);
                    failed.store(result.is_err(), Ordering::Relaxed);
                }
                if result.is_err() {
                    let _ = fs::remove_file(&shard.tmp);
                }
            }
            result
        });
        let mut written = Ok(());
        for (k, data) in pieces.iter().enumerate() {
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let name = shard_name(first_index + k);
            let tmp = dir.join(format!(".{name}.tmp"));
            let prefix = shard_prefix(dtype, data.len() / row_bytes, width);
            match write_hashed(&tmp, &prefix, data) {
                Ok((file, hash)) => {
                    let shard = WrittenShard {
                        file,
                        tmp,
                        name,
                        rows: data.len() / row_bytes,
                        bytes: (prefix.len() + data.len()) as u64,
                        hash,
                    };
                    if let Err(unsent) = tx.send(shard) {
                        let _ = fs::remove_file(&unsent.0.tmp);
                        break;
                    }
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    written = Err(ShardError::io(&tmp, e));
                    break;
                }
            }
        }
        drop(tx);
        let committed = committer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        committed.and(written)
    })
}

/// The durable steps of one shard: fsync, rename, directory fsync, manifest.
fn commit_written(dir: &Path, manifest: &mut Manifest, shard: &WrittenShard) -> Result<()> {
    shard
        .file
        .sync_all()
        .map_err(|e| ShardError::io(&shard.tmp, e))?;
    let path = dir.join(&shard.name);
    fs::rename(&shard.tmp, &path).map_err(|e| ShardError::io(&path, e))?;
    // Persist the rename before the manifest can mention the file.
    sync_dir(dir)?;
    manifest.shards.push(ShardEntry {
        file: shard.name.clone(),
        rows: shard.rows,
        bytes: shard.bytes,
        xxh3: hex64(shard.hash),
    });
    manifest.total_rows += shard.rows as u64;
    if let Err(e) = manifest.store(dir) {
        manifest.total_rows -= shard.rows as u64;
        manifest.shards.pop();
        return Err(e);
    }
    Ok(())
}

/// Writes `prefix` then `data` to a new file at `path` and returns it (not yet fsynced) with
/// the xxh3 of both. Large data is hashed on a helper thread while this one writes, so the
/// checksum costs no extra pass in wall time.
fn write_hashed(path: &Path, prefix: &[u8], data: &[u8]) -> io::Result<(File, u64)> {
    let mut file = File::create(path)?;
    let hash = if data.len() >= PARALLEL_HASH_MIN {
        thread::scope(|scope| {
            let hasher = scope.spawn(|| hash_parts(&[prefix, data], None));
            let written = file.write_all(prefix).and_then(|()| file.write_all(data));
            let hash = hasher
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            written.map(|()| hash)
        })?
    } else {
        file.write_all(prefix)?;
        file.write_all(data)?;
        hash_parts(&[prefix, data], None)
    };
    Ok((
        file,
        hash.expect("hashing without a cancel flag always finishes"),
    ))
}

/// Removes leftovers of a killed writer: temp files, and shard files the manifest does not
/// list. Other files in the directory are left alone.
fn remove_strays(dir: &Path, manifest: &Manifest) -> Result<()> {
    let listed: HashSet<&str> = manifest.shards.iter().map(|s| s.file.as_str()).collect();
    let entries = fs::read_dir(dir).map_err(|e| ShardError::io(dir, e))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| ShardError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_our_temp_file(name) || (is_our_shard_file(name) && !listed.contains(name)) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| ShardError::io(&path, e))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

/// A shard file mapped into memory and checked against its manifest entry.
///
/// The mapping is private copy-on-write: batches handed to Python are writable numpy views
/// of it, and writes through them never reach the file (nor any other reader's mapping).
#[derive(Debug)]
pub struct MappedShard {
    path: PathBuf,
    /// Owns the mapping; after construction it is only touched again by `Drop`. All access
    /// goes through `ptr`, which was derived from it with write permission.
    _map: MmapMut,
    ptr: *mut u8,
    /// Byte offset of row 0 in the mapping.
    data_offset: usize,
    rows: usize,
    row_bytes: usize,
}

// SAFETY: `ptr` points into the mapping owned by the same struct, which lives (and stays at
// the same address) until the struct is dropped. Sharing across threads is sound because the
// crate upholds one rule: every row of a mapped shard is handed out at most once, either
// copied (`copy_rows`) or as the memory of one `Batch::Mapped`, so no two threads ever access
// the same bytes while one of them may write (only the owner of a mapped batch may write).
unsafe impl Send for MappedShard {}
unsafe impl Sync for MappedShard {}

impl MappedShard {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Pointer to the first byte of `row` (which must be `<= rows`).
    fn row_ptr(&self, row: usize) -> *mut u8 {
        assert!(row <= self.rows);
        // SAFETY: data_offset + rows * row_bytes == mapping length (checked in `open`), so
        // the offset stays inside the mapping or one past its end.
        unsafe { self.ptr.add(self.data_offset + row * self.row_bytes) }
    }

    /// Appends rows `start..start + n` to `out`.
    fn copy_rows(&self, start: usize, n: usize, out: &mut Vec<u8>) {
        assert!(start + n <= self.rows);
        let len = n * self.row_bytes;
        // SAFETY: the range is inside the mapping (asserted above); by the crate's rule these
        // rows are handed out only here, so nobody writes them concurrently.
        let src = unsafe { std::slice::from_raw_parts(self.row_ptr(start), len) };
        out.extend_from_slice(src);
    }

    /// Maps `dir/entry.file` and checks it: size, checksum (when `verify`), then that the
    /// safetensors header holds exactly one tensor of the manifest's dtype and shape. Returns
    /// `Ok(None)` when `cancel` was raised during hashing.
    fn open(
        dir: &Path,
        manifest: &Manifest,
        entry: &ShardEntry,
        verify: bool,
        cancel: Option<&AtomicBool>,
    ) -> Result<Option<Self>> {
        let path = dir.join(&entry.file);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ShardError::MissingShard { path })
            }
            Err(e) => return Err(ShardError::io(&path, e)),
        };
        let len = file.metadata().map_err(|e| ShardError::io(&path, e))?.len();
        if len != entry.bytes {
            if len < entry.bytes {
                return Err(ShardError::Truncated {
                    path,
                    expected: entry.bytes,
                    actual: len,
                });
            }
            return Err(ShardError::Mismatch {
                path,
                reason: format!(
                    "the file has {len} bytes, the manifest says {}",
                    entry.bytes
                ),
            });
        }
        // SAFETY: memmap2 requires that the file is not modified while mapped, or reads may
        // see changing data (and a truncation would fault). Our writers never modify a shard
        // in place: they write a new file and rename it over, which leaves this mapping's
        // inode intact. The mapping is private, so writes through it never reach the file.
        // The size was checked just above, so the mapping covers exactly `entry.bytes`.
        let mut map = unsafe {
            MmapOptions::new()
                .populate()
                .map_copy_read_only(&file)
                .and_then(|m| m.make_mut())
        }
        .map_err(|e| ShardError::io(&path, e))?;
        if map.len() as u64 != entry.bytes {
            return Err(ShardError::Truncated {
                path,
                expected: entry.bytes,
                actual: map.len() as u64,
            });
        }
        if verify {
            let Some(hash) = hash_parts(&[&map[..]], cancel) else {
                return Ok(None);
            };
            let expected = parse_hex64(&entry.xxh3);
            if expected != Some(hash) {
                return Err(ShardError::Checksum {
                    path,
                    expected: entry.xxh3.clone(),
                    actual: hex64(hash),
                });
            }
        }
        let data_offset = check_header(&path, &map, manifest, entry)?;
        let ptr = map.as_mut_ptr();
        Ok(Some(Self {
            path,
            _map: map,
            ptr,
            data_offset,
            rows: entry.rows,
            row_bytes: manifest.row_bytes(),
        }))
    }
}

/// Validates a shard's safetensors header against the manifest and returns the data offset.
fn check_header(path: &Path, buf: &[u8], manifest: &Manifest, entry: &ShardEntry) -> Result<usize> {
    let corrupt = |reason: String| ShardError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mismatch = |reason: String| ShardError::Mismatch {
        path: path.to_path_buf(),
        reason,
    };
    let len_bytes: [u8; 8] = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("shorter than the 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    let header = usize::try_from(header_len)
        .ok()
        .and_then(|n| buf.get(8..8usize.checked_add(n)?))
        .ok_or_else(|| {
            corrupt(format!(
                "header length {header_len} exceeds the file size {}",
                buf.len()
            ))
        })?;
    // Check the tensor names ourselves first: with exactly one tensor, the crate's offset
    // arithmetic below cannot overflow whatever the header claims.
    let keys: HashMap<String, serde::de::IgnoredAny> =
        serde_json::from_slice(header).map_err(|e| corrupt(format!("invalid JSON header: {e}")))?;
    if keys.len() != 2 || !keys.contains_key(TENSOR_NAME) || !keys.contains_key("__metadata__") {
        let mut names: Vec<&str> = keys.keys().map(String::as_str).collect();
        names.sort_unstable();
        return Err(mismatch(format!(
            "expected one tensor {TENSOR_NAME:?} and __metadata__, found {names:?}"
        )));
    }
    let (n, metadata) = SafeTensors::read_metadata(buf).map_err(|e| corrupt(format!("{e}")))?;
    let tag = metadata.metadata().as_ref().and_then(|m| m.get("format"));
    if tag.map(String::as_str) != Some(SHARD_FORMAT_TAG) {
        return Err(mismatch(format!(
            "metadata format is {tag:?}, expected {SHARD_FORMAT_TAG:?}"
        )));
    }
    let info = metadata
        .info(TENSOR_NAME)
        .ok_or_else(|| mismatch(format!("no tensor {TENSOR_NAME:?}")))?;
    if info.dtype != manifest.dtype.safetensors() {
        return Err(mismatch(format!(
            "dtype is {}, the manifest says {}",
            info.dtype,
            manifest.dtype.name()
        )));
    }
    if info.shape != [entry.rows, manifest.width] {
        return Err(mismatch(format!(
            "shape is {:?}, the manifest says [{}, {}]",
            info.shape, entry.rows, manifest.width
        )));
    }
    // read_metadata checked that the single tensor's bytes end exactly at the end of the file.
    Ok(8 + n + info.data_offsets.0)
}

/// A batch of rows, `rows * row_bytes` bytes in row-major order.
#[derive(Debug)]
pub enum Batch {
    /// Rows `first_row..first_row + rows` of a mapped shard (zero-copy).
    Mapped {
        shard: Arc<MappedShard>,
        first_row: usize,
        rows: usize,
    },
    /// Rows copied into an owned buffer (shuffled batches, batches across shard boundaries).
    Owned { data: Vec<u8>, rows: usize },
}

impl Batch {
    pub fn rows(&self) -> usize {
        match self {
            Self::Mapped { rows, .. } | Self::Owned { rows, .. } => *rows,
        }
    }

    /// The batch's bytes, copied. For tests and Rust consumers that want owned data.
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            Self::Mapped {
                shard,
                first_row,
                rows,
            } => {
                let mut out = Vec::with_capacity(rows * shard.row_bytes);
                shard.copy_rows(*first_row, *rows, &mut out);
                out
            }
            Self::Owned { data, .. } => data.clone(),
        }
    }

    /// Pointer to the batch's first byte, writable: the memory belongs to this batch alone
    /// (see [`MappedShard`]) and stays valid while the batch lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            Self::Mapped {
                shard, first_row, ..
            } => shard.row_ptr(*first_row),
            Self::Owned { data, .. } => data.as_mut_ptr(),
        }
    }
}

/// Options of one pass over a shard set.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Rows per batch; the last batch may be smaller unless `drop_last`.
    pub batch_rows: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Selects an independent random stream for the same seed (one per training epoch).
    pub epoch: u64,
    /// Check each shard's checksum before using it.
    pub verify: bool,
    pub drop_last: bool,
    /// Batches the background thread may prepare ahead of the consumer.
    pub prefetch: usize,
    /// Rows in the shuffle buffer; `None` means 64 batches.
    pub shuffle_buffer_rows: Option<usize>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            batch_rows: 4096,
            shuffle: false,
            seed: 0,
            epoch: 0,
            verify: true,
            drop_last: false,
            prefetch: 4,
            shuffle_buffer_rows: None,
        }
    }
}

/// An opened shard set: the validated manifest, from which passes are started.
#[derive(Debug, Clone)]
pub struct ShardReader {
    dir: PathBuf,
    manifest: Arc<Manifest>,
}

impl ShardReader {
    /// Reads and validates the manifest; shards are opened lazily by each pass.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = Arc::new(Manifest::load(&dir)?);
        Ok(Self { dir, manifest })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn num_rows(&self) -> u64 {
        self.manifest.total_rows
    }

    /// Number of batches a pass with these options yields.
    pub fn num_batches(&self, batch_rows: usize, drop_last: bool) -> u64 {
        let rows = self.manifest.total_rows;
        let b = batch_rows.max(1) as u64;
        if drop_last {
            rows / b
        } else {
            rows.div_ceil(b)
        }
    }

    /// Maps and checks shard `index` of the manifest.
    pub fn open_shard(&self, index: usize, verify: bool) -> Result<MappedShard> {
        let entry =
            self.manifest.shards.get(index).ok_or_else(|| {
                ShardError::arg(&self.dir, format!("no shard {index} in this set"))
            })?;
        Ok(
            MappedShard::open(&self.dir, &self.manifest, entry, verify, None)?
                .expect("hashing without a cancel flag always finishes"),
        )
    }

    /// Checks every shard (size, checksum, header) up front.
    pub fn verify(&self) -> Result<()> {
        for index in 0..self.manifest.shards.len() {
            self.open_shard(index, true)?;
        }
        Ok(())
    }

    /// Starts a pass: a background thread reads ahead and sends batches; errors arrive in
    /// order, after the batches that preceded them, and end the pass.
    pub fn batches(&self, options: ReadOptions) -> Result<Batches> {
        if options.batch_rows == 0 {
            return Err(ShardError::arg(&self.dir, "batch_rows must be positive"));
        }
        if options.shuffle_buffer_rows == Some(0) {
            return Err(ShardError::arg(
                &self.dir,
                "shuffle_buffer_rows must be positive",
            ));
        }
        let (tx, rx) = sync_channel(options.prefetch.max(1));
        let cancel = Arc::new(AtomicBool::new(false));
        let pass = Pass {
            dir: self.dir.clone(),
            manifest: Arc::clone(&self.manifest),
            options,
            tx,
            cancel: Arc::clone(&cancel),
        };
        let handle = thread::Builder::new()
            .name("nlrw-shard-reader".into())
            .spawn(move || pass.run())
            .map_err(|e| ShardError::io(&self.dir, e))?;
        Ok(Batches {
            rx: Some(rx),
            cancel,
            handle: Some(handle),
            done: false,
        })
    }
}

/// The consumer end of a pass: an iterator of batches. Dropping it stops the thread.
#[derive(Debug)]
pub struct Batches {
    rx: Option<Receiver<Result<Batch>>>,
    cancel: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    done: bool,
}

/// [`Batches::next_timeout`] found nothing within its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

impl Batches {
    /// Like [`Iterator::next`], but waits at most `timeout` (so a caller can check for
    /// interrupts between waits); `Err(TimedOut)` means nothing arrived yet.
    pub fn next_timeout(
        &mut self,
        timeout: Duration,
    ) -> std::result::Result<Option<Result<Batch>>, TimedOut> {
        if self.done {
            return Ok(None);
        }
        let received = match self.rx.as_ref().map(|rx| rx.recv_timeout(timeout)) {
            Some(Ok(item)) => Some(item),
            Some(Err(RecvTimeoutError::Timeout)) => return Err(TimedOut),
            Some(Err(RecvTimeoutError::Disconnected)) | None => None,
        };
        Ok(self.finish(received))
    }

    fn finish(&mut self, item: Option<Result<Batch>>) -> Option<Result<Batch>> {
        match &item {
            Some(Ok(_)) => {}
            Some(Err(_)) => self.done = true,
            None => {
                self.done = true;
                // The thread hung up: normally because it finished, but a panic must not
                // pass for the end of the data, so it is re-raised here.
                if let Some(handle) = self.handle.take() {
                    if let Err(panic) = handle.join() {
                        std::panic::resume_unwind(panic);
                    }
                }
            }
        }
        item
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let received = self.rx.as_ref().and_then(|rx| rx.recv().ok());
        self.finish(received)
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a thread waiting to send; the flag stops one that is
        // hashing. Either way it exits promptly, so joining here is cheap.
        drop(self.rx.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The background thread's state for one pass.
struct Pass {
    dir: PathBuf,
    manifest: Arc<Manifest>,
    options: ReadOptions,
    tx: SyncSender<Result<Batch>>,
    cancel: Arc<AtomicBool>,
}

/// `Err(Stop)`: the consumer is gone or an error was sent; the thread just returns.
struct Stop;

impl Pass {
    fn run(self) {
        let _ = if self.options.shuffle {
            self.run_shuffled()
        } else {
            self.run_sequential()
        };
    }

    fn send(&self, item: Result<Batch>) -> std::result::Result<(), Stop> {
        let is_err = item.is_err();
        self.tx.send(item).map_err(|_| Stop)?;
        if is_err {
            Err(Stop)
        } else {
            Ok(())
        }
    }

    fn open(&self, index: usize) -> std::result::Result<Arc<MappedShard>, Stop> {
        let entry = &self.manifest.shards[index];
        match MappedShard::open(
            &self.dir,
            &self.manifest,
            entry,
            self.options.verify,
            Some(&self.cancel),
        ) {
            Ok(Some(shard)) => Ok(Arc::new(shard)),
            Ok(None) => Err(Stop),
            Err(e) => {
                self.send(Err(e))?;
                Err(Stop)
            }
        }
    }

    fn row_bytes(&self) -> usize {
        self.manifest.row_bytes()
    }

    /// Shards in order; whole batches inside a shard are views, batches that straddle a
    /// shard boundary are copied.
    fn run_sequential(&self) -> std::result::Result<(), Stop> {
        let batch_rows = self.options.batch_rows;
        let row_bytes = self.row_bytes();
        let mut pending: Vec<u8> = Vec::new();
        for index in 0..self.manifest.shards.len() {
            let shard = self.open(index)?;
            let mut row = 0;
            if !pending.is_empty() {
                let have = pending.len() / row_bytes;
                let take = (batch_rows - have).min(shard.rows);
                shard.copy_rows(0, take, &mut pending);
                row = take;
                if have + take == batch_rows {
                    let data = std::mem::take(&mut pending);
                    self.send(Ok(Batch::Owned {
                        data,
                        rows: batch_rows,
                    }))?;
                }
            }
            while shard.rows - row >= batch_rows {
                self.send(Ok(Batch::Mapped {
                    shard: Arc::clone(&shard),
                    first_row: row,
                    rows: batch_rows,
                }))?;
                row += batch_rows;
            }
            if row < shard.rows {
                if pending.is_empty() {
                    pending.reserve_exact(batch_rows * row_bytes);
                }
                shard.copy_rows(row, shard.rows - row, &mut pending);
            }
        }
        if !pending.is_empty() && !self.options.drop_last {
            let rows = pending.len() / row_bytes;
            self.send(Ok(Batch::Owned {
                data: pending,
                rows,
            }))?;
        }
        Ok(())
    }

    /// Shards in a seeded random order; rows pass through a shuffle buffer of
    /// `(shard, row)` indices: once it is full, each incoming row replaces a uniformly chosen
    /// buffered row, which goes out. At the end the buffer is emptied in random order, so
    /// every row goes out exactly once.
    fn run_shuffled(&self) -> std::result::Result<(), Stop> {
        let batch_rows = self.options.batch_rows;
        let row_bytes = self.row_bytes();
        let mut rng = ChaCha8Rng::seed_from_u64(self.options.seed);
        rng.set_stream(self.options.epoch);
        let mut order: Vec<usize> = (0..self.manifest.shards.len()).collect();
        shuffle(&mut order, &mut rng);
        let capacity = self
            .options
            .shuffle_buffer_rows
            .unwrap_or(batch_rows.saturating_mul(64))
            .max(1)
            .min(usize::try_from(self.manifest.total_rows).unwrap_or(usize::MAX))
            .max(1);
        let mut emitter = Emitter {
            pass: self,
            shards: HashMap::new(),
            batch: Vec::new(),
            batch_rows,
            row_bytes,
        };
        let mut buffer: Vec<(usize, usize)> = Vec::with_capacity(capacity);
        for (slot, &index) in order.iter().enumerate() {
            let shard = self.open(index)?;
            let rows = shard.rows;
            emitter.shards.insert(slot, (shard, rows));
            for row in 0..rows {
                let item = (slot, row);
                if buffer.len() < capacity {
                    buffer.push(item);
                } else {
                    let j = below(&mut rng, capacity);
                    let out = std::mem::replace(&mut buffer[j], item);
                    emitter.emit(out)?;
                }
            }
        }
        shuffle(&mut buffer, &mut rng);
        for item in buffer {
            emitter.emit(item)?;
        }
        if !emitter.batch.is_empty() && !self.options.drop_last {
            let rows = emitter.batch.len() / row_bytes;
            self.send(Ok(Batch::Owned {
                data: emitter.batch,
                rows,
            }))?;
        }
        Ok(())
    }
}

/// Gathers shuffled rows into owned batches and unmaps each shard once its last row left.
struct Emitter<'a> {
    pass: &'a Pass,
    /// slot -> (shard, rows of it still in the shuffle buffer)
    shards: HashMap<usize, (Arc<MappedShard>, usize)>,
    batch: Vec<u8>,
    batch_rows: usize,
    row_bytes: usize,
}

impl Emitter<'_> {
    fn emit(&mut self, (slot, row): (usize, usize)) -> std::result::Result<(), Stop> {
        let entry = self
            .shards
            .get_mut(&slot)
            .expect("buffered rows keep their shard");
        if self.batch.is_empty() {
            self.batch.reserve_exact(self.batch_rows * self.row_bytes);
        }
        entry.0.copy_rows(row, 1, &mut self.batch);
        entry.1 -= 1;
        if entry.1 == 0 {
            self.shards.remove(&slot);
        }
        if self.batch.len() == self.batch_rows * self.row_bytes {
            let data = std::mem::take(&mut self.batch);
            self.pass.send(Ok(Batch::Owned {
                data,
                rows: self.batch_rows,
            }))?;
        }
        Ok(())
    }
}

/// Uniform integer in `0..n` (n > 0) by Lemire's multiply-shift: written out rather than
/// taken from `rand` so that the order depends only on the ChaCha8 stream, which is
/// specified bit for bit. The bias, below n / 2^64, is immaterial here.
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// Fisher–Yates with [`below`].
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i + 1);
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of `width` f32 values where row i holds i, i + 0.25, ... so order is visible.
    fn rows_f32(start: usize, n: usize, width: usize) -> Vec<u8> {
        (start..start + n)
            .flat_map(|i| (0..width).map(move |j| i as f32 + j as f32 / 64.0))
            .flat_map(f32::to_le_bytes)
            .collect()
    }

    fn row_ids(bytes: &[u8], width: usize) -> Vec<usize> {
        bytes
            .chunks(width * 4)
            .map(|row| f32::from_le_bytes(row[..4].try_into().unwrap()) as usize)
            .collect()
    }

    fn write_set(dir: &Path, rows: usize, width: usize, rows_per_shard: usize) -> Vec<u8> {
        let data = rows_f32(0, rows, width);
        let mut w =
            ShardWriter::create(dir, width, ShardDtype::F32, rows_per_shard, WriteMode::New)
                .unwrap();
        // Uneven pieces: partial fill, several full shards from one call, single rows.
        let row_bytes = width * 4;
        let cuts = [0, 3.min(rows), (3 + 2 * rows_per_shard + 1).min(rows), rows];
        for pair in cuts.windows(2) {
            if pair[1] > pair[0] {
                w.write_bytes(&data[pair[0] * row_bytes..pair[1] * row_bytes])
                    .unwrap();
            }
        }
        w.close().unwrap();
        data
    }

    fn read_all(dir: &Path, options: ReadOptions) -> Result<Vec<Vec<u8>>> {
        let reader = ShardReader::open(dir)?;
        reader
            .batches(options)?
            .map(|b| b.map(|b| b.to_vec()))
            .collect()
    }

    #[test]
    fn shards_roundtrip_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let data = write_set(tmp.path(), 45, 5, 7);
        let m = Manifest::load(tmp.path()).unwrap();
        assert!(m.complete);
        assert_eq!(m.total_rows, 45);
        assert_eq!(m.shards.len(), 7);
        assert_eq!(m.shards.last().unwrap().rows, 3);
        for batch_rows in [1, 4, 7, 10, 45, 100] {
            let batches = read_all(
                tmp.path(),
                ReadOptions {
                    batch_rows,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(batches.concat(), data, "batch_rows={batch_rows}");
            assert!(batches[..batches.len() - 1]
                .iter()
                .all(|b| b.len() == batch_rows * 20));
            let reader = ShardReader::open(tmp.path()).unwrap();
            assert_eq!(reader.num_batches(batch_rows, false), batches.len() as u64);
        }
        let dropped = read_all(
            tmp.path(),
            ReadOptions {
                batch_rows: 10,
                drop_last: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(dropped.len(), 4);
        assert_eq!(dropped.concat(), data[..40 * 20]);
    }

    #[test]
    fn shards_are_plain_safetensors() {
        let tmp = tempfile::tempdir().unwrap();
        let data = write_set(tmp.path(), 10, 3, 4);
        let bytes = fs::read(tmp.path().join("shard-000002.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(TENSOR_NAME).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.data(), &data[8 * 12..]);
        // Header bytes are deterministic, so equal data gives equal checksums.
        let other = tempfile::tempdir().unwrap();
        write_set(other.path(), 10, 3, 4);
        assert_eq!(
            Manifest::load(tmp.path()).unwrap().shards,
            Manifest::load(other.path()).unwrap().shards
        );
    }

    #[test]
    fn shards_half_dtypes() {
        for dtype in [ShardDtype::F16, ShardDtype::BF16] {
            let tmp = tempfile::tempdir().unwrap();
            let data: Vec<u8> = (0..6 * 4 * 2).map(|i| i as u8).collect();
            let mut w = ShardWriter::create(tmp.path(), 4, dtype, 4, WriteMode::New).unwrap();
            w.write_bytes(&data).unwrap();
            w.close().unwrap();
            let bytes = fs::read(tmp.path().join("shard-000000.safetensors")).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.tensor(TENSOR_NAME).unwrap().dtype(), dtype.safetensors());
            let got = read_all(tmp.path(), ReadOptions::default()).unwrap();
            assert_eq!(got.concat(), data);
        }
    }

    #[test]
    fn shards_shuffle_is_seeded_and_exact() {
        let tmp = tempfile::tempdir().unwrap();
        write_set(tmp.path(), 103, 2, 10);
        let order = |seed, epoch, buffer| {
            let batches = read_all(
                tmp.path(),
                ReadOptions {
                    batch_rows: 8,
                    shuffle: true,
                    seed,
                    epoch,
                    shuffle_buffer_rows: buffer,
                    ..Default::default()
                },
            )
            .unwrap();
            row_ids(&batches.concat(), 2)
        };
        let a = order(1, 0, None);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..103).collect::<Vec<_>>());
        assert_ne!(a, sorted);
        assert_eq!(a, order(1, 0, None));
        assert_ne!(a, order(2, 0, None));
        assert_ne!(a, order(1, 1, None));
        for buffer in [1, 5, 1000] {
            let mut b = order(3, 0, Some(buffer));
            b.sort_unstable();
            assert_eq!(b, sorted, "buffer={buffer}");
        }
    }

    #[test]
    fn shards_unclosed_writer_leaves_resumable_set() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let data = rows_f32(0, 30, 3);
        {
            let mut w = ShardWriter::create(dir, 3, ShardDtype::F32, 8, WriteMode::New).unwrap();
            w.write_bytes(&data[..19 * 12]).unwrap();
            assert_eq!(w.rows_written(), 19);
            assert_eq!(w.rows_committed(), 16);
            // Dropped without close: as if the process died.
        }
        // A stray temp file and an unlisted shard, as a kill mid-shard could leave.
        fs::write(dir.join(".shard-000002.safetensors.tmp"), b"partial").unwrap();
        fs::write(dir.join("shard-000007.safetensors"), b"junk").unwrap();
        let m = Manifest::load(dir).unwrap();
        assert!(!m.complete);
        assert_eq!(m.total_rows, 16);
        let got = read_all(dir, ReadOptions::default()).unwrap();
        assert_eq!(got.concat(), data[..16 * 12]);

        assert!(matches!(
            ShardWriter::create(dir, 3, ShardDtype::F32, 8, WriteMode::New),
            Err(ShardError::AlreadyExists { .. })
        ));
        assert!(matches!(
            ShardWriter::create(dir, 4, ShardDtype::F32, 8, WriteMode::Resume),
            Err(ShardError::InvalidArgument { .. })
        ));
        let mut w = ShardWriter::create(dir, 3, ShardDtype::F32, 8, WriteMode::Resume).unwrap();
        assert!(!dir.join(".shard-000002.safetensors.tmp").exists());
        assert!(!dir.join("shard-000007.safetensors").exists());
        let start = w.rows_committed() as usize;
        w.write_bytes(&data[start * 12..]).unwrap();
        w.close().unwrap();
        let got = read_all(dir, ReadOptions::default()).unwrap();
        assert_eq!(got.concat(), data);
        assert!(matches!(
            ShardWriter::create(dir, 3, ShardDtype::F32, 8, WriteMode::Resume),
            Err(ShardError::InvalidArgument { .. })
        ));
        let mut w = ShardWriter::create(dir, 3, ShardDtype::F32, 8, WriteMode::Overwrite).unwrap();
        w.write_bytes(&data[..12]).unwrap();
        w.close().unwrap();
        assert_eq!(ShardReader::open(dir).unwrap().num_rows(), 1);
        assert!(!dir.join("shard-000002.safetensors").exists());
    }

    #[test]
    fn shards_bad_writes_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(tmp.path(), 3, ShardDtype::F32, 8, WriteMode::New).unwrap();
        assert!(matches!(
            w.write_bytes(&[]),
            Err(ShardError::InvalidArgument { .. })
        ));
        assert!(matches!(
            w.write_bytes(&[0; 13]),
            Err(ShardError::InvalidArgument { .. })
        ));
        w.close().unwrap();
        assert!(w.write_bytes(&[0; 12]).is_err());
        assert!(
            ShardWriter::create(tmp.path().join("x"), 0, ShardDtype::F32, 8, WriteMode::New)
                .is_err()
        );
        assert!(
            ShardWriter::create(tmp.path().join("y"), 3, ShardDtype::F32, 0, WriteMode::New)
                .is_err()
        );
    }

    #[test]
    fn shards_corruption_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_set(dir, 20, 4, 8);
        let shard = dir.join("shard-000001.safetensors");
        let good = fs::read(&shard).unwrap();
        let expect_err = |check: fn(&ShardError) -> bool| {
            let err = read_all(dir, ReadOptions::default()).unwrap_err();
            assert!(check(&err), "{err}");
            assert!(
                err.to_string().contains("shard-000001.safetensors"),
                "{err}"
            );
            assert_eq!(err.path(), shard);
        };

        let mut bad = good.clone();
        bad[good.len() - 5] ^= 0x10;
        fs::write(&shard, &bad).unwrap();
        expect_err(|e| matches!(e, ShardError::Checksum { .. }));
        // Without verification the flipped data byte goes unnoticed (documented).
        assert!(read_all(
            dir,
            ReadOptions {
                verify: false,
                ..Default::default()
            }
        )
        .is_ok());

        fs::write(&shard, &good[..good.len() - 1]).unwrap();
        expect_err(|e| matches!(e, ShardError::Truncated { .. }));

        fs::remove_file(&shard).unwrap();
        expect_err(|e| matches!(e, ShardError::MissingShard { .. }));

        // A well-formed shard of another shape, with a manifest entry that matches its bytes.
        let other = shard_prefix(ShardDtype::F32, 4, 8);
        let mut file = other.clone();
        file.extend(rows_f32(0, 4, 8));
        fs::write(&shard, &file).unwrap();
        let mut m = Manifest::load(dir).unwrap();
        m.shards[1].xxh3 = hex64(xxhash_rust::xxh3::xxh3_64(&file));
        m.shards[1].bytes = file.len() as u64;
        m.store(dir).unwrap();
        expect_err(|e| matches!(e, ShardError::Mismatch { .. }));
        fs::write(&shard, &good).unwrap();

        fs::remove_file(dir.join(MANIFEST)).unwrap();
        let err = ShardReader::open(dir).unwrap_err();
        assert!(matches!(err, ShardError::MissingManifest { .. }));
        assert!(err.to_string().contains(MANIFEST));
        fs::write(dir.join(MANIFEST), b"{not json").unwrap();
        assert!(matches!(
            ShardReader::open(dir),
            Err(ShardError::InvalidManifest { .. })
        ));
    }

    #[test]
    fn shards_error_arrives_after_good_batches() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_set(dir, 24, 2, 8);
        let shard = dir.join("shard-000002.safetensors");
        let mut bytes = fs::read(&shard).unwrap();
        bytes[20] ^= 1;
        fs::write(&shard, &bytes).unwrap();
        let reader = ShardReader::open(dir).unwrap();
        let items: Vec<_> = reader
            .batches(ReadOptions {
                batch_rows: 4,
                ..Default::default()
            })
            .unwrap()
            .collect();
        assert_eq!(items.len(), 5);
        assert!(items[..4].iter().all(Result::is_ok));
        assert!(matches!(items[4], Err(ShardError::Checksum { .. })));
        assert!(reader.verify().is_err());
    }

    #[test]
    fn shards_abandoned_pass_stops() {
        let tmp = tempfile::tempdir().unwrap();
        write_set(tmp.path(), 200, 2, 10);
        let reader = ShardReader::open(tmp.path()).unwrap();
        let mut batches = reader
            .batches(ReadOptions {
                batch_rows: 1,
                prefetch: 1,
                ..Default::default()
            })
            .unwrap();
        assert!(batches.next().unwrap().is_ok());
        assert!(batches
            .next_timeout(Duration::from_secs(60))
            .unwrap()
            .unwrap()
            .is_ok());
        drop(batches); // must not hang on the full channel

        let mut batches = reader
            .batches(ReadOptions {
                batch_rows: 150,
                ..Default::default()
            })
            .unwrap();
        let mut rows = 0;
        loop {
            match batches.next_timeout(Duration::from_millis(1)) {
                Err(TimedOut) => continue,
                Ok(Some(batch)) => rows += batch.unwrap().rows(),
                Ok(None) => break,
            }
        }
        assert_eq!(rows, 200);
        assert!(matches!(batches.next_timeout(Duration::ZERO), Ok(None)));
    }

    // ---- deterministic mutation fuzzing ------------------------------------------------------

    /// Reads a (possibly damaged) set every way the reader can; any panic fails the test.
    fn read_every_way(dir: &Path) -> usize {
        let Ok(reader) = ShardReader::open(dir) else {
            return 0;
        };
        let mut ok = 0;
        for (verify, shuffle) in [(true, false), (false, false), (false, true)] {
            let options = ReadOptions {
                batch_rows: 3,
                verify,
                shuffle,
                shuffle_buffer_rows: Some(4),
                ..Default::default()
            };
            if let Ok(batches) = reader.batches(options) {
                for batch in batches {
                    match batch {
                        Ok(b) => {
                            let bytes = b.to_vec();
                            assert_eq!(bytes.len(), b.rows() * reader.manifest().row_bytes());
                            ok += 1;
                        }
                        Err(e) => assert!(!e.to_string().is_empty()),
                    }
                }
            }
        }
        let _ = reader.verify();
        ok
    }

    fn rewrite_header(file: &[u8], header: &str) -> Vec<u8> {
        let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&file[8 + n..]);
        out
    }

    /// Updates the manifest entry of `file` to match `bytes`, so that the damage reaches the
    /// header parser even with verification on.
    fn relist(dir: &Path, manifest: &[u8], index: usize, bytes: &[u8]) {
        let mut m: Manifest = serde_json::from_slice(manifest).unwrap();
        m.shards[index].bytes = bytes.len() as u64;
        m.shards[index].xxh3 = hex64(xxhash_rust::xxh3::xxh3_64(bytes));
        fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
    }

    #[test]
    fn shards_mutation_fuzz_never_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut w = ShardWriter::create(dir, 3, ShardDtype::F16, 4, WriteMode::New).unwrap();
        w.write_bytes(&(0..10 * 6).map(|i| i as u8).collect::<Vec<_>>())
            .unwrap();
        w.close().unwrap();
        let manifest = fs::read(dir.join(MANIFEST)).unwrap();
        let names: Vec<String> = Manifest::load(dir)
            .unwrap()
            .shards
            .iter()
            .map(|s| s.file.clone())
            .collect();
        let shards: Vec<Vec<u8>> = names
            .iter()
            .map(|n| fs::read(dir.join(n)).unwrap())
            .collect();
        assert!(read_every_way(dir) > 0);

        let headers = [
            String::new(),
            "{}".into(),
            "[]".into(),
            "{\"activations\": 1}".into(),
            r#"{"__metadata__":{"format":"nlrw-shards/1"},"activations":{"dtype":"F16","shape":[4,3],"data_offsets":[0,25]}}"#.into(),
            r#"{"__metadata__":{"format":"nlrw-shards/1"},"activations":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#.into(),
            r#"{"__metadata__":{"format":"nlrw-shards/1"},"activations":{"dtype":"F16","shape":[3,4],"data_offsets":[0,24]}}"#.into(),
            r#"{"__metadata__":{"format":"other"},"activations":{"dtype":"F16","shape":[4,3],"data_offsets":[0,24]}}"#.into(),
            r#"{"__metadata__":{"format":"nlrw-shards/1"},"activations":{"dtype":"F16","shape":[18446744073709551615,3],"data_offsets":[0,24]}}"#.into(),
            r#"{"__metadata__":{"format":"nlrw-shards/1"},"activations":{"dtype":"F16","shape":[4,3],"data_offsets":[18446744073709551615,24]}}"#.into(),
            // Many tensors whose offsets add up past usize::MAX (overflow in naive checks).
            format!(
                "{{{}}}",
                (0..9)
                    .map(|i| {
                        let step = u64::MAX / 9;
                        format!(
                            r#""t{i}":{{"dtype":"U8","shape":[{step}],"data_offsets":[{},{}]}}"#,
                            step * i,
                            step * (i + 1)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            r#"{"__metadata__":{"format":"nlrw-shards/1"},"activations":{"dtype":"F16","shape":[4,3],"data_offsets":[0,24]},"x":{"dtype":"U8","shape":[0],"data_offsets":[24,24]}}"#.into(),
        ];
        let manifest_edits: [(&str, &str); 8] = [
            ("\"rows\": 4", "\"rows\": 5"),
            ("\"rows\": 4", "\"rows\": 0"),
            ("\"width\": 3", "\"width\": 4611686018427387904"),
            ("\"float16\"", "\"float32\""),
            ("\"float16\"", "\"int8\""),
            ("shard-000001", "../000001"),
            ("\"version\": 1", "\"version\": 2"),
            ("\"complete\": true", "\"complete\": false"),
        ];

        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut cases = 0;
        let restore = |dir: &Path| {
            fs::write(dir.join(MANIFEST), &manifest).unwrap();
            for (n, s) in names.iter().zip(&shards) {
                fs::write(dir.join(n), s).unwrap();
            }
        };
        for round in 0..3000 {
            let which = below(&mut rng, names.len());
            let target = dir.join(&names[which]);
            let original = &shards[which];
            match round % 6 {
                0 | 1 => {
                    // Bit flips in a shard (a few at once), sometimes relisted.
                    let mut bytes = original.clone();
                    for _ in 0..1 + below(&mut rng, 3) {
                        let i = below(&mut rng, bytes.len());
                        bytes[i] ^= 1 << below(&mut rng, 8);
                    }
                    fs::write(&target, &bytes).unwrap();
                    if round % 6 == 1 {
                        relist(dir, &manifest, which, &bytes);
                    }
                }
                2 => {
                    let len = below(&mut rng, original.len());
                    let bytes = &original[..len];
                    fs::write(&target, bytes).unwrap();
                    if below(&mut rng, 2) == 0 {
                        relist(dir, &manifest, which, bytes);
                    }
                }
                3 => {
                    let header = &headers[below(&mut rng, headers.len())];
                    let mut bytes = rewrite_header(original, header);
                    if below(&mut rng, 2) == 0 {
                        // Lie about the header length too.
                        let lie = rng.next_u64() >> below(&mut rng, 64);
                        bytes[..8].copy_from_slice(&lie.to_le_bytes());
                    }
                    fs::write(&target, &bytes).unwrap();
                    relist(dir, &manifest, which, &bytes);
                }
                4 => {
                    // Bit flips and truncations of the manifest.
                    let mut bytes = manifest.clone();
                    if below(&mut rng, 3) == 0 {
                        bytes.truncate(below(&mut rng, bytes.len()));
                    } else {
                        let i = below(&mut rng, bytes.len());
                        bytes[i] ^= 1 << below(&mut rng, 8);
                    }
                    fs::write(dir.join(MANIFEST), &bytes).unwrap();
                }
                _ => {
                    let text = String::from_utf8(manifest.clone()).unwrap();
                    let (from, to) = manifest_edits[below(&mut rng, manifest_edits.len())];
                    fs::write(dir.join(MANIFEST), text.replacen(from, to, 1)).unwrap();
                }
            }
            read_every_way(dir);
            restore(dir);
            cases += 1;
        }
        assert_eq!(cases, 3000);
        // The pristine set still reads in full after all that.
        assert_eq!(
            read_all(dir, ReadOptions::default())
                .unwrap()
                .concat()
                .len(),
            60
        );
    }
}
