//! Per-latent quantile tables and quantile-normalization lookups: the calibration step.
//!
//! The simulator rates how strongly a latent fires on a context, but its scores live on
//! their own scale (and simulators rate inactive contexts high). Quantile normalization
//! maps a simulated score `s` of latent `l` to the activation that sits at the same
//! quantile of the latent's *real* activation distribution (zeros included):
//!
//! ```text
//! a = F_real⁻¹(F_sim(s))
//! ```
//!
//! Both distributions are summarised by a quantile table: a row of `Q` ascending values
//! per latent, entry `i` being the quantile at probability `p_i = i / (Q - 1)` (numpy's
//! `linspace(0, 1, Q)`). This module
//! * builds such tables exactly from per-latent samples ([`quantile_tables`]), with the
//!   zeros of sparse latents counted instead of materialised ([`Total`]);
//! * builds them approximately, with a relative-error guarantee, from a mergeable sketch
//!   fed by streamed batches when the data are too large to keep ([`QuantileSketch`]);
//! * maps batches of `(latent_id, score)` through the two tables ([`quantile_normalize`]),
//!   in parallel over scores, with ties handled as documented on `Lookup::group`.
//!
//! Every function validates its input and fails with a [`QuantileError`] naming the
//! argument, latent or index at fault; a failed call returns no partial result and leaves a
//! sketch unchanged.

use rayon::prelude::*;

/// Errors of the quantile functions; each message names the argument, latent or index.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum QuantileError {
    #[error("{name} needs at least 2 quantiles per latent (got Q = {num_quantiles})")]
    TooFewQuantiles {
        name: &'static str,
        num_quantiles: usize,
    },
    #[error("{name} has Q = {num_quantiles} quantiles per latent, more than the 2³⁰ supported")]
    TooManyQuantiles {
        name: &'static str,
        num_quantiles: usize,
    },
    #[error("{name} has {len} values, expected {num_latents} latents × {num_quantiles} quantiles")]
    TableShape {
        name: &'static str,
        len: usize,
        num_latents: usize,
        num_quantiles: usize,
    },
    #[error("sim_table has {sim} latents but real_table has {real}: both need one row per latent")]
    TableRows { sim: usize, real: usize },
    #[error("{name}: latent {latent} has a non-finite entry {value} at quantile index {index}")]
    TableNonFinite {
        name: &'static str,
        latent: usize,
        index: usize,
        value: f32,
    },
    #[error(
        "{name}: latent {latent} is not sorted ascending: entry {index} = {left} > entry {} = {right}",
        index + 1
    )]
    TableUnsorted {
        name: &'static str,
        latent: usize,
        index: usize,
        left: f32,
        right: f32,
    },
    #[error("{left} has {left_len} elements but {right} has {right_len}: they must match")]
    LengthMismatch {
        left: &'static str,
        left_len: usize,
        right: &'static str,
        right_len: usize,
    },
    #[error("latent_ids[{index}] = {id} is not a known latent (num_latents = {num_latents})")]
    UnknownLatent {
        index: usize,
        id: u32,
        num_latents: usize,
    },
    #[error("{name}[{index}] = {value} is not finite")]
    NonFinite {
        name: &'static str,
        index: usize,
        value: f32,
    },
    #[error("total has {len} entries, expected one per latent (num_latents = {num_latents})")]
    TotalLength { len: usize, num_latents: usize },
    #[error("total for latent {latent} is {total}, less than its {observed} observed values")]
    TotalTooSmall {
        latent: usize,
        total: u64,
        observed: u64,
    },
    #[error("counts has {len} entries, expected one per latent (num_latents = {num_latents})")]
    CountsLength { len: usize, num_latents: usize },
    #[error("alpha must lie in [{min}, {max}] (got {alpha})")]
    Alpha { alpha: f64, min: f64, max: f64 },
    #[error("cannot merge sketches: {0}")]
    MergeMismatch(String),
    #[error("invalid sketch state: {0}")]
    State(String),
    #[error("num_latents = {0} does not fit a uint32 latent id")]
    TooManyLatents(usize),
    #[error("frequency of latent {latent} is {value}, outside [0, 1]")]
    Frequency { latent: usize, value: f32 },
    #[error("offsets[{index}] = {value} is outside [-0.5, 0.5]")]
    Offset { index: usize, value: f32 },
}

/// How many observations each latent has in all, when the samples list only some of them.
///
/// Sparse latents are stored as `(latent_id, value)` pairs of the non-zero activations;
/// their distribution over all tokens includes one zero per token the latent did not fire
/// on. With a total `n_l`, the `n_l − c_l` observations of latent `l` that are not among
/// its `c_l` samples are implicit zeros.
#[derive(Debug, Clone, Copy, Default)]
pub enum Total<'a> {
    /// Only the samples: `n_l = c_l`.
    #[default]
    Samples,
    /// The same number of observations for every latent (e.g. the number of tokens).
    All(u64),
    /// One count per latent.
    PerLatent(&'a [u64]),
}

impl Total<'_> {
    fn check_len(&self, num_latents: usize) -> Result<(), QuantileError> {
        match self {
            Total::PerLatent(t) if t.len() != num_latents => Err(QuantileError::TotalLength {
                len: t.len(),
                num_latents,
            }),
            _ => Ok(()),
        }
    }

    /// Total for latent `l` with `observed` samples; errors when the total is smaller.
    fn get(&self, latent: usize, observed: u64) -> Result<u64, QuantileError> {
        let total = match *self {
            Total::Samples => observed,
            Total::All(n) => n,
            Total::PerLatent(t) => t[latent],
        };
        if total < observed {
            return Err(QuantileError::TotalTooSmall {
                latent,
                total,
                observed,
            });
        }
        Ok(total)
    }
}

/// Most quantiles per table row (the lookups compute row indices in u32).
pub const MAX_QUANTILES: usize = 1 << 30;

/// A validated, borrowed quantile table: `num_latents` rows of `num_quantiles` finite,
/// ascending float32 entries (row-major).
#[derive(Debug, Clone, Copy)]
pub struct Table<'a> {
    data: &'a [f32],
    num_latents: usize,
    num_quantiles: usize,
}

impl<'a> Table<'a> {
    /// Checks shape (`Q ≥ 2`, `len = L·Q`), finiteness and per-row order; `name` is the
    /// argument name used in errors.
    pub fn new(
        name: &'static str,
        data: &'a [f32],
        num_latents: usize,
        num_quantiles: usize,
    ) -> Result<Self, QuantileError> {
        if num_quantiles < 2 {
            return Err(QuantileError::TooFewQuantiles {
                name,
                num_quantiles,
            });
        }
        if num_quantiles > MAX_QUANTILES {
            return Err(QuantileError::TooManyQuantiles {
                name,
                num_quantiles,
            });
        }
        if num_latents.checked_mul(num_quantiles) != Some(data.len()) {
            return Err(QuantileError::TableShape {
                name,
                len: data.len(),
                num_latents,
                num_quantiles,
            });
        }
        // Rows are checked in parallel; the error of the lowest latent wins, so the
        // message does not depend on thread timing.
        let bad = data
            .par_chunks(num_quantiles)
            .enumerate()
            .filter_map(|(latent, row)| check_row(name, latent, row).err())
            .min_by_key(|e| match e {
                QuantileError::TableNonFinite { latent, .. }
                | QuantileError::TableUnsorted { latent, .. } => *latent,
                _ => usize::MAX,
            });
        match bad {
            Some(e) => Err(e),
            None => Ok(Self {
                data,
                num_latents,
                num_quantiles,
            }),
        }
    }

    pub fn num_latents(&self) -> usize {
        self.num_latents
    }

    pub fn num_quantiles(&self) -> usize {
        self.num_quantiles
    }
}

fn check_row(name: &'static str, latent: usize, row: &[f32]) -> Result<(), QuantileError> {
    if let Some(index) = row.iter().position(|v| !v.is_finite()) {
        return Err(QuantileError::TableNonFinite {
            name,
            latent,
            index,
            value: row[index],
        });
    }
    if let Some(index) = row.windows(2).position(|w| w[0] > w[1]) {
        return Err(QuantileError::TableUnsorted {
            name,
            latent,
            index,
            left: row[index],
            right: row[index + 1],
        });
    }
    Ok(())
}

