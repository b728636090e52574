"""The condition grid of the evaluate stage: which conditions run, and what each one puts in
place of the true latents of a context.

A grid is a list of :class:`GridRow` (condition, calibration, fraction, choice, trial,
quality), the same for every context, and :class:`Grid` holds what the rows need per
context: the calibrated simulated values, the order in which each choice takes latents, the
cache's mean active values, the synthetic simulators. :meth:`Grid.replacement` turns a batch
of (row, context) pairs into the hookpoint's output at the last position; the forward passes
that call it are in :mod:`nlrw.evaluate.forward`, the conditions' definitions in the docstring
of :mod:`nlrw.evaluate`.

**A rewrite** (``simulated``, the controls, ``synthetic``, ``shuffled``) of n_sel latents L
chosen from N::

    n_sel = max(1, ⌊f·N + ½⌋)
    z' = topk(relu(z with z_l ← v_l for l ∈ L)),   ŷ(z') = W_dec z' + b_dec (+ W_skip x)

with ``v_l`` the row's value of latent l (:meth:`Grid.rewrite_values`) and top-k re-applied
with ties to the lower latent index (:func:`nlrw.model.topk.topk_replace` in Rust on the CPU,
:func:`topk_replace_torch` elsewhere). ``"top"`` takes L as the prefix of the latents by
balanced accuracy (ties by latent id), ``"random"`` as the prefix of a seeded permutation:
one per trial for every context (``random="fixed"``; the subsets of a trial are nested across
fractions) or one per trial and context (``"per-context"``).

**Seeds.** Every random draw of the stage comes from ``np.random.default_rng([seed, tag,
...])`` with one of the ``TAG_*`` stream tags below, so that draws of different purposes (the
random choices, random_k, the synthetic noise, the bootstrap, the sign flips) never share a
stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from nlrw.config.evaluate import EvaluateConfig, RandomMode
from nlrw.model import topk as _topk
from nlrw.model.sparse import SparseCoder

__all__ = [
    "CONDITIONS",
    "Grid",
    "GridRow",
    "Synthetic",
    "n_selected",
    "topk_replace_torch",
]

CONDITIONS = (
    "clean",
    "transcoder",
    "zero_ablation",
    "random_k",
    "simulated",
    "matched_zero",
    "oracle_support",
    "oracle_magnitude",
    "synthetic",
    "shuffled",
)
"""Condition names, in the order of the grid and the summary."""

(
    _CLEAN,
    _TRUE,
    _ZERO,
    _RANDOM_K,
    _SIMULATED,
    _MATCHED_ZERO,
    _ORACLE_SUPPORT,
    _ORACLE_MAGNITUDE,
    _SYNTHETIC,
    _SHUFFLED,
) = range(10)
_REWRITES = (
    _SIMULATED,
    _MATCHED_ZERO,
    _ORACLE_SUPPORT,
    _ORACLE_MAGNITUDE,
    _SYNTHETIC,
    _SHUFFLED,
)

# Seed-stream tags, so that the draws of different purposes never share a stream.
(
    TAG_FIXED,
    TAG_PER_CONTEXT,
    TAG_RANDOM_K,
    TAG_BOOTSTRAP,
    TAG_PERMUTATION,
    TAG_SYNTHETIC_NOISE,
    TAG_SYNTHETIC_FIXED,
    TAG_SYNTHETIC_PER_CONTEXT,
    TAG_BOOTSTRAP_TRIALS,
) = range(9)


@dataclass(frozen=True)
class GridRow:
    """One condition evaluated on every context."""

    condition: str
    """One of :data:`CONDITIONS`."""
    calibration: str | None = None
    """The calibration whose values are used (rewrites only)."""
    fraction: float | None = None
    """Fraction of the rewritable latents rewritten (rewrites only)."""
    choice: str | None = None
    """"top" or "random" (rewrites only)."""
    trial: int = 0
    """Trial of a random choice (0 otherwise)."""
    n_selected: int = 0
    """Latents rewritten (rewrites only)."""
    quality: float | None = None
    """Target AUROC of the synthetic simulator (synthetic only)."""


def n_selected(fraction: float, n_simulated: int) -> int:
    """``max(1, ⌊f·N + ½⌋)``: latents rewritten at fraction f of N simulated (half rounds up)."""
    return max(1, math.floor(fraction * n_simulated + 0.5))


def topk_replace_torch(
    values: Tensor,
    indices: Tensor,
    rows: Tensor,
    latents: Tensor,
    new_values: Tensor,
    k: int,
    num_latents: int,
) -> tuple[Tensor, Tensor]:
    """:func:`nlrw.model.topk.topk_replace` in torch (any device), with the same contract.

    Dense ``[n, num_latents]`` rows, the replacements written in (no duplicate (row, latent)
    pairs may be given), then a **stable** descending sort: ties go to the lower latent index
    and a row with fewer than k positive entries is padded with zeros at its lowest unused
    indices, as the Rust kernel does.
    """
    dense = torch.zeros(values.shape[0], num_latents, dtype=torch.float32, device=values.device)
    dense.scatter_(1, indices.long(), values.float().clamp_min(0))
    # Padding entries (value 0) scattered above are harmless: zero is zero.
    dense[rows.long(), latents.long()] = new_values.float()
    dense.clamp_(min=0)
    sorted_v, sorted_i = torch.sort(dense, dim=1, descending=True, stable=True)
    return sorted_v[:, :k].contiguous(), sorted_i[:, :k].contiguous()


class Synthetic:
    """The synthetic simulators of a grid: every latent of the coder, on every context.

    ``values[(calibration, quality)]`` float32 ``[n_contexts, num_latents]``; ``auroc[quality]``
    the AUROC each latent measures (NaN: one class), which ranks the latents for the "top"
    choice (highest first, NaN last, ties by latent id).
    """

    def __init__(
        self, values: dict[tuple[str, float], np.ndarray], auroc: dict[float, np.ndarray]
    ) -> None:
        self.values = values
        self.auroc = auroc
        self._top: dict[float, np.ndarray] = {}

    def top_order(self, quality: float) -> np.ndarray:
        """The latents best measured AUROC first (NaN last, ties by latent id)."""
        if quality not in self._top:
            a = self.auroc[quality]
            key = np.where(np.isnan(a), -np.inf, a)
            self._top[quality] = np.lexsort((np.arange(len(a)), -key))
        return self._top[quality]


class Grid:
    """The conditions of an evaluation and everything they need per context.

    Args:
        rows: the conditions (see :meth:`build`).
        latents: the N simulated latent ids, ascending.
        values: calibration name -> float32 ``[n_contexts, N]`` calibrated simulated
            activations, row i for ``context_ids[i]``, column j for ``latents[j]``.
        context_ids: the contexts the value rows belong to.
        top_order: positions into ``latents``, best balanced accuracy first (None without
            "top").
        random: "fixed" or "per-context".
        seed: seed of every random draw.
        k, num_latents: the coder's.
        mean_active: ``[N]`` each simulated latent's mean active value in the cache (needed by
            ``oracle_magnitude`` rows).
        synthetic: the synthetic simulators (needed by ``synthetic`` rows).
        shuffled: calibration name -> float32 ``[n_contexts, N]`` like ``values``, the
            shuffled-explanation control's columns in place (needed by ``shuffled`` rows).

    Attribute ``torch_topk``: re-apply top-k with :func:`topk_replace_torch` even on the CPU
    (what a GPU always uses; the tests compare both paths).
    """

    def __init__(
        self,
        rows: Sequence[GridRow],
        latents: npt.ArrayLike,
        values: dict[str, np.ndarray],
        context_ids: npt.ArrayLike,
        *,
        top_order: np.ndarray | None,
        random: RandomMode,
        seed: int,
        k: int,
        num_latents: int,
        mean_active: npt.ArrayLike | None = None,
        synthetic: Synthetic | None = None,
        shuffled: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.rows = list(rows)
        self.shuffled = shuffled
        self.latents = np.asarray(latents, dtype=np.int64)
        self.values = values
        self.context_ids = np.asarray(context_ids, dtype=np.int64)
        self.top_order = top_order
        self.random = random
        self.seed = seed
        self.k = k
        self.num_latents = num_latents
        self.mean_active = (
            None if mean_active is None else np.asarray(mean_active, dtype=np.float32)
        )
        self.synthetic = synthetic
        self._all_latents = np.arange(num_latents, dtype=np.int64)
        self._ctx_pos = {int(c): i for i, c in enumerate(self.context_ids)}
        self._kind = np.array([CONDITIONS.index(r.condition) for r in self.rows], dtype=np.int64)
        self._fixed: dict[tuple[bool, int], np.ndarray] = {}
        self.torch_topk = False
        n = len(self.latents)
        if (self._kind == _SHUFFLED).any() and shuffled is None:
            raise ValueError("shuffled rows need the shuffled control's calibrated values")
        for name, v in [*values.items(), *(shuffled or {}).items()]:
            if v.shape != (len(self.context_ids), n):
                raise ValueError(
                    f"values of calibration {name!r} have shape {v.shape}, expected "
                    f"{(len(self.context_ids), n)}"
                )
        if (self._kind == _ORACLE_MAGNITUDE).any() and (
            self.mean_active is None or self.mean_active.shape != (n,)
        ):
            raise ValueError("oracle_magnitude rows need the mean active value of each latent")
        if (self._kind == _SYNTHETIC).any():
            if synthetic is None:
                raise ValueError("synthetic rows need the synthetic simulators' values")
            for key, v in synthetic.values.items():
                if v.shape != (len(self.context_ids), num_latents):
                    raise ValueError(
                        f"synthetic values {key} have shape {v.shape}, expected "
                        f"{(len(self.context_ids), num_latents)}"
                    )

    @classmethod
    def build(
        cls,
        cfg: EvaluateConfig,
        latents: npt.ArrayLike,
        values: dict[str, np.ndarray],
        context_ids: npt.ArrayLike,
        *,
        balanced_accuracy: npt.ArrayLike | None,
        k: int,
        num_latents: int,
        mean_active: npt.ArrayLike | None = None,
        synthetic: Synthetic | None = None,
        shuffled: dict[str, np.ndarray] | None = None,
    ) -> Grid:
        """The grid of ``cfg``: the four baselines; then for each calibration (sorted),
        choice and fraction the simulated rows (``n_trials`` of them for "random"), each
        followed by its ``cfg.controls`` (same calibration, fraction, choice and trial); then,
        when ``synthetic`` is given, for each quality, synthetic calibration, choice and
        synthetic fraction the synthetic rows over all ``num_latents`` latents.

        ``balanced_accuracy[j]`` ranks ``latents[j]`` for the "top" choice (NaN ranks last).
        """
        lat = np.asarray(latents, dtype=np.int64)
        if lat.ndim != 1 or len(lat) == 0:
            raise ValueError("a grid needs at least one simulated latent")
        rows = [GridRow(c) for c in CONDITIONS[:4]]
        for cal in sorted(values):
            for choice in cfg.choices:
                for f in cfg.fractions:
                    trials = range(cfg.n_trials) if choice == "random" else range(1)
                    for t in trials:
                        n_sel = n_selected(f, len(lat))
                        also = ("shuffled",) if shuffled is not None and cal in shuffled else ()
                        for condition in ("simulated", *cfg.controls, *also):
                            rows.append(GridRow(condition, cal, float(f), choice, t, n_sel))
        if synthetic is not None and cfg.synthetic_qualities:
            fractions = cfg.synthetic_fractions or cfg.fractions
            for q in cfg.synthetic_qualities:
                for cal in cfg.synthetic_calibrations:
                    for choice in cfg.choices:
                        for f in fractions:
                            trials = range(cfg.n_trials) if choice == "random" else range(1)
                            for t in trials:
                                n_sel = n_selected(f, num_latents)
                                rows.append(
                                    GridRow("synthetic", cal, float(f), choice, t, n_sel, float(q))
                                )
        top_order = None
        if "top" in cfg.choices:
            if balanced_accuracy is None:
                raise ValueError("the 'top' choice needs balanced accuracies")
            ba = np.asarray(balanced_accuracy, dtype=np.float64)
            key = np.where(np.isnan(ba), -np.inf, ba)
            top_order = np.lexsort((lat, -key))
        return cls(
            rows,
            lat,
            values,
            context_ids,
            top_order=top_order,
            random=cfg.random,
            seed=cfg.seed,
            k=k,
            num_latents=num_latents,
            mean_active=mean_active,
            synthetic=synthetic,
            shuffled=shuffled,
        )

    def canonical_rows(self) -> np.ndarray:
        """For each row, the first row that makes the same replacement on every context (so
        that :func:`grid_ce` runs it once): a rewrite's latents depend on its choice, trial
        and number selected only, and when it selects all of its latents not even on those;
        ``matched_zero`` does not depend on the calibration. :func:`grid_ce_full` evaluates
        every row, and the tests compare the two."""
        first: dict[tuple[Any, ...], int] = {}
        out = np.arange(len(self.rows))
        for i, r in enumerate(self.rows):
            if r.condition in CONDITIONS[:4]:
                continue
            n_all = self.num_latents if r.quality is not None else len(self.latents)
            which = ("all",) if r.n_selected >= n_all else (r.choice, r.trial, r.n_selected)
            calibration = None if r.condition == "matched_zero" else r.calibration
            out[i] = first.setdefault((r.condition, calibration, r.quality, *which), i)
        return out

    # ---------------------------------------------------------------- draws
    def order(
        self, choice: str, trial: int, context_id: int, *, quality: float | None = None
    ) -> np.ndarray:
        """Positions in the order a choice takes them (prefix = chosen): into :attr:`latents`,
        or, for a synthetic row (``quality`` given), into all ``num_latents`` latents."""
        synthetic = quality is not None
        if choice == "top":
            if synthetic:
                assert self.synthetic is not None
                return self.synthetic.top_order(quality)
            assert self.top_order is not None
            return self.top_order
        n = self.num_latents if synthetic else len(self.latents)
        if self.random == "fixed":
            if (synthetic, trial) not in self._fixed:
                tag = TAG_SYNTHETIC_FIXED if synthetic else TAG_FIXED
                rng = np.random.default_rng([self.seed, tag, trial])
                self._fixed[(synthetic, trial)] = rng.permutation(n)
            return self._fixed[(synthetic, trial)]
        tag = TAG_SYNTHETIC_PER_CONTEXT if synthetic else TAG_PER_CONTEXT
        rng = np.random.default_rng([self.seed, tag, trial, context_id])
        return rng.permutation(n)

    def random_k_latents(self, context_id: int) -> np.ndarray:
        """The k distinct random latents of ``random_k`` on a context (seeded by its id)."""
        rng = np.random.default_rng([self.seed, TAG_RANDOM_K, context_id])
        return rng.choice(self.num_latents, size=self.k, replace=False)

    # ---------------------------------------------------------------- replacement
    def replacement(
        self,
        coder: SparseCoder,
        src: Tensor,
        y: Tensor,
        row_index: np.ndarray,
        context_ids: np.ndarray,
    ) -> Tensor:
        """The hookpoint's output at the last position for each row ``[R, d_out]``.

        ``src`` ``[R, d_in]`` is the coder's input seen by row r (the MLP input for a
        transcoder, the hookpoint output for an SAE), ``y`` ``[R, d_out]`` the real output,
        ``row_index[r]`` the grid row and ``context_ids[r]`` the context of row r. The true
        latents of a context are encoded once, from its first row.
        """
        kinds = self._kind[row_index]
        out_dtype = y.dtype
        uniq, first, inverse = np.unique(context_ids, return_index=True, return_inverse=True)
        true_v, true_i = coder.encode(src[torch.as_tensor(first, device=src.device)])
        true_v, true_i = true_v.float(), true_i.long()
        inv = torch.as_tensor(inverse, device=true_v.device)
        values, indices = true_v[inv].clone(), true_i[inv].clone()

        zero = np.flatnonzero(kinds == _ZERO)
        if len(zero):
            values[torch.as_tensor(zero, device=values.device)] = 0.0
        rand = np.flatnonzero(kinds == _RANDOM_K)
        if len(rand):
            drawn = np.stack([self.random_k_latents(int(context_ids[r])) for r in rand])
            indices[torch.as_tensor(rand, device=indices.device)] = torch.as_tensor(
                drawn, device=indices.device
            )
        sim = np.flatnonzero(np.isin(kinds, _REWRITES))
        if len(sim):
            new_v, new_i = self._rewritten(
                values[torch.as_tensor(sim, device=values.device)],
                indices[torch.as_tensor(sim, device=values.device)],
                row_index[sim],
                context_ids[sim],
                true_v,
                true_i,
                {int(c): j for j, c in enumerate(uniq)},
            )
            sim_t = torch.as_tensor(sim, device=values.device)
            values[sim_t], indices[sim_t] = new_v, new_i

        out = coder.decode(values, indices)
        skip = coder.skip(src)
        if skip is not None:
            out = out + skip
        out = out.to(out_dtype)
        clean = np.flatnonzero(kinds == _CLEAN)
        if len(clean):
            c = torch.as_tensor(clean, device=out.device)
            out[c] = y[c]
        return out

    def rewrite_values(
        self, condition: str, simulated: np.ndarray, true: np.ndarray, mean_active: np.ndarray
    ) -> np.ndarray:
        """The values the chosen latents take in a rewrite row, given their calibrated
        simulated values ``s``, true values ``a`` (0 where inactive) and cache mean active
        values ``μ`` (elementwise):

        * ``simulated``, ``synthetic``, ``shuffled``: ``s`` (for ``shuffled`` the control's
          calibrated simulations);
        * ``matched_zero``: ``0``;
        * ``oracle_support``: ``s`` where ``a > 0``, else 0 (the true support, simulated
          magnitudes);
        * ``oracle_magnitude``: where ``s > 0``: ``a`` if ``a > 0`` else ``μ``; 0 where
          ``s = 0`` (the simulated support, true magnitudes).
        """
        if condition in ("simulated", "synthetic", "shuffled"):
            return simulated
        if condition == "matched_zero":
            return np.zeros_like(simulated)
        if condition == "oracle_support":
            return np.where(true > 0, simulated, 0).astype(simulated.dtype)
        if condition == "oracle_magnitude":
            magnitude = np.where(true > 0, true, mean_active)
            return np.where(simulated > 0, magnitude, 0).astype(simulated.dtype)
        raise ValueError(f"{condition!r} is not a rewrite condition")

    def _rewritten(
        self,
        values: Tensor,
        indices: Tensor,
        row_index: np.ndarray,
        context_ids: np.ndarray,
        true_v: Tensor,
        true_i: Tensor,
        slot: dict[int, int],
    ) -> tuple[Tensor, Tensor]:
        """Top-k after the chosen latents of each rewrite row take their values
        (:meth:`rewrite_values`).

        A replacement by 0 of a latent that is not active on the context changes nothing, so
        only nonzero values and currently active latents are passed to the top-k kernel.
        """
        tv, ti = true_v.cpu().numpy(), true_i.cpu().numpy()
        true_dense = np.zeros((len(tv), self.num_latents), dtype=np.float32)
        for j in range(len(tv)):
            on = tv[j] > 0
            true_dense[j, ti[j][on]] = tv[j][on]
        prepared: dict[tuple[Any, ...], tuple[np.ndarray, ...]] = {}
        rows_m: list[np.ndarray] = []
        lat_m: list[np.ndarray] = []
        val_m: list[np.ndarray] = []
        for r, (g, ctx) in enumerate(zip(row_index.tolist(), context_ids.tolist(), strict=True)):
            row = self.rows[g]
            assert row.calibration is not None and row.choice is not None
            key = (ctx, row.condition, row.calibration, row.quality, row.choice, row.trial)
            if key not in prepared:
                order = self.order(row.choice, row.trial, ctx, quality=row.quality)
                if row.quality is not None:
                    assert self.synthetic is not None
                    sim = self.synthetic.values[(row.calibration, row.quality)]
                    lat = self._all_latents[order]
                else:
                    source = self.shuffled if row.condition == "shuffled" else self.values
                    assert source is not None
                    sim = source[row.calibration]
                    lat = self.latents[order]
                true = true_dense[slot[ctx], lat]
                mean = (
                    self.mean_active[order]
                    if self.mean_active is not None and row.condition == "oracle_magnitude"
                    else np.zeros(0, np.float32)
                )
                vals = self.rewrite_values(
                    row.condition, sim[self._ctx_pos[ctx], order], true, mean
                )
                keep = np.flatnonzero((vals != 0) | (true > 0))
                prepared[key] = (keep, lat[keep], vals[keep])
            keep, lat, vals = prepared[key]
            m = int(np.searchsorted(keep, row.n_selected))
            rows_m.append(np.full(m, r, dtype=np.int64))
            lat_m.append(lat[:m])
            val_m.append(vals[:m])
        rows_a, lat_a, val_a = (np.concatenate(a) for a in (rows_m, lat_m, val_m))
        if values.device.type == "cpu" and not self.torch_topk:
            out_v, out_i = _topk.topk_replace(
                values.numpy(),
                indices.numpy(),
                rows_a,
                lat_a,
                val_a.astype(np.float32),
                self.k,
                self.num_latents,
            )
            return torch.from_numpy(np.asarray(out_v)), torch.from_numpy(
                np.asarray(out_i).astype(np.int64)
            )
        dev = values.device
        return topk_replace_torch(
            values,
            indices,
            torch.as_tensor(rows_a, device=dev),
            torch.as_tensor(lat_a, device=dev),
            torch.as_tensor(val_a, device=dev),
            self.k,
            self.num_latents,
        )
