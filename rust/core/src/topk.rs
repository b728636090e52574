//! Sparse top-k encoding: the transcoder's activation function and the helpers around it.
//!
//! A TopK transcoder encodes `z = topk(relu(W_enc x + b_enc))`: of each row of
//! pre-activations only the k largest positive entries survive. This module computes that
//! selection on the CPU, fused with the ReLU, for float32, float16 and bfloat16 rows, in
//! parallel over rows, and returns the sparse form `(values f32[n, k], indices u32[n, k])`.
//!
//! Output contract (exactly a stable sort of `relu(x)` by value, descending):
//! * values are sorted descending; ties are broken by the lower index first;
//! * a row with fewer than k positive entries fills the remaining slots with value 0 and
//!   the lowest indices not already used (the order a stable sort of `relu(x)` gives);
//! * a non-finite entry (NaN or ±inf) is an error naming its row and column.
//!
//! Helpers: [`decode`] scatters sparse latents into a dense buffer, [`topk_replace`]
//! re-applies top-k after some latents' values were replaced (the evaluation splices
//! simulated values into the true latents this way), and [`LatentStats`] accumulates
//! per-latent statistics over streamed batches.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use std::cmp::Ordering;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

/// Errors of the top-k functions; each message names the argument, row or latent at fault.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TopkError {
    #[error("k must be at least 1 (got k = 0)")]
    ZeroK,
    #[error("k = {k} is larger than the number of latents d = {d}")]
    KTooLarge { k: usize, d: usize },
    #[error("the input has no rows")]
    Empty,
    #[error("{name} has {got} elements, expected {expected} ({shape})")]
    Length {
        name: &'static str,
        got: usize,
        expected: usize,
        shape: String,
    },
    #[error("row {row} has a non-finite pre-activation {value} at latent {col}")]
    NonFinite { row: usize, col: usize, value: f32 },
    #[error("{name}: latent index {index} in row {row} is out of range for d = {d}")]
    IndexOutOfRange {
        name: &'static str,
        row: usize,
        index: u64,
        d: usize,
    },
    #[error("{name}: row {row} is out of range for n = {n}")]
    RowOutOfRange {
        name: &'static str,
        row: u64,
        n: usize,
    },
    #[error("stats were built for {expected} latents, got {got}")]
    LatentCount { expected: usize, got: usize },
}

pub type Result<T> = std::result::Result<T, TopkError>;