/// `if v ≤ s { yes } else { no }` as a conditional move (`v`, `s` not NaN).
///
/// The binary searches below need a real `cmov`: LLVM's x86 "cmov conversion" pass turns
/// a select in their loop (also a masked add) into a branch, which mispredicts half the
/// time. A two-instruction asm block keeps it. (`std::hint::select_unpredictable` does the
/// same but needs Rust 1.88, above this crate's MSRV.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn select_if_le(v: f32, s: f32, yes: usize, no: usize) -> usize {
    let mut out = no;
    // SAFETY: register-only compare and conditional move; no memory or stack access.
    // `ucomiss s, v` sets CF iff s < v (or unordered), so `cmovae` moves iff v ≤ s.
    unsafe {
        std::arch::asm!(
            "ucomiss {s}, {v}",
            "cmovae {out}, {yes}",
            v = in(xmm_reg) v, s = in(xmm_reg) s, yes = in(reg) yes, out = inout(reg) out,
            options(pure, nomem, nostack),
        );
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn select_if_le(v: f32, s: f32, yes: usize, no: usize) -> usize {
    if v <= s {
        yes
    } else {
        no
    }
}

/// `if a == b { yes } else { no }` as a conditional move (`a`, `b` not NaN); see
/// [`select_if_le`] for why. Picks a hit's precomputed value without a branch that
/// mispredicts whenever ties are common.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn select_if_eq(a: f32, b: f32, yes: u64, no: u64) -> u64 {
    let mut out = no;
    // SAFETY: register-only compare and conditional move. ZF = 1 iff a = b (or unordered).
    unsafe {
        std::arch::asm!(
            "ucomiss {a}, {b}",
            "cmove {out}, {yes}",
            a = in(xmm_reg) a, b = in(xmm_reg) b, yes = in(reg) yes, out = inout(reg) out,
            options(pure, nomem, nostack),
        );
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn select_if_eq(a: f32, b: f32, yes: u64, no: u64) -> u64 {
    if a == b {
        yes
    } else {
        no
    }
}

/// Each latent's real activation distribution, as the mixture quantile normalization maps
/// onto: the latent is active (value > 0) with probability `q_l` (its `frequency`), and its
/// active values have the quantile function `Q_act,l` tabulated in row `l` of `active` (entry
/// `i` at probability `i / (Qr − 1)`, numpy's `linspace`). Then
///
/// ```text
/// F_real⁻¹(p) = 0                               for p ≤ 1 − q
///             = Q_act((p − (1 − q)) / q)          for p > 1 − q
/// ```
///
/// exactly, whatever `q`: a table over the whole distribution with a fixed number of entries
/// cannot represent a latent rarer than one table step (with 101 entries, interpolating
/// between the zero at p = 0.99 and the max made every latent "active" on ≥ 1% of contexts).
/// A latent with `q = 0` (never active) maps everything to 0.
#[derive(Debug, Clone, Copy)]
pub struct Reference<'a> {
    active: Table<'a>,
    frequency: &'a [f32],
}

impl<'a> Reference<'a> {
    /// Checks one frequency in `[0, 1]` per row of `active`.
    pub fn new(active: Table<'a>, frequency: &'a [f32]) -> Result<Self, QuantileError> {
        if frequency.len() != active.num_latents {
            return Err(QuantileError::LengthMismatch {
                left: "frequency",
                left_len: frequency.len(),
                right: "active_table rows",
                right_len: active.num_latents,
            });
        }
        if let Some(latent) = frequency.iter().position(|q| !(0.0..=1.0).contains(q)) {
            return Err(QuantileError::Frequency {
                latent,
                value: frequency[latent],
            });
        }
        Ok(Self { active, frequency })
    }

    pub fn num_latents(&self) -> usize {
        self.active.num_latents
    }

    /// `F_real⁻¹(p)` of latent `l` (see the type's docs), with `Q_act` the linear
    /// interpolation of the active row: `x = u·(Qr − 1)`, `k = min(⌊x⌋, Qr − 2)`,
    /// `row[k] + (x − k)(row[k+1] − row[k])`.
    #[inline(always)]
    fn inverse(&self, latent: usize, p: f64) -> f32 {
        let q = f64::from(self.frequency[latent]);
        // q = 0 gives −inf or NaN here; both are "not above 0" and map to 0.
        let u = (p - (1.0 - q)) / q;
        if u.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return 0.0;
        }
        let qr = self.active.num_quantiles;
        let x = u.min(1.0) * (qr - 1) as f64;
        let k = (x as usize).min(qr - 2);
        let row = &self.active.data[latent * qr..(latent + 1) * qr];
        let (r0, r1) = (f64::from(row[k]), f64::from(row[k + 1]));
        (r0 + (x - k as f64) * (r1 - r0)) as f32
    }
}

/// Per sim entry, the probability and width a score equal to it gets: with `a..=b` the run
/// of entries equal to entry `i` of its row and `Qs` entries at the mid-rank positions
/// `p_i = (i + ½) / Qs`, the probability is the run's middle `(a + b + 1) / (2 Qs)` and the
/// width `(b − a + 1) / Qs` (the run covers probabilities `[a / Qs, (b + 1) / Qs]`).
///
/// A hit then costs one load instead of a second binary search for the run's start.
fn hit_positions(sim: &Table<'_>) -> Vec<(f64, f64)> {
    let qs = sim.num_quantiles;
    let step = 1.0 / qs as f64;
    let mut out = vec![(0.0, 0.0); sim.data.len()];
    out.par_chunks_mut(qs)
        .zip(sim.data.par_chunks(qs))
        .for_each(|(hits, row)| {
            let mut a = 0;
            while a < qs {
                let mut b = a;
                while b + 1 < qs && row[b + 1] == row[a] {
                    b += 1;
                }
                let middle = (a + b + 1) as f64 * 0.5 * step;
                let width = (b - a + 1) as f64 * step;
                hits[a..=b].fill((middle, width));
                a = b + 1;
            }
        });
    out
}

/// Scores searched in lockstep (see [`Lookup::group`]).
const GROUP: usize = 8;

/// Validated tables plus what the lookups precompute once per call.
struct Lookup<'a> {
    sim: &'a [f32],
    /// `hit_positions` of the sim table.
    hits: &'a [(f64, f64)],
    reference: Reference<'a>,
    num_latents: usize,
    qs: usize,
    qr: usize,
    /// `1 / Qs`, the probability step of the sim table.
    step: f64,
}

impl<'a> Lookup<'a> {
    /// Tables with the same latents, and their [`hit_positions`].
    fn new(sim: &Table<'a>, reference: &Reference<'a>, hits: &'a [(f64, f64)]) -> Self {
        // The unchecked reads of `group` rely on these sizes.
        assert!(sim.num_latents == reference.num_latents() && hits.len() == sim.data.len());
        Self {
            sim: sim.data,
            hits,
            reference: *reference,
            num_latents: sim.num_latents,
            qs: sim.num_quantiles,
            qr: reference.active.num_quantiles,
            step: 1.0 / sim.num_quantiles as f64,
        }
    }

    /// `out[g] = F_real⁻¹(F_sim(scores[g]) + offsets[g]·w_g)` for `G` scores with finite
    /// values and offsets in `[−½, ½]` (the caller checked) and latent ids below
    /// `num_latents` (asserted here: the unchecked reads rely on it); without `OFFSETS` every
    /// offset is 0 (`offsets` is then empty).
    ///
    /// **Search.** `ub_g` = number of sim entries `≤ s_g` (numpy's `searchsorted(row, s,
    /// "right")`), by a branchless binary search: the step count depends only on `Qs`,
    /// which all rows share, so the `G` searches run in lockstep, one step each per round.
    /// Each step is a conditional move; the `G` independent load chains then overlap in the
    /// CPU instead of one search waiting on its ~7 dependent loads (Khuong & Morin, "Array
    /// layouts for comparison-based searching", 2017).
    ///
    /// **`F_sim(s)`**, with the sim row's `Qs` entries at the mid-rank plotting positions
    /// `p_i = (i + ½) / Qs` (when the row is the sorted `n` scores themselves, `Qs = n`, the
    /// score of rank `r` gets `(r − ½) / n`: no context maps to probability 0 or 1, so none
    /// maps to the cache's extreme by construction), `a` = the first index with
    /// `row[a] ≥ s` and `b` = the last index with `row[b] ≤ s`:
    /// * `s < row[0]` → `p_0` and `s > row[Qs−1]` → `p_{Qs−1}` (constant beyond the table);
    /// * `a ≤ b` (`s` equals the run of entries `a..=b`, many contexts with one score) → the
    ///   middle of the run, `(p_a + p_b) / 2`, and width `w = (b − a + 1) / Qs`;
    /// * otherwise (`row[b] < s < row[b+1]`) linear interpolation,
    ///   `p_b + (s − row[b]) / (row[b+1] − row[b]) · (p_{b+1} − p_b)`, width `w = 1 / Qs`.
    ///
    /// **Offset.** `p + offset·w`, clamped to `[0, 1]`: offset 0 is the deterministic
    /// mid-rank rule; an offset drawn uniformly from `[−½, ½]` spreads a run of ties (and
    /// each single rank) uniformly over the probabilities it covers — the randomized
    /// probability integral transform, under which the calibrated activations have exactly
    /// the real distribution when the scores carry no information, at any frequency (the
    /// deterministic rule can never activate a latent with `q < 1 / (2n)`).
    ///
    /// Then `F_real⁻¹` as on [`Reference`]. **Worked example**: a latent with `q = 0.02`,
    /// active values tabulated `[1, 3]` (`Qr = 2`), 100 contexts (`Qs = 100`, distinct
    /// scores). The top-ranked context has `p = 99.5 / 100 = 0.995`, `u = (0.995 − 0.98) /
    /// 0.02 = 0.75`, activation `1 + 0.75·2 = 2.5`; the second `p = 0.985`, `u = 0.25`, 1.5;
    /// the third `p = 0.975 ≤ 0.98`: 0. Two of 100 contexts are active, as `q` says.
    #[inline(always)]
    fn group<const G: usize, const OFFSETS: bool>(
        &self,
        ids: &[u32],
        scores: &[f32],
        offsets: &[f32],
        out: &mut [f32],
    ) {
        let (ids, scores, out) = (&ids[..G], &scores[..G], &mut out[..G]);
        let qs = self.qs;
        let mut row = [0usize; G];
        let mut base = [0usize; G];
        for g in 0..G {
            // Never fires after the caller's check; a predictable branch.
            assert!((ids[g] as usize) < self.num_latents, "unchecked latent id");
            row[g] = ids[g] as usize * qs;
        }
        // Invariant: ub_g ∈ [base_g, base_g + n] and base_g + n ≤ Qs.
        let mut n = qs;
        while n > 1 {
            let half = n / 2;
            for g in 0..G {
                // SAFETY: half < n, so base + half < Qs, inside row ids[g] < num_latents.
                let v = unsafe { *self.sim.get_unchecked(row[g] + base[g] + half) };
                base[g] = select_if_le(v, scores[g], base[g] + half, base[g]);
            }
            n -= half;
        }
        for g in 0..G {
            let s = scores[g];
            // SAFETY (all unchecked reads below): ids[g] < num_latents, the sim table and
            // `hits` have num_latents·Qs entries (checked by the caller); base_g ≤ Qs − 1 by
            // the invariant, so ub ≤ Qs, b ≤ Qs − 1 and j + 1 ≤ Qs − 1.
            let sim = |i: usize| unsafe { *self.sim.get_unchecked(row[g] + i) };
            let ub = select_if_le(sim(base[g]), s, base[g] + 1, base[g]);
            let b = ub.max(1) - 1;
            let j = b.min(qs - 2);
            // f64: the difference of two f32 values is exact there and the division rounds
            // once. A flat segment (t1 = t0) gives ±inf (s below or above it: the clamp
            // makes that 0 or 1, as it should) or NaN (s on it: a hit, selected away). The
            // abs turns the width −0.0 of a segment from 0.0 to −0.0 into +0.0, so that the
            // infinity gets the sign of s − t0.
            let t0 = f64::from(sim(j));
            let t1 = f64::from(sim(j + 1));
            // max/min, not clamp: `f64::clamp` keeps a NaN, max turns it into 0.
            #[allow(clippy::manual_clamp)]
            let frac = ((f64::from(s) - t0) / (t1 - t0).abs()).max(0.0).min(1.0);
            let interpolated = (j as f64 + frac + 0.5) * self.step;
            let (hit_p, hit_w) = unsafe { *self.hits.get_unchecked(row[g] + b) };
            let is_hit = |yes: f64, no: f64| {
                f64::from_bits(select_if_eq(sim(b), s, yes.to_bits(), no.to_bits()))
            };
            let mut p = is_hit(hit_p, interpolated);
            if OFFSETS {
                let w = is_hit(hit_w, self.step);
                #[allow(clippy::manual_clamp)]
                {
                    p = (p + f64::from(offsets[g]) * w).max(0.0).min(1.0);
                }
            }
            out[g] = self.reference.inverse(ids[g] as usize, p);
        }
    }

    /// All lookups of one chunk of checked scores.
    fn chunk<const OFFSETS: bool>(
        &self,
        ids: &[u32],
        scores: &[f32],
        offsets: &[f32],
        out: &mut [f32],
    ) {
        let n = out.len();
        let full = n - n % GROUP;
        let mut at = 0;
        while at < full {
            let off = if OFFSETS { &offsets[at..] } else { offsets };
            self.group::<GROUP, OFFSETS>(&ids[at..], &scores[at..], off, &mut out[at..]);
            at += GROUP;
        }
        while at < n {
            let off = if OFFSETS { &offsets[at..] } else { offsets };
            self.group::<1, OFFSETS>(&ids[at..], &scores[at..], off, &mut out[at..]);
            at += 1;
        }
    }

    /// Lookups of checked scores in parallel chunks, in the given order; `offsets` is empty
    /// (all 0) or one per score.
    fn direct(&self, ids: &[u32], scores: &[f32], offsets: &[f32], out: &mut [f32]) {
        if offsets.is_empty() {
            out.par_chunks_mut(CHUNK)
                .zip(ids.par_chunks(CHUNK))
                .zip(scores.par_chunks(CHUNK))
                .for_each(|((o, i), s)| self.chunk::<false>(i, s, &[], o));
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(ids.par_chunks(CHUNK))
                .zip(scores.par_chunks(CHUNK))
                .zip(offsets.par_chunks(CHUNK))
                .for_each(|(((o, i), s), f)| self.chunk::<true>(i, s, f, o));
        }
    }

    /// Table bytes of one latent: its sim row, hit positions and active row.
    fn row_bytes(&self) -> usize {
        4 * self.qs + 16 * self.qs + 4 * self.qr
    }

    /// Lookups of checked scores whose latents are scattered (each row used once in a
    /// while, e.g. scores ordered by context): without reordering, every lookup pulls a
    /// row's cache lines from memory again, which made such calls ~7x slower than grouped
    /// ones on 32k latents.
    ///
    /// Radix partition instead: the scores of a super-chunk are bucketed by block of
    /// latents (a block's table rows take about [`BLOCK_BYTES`], so they stay in the L2
    /// cache while the block is processed), looked up in bucket order, and the results
    /// scattered back to their positions. Parallel throughout: each part of the input has
    /// its own histogram, so parts write disjoint ranges of the buckets.
    fn bucketed(
        &self,
        ids: &[u32],
        scores: &[f32],
        offsets: &[f32],
        out: &mut [f32],
        super_len: usize,
    ) {
        let with_offsets = !offsets.is_empty();
        let rows_per_block = (BLOCK_BYTES / self.row_bytes()).max(1);
        let shift = rows_per_block.ilog2();
        let num_blocks = (self.num_latents >> shift) + 1;
        let super_len = super_len.min(ids.len()).max(1);
        let mut b_ids = vec![0u32; super_len];
        let mut b_scores = vec![0f32; super_len];
        let mut b_offsets = vec![0f32; if with_offsets { super_len } else { 0 }];
        let mut b_pos = vec![0u32; super_len];
        let mut b_out = vec![0f32; super_len];
        let parts = rayon::current_num_threads().clamp(1, 64);
        for (c, ((ids, scores), out)) in ids
            .chunks(super_len)
            .zip(scores.chunks(super_len))
            .zip(out.chunks_mut(super_len))
            .enumerate()
        {
            let n = ids.len();
            let offsets = if with_offsets {
                &offsets[c * super_len..c * super_len + n]
            } else {
                &[][..]
            };
            let part_len = n.div_ceil(parts);
            let hists: Vec<Vec<usize>> = ids
                .par_chunks(part_len)
                .map(|part| {
                    let mut h = vec![0usize; num_blocks];
                    for &id in part {
                        h[(id >> shift) as usize] += 1;
                    }
                    h
                })
                .collect();
            // Bucket b holds part 0's scores of block b, then part 1's, ...
            let mut starts = vec![vec![0usize; num_blocks]; hists.len()];
            let mut at = 0;
            for b in 0..num_blocks {
                for (p, h) in hists.iter().enumerate() {
                    starts[p][b] = at;
                    at += h[b];
                }
            }
            let dst_ids = SharedSlice::new(&mut b_ids[..n]);
            let dst_scores = SharedSlice::new(&mut b_scores[..n]);
            let dst_offsets = SharedSlice::new(&mut b_offsets[..if with_offsets { n } else { 0 }]);
            let dst_pos = SharedSlice::new(&mut b_pos[..n]);
            ids.par_chunks(part_len)
                .zip(scores.par_chunks(part_len))
                .zip(starts.into_par_iter())
                .enumerate()
                .for_each(|(p, ((ids, scores), mut next))| {
                    for (k, (&id, &s)) in ids.iter().zip(scores).enumerate() {
                        let b = (id >> shift) as usize;
                        let at = next[b];
                        next[b] += 1;
                        // SAFETY: the ranges [starts[p][b], starts[p][b] + hists[p][b]) of
                        // all (p, b) partition 0..n, and part p writes only its own.
                        unsafe {
                            dst_ids.write(at, id);
                            dst_scores.write(at, s);
                            if with_offsets {
                                dst_offsets.write(at, offsets[p * part_len + k]);
                            }
                            dst_pos.write(at, (p * part_len + k) as u32);
                        }
                    }
                });
            let b_off = if with_offsets {
                &b_offsets[..n]
            } else {
                &[][..]
            };
            self.direct(&b_ids[..n], &b_scores[..n], b_off, &mut b_out[..n]);
            let dst = SharedSlice::new(out);
            b_out[..n]
                .par_chunks(CHUNK)
                .zip(b_pos[..n].par_chunks(CHUNK))
                .for_each(|(vals, pos)| {
                    for (&v, &k) in vals.iter().zip(pos) {
                        // SAFETY: b_pos[..n] is a permutation of 0..n (each position was
                        // bucketed once), so the writes are disjoint.
                        unsafe { dst.write(k as usize, v) };
                    }
                });
        }
    }
}