/// A row of pre-activations in some storage type, read as float32 in chunks.
pub trait Element: Copy + Send + Sync + 'static {
    /// Convert `src` to float32 into `dst` (same length).
    fn to_f32(src: &[Self], dst: &mut [f32]);

    /// `src` as float32: converted into `tmp`, or `src` itself when it already is float32
    /// (no copy on the hot path).
    #[inline(always)]
    fn as_f32<'a>(src: &'a [Self], tmp: &'a mut [f32]) -> &'a [f32] {
        let tmp = &mut tmp[..src.len()];
        Self::to_f32(src, tmp);
        tmp
    }
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn as_f32<'a>(src: &'a [f32], _tmp: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(src: &[f16], dst: &mut [f32]) {
        // `half` uses F16C when the CPU has it (runtime detection).
        src.convert_to_f32_slice(dst);
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(src: &[bf16], dst: &mut [f32]) {
        // bfloat16 is the upper half of a float32: a shift, which vectorizes.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

/// Elements scanned per step: the scan tests a whole chunk against the running threshold
/// with vector instructions and only walks it element by element when something passes.
const CHUNK: usize = 32;

/// Total order of candidates: larger value first, then lower index first.
#[inline(always)]
fn by_value_then_index(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.partial_cmp(&a.0)
        .unwrap_or(Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Streaming selection of the k largest positive entries of one row.
///
/// Candidates strictly above the threshold `thr` are appended to `buf`; when it holds
/// `cap` of them it is cut back to its k best and `thr` becomes the k-th best value. An
/// entry equal to `thr` arrives after (has a higher index than) the entry that set it,
/// so ties are resolved towards the lower index by the strict comparison alone.
struct Selector {
    k: usize,
    cap: usize,
    thr: f32,
    buf: Vec<(f32, u32)>,
}

impl Selector {
    fn new(k: usize) -> Self {
        let cap = (2 * k).max(k + 64);
        Selector {
            k,
            cap,
            thr: 0.0,
            buf: Vec::with_capacity(cap),
        }
    }

    #[inline(always)]
    fn reset(&mut self) {
        self.thr = 0.0;
        self.buf.clear();
    }

    #[inline(always)]
    fn push(&mut self, value: f32, index: u32) {
        if value > self.thr {
            self.buf.push((value, index));
            if self.buf.len() == self.cap {
                self.compact();
            }
        }
    }

    fn compact(&mut self) {
        let k = self.k;
        self.buf.select_nth_unstable_by(k - 1, by_value_then_index);
        self.buf.truncate(k);
        self.thr = self.buf[k - 1].0;
    }

    /// Write the row's k best into `values`/`indices`, zero-filling with the lowest unused
    /// indices when fewer than k entries were positive.
    fn finish(&mut self, values: &mut [f32], indices: &mut [u32]) {
        let k = self.k;
        self.buf.sort_unstable_by(by_value_then_index);
        self.buf.truncate(k);
        for (slot, &(v, i)) in self.buf.iter().enumerate() {
            values[slot] = v;
            indices[slot] = i;
        }
        let filled = self.buf.len();
        if filled < k {
            let mut used: Vec<u32> = self.buf.iter().map(|&(_, i)| i).collect();
            used.sort_unstable();
            let mut next = 0u32;
            let mut u = 0;
            for slot in filled..k {
                while u < used.len() && used[u] == next {
                    next += 1;
                    u += 1;
                }
                values[slot] = 0.0;
                indices[slot] = next;
                next += 1;
            }
        }
    }
}

/// Bits of |x| above this are NaN or infinity (exponent all ones).
const MAX_FINITE_BITS: i32 = 0x7f7f_ffff;

/// Bit j of the result is set when `xs[j] > thr`; `bad` accumulates non-finite entries.
///
/// Portable form: comparisons on the float bits as integers. For a threshold `thr ≥ 0`,
/// `x > thr` ⇔ `bits(x) > bits(thr)` as signed integers (negative floats have the sign
/// bit set), and `x` is non-finite ⇔ `bits(|x|) > bits(f32::MAX)`.
#[inline(always)]
fn chunk_mask_portable(xs: &[f32], thr: f32, bad: &mut u32) -> u32 {
    let thr = thr.to_bits() as i32;
    let mut hit = 0u32;
    let mut nonfinite = 0u32;
    for (j, &x) in xs.iter().enumerate() {
        let b = x.to_bits();
        hit |= (((b as i32) > thr) as u32) << j;
        nonfinite |= (((b & 0x7fff_ffff) as i32) > MAX_FINITE_BITS) as u32;
    }
    *bad |= nonfinite;
    hit
}

/// AVX2 form of [`chunk_mask_portable`] for a chunk of exactly `CHUNK` = 32 entries:
/// four 8-lane compares and movemasks.
///
/// # Safety
/// The CPU must support AVX2 and `xs.len() == CHUNK`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn chunk_mask_avx2(xs: &[f32], thr: f32, bad: &mut std::arch::x86_64::__m256i) -> u32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(xs.len(), CHUNK);
    let t = _mm256_set1_ps(thr);
    let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
    let max_finite = _mm256_set1_epi32(MAX_FINITE_BITS);
    let mut hit = 0u32;
    for q in 0..CHUNK / 8 {
        // SAFETY: q*8+8 <= CHUNK = xs.len(), so the unaligned 8-float load is in bounds.
        let v = unsafe { _mm256_loadu_ps(xs.as_ptr().add(q * 8)) };
        // Ordered greater-than: false for NaN, which the non-finite check reports.
        let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(v, t);
        hit |= (_mm256_movemask_ps(gt) as u32) << (q * 8);
        let abs = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
        *bad = _mm256_or_si256(*bad, _mm256_cmpgt_epi32(abs, max_finite));
    }
    hit
}

/// Largest entry of a block of whole chunks, NaN ignored where the hardware allows.
#[inline(always)]
fn block_max<T: Element, const AVX2: bool>(block: &[T], tmp: &mut [f32; CHUNK]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: AVX2 is only true after runtime detection (`encode_block_dispatch`).
        return unsafe { block_max_avx2(block, tmp) };
    }
    let mut lanes = [f32::NEG_INFINITY; 8];
    for chunk in block.chunks_exact(CHUNK) {
        let xs = T::as_f32(chunk, tmp);
        for eight in xs.chunks_exact(8) {
            for l in 0..8 {
                lanes[l] = if eight[l] > lanes[l] {
                    eight[l]
                } else {
                    lanes[l]
                };
            }
        }
    }
    lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_max_avx2<T: Element>(block: &[T], tmp: &mut [f32; CHUNK]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); CHUNK / 8];
    for chunk in block.chunks_exact(CHUNK) {
        let xs = T::as_f32(chunk, tmp);
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: q*8+8 <= CHUNK = xs.len() (chunks_exact), so the load is in bounds.
            let v = unsafe { _mm256_loadu_ps(xs.as_ptr().add(q * 8)) };
            *a = _mm256_max_ps(*a, v);
        }
    }
    let m = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
    let mut out = [0f32; 8];
    // SAFETY: `out` holds exactly 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), m) };
    out.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// A lower bound on the row's k-th largest entry, from the maxima of blocks of the row.
///
/// The k largest block maxima are k distinct entries that are all ≥ the k-th of them,
/// so the row's k-th largest entry is at least that value: every entry of the top k is
/// ≥ the estimate. With about 4k blocks the estimate is close to the true k-th value, so
/// the scan that follows offers only a few more than k entries to the selector instead of
/// the ~k·ln(d/k) a threshold rising from zero lets through. Returns 0 (no pre-pass) for
/// rows too short to have 4k blocks of whole chunks.
#[inline(always)]
fn threshold_estimate<T: Element, const AVX2: bool>(
    row: &[T],
    k: usize,
    maxima: &mut Vec<f32>,
) -> f32 {
    let chunks_per_block = row.len() / CHUNK / (4 * k);
    if chunks_per_block == 0 {
        return 0.0;
    }
    let mut tmp = [0f32; CHUNK];
    maxima.clear();
    // A trailing partial block is left out: a lower bound needs no more than k blocks.
    for block in row.chunks_exact(chunks_per_block * CHUNK) {
        maxima.push(block_max::<T, AVX2>(block, &mut tmp));
    }
    // NaN sorts last, so it can only make the estimate smaller (the row errors anyway).
    let (_, &mut kth, _) = maxima.select_nth_unstable_by(k - 1, |a, b| {
        b.partial_cmp(a)
            .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
    });
    if kth > 0.0 && kth.is_finite() {
        kth
    } else {
        0.0
    }
}

/// Scan one row into the selector. Returns false when the row holds a non-finite value.
///
/// The row is tested a chunk at a time against the running threshold (a bit mask of the
/// entries that pass, computed with vector compares) and only those entries, usually none,
/// are offered to the selector.
#[inline(always)]
fn scan_row<T: Element, const AVX2: bool>(row: &[T], sel: &mut Selector) -> bool {
    let mut tmp = [0f32; CHUNK];
    let mut bad = 0u32;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: _mm256_setzero_si256 only needs AVX, implied by AVX2 when AVX2 is true;
    // when it is false the value is never used by an AVX instruction.
    let mut bad_avx = unsafe { std::mem::zeroed::<std::arch::x86_64::__m256i>() };
    let mut base = 0usize;
    let mut chunks = row.chunks_exact(CHUNK);
    for chunk in &mut chunks {
        let xs = T::as_f32(chunk, &mut tmp);
        #[cfg(target_arch = "x86_64")]
        let mut hit = if AVX2 {
            // SAFETY: AVX2 is only true in code reached after runtime detection of AVX2
            // (`encode_block_dispatch`), and chunks_exact gives exactly CHUNK entries.
            unsafe { chunk_mask_avx2(xs, sel.thr, &mut bad_avx) }
        } else {
            chunk_mask_portable(xs, sel.thr, &mut bad)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let mut hit = chunk_mask_portable(xs, sel.thr, &mut bad);
        // Offer only the entries that passed; a compaction inside may raise the
        // threshold, which `push` re-checks.
        while hit != 0 {
            let j = hit.trailing_zeros() as usize;
            sel.push(xs[j], (base + j) as u32);
            hit &= hit - 1;
        }
        base += CHUNK;
    }
    let xs = T::as_f32(chunks.remainder(), &mut tmp);
    for (j, &x) in xs.iter().enumerate() {
        bad |= !x.is_finite() as u32;
        sel.push(x, (base + j) as u32);
    }
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: as above, AVX2 was detected at runtime.
        bad |= unsafe { avx2_any(bad_avx) } as u32;
    }
    bad == 0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn avx2_any(v: std::arch::x86_64::__m256i) -> bool {
    std::arch::x86_64::_mm256_testz_si256(v, v) == 0
}

/// Encode a block of rows; compiled once generically and once with AVX2 enabled.
#[inline(always)]
fn encode_block<T: Element, const AVX2: bool>(
    x: &[T],
    d: usize,
    k: usize,
    first_row: usize,
    values: &mut [f32],
    indices: &mut [u32],
    first_bad: &AtomicUsize,
) {
    let mut sel = Selector::new(k);
    let mut maxima = Vec::new();
    for (r, ((row, vals), idxs)) in x
        .chunks_exact(d)
        .zip(values.chunks_exact_mut(k))
        .zip(indices.chunks_exact_mut(k))
        .enumerate()
    {
        sel.reset();
        let estimate = threshold_estimate::<T, AVX2>(row, k, &mut maxima);
        if estimate > 0.0 {
            // The scan keeps entries strictly above `thr`; the estimate itself may be the
            // k-th value, so start just below it.
            sel.thr = f32::from_bits(estimate.to_bits() - 1);
        }
        if !scan_row::<T, AVX2>(row, &mut sel) {
            first_bad.fetch_min(first_row + r, AtomicOrdering::Relaxed);
        }
        sel.finish(vals, idxs);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_block_avx2<T: Element>(
    x: &[T],
    d: usize,
    k: usize,
    first_row: usize,
    values: &mut [f32],
    indices: &mut [u32],
    first_bad: &AtomicUsize,
) {
    encode_block::<T, true>(x, d, k, first_row, values, indices, first_bad)
}

fn encode_block_dispatch<T: Element>(
    x: &[T],
    d: usize,
    k: usize,
    first_row: usize,
    values: &mut [f32],
    indices: &mut [u32],
    first_bad: &AtomicUsize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), which is the only
            // requirement `encode_block_avx2` adds over the generic build.
            unsafe { encode_block_avx2(x, d, k, first_row, values, indices, first_bad) };
            return;
        }
    }
    encode_block::<T, false>(x, d, k, first_row, values, indices, first_bad)
}

fn check_shape(len: usize, n: usize, d: usize, k: usize) -> Result<()> {
    if k == 0 {
        return Err(TopkError::ZeroK);
    }
    if k > d {
        return Err(TopkError::KTooLarge { k, d });
    }
    if n == 0 {
        return Err(TopkError::Empty);
    }
    if len != n * d {
        return Err(TopkError::Length {
            name: "pre_acts",
            got: len,
            expected: n * d,
            shape: format!("[{n}, {d}]"),
        });
    }
    Ok(())
}

/// Fused ReLU + top-k of each row of the row-major `[n, d]` matrix `x`, in parallel.
///
/// `z_i = topk(relu(x_i))`: returns `(values f32[n·k], indices u32[n·k])`, row-major, with
/// the ordering and zero-fill contract of the module docs.
pub fn topk_encode<T: Element>(
    x: &[T],
    n: usize,
    d: usize,
    k: usize,
) -> Result<(Vec<f32>, Vec<u32>)> {
    check_shape(x.len(), n, d, k)?;
    let mut values = vec![0f32; n * k];
    let mut indices = vec![0u32; n * k];
    let first_bad = AtomicUsize::new(usize::MAX);
    // Blocks of rows amortize the selector's allocation and rayon's per-task cost.
    let rows_per_block = (8192 / d.max(1)).clamp(1, 64);
    x.par_chunks(rows_per_block * d)
        .zip(values.par_chunks_mut(rows_per_block * k))
        .zip(indices.par_chunks_mut(rows_per_block * k))
        .enumerate()
        .for_each(|(b, ((xb, vb), ib))| {
            encode_block_dispatch(xb, d, k, b * rows_per_block, vb, ib, &first_bad)
        });
    let bad = first_bad.load(AtomicOrdering::Relaxed);
    if bad != usize::MAX {
        let mut tmp = vec![0f32; d];
        T::to_f32(&x[bad * d..(bad + 1) * d], &mut tmp);
        let col = tmp.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(TopkError::NonFinite {
            row: bad,
            col,
            value: tmp[col],
        });
    }
    Ok((values, indices))
}

fn check_sparse(values: &[f32], indices: &[u32], n: usize, k: usize) -> Result<()> {
    if values.len() != n * k {
        return Err(TopkError::Length {
            name: "values",
            got: values.len(),
            expected: n * k,
            shape: format!("[{n}, {k}]"),
        });
    }
    if indices.len() != n * k {
        return Err(TopkError::Length {
            name: "indices",
            got: indices.len(),
            expected: n * k,
            shape: format!("[{n}, {k}]"),
        });
    }
    Ok(())
}

fn check_indices(name: &'static str, indices: &[u32], k: usize, d: usize) -> Result<()> {
    match indices.iter().position(|&i| i as usize >= d) {
        Some(p) => Err(TopkError::IndexOutOfRange {
            name,
            row: p / k.max(1),
            index: indices[p] as u64,
            d,
        }),
        None => Ok(()),
    }
}

/// Scatter sparse latents into a dense row-major `[n, d]` float32 buffer.
///
/// `dense[i, indices[i, j]] += values[i, j]`: repeated indices in a row add up (as in the
/// decoder product `W_dec · z`), which top-k output never has.
pub fn decode(values: &[f32], indices: &[u32], n: usize, k: usize, d: usize) -> Result<Vec<f32>> {
    check_sparse(values, indices, n, k)?;
    check_indices("indices", indices, k, d)?;
    let mut dense = vec![0f32; n * d];
    if k == 0 {
        return Ok(dense);
    }
    dense
        .par_chunks_mut(d)
        .zip(values.par_chunks(k))
        .zip(indices.par_chunks(k))
        .for_each(|((row, vals), idxs)| {
            for (&v, &i) in vals.iter().zip(idxs) {
                row[i as usize] += v;
            }
        });
    Ok(dense)
}

/// Re-apply top-k after replacing some latents' values.
///
/// Row i starts as the sparse latents `(values[i], indices[i])` (zero-valued padding
/// entries are dropped); each replacement `(rows[m], latents[m], new_values[m])` then sets
/// that latent's value in that row (added if absent; a later replacement of the same
/// latent wins), and the row is re-encoded as `topk(relu(·))` with `k_out` slots under the
/// same ordering and zero-fill contract as [`topk_encode`]. This is how the evaluation
/// overwrites a fraction of the true latents with simulated values.
#[allow(clippy::too_many_arguments)]
pub fn topk_replace(
    values: &[f32],
    indices: &[u32],
    n: usize,
    k: usize,
    rows: &[u64],
    latents: &[u32],
    new_values: &[f32],
    k_out: usize,
    d: usize,
) -> Result<(Vec<f32>, Vec<u32>)> {
    if k_out == 0 {
        return Err(TopkError::ZeroK);
    }
    if k_out > d {
        return Err(TopkError::KTooLarge { k: k_out, d });
    }
    check_sparse(values, indices, n, k)?;
    check_indices("indices", indices, k, d)?;
    let m = rows.len();
    for (name, len) in [("latents", latents.len()), ("new_values", new_values.len())] {
        if len != m {
            return Err(TopkError::Length {
                name,
                got: len,
                expected: m,
                shape: format!("[{m}] like rows"),
            });
        }
    }
    if let Some(p) = rows.iter().position(|&r| r as usize >= n) {
        return Err(TopkError::RowOutOfRange {
            name: "rows",
            row: rows[p],
            n,
        });
    }
    if let Some(p) = latents.iter().position(|&l| l as usize >= d) {
        return Err(TopkError::IndexOutOfRange {
            name: "latents",
            row: rows[p] as usize,
            index: latents[p] as u64,
            d,
        });
    }
    if let Some(p) = new_values.iter().position(|v| !v.is_finite()) {
        return Err(TopkError::NonFinite {
            row: rows[p] as usize,
            col: latents[p] as usize,
            value: new_values[p],
        });
    }
    // Group replacements by row (a stable counting sort keeps their order within a row).
    let mut offsets = vec![0usize; n + 1];
    for &r in rows {
        offsets[r as usize + 1] += 1;
    }
    for i in 0..n {
        offsets[i + 1] += offsets[i];
    }
    let mut order = vec![0usize; m];
    let mut cursor = offsets.clone();
    for (p, &r) in rows.iter().enumerate() {
        order[cursor[r as usize]] = p;
        cursor[r as usize] += 1;
    }

    let mut out_values = vec![0f32; n * k_out];
    let mut out_indices = vec![0u32; n * k_out];
    out_values
        .par_chunks_mut(k_out)
        .zip(out_indices.par_chunks_mut(k_out))
        .enumerate()
        .for_each_init(
            || (Vec::<(u32, f32)>::new(), Selector::new(k_out)),
            |(entries, sel), (i, (ov, oi))| {
                entries.clear();
                for j in i * k..(i + 1) * k {
                    if values[j] != 0.0 {
                        entries.push((indices[j], values[j]));
                    }
                }
                for &p in &order[offsets[i]..offsets[i + 1]] {
                    entries.push((latents[p], new_values[p]));
                }
                // Sort by latent, keeping the last write of each latent.
                entries.sort_by_key(|&(l, _)| l);
                sel.reset();
                let mut e = 0;
                while e < entries.len() {
                    let mut last = e;
                    while last + 1 < entries.len() && entries[last + 1].0 == entries[e].0 {
                        last += 1;
                    }
                    sel.push(entries[last].1, entries[last].0);
                    e = last + 1;
                }
                sel.finish(ov, oi);
            },
        );
    Ok((out_values, out_indices))
}

/// Per-latent running statistics over streamed batches of sparse latents.
///
/// For each latent l: `count_l` = number of entries with value > 0, `max_l`, `sum_l` and
/// `sum_sq_l` of those values (sums in float64), and `rows` = rows (tokens) seen, so that
/// frequency = count / rows and mean over active positions = sum / count.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentStats {
    pub rows: u64,
    pub count: Vec<u64>,
    pub max: Vec<f32>,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
}