/// Target table bytes per latent block of [`Lookup::bucketed`]: about half a typical L2.
const BLOCK_BYTES: usize = 256 * 1024;

/// A mutable slice written by several threads at disjoint indices.
struct SharedSlice<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: only `write` touches the data, and its callers guarantee disjoint indices.
unsafe impl<T: Send> Send for SharedSlice<T> {}
unsafe impl<T: Send> Sync for SharedSlice<T> {}

impl<T> SharedSlice<T> {
    fn new(slice: &mut [T]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    /// # Safety
    /// No other thread reads or writes index `i` while the slice is shared.
    #[inline(always)]
    unsafe fn write(&self, i: usize, v: T) {
        assert!(
            i < self.len,
            "SharedSlice index {i} out of bounds {}",
            self.len
        );
        // SAFETY: in bounds (checked above); exclusive per the caller's contract.
        unsafe { self.ptr.add(i).write(v) };
    }
}

/// Number of entries `≤ s` of the ascending `row` (numpy's `searchsorted(row, s, "right")`).
#[cfg(test)]
fn upper_bound(row: &[f32], s: f32) -> usize {
    let mut base = 0usize;
    let mut n = row.len();
    while n > 1 {
        let half = n / 2;
        base = select_if_le(row[base + half], s, base + half, base);
        n -= half;
    }
    if row.is_empty() {
        0
    } else {
        select_if_le(row[base], s, base + 1, base)
    }
}

/// Scores per parallel task: large enough to amortise scheduling, small enough that both
/// cores get work on small inputs.
const CHUNK: usize = 16 * 1024;

/// Quantile normalization: `out[i] = F_real⁻¹(F_sim(scores[i]) + offsets[i]·w)` with the
/// sim row and [`Reference`] of latent `latent_ids[i]`. The maths (mid-rank positions, the
/// middle-of-run rule for ties, the offset, the mixture `F_real⁻¹`) and a worked example
/// are on `Lookup::group`. `offsets = None` is the deterministic mid-rank rule (all 0).
///
/// Errors: length mismatch, sim and reference of different latents, a latent id
/// `≥ num_latents`, a non-finite score, an offset outside `[−½, ½]` (the error names the
/// lowest bad index).
pub fn quantile_normalize(
    latent_ids: &[u32],
    scores: &[f32],
    offsets: Option<&[f32]>,
    sim: &Table<'_>,
    reference: &Reference<'_>,
) -> Result<Vec<f32>, QuantileError> {
    let mut out = vec![0.0f32; scores.len()];
    quantile_normalize_into(latent_ids, scores, offsets, sim, reference, &mut out)?;
    Ok(out)
}

/// [`quantile_normalize`] into a caller's buffer of `scores.len()` values; on error the
/// buffer's content is unspecified.
pub fn quantile_normalize_into(
    latent_ids: &[u32],
    scores: &[f32],
    offsets: Option<&[f32]>,
    sim: &Table<'_>,
    reference: &Reference<'_>,
    out: &mut [f32],
) -> Result<(), QuantileError> {
    if latent_ids.len() != scores.len() {
        return Err(QuantileError::LengthMismatch {
            left: "latent_ids",
            left_len: latent_ids.len(),
            right: "scores",
            right_len: scores.len(),
        });
    }
    if out.len() != scores.len() {
        return Err(QuantileError::LengthMismatch {
            left: "out",
            left_len: out.len(),
            right: "scores",
            right_len: scores.len(),
        });
    }
    let offsets = offsets.unwrap_or(&[]);
    if !offsets.is_empty() && offsets.len() != scores.len() {
        return Err(QuantileError::LengthMismatch {
            left: "offsets",
            left_len: offsets.len(),
            right: "scores",
            right_len: scores.len(),
        });
    }
    if sim.num_latents != reference.num_latents() {
        return Err(QuantileError::TableRows {
            sim: sim.num_latents,
            real: reference.num_latents(),
        });
    }
    if let Some(index) = offsets.iter().position(|o| !(-0.5..=0.5).contains(o)) {
        return Err(QuantileError::Offset {
            index,
            value: offsets[index],
        });
    }
    let hits = hit_positions(sim);
    let lookup = Lookup::new(sim, reference, &hits);
    // Check every score first (in parallel; the lowest bad index wins) and count where the
    // latent changes between neighbours: the measure of locality that picks the strategy.
    let num_latents = lookup.num_latents;
    let changes = latent_ids
        .par_chunks(CHUNK)
        .zip(scores.par_chunks(CHUNK))
        .enumerate()
        .map(|(c, (ids, scores))| {
            let mut changes = 0usize;
            let mut prev = ids.first().copied().unwrap_or(0);
            for (k, (&id, &s)) in ids.iter().zip(scores).enumerate() {
                if id as usize >= num_latents {
                    return Err(QuantileError::UnknownLatent {
                        index: c * CHUNK + k,
                        id,
                        num_latents,
                    });
                }
                if !s.is_finite() {
                    return Err(QuantileError::NonFinite {
                        name: "scores",
                        index: c * CHUNK + k,
                        value: s,
                    });
                }
                changes += usize::from(id != prev);
                prev = id;
            }
            Ok(changes)
        })
        .reduce(
            || Ok(0),
            |a, b| match (a, b) {
                (Ok(a), Ok(b)) => Ok(a + b),
                (Err(a), Err(b)) => Err(if error_index(&a) <= error_index(&b) {
                    a
                } else {
                    b
                }),
                (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
            },
        )?;
    // Bucket when rows would fall out of cache between uses: big input, tables larger
    // than a typical L2, and latent runs shorter than 8 scores on average.
    let m = scores.len();
    let scattered =
        m >= 1 << 16 && num_latents * lookup.row_bytes() > 1 << 20 && m < 8 * (changes + 1);
    if scattered {
        // Enough scores per super-chunk that each row is reused ~64 times, with bounded
        // scratch memory (16 bytes per score).
        let super_len = (64 * num_latents).clamp(1 << 20, 1 << 22);
        lookup.bucketed(latent_ids, scores, offsets, out, super_len);
    } else {
        lookup.direct(latent_ids, scores, offsets, out);
    }
    Ok(())
}

fn error_index(e: &QuantileError) -> usize {
    match e {
        QuantileError::UnknownLatent { index, .. } | QuantileError::NonFinite { index, .. } => {
            *index
        }
        _ => usize::MAX,
    }
}

/// Checks `latent_ids`/`values` (same length, ids `< num_latents`, finite values) and
/// groups the values by latent with a counting sort: returns `offsets` (`L + 1` entries;
/// latent `l`'s values are `grouped[offsets[l]..offsets[l+1]]`) and `grouped`.
fn group_by_latent(
    latent_ids: &[u32],
    values: &[f32],
    num_latents: usize,
) -> Result<(Vec<usize>, Vec<f32>), QuantileError> {
    if latent_ids.len() != values.len() {
        return Err(QuantileError::LengthMismatch {
            left: "latent_ids",
            left_len: latent_ids.len(),
            right: "values",
            right_len: values.len(),
        });
    }
    if num_latents > u32::MAX as usize + 1 {
        return Err(QuantileError::TooManyLatents(num_latents));
    }
    let bad = latent_ids
        .par_chunks(CHUNK)
        .zip(values.par_chunks(CHUNK))
        .enumerate()
        .filter_map(|(c, (ids, vals))| {
            ids.iter().zip(vals).enumerate().find_map(|(k, (&id, &v))| {
                let index = c * CHUNK + k;
                if id as usize >= num_latents {
                    Some(QuantileError::UnknownLatent {
                        index,
                        id,
                        num_latents,
                    })
                } else if !v.is_finite() {
                    Some(QuantileError::NonFinite {
                        name: "values",
                        index,
                        value: v,
                    })
                } else {
                    None
                }
            })
        })
        .min_by_key(error_index);
    if let Some(e) = bad {
        return Err(e);
    }
    let mut offsets = vec![0usize; num_latents + 1];
    for &id in latent_ids {
        offsets[id as usize + 1] += 1;
    }
    for l in 0..num_latents {
        offsets[l + 1] += offsets[l];
    }
    let mut cursor = offsets[..num_latents].to_vec();
    let mut grouped = vec![0.0f32; values.len()];
    for (&id, &v) in latent_ids.iter().zip(values) {
        let c = &mut cursor[id as usize];
        grouped[*c] = v;
        *c += 1;
    }
    Ok((offsets, grouped))
}

/// Splits `data` into consecutive mutable pieces at `offsets` (`L + 1` ascending entries).
fn split_groups<'a, T>(mut data: &'a mut [T], offsets: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (head, tail) = data.split_at_mut(w[1] - w[0]);
        out.push(head);
        data = tail;
    }
    out
}

/// numpy's `_lerp(a, b, t)`: `a + (b − a)·t`, computed from the nearer end so that `t = 1`
/// returns `b` exactly (numpy switches at `t ≥ 0.5`).
#[inline]
fn lerp(a: f64, b: f64, t: f64) -> f64 {
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

/// Fills `row` (Q entries) with the linear-method quantiles of `n` observations whose
/// order statistic of rank `r` (0-based) is `order_stat(r)`.
///
/// numpy's default `method="linear"`: at probability `p`, the virtual index is
/// `h = p·(n − 1)`; with `j = ⌊h⌋` and `g = h − j`, the quantile is
/// `x_(j) + g·(x_(j+1) − x_(j))`. A latent with no observations (`n = 0`) gets a row of
/// zeros: its activation is never anything else.
fn fill_row(row: &mut [f32], n: u64, mut order_stat: impl FnMut(u64) -> f64) {
    if n == 0 {
        row.fill(0.0);
        return;
    }
    let last = row.len() - 1;
    // numpy's linspace(0, 1, Q): i · (1 / (Q − 1)), with the last probability exactly 1.
    let step = 1.0 / last as f64;
    let mut prev = f32::NEG_INFINITY;
    for (i, r) in row.iter_mut().enumerate() {
        let p = if i == last { 1.0 } else { i as f64 * step };
        let h = p * (n - 1) as f64;
        let j = (h.floor() as u64).min(n - 1);
        let g = h - j as f64;
        let lo = order_stat(j);
        let v = if g > 0.0 && j + 1 < n {
            lerp(lo, order_stat(j + 1), g)
        } else {
            lo
        };
        // Rounding must not break the ascending order the lookups rely on.
        prev = prev.max(v as f32);
        *r = prev;
    }
}

/// Exact per-latent quantile tables: row `l` holds the linear-method quantiles (numpy's
/// default, see `fill_row`) at `linspace(0, 1, num_quantiles)` of latent `l`'s values.
///
/// `total` gives each latent's number of observations; those not among its samples are
/// implicit zeros, merged into the sorted samples by rank instead of being materialised.
/// Returns `num_latents × num_quantiles` values, row-major. Latents are grouped with a
/// counting sort, then each latent's values are sorted in parallel over latents.
pub fn quantile_tables(
    latent_ids: &[u32],
    values: &[f32],
    num_latents: usize,
    num_quantiles: usize,
    total: Total<'_>,
) -> Result<Vec<f32>, QuantileError> {
    if num_quantiles < 2 {
        return Err(QuantileError::TooFewQuantiles {
            name: "num_quantiles",
            num_quantiles,
        });
    }
    total.check_len(num_latents)?;
    let (offsets, mut grouped) = group_by_latent(latent_ids, values, num_latents)?;
    let totals = (0..num_latents)
        .map(|l| total.get(l, (offsets[l + 1] - offsets[l]) as u64))
        .collect::<Result<Vec<u64>, _>>()?;
    let mut out = vec![0.0f32; num_latents * num_quantiles];
    out.par_chunks_mut(num_quantiles)
        .zip(split_groups(&mut grouped, &offsets).into_par_iter())
        .zip(totals.par_iter())
        .for_each(|((row, xs), &n)| {
            xs.sort_unstable_by(f32::total_cmp);
            // Sorted samples with the implicit zeros inserted after the negatives:
            // rank r < neg is a negative sample, the next `zeros` ranks are 0, the rest are
            // the non-negative samples shifted by `zeros`.
            let neg = xs.partition_point(|&v| v < 0.0) as u64;
            let zeros = n - xs.len() as u64;
            fill_row(row, n, |r| {
                let v = if r < neg {
                    xs[r as usize]
                } else if r < neg + zeros {
                    0.0
                } else {
                    xs[(r - zeros) as usize]
                };
                f64::from(v)
            });
        });
    Ok(out)
}

/// Smallest and largest relative accuracy a [`QuantileSketch`] accepts. Below 1e-4 the
/// dense bucket vectors get long (≈ 2·ln(range)/alpha buckets) and the float32 margin
/// below stops being negligible.
pub const MIN_ALPHA: f64 = 1e-4;
pub const MAX_ALPHA: f64 = 0.5;

/// Bucket key `⌈ln(magnitude) / ln γ⌉` of a positive magnitude.
#[inline]
fn bucket_key(magnitude: f32, ln_gamma: f64) -> i32 {
    // |v| ≥ 1.4e-45 gives keys above −104 / ln γ ≥ −6·10⁵ (alpha ≥ 1e-4): far inside i32.
    (f64::from(magnitude).ln() / ln_gamma).ceil() as i32
}

/// Counts of one sign's logarithmic buckets: `counts[i]` is bucket key `start + i`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Store {
    start: i32,
    counts: Vec<u64>,
}

impl Store {
    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// First key and counts without empty buckets at either end (`(0, [])` when empty).
    fn trimmed(&self) -> (i32, &[u64]) {
        match self.counts.iter().position(|&c| c > 0) {
            None => (0, &[]),
            Some(first) => {
                let last = self.counts.iter().rposition(|&c| c > 0).unwrap_or(first);
                (self.start + first as i32, &self.counts[first..=last])
            }
        }
    }

    /// Makes room for keys `lo..=hi` (one reallocation per batch and latent).
    fn reserve_range(&mut self, lo: i32, hi: i32) {
        if self.counts.is_empty() {
            self.start = lo;
            self.counts = vec![0; (hi - lo) as usize + 1];
            return;
        }
        let end = self.start + self.counts.len() as i32 - 1;
        if lo < self.start {
            let mut grown = vec![0; (self.start - lo) as usize];
            grown.extend_from_slice(&self.counts);
            self.counts = grown;
            self.start = lo;
        }
        if hi > end {
            self.counts
                .resize(self.counts.len() + (hi - end) as usize, 0);
        }
    }

    fn add_key(&mut self, key: i32, count: u64) {
        self.counts[(key - self.start) as usize] += count;
    }

    fn merge(&mut self, other: &Store) {
        if other.counts.is_empty() {
            return;
        }
        let hi = other.start + other.counts.len() as i32 - 1;
        self.reserve_range(other.start, hi);
        for (i, &c) in other.counts.iter().enumerate() {
            self.add_key(other.start + i as i32, c);
        }
    }
}

/// Sketch of one latent's distribution: exact zero count and extremes, log buckets for
/// each sign.
#[derive(Debug, Clone, PartialEq)]
struct LatentSketch {
    zeros: u64,
    pos: Store,
    /// Buckets of `|v|` for negative `v`.
    neg: Store,
    min: f32,
    max: f32,
}