impl LatentStats {
    pub fn new(num_latents: usize) -> Self {
        LatentStats {
            rows: 0,
            count: vec![0; num_latents],
            max: vec![0.0; num_latents],
            sum: vec![0.0; num_latents],
            sum_sq: vec![0.0; num_latents],
        }
    }

    pub fn num_latents(&self) -> usize {
        self.count.len()
    }

    /// Add a batch of `n` rows of sparse latents `(values, indices)`, each `[n, k]`.
    pub fn update(&mut self, values: &[f32], indices: &[u32], n: usize, k: usize) -> Result<()> {
        check_sparse(values, indices, n, k)?;
        check_indices("indices", indices, k, self.num_latents())?;
        if let Some(p) = values.iter().position(|v| !v.is_finite()) {
            return Err(TopkError::NonFinite {
                row: p / k.max(1),
                col: indices[p] as usize,
                value: values[p],
            });
        }
        for (&v, &i) in values.iter().zip(indices) {
            if v > 0.0 {
                let l = i as usize;
                self.count[l] += 1;
                if v > self.max[l] {
                    self.max[l] = v;
                }
                let v = v as f64;
                self.sum[l] += v;
                self.sum_sq[l] += v * v;
            }
        }
        self.rows += n as u64;
        Ok(())
    }