impl Default for LatentSketch {
    fn default() -> Self {
        Self {
            zeros: 0,
            pos: Store::default(),
            neg: Store::default(),
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
}

impl LatentSketch {
    fn count(&self) -> u64 {
        self.zeros + self.pos.total() + self.neg.total()
    }

    fn add_zeros(&mut self, n: u64) {
        if n > 0 {
            self.zeros += n;
            self.min = self.min.min(0.0);
            self.max = self.max.max(0.0);
        }
    }

    fn merge(&mut self, other: &LatentSketch) {
        self.zeros += other.zeros;
        self.pos.merge(&other.pos);
        self.neg.merge(&other.neg);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

/// A mergeable per-latent quantile sketch with relative accuracy `alpha` (DDSketch,
/// Masson, Rim & Lee, VLDB 2019), for activation streams too large to keep.
///
/// A value `v ≠ 0` falls into the bucket of key `k = ⌈ln|v| / ln γ⌉` with
/// `γ = (1 + α′)/(1 − α′)` (one store per sign), i.e. `|v| ∈ (γ^(k−1), γ^k]`; the bucket
/// stands for `2γ^k/(γ + 1)`, which is within relative error `α′` of every value in it.
/// Zeros are counted exactly, as are each latent's minimum and maximum.
///
/// Guarantee of [`QuantileSketch::tables`]: every table entry is within relative error
/// `alpha` of the exact linear-method quantile of all values seen (as
/// [`quantile_tables`] computes it), provided the two order statistics it interpolates
/// have the same sign or one is zero (always true for non-negative data such as
/// activations and simulator scores) and the values are zero or of normal float32
/// magnitude (`|v| ≥ 1.2e-38`). The internal `α′ = alpha − 2⁻²²` leaves room for the
/// final rounding to float32 (an entry that falls below float32's normal range, by
/// interpolating between 0 and a tiny value, is only good to 1.2e-38 absolute). When the
/// two order statistics straddle zero the error is at most `alpha·max(|x_(j)|, |x_(j+1)|)`.
///
/// Counts only add up, so merging is exact and order-independent: sketches of shards
/// merged together equal one sketch fed every batch.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantileSketch {
    alpha: f64,
    ln_gamma: f64,
    latents: Vec<LatentSketch>,
}

/// A [`QuantileSketch`] as flat arrays (for safetensors): per latent, its zero count,
/// extremes, and each store's first key and length; the stores' counts concatenated in
/// latent order.
#[derive(Debug, Clone, PartialEq)]
pub struct SketchState {
    pub alpha: f64,
    pub zeros: Vec<u64>,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub pos_start: Vec<i32>,
    pub pos_len: Vec<u64>,
    pub pos_counts: Vec<u64>,
    pub neg_start: Vec<i32>,
    pub neg_len: Vec<u64>,
    pub neg_counts: Vec<u64>,
}

impl QuantileSketch {
    /// An empty sketch of `num_latents` latents; `alpha ∈ [MIN_ALPHA, MAX_ALPHA]`.
    pub fn new(num_latents: usize, alpha: f64) -> Result<Self, QuantileError> {
        if !(MIN_ALPHA..=MAX_ALPHA).contains(&alpha) {
            return Err(QuantileError::Alpha {
                alpha,
                min: MIN_ALPHA,
                max: MAX_ALPHA,
            });
        }
        if num_latents > u32::MAX as usize + 1 {
            return Err(QuantileError::TooManyLatents(num_latents));
        }
        let inner = alpha - f64::powi(2.0, -22);
        let gamma = (1.0 + inner) / (1.0 - inner);
        Ok(Self {
            alpha,
            ln_gamma: gamma.ln(),
            latents: vec![LatentSketch::default(); num_latents],
        })
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    pub fn num_latents(&self) -> usize {
        self.latents.len()
    }

    /// Number of observations of each latent (samples plus zeros).
    pub fn counts(&self) -> Vec<u64> {
        self.latents.par_iter().map(LatentSketch::count).collect()
    }

    #[inline]
    fn bucket_value(&self, key: i32) -> f64 {
        // 2γ^k / (γ + 1): the point of (γ^(k−1), γ^k] with equal relative error to both ends.
        let gamma = self.ln_gamma.exp();
        2.0 * (f64::from(key) * self.ln_gamma).exp() / (gamma + 1.0)
    }

    /// Adds a batch of `(latent_id, value)` observations. With a `total` other than
    /// [`Total::Samples`], latent `l` observed `total_l` values in this batch, and the
    /// `total_l − c_l` not among its `c_l` samples are zeros. Validates everything before
    /// changing the sketch, so a failed update leaves it untouched.
    pub fn update(
        &mut self,
        latent_ids: &[u32],
        values: &[f32],
        total: Total<'_>,
    ) -> Result<(), QuantileError> {
        let num_latents = self.latents.len();
        total.check_len(num_latents)?;
        let (offsets, grouped) = group_by_latent(latent_ids, values, num_latents)?;
        let zeros = (0..num_latents)
            .map(|l| {
                let c = (offsets[l + 1] - offsets[l]) as u64;
                total.get(l, c).map(|n| n - c)
            })
            .collect::<Result<Vec<u64>, _>>()?;
        let ln_gamma = self.ln_gamma;
        self.latents
            .par_iter_mut()
            .zip(offsets.par_windows(2))
            .zip(zeros.par_iter())
            .for_each(|((sk, w), &implicit)| {
                let xs = &grouped[w[0]..w[1]];
                // Keys first, so each store grows at most once per batch.
                let (mut pos, mut neg) = (Vec::new(), Vec::new());
                for &v in xs {
                    sk.min = sk.min.min(v);
                    sk.max = sk.max.max(v);
                    if v > 0.0 {
                        pos.push(bucket_key(v, ln_gamma));
                    } else if v < 0.0 {
                        neg.push(bucket_key(-v, ln_gamma));
                    } else {
                        sk.zeros += 1;
                    }
                }
                for (store, keys) in [(&mut sk.pos, pos), (&mut sk.neg, neg)] {
                    if let (Some(&kmin), Some(&kmax)) = (keys.iter().min(), keys.iter().max()) {
                        store.reserve_range(kmin, kmax);
                        for k in keys {
                            store.add_key(k, 1);
                        }
                    }
                }
                sk.add_zeros(implicit);
            });
        Ok(())
    }

    /// Adds `counts[l]` zero observations to latent `l` (or the same count to every latent).
    pub fn add_zeros(&mut self, counts: Total<'_>) -> Result<(), QuantileError> {
        match counts {
            Total::Samples => Ok(()),
            Total::All(n) => {
                self.latents.par_iter_mut().for_each(|s| s.add_zeros(n));
                Ok(())
            }
            Total::PerLatent(c) => {
                if c.len() != self.latents.len() {
                    return Err(QuantileError::CountsLength {
                        len: c.len(),
                        num_latents: self.latents.len(),
                    });
                }
                self.latents
                    .par_iter_mut()
                    .zip(c.par_iter())
                    .for_each(|(s, &n)| s.add_zeros(n));
                Ok(())
            }
        }
    }

    /// Adds every count of `other` (same latents and alpha) to this sketch.
    pub fn merge(&mut self, other: &QuantileSketch) -> Result<(), QuantileError> {
        if other.latents.len() != self.latents.len() {
            return Err(QuantileError::MergeMismatch(format!(
                "num_latents {} vs {}",
                self.latents.len(),
                other.latents.len()
            )));
        }
        if other.alpha.to_bits() != self.alpha.to_bits() {
            return Err(QuantileError::MergeMismatch(format!(
                "alpha {} vs {}",
                self.alpha, other.alpha
            )));
        }
        self.latents
            .par_iter_mut()
            .zip(other.latents.par_iter())
            .for_each(|(a, b)| a.merge(b));
        Ok(())
    }

    /// Quantile tables (`num_latents × num_quantiles`, row-major) of everything seen, by
    /// the linear method of `fill_row` applied to the order statistics: the smallest and
    /// largest are the exact extremes (so the `p = 0` and `p = 1` entries are exact), the
    /// others their bucket's value clamped to the extremes (which only moves it closer to
    /// the true value). A latent with no observations gets a row of zeros.
    pub fn tables(&self, num_quantiles: usize) -> Result<Vec<f32>, QuantileError> {
        if num_quantiles < 2 {
            return Err(QuantileError::TooFewQuantiles {
                name: "num_quantiles",
                num_quantiles,
            });
        }
        let mut out = vec![0.0f32; self.latents.len() * num_quantiles];
        out.par_chunks_mut(num_quantiles)
            .zip(self.latents.par_iter())
            .for_each(|(row, sk)| {
                // Values in ascending order as (cumulative count up to and including the
                // segment, value): negatives from the largest magnitude, zeros, positives.
                let mut segments: Vec<(u64, f64)> = Vec::new();
                let mut cum = 0u64;
                let (lo, hi) = (f64::from(sk.min), f64::from(sk.max));
                let mut push = |count: u64, v: f64| {
                    if count > 0 {
                        cum += count;
                        segments.push((cum, v.clamp(lo, hi)));
                    }
                };
                for (i, &c) in sk.neg.counts.iter().enumerate().rev() {
                    push(c, -self.bucket_value(sk.neg.start + i as i32));
                }
                push(sk.zeros, 0.0);
                for (i, &c) in sk.pos.counts.iter().enumerate() {
                    push(c, self.bucket_value(sk.pos.start + i as i32));
                }
                // The extremes are known exactly; other ranks take their bucket's value.
                fill_row(row, cum, |r| {
                    if r == 0 {
                        lo
                    } else if r + 1 == cum {
                        hi
                    } else {
                        segments[segments.partition_point(|&(c, _)| c <= r)].1
                    }
                });
            });
        Ok(out)
    }

    /// The sketch as flat arrays (see [`SketchState`]).
    pub fn to_state(&self) -> SketchState {
        let n = self.latents.len();
        let mut st = SketchState {
            alpha: self.alpha,
            zeros: Vec::with_capacity(n),
            min: Vec::with_capacity(n),
            max: Vec::with_capacity(n),
            pos_start: Vec::with_capacity(n),
            pos_len: Vec::with_capacity(n),
            pos_counts: Vec::new(),
            neg_start: Vec::with_capacity(n),
            neg_len: Vec::with_capacity(n),
            neg_counts: Vec::new(),
        };
        for sk in &self.latents {
            st.zeros.push(sk.zeros);
            st.min.push(sk.min);
            st.max.push(sk.max);
            // Empty buckets at either end are dropped, so equal distributions give equal
            // states whatever the order of the batches (merged shards = one pass).
            let (start, counts) = sk.pos.trimmed();
            st.pos_start.push(start);
            st.pos_len.push(counts.len() as u64);
            st.pos_counts.extend_from_slice(counts);
            let (start, counts) = sk.neg.trimmed();
            st.neg_start.push(start);
            st.neg_len.push(counts.len() as u64);
            st.neg_counts.extend_from_slice(counts);
        }
        st
    }

    /// Rebuilds a sketch from [`QuantileSketch::to_state`]'s arrays, checking that they
    /// are consistent (lengths, key ranges, extremes of non-empty latents).
    pub fn from_state(st: &SketchState) -> Result<Self, QuantileError> {
        let mut sketch = Self::new(st.zeros.len(), st.alpha)?;
        let n = st.zeros.len();
        for (name, len) in [
            ("min", st.min.len()),
            ("max", st.max.len()),
            ("pos_start", st.pos_start.len()),
            ("pos_len", st.pos_len.len()),
            ("neg_start", st.neg_start.len()),
            ("neg_len", st.neg_len.len()),
        ] {
            if len != n {
                return Err(QuantileError::State(format!(
                    "{name} has {len} entries but zeros has {n}"
                )));
            }
        }
        let mut pos_at = 0usize;
        let mut neg_at = 0usize;
        for (l, sk) in sketch.latents.iter_mut().enumerate() {
            sk.zeros = st.zeros[l];
            sk.min = st.min[l];
            sk.max = st.max[l];
            for (store, name, start, len, counts, at) in [
                (
                    &mut sk.pos,
                    "pos",
                    st.pos_start[l],
                    st.pos_len[l],
                    &st.pos_counts,
                    &mut pos_at,
                ),
                (
                    &mut sk.neg,
                    "neg",
                    st.neg_start[l],
                    st.neg_len[l],
                    &st.neg_counts,
                    &mut neg_at,
                ),
            ] {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let end = at
                    .checked_add(len)
                    .filter(|&e| e <= counts.len())
                    .ok_or_else(|| {
                        QuantileError::State(format!(
                            "{name}_len of latent {l} runs past the end of {name}_counts"
                        ))
                    })?;
                if len > 0 && i64::from(start) + len as i64 - 1 > i64::from(i32::MAX) {
                    return Err(QuantileError::State(format!(
                        "{name} bucket keys of latent {l} overflow"
                    )));
                }
                store.start = start;
                store.counts = counts[*at..end].to_vec();
                *at = end;
            }
            if sk.count() > 0 && !(sk.min <= sk.max && sk.min.is_finite() && sk.max.is_finite()) {
                return Err(QuantileError::State(format!(
                    "latent {l} has observations but min/max = {}/{}",
                    sk.min, sk.max
                )));
            }
        }
        if pos_at != st.pos_counts.len() || neg_at != st.neg_counts.len() {
            return Err(QuantileError::State(
                "pos_counts/neg_counts are longer than pos_len/neg_len say".into(),
            ));
        }
        Ok(sketch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The reference semantics spelled out with linear scans: `(p, w)` of `F_sim`.
    fn brute_sim_probability(row: &[f32], s: f32) -> (f64, f64) {
        let q = row.len();
        let step = 1.0 / q as f64;
        let pos = |i: f64| (i + 0.5) * step;
        let eq: Vec<usize> = (0..q).filter(|&i| row[i] == s).collect();
        if let (Some(&a), Some(&b)) = (eq.first(), eq.last()) {
            return (
                (pos(a as f64) + pos(b as f64)) / 2.0,
                (b - a + 1) as f64 * step,
            );
        }
        if s < row[0] {
            return (pos(0.0), step);
        }
        if s > row[q - 1] {
            return (pos((q - 1) as f64), step);
        }
        let b = (0..q).rev().find(|&i| row[i] < s).unwrap();
        let (t0, t1) = (f64::from(row[b]), f64::from(row[b + 1]));
        (pos(b as f64 + (f64::from(s) - t0) / (t1 - t0)), step)
    }

    /// The mixture `F_real⁻¹` spelled out.
    fn brute_inverse(active: &[f64], q: f64, p: f64) -> f64 {
        if q <= 0.0 || p <= 1.0 - q {
            return 0.0;
        }
        brute_quantile(active, ((p - (1.0 - q)) / q).min(1.0))
    }

    fn random_frequencies(rng: &mut ChaCha8Rng, l: usize) -> Vec<f32> {
        (0..l)
            .map(|i| match i % 4 {
                0 => 0.0,
                1 => 1.0,
                _ => rng.random_range(0.0..0.5f32),
            })
            .collect()
    }

    fn sorted_rows(t: &mut [f32], q: usize) {
        for row in t.chunks_mut(q) {
            for v in row.iter_mut() {
                *v = v.abs();
            }
            row.sort_by(f32::total_cmp);
        }
    }

    fn brute_quantile(sorted: &[f64], p: f64) -> f64 {
        let h = p * (sorted.len() - 1) as f64;
        let j = h.floor() as usize;
        let g = h - j as f64;
        if j + 1 < sorted.len() {
            sorted[j] + g * (sorted[j + 1] - sorted[j])
        } else {
            sorted[j]
        }
    }

    fn random_table(rng: &mut ChaCha8Rng, l: usize, q: usize) -> Vec<f32> {
        let mut t = Vec::with_capacity(l * q);
        for _ in 0..l {
            // Few distinct values, so rows have flat runs (often a zero run).
            let mut row: Vec<f32> = (0..q)
                .map(|_| {
                    if rng.random_bool(0.4) {
                        0.0
                    } else {
                        rng.random_range(-3..10) as f32 * 0.5
                    }
                })
                .collect();
            row.sort_by(f32::total_cmp);
            t.extend(row);
        }
        t
    }

    #[test]
    fn bounds_match_linear_scans() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for q in 1..40 {
            let mut row: Vec<f32> = (0..q).map(|_| rng.random_range(0..6) as f32).collect();
            row.sort_by(f32::total_cmp);
            for s in [-1.0, 0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 5.0, 5.5, 7.0] {
                assert_eq!(
                    upper_bound(&row, s),
                    row.iter().filter(|&&v| v <= s).count()
                );
            }
        }
    }

    #[test]
    fn normalize_matches_brute_force() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let l = 13;
        // Q = 2 is the smallest table; Qs ≠ Qr and Qs = Qr.
        for (qs, qr) in [(11, 7), (9, 9), (2, 2), (2, 5), (101, 101), (6, 2)] {
            let sim = random_table(&mut rng, l, qs);
            let mut active = random_table(&mut rng, l, qr);
            sorted_rows(&mut active, qr);
            let freq = random_frequencies(&mut rng, l);
            // Not a multiple of GROUP, so the remainder path runs too.
            let n = 20_003;
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..l as u32)).collect();
            let scores: Vec<f32> = (0..n)
                .map(|_| rng.random_range(-4..24) as f32 * 0.25)
                .collect();
            let offsets: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5..=0.5f32)).collect();
            let st = Table::new("sim_table", &sim, l, qs).unwrap();
            let at = Table::new("active_table", &active, l, qr).unwrap();
            let reference = Reference::new(at, &freq).unwrap();
            let plain = quantile_normalize(&ids, &scores, None, &st, &reference).unwrap();
            let offset =
                quantile_normalize(&ids, &scores, Some(&offsets), &st, &reference).unwrap();
            for i in 0..n {
                let li = ids[i] as usize;
                let (p, w) = brute_sim_probability(&sim[li * qs..(li + 1) * qs], scores[i]);
                let arow: Vec<f64> = active[li * qr..(li + 1) * qr]
                    .iter()
                    .map(|&v| v.into())
                    .collect();
                let q = f64::from(freq[li]);
                let want = brute_inverse(&arow, q, p) as f32;
                assert!(
                    (plain[i] - want).abs() <= 1e-5,
                    "Q {qs}/{qr} i={i} got {} want {want}",
                    plain[i]
                );
                let p = (p + f64::from(offsets[i]) * w).clamp(0.0, 1.0);
                let want = brute_inverse(&arow, q, p) as f32;
                assert!(
                    (offset[i] - want).abs() <= 1e-5,
                    "offsets Q {qs}/{qr} i={i} got {} want {want}",
                    offset[i]
                );
            }
        }
    }

    #[test]
    fn bucketed_order_equals_direct_order() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (l, qs, qr) in [(3000, 101, 101), (700, 33, 17), (5, 2, 3)] {
            let sim = random_table(&mut rng, l, qs);
            let mut active = random_table(&mut rng, l, qr);
            sorted_rows(&mut active, qr);
            let freq = random_frequencies(&mut rng, l);
            let st = Table::new("sim_table", &sim, l, qs).unwrap();
            let at = Table::new("active_table", &active, l, qr).unwrap();
            let reference = Reference::new(at, &freq).unwrap();
            let hits = hit_positions(&st);
            let lookup = Lookup::new(&st, &reference, &hits);
            let n = 30_011;
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..l as u32)).collect();
            let scores: Vec<f32> = (0..n)
                .map(|_| rng.random_range(-4..24) as f32 * 0.25)
                .collect();
            let offsets: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5..=0.5f32)).collect();
            for off in [&[][..], &offsets[..]] {
                let mut direct = vec![0.0; n];
                lookup.direct(&ids, &scores, off, &mut direct);
                // Several super-chunks of odd sizes, and one covering everything.
                for super_len in [1, 997, 8192, n] {
                    let mut bucketed = vec![f32::NAN; n];
                    lookup.bucketed(&ids, &scores, off, &mut bucketed, super_len);
                    assert_eq!(bucketed, direct, "L {l} super_len {super_len}");
                }
            }
            // The public entry point takes the bucketed path for scattered input of this size.
            if l == 3000 {
                let ids: Vec<u32> = (0..70_000u32).map(|i| i % l as u32).collect();
                let scores = vec![1.0f32; ids.len()];
                let mut direct = vec![0.0; ids.len()];
                lookup.direct(&ids, &scores, &[], &mut direct);
                let got = quantile_normalize(&ids, &scores, None, &st, &reference).unwrap();
                assert_eq!(got, direct);
            }
        }
    }

    #[test]
    fn worked_example_rare_latent_and_ties() {
        // The docstring's example: q = 0.02, active values [1, 3], 100 distinct scores.
        let sim: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let active = [1.0f32, 3.0];
        let st = Table::new("sim_table", &sim, 1, 100).unwrap();
        let reference =
            Reference::new(Table::new("active_table", &active, 1, 2).unwrap(), &[0.02]).unwrap();
        let out =
            quantile_normalize(&[0; 4], &[99.0, 98.0, 97.0, 1e9], None, &st, &reference).unwrap();
        assert!(
            (out[0] - 2.5).abs() < 1e-5 && (out[1] - 1.5).abs() < 1e-5,
            "{out:?}"
        );
        assert_eq!(out[2], 0.0);
        // Above the table: the top position p = 0.995, never the active maximum 3.
        assert!((out[3] - 2.5).abs() < 1e-5, "{out:?}");
        // A run of ties (entries 1..=3 of 5): middle p = (1.5 + 3.5) / 2 / 5 = 0.5; with
        // q = 0.6 that is u = (0.5 - 0.4) / 0.6 = 1/6 of the way from 0 to 6: 1.0.
        let sim = [0.0f32, 1.0, 1.0, 1.0, 2.0];
        let active = [0.0f32, 6.0];
        let st = Table::new("sim_table", &sim, 1, 5).unwrap();
        let reference =
            Reference::new(Table::new("active_table", &active, 1, 2).unwrap(), &[0.6]).unwrap();
        let out =
            quantile_normalize(&[0; 2], &[1.0, 1.0], Some(&[0.0, 0.5]), &st, &reference).unwrap();
        assert!((out[0] - 1.0).abs() < 1e-5, "{out:?}");
        // Offset +½ moves to the run's top, p = 4/5: u = 2/3, 4.0.
        assert!((out[1] - 4.0).abs() < 1e-5, "{out:?}");
        // A never-active latent maps everything to 0.
        let reference =
            Reference::new(Table::new("active_table", &active, 1, 2).unwrap(), &[0.0]).unwrap();
        let out =
            quantile_normalize(&[0; 2], &[2.0, 9.0], Some(&[0.5, 0.5]), &st, &reference).unwrap();
        assert_eq!(out, vec![0.0, 0.0]);
    }

    #[test]
    fn bad_inputs_name_the_culprit() {
        let t = [0.0f32, 1.0, 2.0];
        let st = Table::new("sim_table", &t, 1, 3).unwrap();
        let rf = Reference::new(st, &[0.5]).unwrap();
        let e = quantile_normalize(&[0, 1], &[0.5, 0.5], None, &st, &rf).unwrap_err();
        assert!(e.to_string().contains("latent_ids[1] = 1"), "{e}");
        let e = quantile_normalize(&[0, 0, 0], &[0.5, 0.5, f32::NAN], None, &st, &rf).unwrap_err();
        assert!(e.to_string().contains("scores[2]"), "{e}");
        let e = quantile_normalize(&[0, 0], &[0.5, 0.5], Some(&[0.0, 0.7]), &st, &rf).unwrap_err();
        assert!(e.to_string().contains("offsets[1] = 0.7"), "{e}");
        let e = Reference::new(st, &[1.5]).unwrap_err();
        assert!(
            e.to_string().contains("frequency of latent 0 is 1.5"),
            "{e}"
        );
        let e = Table::new("real_table", &[0.0, 1.0, 3.0, 2.0], 2, 2).unwrap_err();
        assert!(e.to_string().contains("real_table: latent 1"), "{e}");
        let e = Table::new("sim_table", &[0.0], 1, 1).unwrap_err();
        assert!(matches!(e, QuantileError::TooFewQuantiles { .. }));
        let e = quantile_tables(&[0], &[1.0], 1, 3, Total::All(0)).unwrap_err();
        assert!(e.to_string().contains("latent 0"), "{e}");
        assert!(QuantileSketch::new(3, 0.0).is_err());
    }

    #[test]
    fn tables_match_sorted_reference_with_implicit_zeros() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let l = 9;
        let n = 2000;
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..l as u32 - 1)).collect();
        let vals: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..5.0)).collect();
        let totals: Vec<u64> = (0..l as u64).map(|i| 300 + 17 * i).collect();
        let q = 17;
        let t = quantile_tables(&ids, &vals, l, q, Total::PerLatent(&totals)).unwrap();
        for li in 0..l {
            let mut xs: Vec<f64> = ids
                .iter()
                .zip(&vals)
                .filter(|(&i, _)| i as usize == li)
                .map(|(_, &v)| f64::from(v))
                .collect();
            xs.resize(totals[li] as usize, 0.0);
            xs.sort_by(f64::total_cmp);
            for k in 0..q {
                let want = brute_quantile(&xs, k as f64 / (q - 1) as f64);
                let got = f64::from(t[li * q + k]);
                assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{li} {k}");
            }
        }
        // Latent l − 1 had no samples: all its observations are zeros.
        assert!(t[(l - 1) * q..].iter().all(|&v| v == 0.0));
        // No observations at all: a row of zeros.
        assert_eq!(
            quantile_tables(&[], &[], 2, 3, Total::Samples).unwrap(),
            vec![0.0; 6]
        );
    }

    #[test]
    fn sketch_within_alpha_and_merge_is_exact() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (l, n, q, alpha) = (5, 5000, 21, 0.01);
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..l as u32)).collect();
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                let m: f32 = rng.random_range(-3.0f32..3.0).exp();
                if rng.random_bool(0.2) {
                    0.0
                } else {
                    m
                }
            })
            .collect();
        let exact = quantile_tables(&ids, &vals, l, q, Total::All(n as u64)).unwrap();
        let mut one = QuantileSketch::new(l, alpha).unwrap();
        one.update(&ids, &vals, Total::All(n as u64)).unwrap();
        let approx = one.tables(q).unwrap();
        for (a, e) in approx.iter().zip(&exact) {
            assert!((a - e).abs() as f64 <= alpha * e.abs() as f64, "{a} vs {e}");
        }
        let half = n / 2;
        let mut s1 = QuantileSketch::new(l, alpha).unwrap();
        let mut s2 = QuantileSketch::new(l, alpha).unwrap();
        s2.update(&ids[half..], &vals[half..], Total::All((n - half) as u64))
            .unwrap();
        s1.update(&ids[..half], &vals[..half], Total::All(half as u64))
            .unwrap();
        s1.merge(&s2).unwrap();
        assert_eq!(s1.tables(q).unwrap(), approx);
        assert_eq!(s1.counts(), one.counts());
        assert_eq!(s1.to_state(), one.to_state());
        let back = QuantileSketch::from_state(&s1.to_state()).unwrap();
        assert_eq!(back.tables(q).unwrap(), approx);
    }
}