    /// Fold another accumulator (e.g. from another worker) into this one.
    pub fn merge(&mut self, other: &LatentStats) -> Result<()> {
        if other.num_latents() != self.num_latents() {
            return Err(TopkError::LatentCount {
                expected: self.num_latents(),
                got: other.num_latents(),
            });
        }
        self.rows += other.rows;
        for l in 0..self.num_latents() {
            self.count[l] += other.count[l];
            self.max[l] = self.max[l].max(other.max[l]);
            self.sum[l] += other.sum[l];
            self.sum_sq[l] += other.sum_sq[l];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Reference: stable sort of relu(x) by value descending, first k.
    fn reference(x: &[f32], n: usize, d: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
        let mut values = Vec::new();
        let mut indices = Vec::new();
        for row in x.chunks(d).take(n) {
            let mut order: Vec<u32> = (0..d as u32).collect();
            order.sort_by(|&a, &b| {
                let va = row[a as usize].max(0.0);
                let vb = row[b as usize].max(0.0);
                vb.partial_cmp(&va).unwrap()
            });
            for &i in &order[..k] {
                values.push(row[i as usize].max(0.0));
                indices.push(i);
            }
        }
        (values, indices)
    }

    fn random(n: usize, d: usize, seed: u64, levels: Option<i32>) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n * d)
            .map(|_| match levels {
                // Few distinct values: many ties.
                Some(l) => rng.random_range(-l..=l) as f32,
                None => rng.random_range(-1.0f32..1.0),
            })
            .collect()
    }

    #[test]
    fn matches_reference_on_random_rows_with_and_without_ties() {
        for (seed, (n, d, k)) in [
            (17, 5, 3),
            (3, 100, 7),
            (70, 64, 64),
            (9, 1000, 32),
            (33, 33, 1),
        ]
        .into_iter()
        .enumerate()
        {
            for levels in [None, Some(2), Some(0)] {
                let x = random(n, d, seed as u64, levels);
                assert_eq!(
                    topk_encode(&x, n, d, k).unwrap(),
                    reference(&x, n, d, k),
                    "n={n} d={d} k={k} levels={levels:?}"
                );
            }
        }
    }

    #[test]
    fn half_precision_rows_match_float32_of_the_same_values() {
        let (n, d, k) = (9, 300, 16);
        let x = random(n, d, 5, None);
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let hf: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
        assert_eq!(topk_encode(&h, n, d, k).unwrap(), reference(&hf, n, d, k));
        let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
        assert_eq!(topk_encode(&b, n, d, k).unwrap(), reference(&bf, n, d, k));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let x = vec![1.0f32; 12];
        assert_eq!(topk_encode(&x, 3, 4, 0), Err(TopkError::ZeroK));
        assert_eq!(
            topk_encode(&x, 3, 4, 5),
            Err(TopkError::KTooLarge { k: 5, d: 4 })
        );
        assert_eq!(topk_encode::<f32>(&[], 0, 4, 2), Err(TopkError::Empty));
        assert!(matches!(
            topk_encode(&x, 4, 4, 2),
            Err(TopkError::Length { .. })
        ));
        let mut y = random(50, 70, 1, None);
        y[37 * 70 + 44] = f32::NAN;
        y[41 * 70 + 3] = f32::INFINITY;
        match topk_encode(&y, 50, 70, 4) {
            Err(TopkError::NonFinite {
                row: 37,
                col: 44,
                value,
            }) => assert!(value.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decode_scatters_and_checks_indices() {
        let dense = decode(&[2.0, 1.0, 0.5, 0.0], &[3, 0, 1, 2], 2, 2, 4).unwrap();
        assert_eq!(dense, vec![1.0, 0.0, 0.0, 2.0, 0.0, 0.5, 0.0, 0.0]);
        assert!(matches!(
            decode(&[1.0], &[4], 1, 1, 4),
            Err(TopkError::IndexOutOfRange { index: 4, .. })
        ));
    }

    #[test]
    fn replace_equals_dense_edit_then_topk() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, d, k, k_out) = (20, 50, 6, 6);
        let x = random(n, d, 2, None);
        let (values, indices) = topk_encode(&x, n, d, k).unwrap();
        let m = 60;
        let rows: Vec<u64> = (0..m).map(|_| rng.random_range(0..n as u64)).collect();
        let latents: Vec<u32> = (0..m).map(|_| rng.random_range(0..d as u32)).collect();
        let new: Vec<f32> = (0..m).map(|_| rng.random_range(-0.5f32..2.0)).collect();
        let mut dense = decode(&values, &indices, n, k, d).unwrap();
        for p in 0..m {
            dense[rows[p] as usize * d + latents[p] as usize] = new[p];
        }
        let got = topk_replace(&values, &indices, n, k, &rows, &latents, &new, k_out, d).unwrap();
        assert_eq!(got, topk_encode(&dense, n, d, k_out).unwrap());
    }

    #[test]
    fn stats_accumulate_and_merge() {
        let mut a = LatentStats::new(3);
        a.update(&[2.0, 1.0, 3.0, 0.0], &[0, 2, 0, 1], 2, 2)
            .unwrap();
        assert_eq!(a.count, vec![2, 0, 1]);
        assert_eq!(a.max, vec![3.0, 0.0, 1.0]);
        assert_eq!(a.sum, vec![5.0, 0.0, 1.0]);
        assert_eq!(a.sum_sq, vec![13.0, 0.0, 1.0]);
        let mut b = LatentStats::new(3);
        b.update(&[4.0], &[1], 1, 1).unwrap();
        a.merge(&b).unwrap();
        assert_eq!((a.rows, a.count.clone(), a.max[1]), (3, vec![2, 1, 1], 4.0));
        assert!(a.merge(&LatentStats::new(2)).is_err());
    }
}
