"""The stage graph behind ``nlrw run``: run directory, presets, resume and status.

Stages run in order (collect → train → … as they land); each is a plain function of the
whole :class:`RunConfig` and the run directory. A stage's **chained hash** covers its own
config and the chained hash of the stage before it, so a changed option re-runs that stage
and everything downstream of it, never anything upstream:

* record ``stages/<name>.json`` says ``done`` with the same chained hash → skipped;
* no record, or a ``running`` record with the same hash (the run was killed) → the stage
  runs and resumes from its own checkpoints;
* a record with another hash → the stage's old outputs are replaced (``overwrite``);
* a record ``imported`` (explanations and scores from ``nlrw import-explanations``) → kept
  whatever the config says, refused once the coder they were checked against is replaced.

A run directory never loses work to a mistake: an existing run resumes with its own
``config.json``; a config that changes a stage already run is refused unless ``rerun``
(:func:`changed_stages`); devices, model paths and backend options are checked before any
stage runs (:func:`preflight`); a stage that replaces outputs first sets the previous ones
aside in ``.replaced/<stage>/`` and deletes them only once it has finished, a failure or a
kill puts them back; a finished stage's record lists its outputs with their sizes and
digests, checked (size always, digests before later stages read them and by :func:`verify`):
a damaged stage is redone, and so is what follows it.

``config.json`` holds the resolved config of every stage with its hash, package versions,
the git revision and the seeds; it is rewritten (atomically) at the start of each run.
Presets are TOML files shipped in ``nlrw/presets`` (one table per stage); any value can be
overridden on the command line. What a stage wrote is listed, set aside, rolled back and
digested by :mod:`nlrw.lib.outputs`; the stages' bodies live in their own modules and are
imported only when they run, so this module (and ``nlrw status``) never imports torch.

Why this module is long: the run loop, resume, refusal of changed stages, replacement with
rollback, the dry run and status are one state machine over the ``stages/<name>.json``
records; split, each part would have to re-derive that state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from nlrw.config.cache import CacheConfig
from nlrw.config.calibrate import CalibrateConfig
from nlrw.config.collect import CollectConfig
from nlrw.config.contexts import ContextsConfig
from nlrw.config.evaluate import EvaluateConfig
from nlrw.config.explain import ExplainConfig
from nlrw.config.recovery import RecoveryConfig
from nlrw.config.report import ReportConfig
from nlrw.config.score import ScoreConfig
from nlrw.config.simulate import SimulateConfig
from nlrw.config.train import TrainConfig
from nlrw.lib import outputs as stage_outputs
from nlrw.lib.io import atomic_write, atomic_write_json
from nlrw.lib.provenance import config_hash, from_dict, git_revision, to_jsonable, versions
from nlrw.lib.rundir import RunDir
from nlrw.prompts import detection as detection_prompt
from nlrw.prompts import explain as explain_prompt
from nlrw.prompts import simulation as simulation_prompt

__all__ = [
    "RUN_FORMAT",
    "STAGES",
    "RerunRefused",
    "RunConfig",
    "RunDirError",
    "Stage",
    "StageStatus",
    "changed_stages",
    "load_preset",
    "load_run_config",
    "preset_names",
    "run",
    "run_stage",
    "status",
    "verify",
]


RUN_FORMAT = "nlrw.run.v1"
"""Layout version of a run directory, recorded in its config.json. A directory of another
version is refused rather than half-reused."""


class RunDirError(ValueError):
    """A run directory that cannot be used: another process holds it, or another nlrw version
    wrote it."""


@dataclass(frozen=True)
class RunConfig:
    """The whole experiment: one config per stage."""

    collect: CollectConfig = field(default_factory=CollectConfig)
    """Activation collection from the subject model at the hookpoint."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training of the transcoder (or SAE) on the collected activations."""
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    """Loss recovered by the transcoder's splice on held-out windows."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Latent cache: the coder's sparse latents over held-out activations, per-latent
    statistics and quantile tables, top activating windows."""
    contexts: ContextsConfig = field(default_factory=ContextsConfig)
    """Evaluation and calibration contexts from held-out text, with the transcoder's true
    latents on their last token."""
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    """Explanations of the cached latents by an LLM, one sentence each."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Detection scoring of the explanations, with a shuffled-explanation baseline."""
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    """LLM simulation: each explained latent's expected 0-9 rating on each context."""
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    """Calibration of simulated scores into activations (uncalibrated, quantile, isotonic,
    gate), with per-latent specificity/sensitivity/correlation on the eval contexts."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Next-token CE when latents are rewritten from their calibrated simulations, next to
    the clean, transcoder, zero-ablation and random-k baselines (bootstrap CIs, paired test
    against zero ablation)."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """The report: headline figure, conditions table, diagnosis figures and latent browser in
    RUN_DIR/report (self-contained index.html, report.md, PNGs)."""

    def __post_init__(self) -> None:
        if self.collect.kind != self.train.kind:
            raise ValueError(
                f"collect.kind = {self.collect.kind!r} but train.kind = {self.train.kind!r}: "
                "the sparse model must be trained on the activations it was collected for"
            )


class Stage(NamedTuple):
    """One node of the stage graph."""

    name: str
    run: Callable[[RunConfig, Path, bool], Any]
    """``run(cfg, run_dir, overwrite)``; returns a summary (JSON-able) or None."""
    config: Callable[[RunConfig], Any]
    """The part of the config this stage depends on directly."""


def _collect(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    from nlrw import collect

    result = collect.run(cfg.collect, run_dir, overwrite=overwrite)
    return {"n_train_tokens": result.n_train_tokens, "n_eval_tokens": result.n_eval_tokens}


def _train_identity(c: RunConfig) -> Any:
    """The train stage's hash input: its config, and the adopted checkpoint's digests when
    ``train.pretrained`` is set (a checkpoint changed on disk is adopted again)."""
    if c.train.pretrained is None:
        return c.train
    from nlrw.model.pretrained import source_digest

    try:
        digest: Any = source_digest(c.train.pretrained, c.collect.hookpoint)
    except FileNotFoundError as e:
        digest = str(e)
    return {"config": c.train, "pretrained": digest}


def _train(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    from nlrw import train

    return to_jsonable(train.run(cfg.train, run_dir, cfg.collect.hookpoint, overwrite))


def _recovery(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    from nlrw import recovery

    return recovery.run(cfg.recovery, run_dir, cfg.collect)


def _cache(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    from nlrw import cache

    result = cache.run(cfg.cache, run_dir, hookpoint=cfg.collect.hookpoint, overwrite=overwrite)
    return result._asdict()


def _contexts(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    from nlrw import contexts

    table = contexts.run(cfg.contexts, run_dir, overwrite=overwrite)
    return {str(k): int(v) for k, v in table["split"].value_counts().iter_rows()}


def _explain(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    from nlrw import explain

    table = explain.run(cfg.explain, run_dir, overwrite=overwrite)
    return {str(k): int(v) for k, v in table["status"].value_counts().iter_rows()}


def _score(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    from nlrw import score

    table = score.run(cfg.score, run_dir, overwrite=overwrite)
    return {
        "latents": table.height,
        "mean_balanced_accuracy": table["balanced_accuracy"].mean(),
        "mean_shuffled_balanced_accuracy": table["shuffled_balanced_accuracy"].mean(),
    }


def _simulate(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    from nlrw import simulate

    table = simulate.run(cfg.simulate, run_dir, overwrite=overwrite)
    return {
        "prompts": table.height,
        "latents": table["latent"].n_unique(),
        "mean_digit_mass": float(table["digit_mass"].mean() or 0.0),  # pyright: ignore[reportArgumentType]
    }


def _evaluate(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    import polars as pl

    from nlrw import evaluate

    summary = evaluate.run(
        cfg.evaluate,
        run_dir,
        hookpoint=cfg.collect.hookpoint,
        model=cfg.collect.model,
        overwrite=overwrite,
    )
    baselines = summary.filter(pl.col("condition") != "simulated")
    return {r["condition"]: r["mean_ce"] for r in baselines.iter_rows(named=True)}


def _report(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    from nlrw import report

    return {"index": str(report.run(cfg.report, run_dir, overwrite=overwrite))}


def _calibrate(cfg: RunConfig, run_dir: Path, overwrite: bool) -> Any:
    import polars as pl

    from nlrw import calibrate

    metrics = calibrate.run(cfg.calibrate, run_dir, overwrite=overwrite)
    summary = metrics.group_by("calibration", maintain_order=True).agg(
        pl.col("pearson", "specificity", "sensitivity").fill_nan(None).mean()
    )
    return {r.pop("calibration"): r for r in summary.iter_rows(named=True)}


STAGES: tuple[Stage, ...] = (
    Stage("collect", _collect, lambda c: c.collect),
    Stage("train", _train, _train_identity),
    # Depends on the subject (collect) and the coder (train), both upstream in the chain.
    Stage("recovery", _recovery, lambda c: c.recovery),
    # After recovery (a cheap diagnostic whose options rarely change) so that tuning the
    # cache's options does not re-run the subject model for recovery.
    Stage("cache", _cache, lambda c: c.cache),
    # Needs the coder (train) and, for from-cache, the cache; independent of the LLM stages,
    # so tuning explanations never re-draws the contexts.
    Stage("contexts", _contexts, lambda c: c.contexts),
    # Prompt templates count as config: editing one re-runs its stage and what follows.
    Stage(
        "explain",
        _explain,
        lambda c: {"config": c.explain, "prompt": explain_prompt.prompt_hash(c.explain.prompt)},
    ),
    Stage("score", _score, lambda c: {"config": c.score, "prompt": detection_prompt.PROMPT_HASH}),
    # After score: max_latents simulates the best-scored latents first.
    Stage(
        "simulate",
        _simulate,
        lambda c: {"config": c.simulate, "prompt": simulation_prompt.PROMPT_HASH},
    ),
    Stage("calibrate", _calibrate, lambda c: c.calibrate),
    Stage("evaluate", _evaluate, lambda c: c.evaluate),
    Stage("report", _report, lambda c: c.report),
)


HASH_NEUTRAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "evaluate": {"positions": "last"},
    "explain": {"prompt": "nlrw"},
}
"""Config fields added after run directories existed, with the default that reproduces what
those runs did: while a field holds it, it is left out of its stage's hash, so a run
directory made by an earlier nlrw stays done (and resumable) under this one instead of being
refused as changed. A new field whose default changes nothing belongs here."""


def _hashed_config(name: str, stage_cfg: Any) -> Any:
    """What a stage's hash is computed from: its config, less the fields of
    :data:`HASH_NEUTRAL_DEFAULTS` that hold their neutral default."""
    data = to_jsonable(stage_cfg)
    for key, neutral in HASH_NEUTRAL_DEFAULTS.get(name, {}).items():
        if data.get(key) == neutral:
            del data[key]
    return data


def chained_hashes(cfg: RunConfig) -> dict[str, str]:
    """Each stage's hash of its own config (:func:`_hashed_config`) and the chained hash of
    the stage before it."""
    out: dict[str, str] = {}
    previous = ""
    for stage in STAGES:
        config = _hashed_config(stage.name, stage.config(cfg))
        previous = config_hash({"upstream": previous, "config": config})
        out[stage.name] = previous
    return out


# --- presets -------------------------------------------------------------------------------


def preset_names() -> list[str]:
    """Names of the presets shipped with nlrw."""
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("nlrw.presets").iterdir()
        if p.name.endswith(".toml")
    )


def load_preset(name_or_path: str) -> RunConfig:
    """A shipped preset by name, or a TOML file by path, as a :class:`RunConfig`.

    The file has one table per stage (``[collect]``, ``[train]``, …) whose keys are that
    stage's config fields; fields left out keep their defaults. Unknown tables or keys are
    errors naming the file.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        source = str(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise FileNotFoundError(f"preset file {path}: {e.strerror}") from e
    else:
        resource = resources.files("nlrw.presets") / f"{name_or_path}.toml"
        if not resource.is_file():
            raise ValueError(
                f"unknown preset {name_or_path!r}; shipped presets: {', '.join(preset_names())}"
            )
        source = f"preset {name_or_path!r}"
        text = resource.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source}: invalid TOML: {e}") from e
    return from_dict(RunConfig, data, source)


# --- dry run ---------------------------------------------------------------------------------


def _count(n: int | None, what: str) -> str:
    return f"{n:,} {what}" if n is not None else f"all {what}"


def work_sizes(cfg: RunConfig) -> dict[str, str]:
    """What each stage will do, in the units that cost time (no model is loaded).

    Latent counts are upper bounds: explain skips latents under ``min_count`` and the later
    stages only see explained latents.
    """
    c, t = cfg.collect, cfg.train
    latents = t.num_latents or None
    width = f"{latents:,} latents" if latents else f"{t.expansion_factor} x d_in latents"
    steps = t.epochs * c.n_tokens // t.batch_size
    cache_rows = c.n_eval_tokens if cfg.cache.source == "eval" else c.n_tokens
    explained = cfg.explain.max_latents or latents
    scored = cfg.score.max_latents or explained
    s = cfg.score
    per_latent = s.n_bins * s.examples_per_bin + s.n_non_activating
    prompts = -(-per_latent // s.examples_per_prompt) * (2 if s.shuffled else 1)
    sizes = {
        "collect": f"{c.n_tokens:,} train + {c.n_eval_tokens:,} eval tokens of {c.model} at "
        f"{c.hookpoint} ({c.n_tokens // c.ctx_len:,} windows of {c.ctx_len})",
        "train": f"{t.kind} with {width}, k = {t.k}: {steps:,} steps of {t.batch_size:,} tokens",
        "recovery": f"{cfg.recovery.n_windows:,} windows through the spliced model",
        "cache": f"{cache_rows:,} rows encoded, top {cfg.cache.max_examples:,} windows kept per "
        "latent",
        "contexts": f"{cfg.contexts.n_contexts:,} eval + {cfg.contexts.n_calibration:,} "
        f"calibration contexts of {cfg.contexts.ctx_len} tokens ({cfg.contexts.source})",
        "explain": f"{_count(explained, 'latents')} x 1 prompt of "
        f"{cfg.explain.n_bins * cfg.explain.examples_per_bin} examples "
        f"({cfg.explain.backend}: {cfg.explain.model})",
        "score": f"{_count(scored, 'latents')} x {prompts} prompts "
        f"({cfg.score.backend}: {cfg.score.model})",
    }
    if scored is not None:
        sizes["score"] += f" = {scored * prompts:,} prompts"
    sim = cfg.simulate
    simulated = sim.max_latents or explained
    n_ctx = cfg.contexts.n_contexts + cfg.contexts.n_calibration
    sizes["simulate"] = (
        f"{_count(simulated, 'latents')} x {n_ctx:,} contexts"
        + (f" = {simulated * n_ctx:,} prompts" if simulated is not None else " prompts")
        + f" ({sim.backend}: {sim.model}, {sim.prompt} prompt, {sim.layout})"
        + ("; the shuffled control re-uses these ratings" if sim.shuffled_control else "")
    )
    sizes["calibrate"] = f"{', '.join(cfg.calibrate.methods)} on {n_ctx:,} contexts per latent"
    ev = cfg.evaluate
    sizes["evaluate"] = (
        f"{cfg.contexts.n_contexts:,} contexts x {len(ev.fractions)} fractions x "
        f"{len(ev.choices)} choices ({ev.n_trials} random trials), "
        + (
            f"every position rewritten: full {cfg.contexts.ctx_len}-token forwards of {c.model}"
            if ev.positions == "all"
            else f"one-token forwards of {c.model} on a shared prefix"
        )
    )
    sizes["report"] = "tables, figures, HTML and Markdown"
    return {stage.name: sizes.get(stage.name, "") for stage in STAGES}


# --- running and status --------------------------------------------------------------------


def _read_record(run_dir: Path, name: str) -> dict[str, Any] | None:
    path = RunDir(run_dir).stage_record(name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        # A damaged record only costs a re-run of its stage (with its outputs replaced).
        return {"status": "damaged", "hash": None}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_run_config(cfg: RunConfig, run_dir: Path) -> None:
    """``config.json``: every stage's resolved config and hash, versions, git, seeds."""
    hashes = chained_hashes(cfg)
    atomic_write_json(
        RunDir(run_dir).config,
        {
            "format": RUN_FORMAT,
            "config": to_jsonable(cfg),
            "stage_hashes": hashes,
            "seeds": {s.name: getattr(getattr(cfg, s.name), "seed", None) for s in STAGES},
            "versions": versions(),
            "git_revision": git_revision(),
            "written_at": _now(),
        },
    )


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an advisory ``flock``, released by the kernel when the holder
    dies, so a killed run never leaves a stale lock) for the duration of the block."""
    path = RunDir(run_dir).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(
            f"{run_dir} is being written by another nlrw process (pid {holder}); wait for it "
            "to finish or choose another --run-dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _check_format(run_dir: Path) -> None:
    path = RunDir(run_dir).config
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text()).get("format", RUN_FORMAT)
    except (OSError, json.JSONDecodeError):
        return  # a damaged config.json is rewritten; stage records decide what re-runs
    if found != RUN_FORMAT:
        raise RunDirError(
            f"{run_dir} was written by an incompatible nlrw (run format {found!r}, this nlrw "
            f"writes {RUN_FORMAT!r}); use a new --run-dir"
        )


def load_run_config(run_dir: str | Path) -> RunConfig | None:
    """The config a run directory was last run with (its ``config.json``), or None for a
    directory that has none yet. ``nlrw run`` and the stage subcommands start from it."""
    path = RunDir(run_dir).config
    _check_format(Path(run_dir))
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is damaged ({e}); pass --preset to start from a preset") from e
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RunDirError(f"{path} has no 'config' table; pass --preset to start from a preset")
    return from_dict(RunConfig, record["config"], str(path))


class RerunRefused(RunDirError):
    """A config that would redo (or leave stale) stages a run directory has already run."""


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unfinished"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def changed_stages(cfg: RunConfig, run_dir: str | Path) -> list[tuple[str, str, float | None]]:
    """Stages ``run_dir`` has already run (finished or partly) whose chained hash ``cfg``
    changes from the run's ``config.json``: ``(name, state, recorded seconds)`` each. Running
    ``cfg`` replaces their outputs (or, for those after the ones run, leaves them stale).
    Stages already stale under ``config.json`` (a stage subcommand changed an earlier stage)
    are not listed: ``config.json`` is what they are redone for."""
    run_dir = Path(run_dir)
    hashes = chained_hashes(cfg)
    try:
        before = json.loads(RunDir(run_dir).config.read_text()).get("stage_hashes") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        before = {}
    out: list[tuple[str, str, float | None]] = []
    for stage in STAGES:
        record = _read_record(run_dir, stage.name)
        if record is None or record.get("status") in ("imported", "invalidated"):
            continue  # kept whatever the config says / to be redone anyway
        h = hashes[stage.name]
        if record.get("hash") != h and before.get(stage.name) != h:
            state = "done" if record.get("status") == "done" else "partial"
            out.append((stage.name, state, record.get("seconds")))
    return out


def run(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    until: str | None = None,
    only: str | None = None,
    rerun: bool = False,
    rerun_flag: str = "--rerun",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every stage (up to and including ``until``; or just stage ``only``) that is not
    already done.

    A config that changes stages the directory has already run (finished or partly) is
    refused with :class:`RerunRefused` listing them and their recorded time, before anything
    is written, unless ``rerun`` (the CLI's ``rerun_flag``); then their outputs are replaced.
    With ``only`` and ``rerun``, that stage runs again even when its config is unchanged.
    Returns each stage's summary. Safe to kill at any moment and call again; a second
    process on the same directory is refused (:class:`RunDirError`) while the first runs.
    """
    run_dir = Path(run_dir)
    names = [s.name for s in STAGES]
    for name in (until, only):
        if name is not None and name not in names:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(names)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_format(run_dir)
    with locked(run_dir):
        for stage in STAGES:  # replacements a kill interrupted: the previous outputs come back
            if stage_outputs.roll_back(run_dir, stage.name):
                log(
                    f"[{stage.name}] an interrupted replacement was rolled back: previous "
                    "outputs kept"
                )
        changed = changed_stages(cfg, run_dir)
        if changed and not rerun:
            listed = ", ".join(
                f"{name} ({_format_seconds(seconds) if state == 'done' else 'partial'})"
                for name, state, seconds in changed
            )
            redo = (
                "redo them (their outputs are replaced)"
                if only is None
                else f"redo {only} (its outputs are replaced; the later stages then show as "
                "stale until `nlrw run` redoes them)"
            )
            why = (
                "leave out the options or --preset that change them (a run resumes with its "
                "own config.json)"
            )
            if _same_as_recorded(cfg, run_dir):
                why = (
                    "use the nlrw that made the run: this one gives the run's own config.json "
                    "other stage hashes (a stage's options, defaults or prompt changed)"
                )
            raise RerunRefused(
                f"{run_dir}: this config changes {len(changed)} stage"
                f"{'s' * (len(changed) != 1)} the run has already run: {listed}; nothing was "
                f"changed. Pass {rerun_flag} to {redo}, or {why}"
            )
        force = rerun and only is not None
        pending = _pending(cfg, run_dir, until, only, force)
        preflight(cfg, pending)
        if pending and only is not None:
            check_inputs(run_dir, pending[0])  # `run` redoes damaged stages instead
        return _run_locked(
            cfg, run_dir, until, log, only=only, force=force, digests=bool(pending), rerun=rerun
        )


def _pending(
    cfg: RunConfig, run_dir: Path, until: str | None, only: str | None, force: bool
) -> list[str]:
    """The stages a call of :func:`run` will run (not skipped as done)."""
    hashes = chained_hashes(cfg)
    out: list[str] = []
    for stage in STAGES:
        if only is None or stage.name == only:
            record = _read_record(run_dir, stage.name) or {}
            done = record.get("status") == "imported" or (
                record.get("status") == "done"
                and record.get("hash") == hashes[stage.name]
                and stage_outputs.damage(run_dir, record, digests=False) is None
            )
            if force or not done:
                out.append(stage.name)
        if stage.name == until:
            break
    return out


def check_inputs(run_dir: str | Path, stage: str) -> None:
    """Before ``stage`` runs: the outputs every finished stage before it recorded are there,
    of their size and digest; for a record without that list (an import, or a record
    written before records had one) at least every parquet table opens (a truncated one
    fails on its footer). Raises ValueError naming the file and the stage that wrote it."""
    import polars as pl
    from polars.exceptions import PolarsError

    run_dir = Path(run_dir)
    for upstream in STAGES[: [s.name for s in STAGES].index(stage)]:
        record = _read_record(run_dir, upstream.name) or {}
        if record.get("status") not in ("done", "imported"):
            continue  # not finished: the stage reports what it lacks itself
        redo = f"nlrw {upstream.name} {run_dir} --overwrite"
        problem = stage_outputs.damage(run_dir, record, digests=True)
        if problem is not None:
            raise ValueError(
                f"{problem}: an output of the {upstream.name} stage, which {stage} reads "
                f"from; redo it with `{redo}` (or `nlrw run {run_dir}`, which redoes it)"
            )
        if "outputs" in record:
            continue
        for path in stage_outputs.files_under(
            run_dir, stage_outputs.stage_files(run_dir, upstream.name)
        ):
            if path.suffix == ".parquet":
                try:
                    pl.read_parquet_schema(path)
                except (OSError, ValueError, PolarsError) as e:
                    raise ValueError(
                        f"{path} is damaged ({' '.join(str(e).split())}); the "
                        f"{upstream.name} stage wrote it: redo it with `{redo}`"
                    ) from e


_LLM_STAGES = ("explain", "score", "simulate")
"""Stages that build an LLM backend from ``backend`` + ``backend_options``."""


def _check_device(option: str, device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":", 1)[1]) if device.count(":") == 1 and device[5:].isdigit() else 0
    if index >= count:
        have = f"{count} CUDA device{'s' * (count != 1)}" if count else "no CUDA device"
        raise ValueError(f"--{option} {device}: this machine has {have}; use cpu or auto")


def _check_model_path(option: str, model: str) -> None:
    """A model given as a local path (not a hub name or alias) must exist."""
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"--{option} {model}: no such file or directory")


def preflight(cfg: RunConfig, stages: list[str]) -> None:
    """Check what ``stages`` will need before any of them runs or writes anything: devices
    exist, models given as paths exist, LLM backend options are known and parse to their
    types, evaluating every position has a layout that rates every position. Each error names
    its option."""
    from nlrw.backends import backend_options

    positions, layout = cfg.evaluate.positions, cfg.simulate.layout
    if "evaluate" in stages and positions == "all" and layout != "all-at-once":
        raise ValueError(
            "--evaluate.positions all needs a rating of every position, which only the "
            f"all-at-once layout makes; this run's simulate.layout is {layout!r}: add "
            "--simulate.layout all-at-once (and --rerun where simulate has run)"
        )
    for name in stages:
        stage_cfg = getattr(cfg, name)
        device = getattr(stage_cfg, "device", None)
        if isinstance(device, str):
            _check_device(f"{name}.device", device)
        if name in ("collect", "recovery", "evaluate"):
            _check_device("collect.device", cfg.collect.device)
            _check_model_path("collect.model", cfg.collect.model)
        if name in _LLM_STAGES:
            _check_model_path(f"{name}.model", stage_cfg.model)
            try:
                backend_options(stage_cfg.backend, stage_cfg.backend_options)
            except ValueError as e:
                raise ValueError(f"--{name}.backend-options: {e}") from None


def _same_as_recorded(cfg: RunConfig, run_dir: Path) -> bool:
    """Whether ``cfg`` is the config ``config.json`` records, value for value."""
    try:
        recorded = json.loads(RunDir(run_dir).config.read_text()).get("config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    current = to_jsonable(cfg)
    return isinstance(recorded, dict) and all(
        recorded.get(name) == {k: v for k, v in value.items() if k in recorded.get(name, {})}
        for name, value in current.items()
    )


def run_stage(
    name: str,
    stage_cfg: Any,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Any:
    """Run stage ``name`` alone with config ``stage_cfg``, every other stage's config taken
    from the run's ``config.json`` (the demo preset's for a new directory); what the stage
    subcommands (``nlrw simulate RUN_DIR ...``) run. The stage's record and ``config.json``
    are updated as by :func:`run` (later stages whose config hash this changes show as
    stale); a change to a stage already run is refused unless ``overwrite``."""
    base = load_run_config(run_dir) or load_preset("demo")
    cfg = dataclasses.replace(base, **{name: stage_cfg})
    summaries = run(cfg, run_dir, only=name, rerun=overwrite, rerun_flag="--overwrite", log=log)
    return summaries.get(name)


def _run_locked(
    cfg: RunConfig,
    run_dir: Path,
    until: str | None,
    log: Callable[[str], None],
    *,
    only: str | None = None,
    force: bool = False,
    digests: bool = False,
    rerun: bool = False,
) -> dict[str, Any]:
    """Run the stages; a done stage whose outputs are damaged (missing, resized, or with
    ``digests`` of other content) is redone, and so is every stage after one that ran."""
    config_path = RunDir(run_dir).config
    previous_config = config_path.read_bytes() if config_path.is_file() else None
    write_run_config(cfg, run_dir)
    hashes = chained_hashes(cfg)
    summaries: dict[str, Any] = {}
    redone_upstream: str | None = None
    ran: list[str] = []
    try:
        for stage in STAGES:
            if only is not None and stage.name != only:
                continue
            record = _read_record(run_dir, stage.name)
            h = hashes[stage.name]
            if force and record is not None and record.get("status") == "done":
                record = {**record, "hash": None}  # redo on request: outputs replaced
            damage = None
            if record is not None and record.get("status") == "done" and record.get("hash") == h:
                damage = stage_outputs.damage(run_dir, record, digests=digests)
                if damage is None and redone_upstream is not None:
                    damage = f"its input from {redone_upstream} was redone"
            if record is not None and record.get("status") == "imported":
                # `nlrw import-explanations` wrote this stage's output: kept whatever the config
                # says, unless the coder it was checked against has been replaced since.
                if record.get("coder_hash") not in (None, hashes["train"]):
                    raise RunDirError(
                        f"{run_dir}: the {stage.name} output imported from {record.get('source')} "
                        "belongs to a coder the train stage has since replaced; import again, or "
                        f"delete {RunDir(run_dir).stage_record(stage.name)} to run the stage"
                    )
                log(f"[{stage.name}] imported from {record.get('source')}, kept")
                summaries[stage.name] = record.get("summary")
            elif (
                record is not None
                and record.get("status") == "done"
                and record.get("hash") == h
                and damage is None
            ):
                again = " (--overwrite redoes it)" if only is not None else ""
                took = f"{record.get('seconds', 0):.0f} s"
                log(f"[{stage.name}] done already ({took}), skipped{again}")
                if "outputs" not in record:  # recorded before digests: trusted once, from now
                    record = {**record, "outputs": stage_outputs.digests(run_dir, stage.name)}
                    atomic_write_json(RunDir(run_dir).stage_record(stage.name), record)
                summaries[stage.name] = record.get("summary")
            else:
                overwrite = record is not None and (record.get("hash") != h or damage is not None)
                action = "re-running (config changed)" if overwrite else "running"
                if force and overwrite and record is not None and record.get("status") == "done":
                    action = "re-running (--overwrite)"
                if damage is not None:
                    action = f"re-running ({damage})"
                if record is not None and not overwrite:
                    action = "resuming"
                if rerun and not overwrite and stage_outputs.stage_files(run_dir, stage.name):
                    # On request, outputs no record accounts for (or a partial run's) are
                    # replaced too, instead of the stage refusing them.
                    overwrite, action = True, "running (replacing the outputs present)"
                log(f"[{stage.name}] {action}")
                summaries[stage.name] = _run_stage_replacing(
                    stage, cfg, run_dir, h, replace=overwrite, log=log
                )
                redone_upstream = redone_upstream or stage.name
                ran.append(stage.name)
            if stage.name == until:
                break
    except BaseException:
        if not ran:  # nothing finished under the new config: the run stays as it was
            if previous_config is None:
                config_path.unlink(missing_ok=True)
            else:
                atomic_write(config_path, lambda f: f.write(previous_config))
        raise
    return summaries


def _run_stage_replacing(
    stage: Stage,
    cfg: RunConfig,
    run_dir: Path,
    h: str,
    *,
    replace: bool,
    log: Callable[[str], None],
) -> Any:
    """Run one stage and record it done with its outputs' sizes and digests. With
    ``replace``, the previous outputs (and record) are first set aside in
    ``.replaced/<stage>/`` and only deleted once the new ones are complete; any failure
    (an exception here, or a kill, rolled back at the next run) puts them back."""
    if replace:
        stage_outputs.set_aside(run_dir, stage.name)
    started = time.perf_counter()
    try:
        atomic_write_json(
            RunDir(run_dir).stage_record(stage.name),
            {"status": "running", "hash": h, "started_at": _now()},
        )
        summary = stage.run(cfg, run_dir, replace)
        seconds = time.perf_counter() - started
        atomic_write_json(
            RunDir(run_dir).stage_record(stage.name),
            {
                "status": "done",
                "hash": h,
                "finished_at": _now(),
                "seconds": seconds,
                "summary": to_jsonable(summary),
                "outputs": stage_outputs.digests(run_dir, stage.name),
            },
        )
    except BaseException:
        if stage_outputs.roll_back(run_dir, stage.name):
            log(f"[{stage.name}] failed: its previous outputs are back in place")
        raise
    stage_outputs.discard_set_aside(run_dir, stage.name)
    log(f"[{stage.name}] done in {seconds:.0f} s")
    return summary


def verify(run_dir: str | Path) -> list[tuple[str, str]]:
    """Every done stage's outputs checked in full (presence, size, digest): ``(stage,
    problem)`` for each damaged stage, empty when all are intact. A record written before
    records listed outputs has nothing to check against (the next ``run`` adds the list)."""
    run_dir = Path(run_dir)
    if not RunDir(run_dir).config.is_file():
        raise FileNotFoundError(
            f"{run_dir / 'config.json'} not found: is {run_dir} a run directory?"
        )
    out: list[tuple[str, str]] = []
    for stage in STAGES:
        record = _read_record(run_dir, stage.name)
        if record is not None and record.get("status") == "done":
            problem = stage_outputs.damage(run_dir, record, digests=True)
            if problem is not None:
                out.append((stage.name, problem))
    return out


_PARTS = {
    "cache": "latents",
    "explain": "explanations.parts",
    "score": "scores.parts",
    "simulate": "simulations.parts",
    "evaluate": "eval/results.parts",
}
"""Where a stage checkpoints its parquet parts: a partial stage's progress."""


class StageStatus(NamedTuple):
    """What ``nlrw status`` shows for one stage."""

    name: str
    state: str
    """``done``, ``partial`` (started, not finished), ``stale`` (done for another config),
    ``damaged`` (done, but an output is missing or resized; ``nlrw verify`` also compares
    digests), ``replacing`` (being redone, its previous outputs set aside), ``imported`` (by
    ``nlrw import-explanations``) or ``not started``."""
    seconds: float | None
    detail: str


def status(run_dir: str | Path) -> list[StageStatus]:
    """Each stage's state in ``run_dir``, judged against the config in its config.json."""
    run_dir = Path(run_dir)
    config_path = RunDir(run_dir).config
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a run directory?")
    try:
        hashes = json.loads(config_path.read_text())["stage_hashes"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{config_path} is damaged: {e}") from e
    out = []
    for stage in STAGES:
        record = _read_record(run_dir, stage.name)
        backup = stage_outputs.replaced_dir(run_dir, stage.name)
        if (backup / "moved.json").is_file():
            detail = f"previous outputs kept in {backup}/ until it finishes (rolled back if not)"
            out.append(StageStatus(stage.name, "replacing", None, detail))
        elif record is None:
            out.append(StageStatus(stage.name, "not started", None, ""))
        elif record.get("status") == "imported":
            out.append(StageStatus(stage.name, "imported", None, f"from {record.get('source')}"))
        elif record.get("hash") != hashes.get(stage.name):
            out.append(StageStatus(stage.name, "stale", record.get("seconds"), "other config"))
        elif record.get("status") == "done" and (
            problem := stage_outputs.damage(run_dir, record, digests=False)
        ):
            out.append(StageStatus(stage.name, "damaged", record.get("seconds"), problem))
        elif record.get("status") == "done":
            summary = record.get("summary")
            detail = json.dumps(summary)[:80] if summary else ""
            out.append(StageStatus(stage.name, "done", record.get("seconds"), detail))
        else:
            detail = f"started {record.get('started_at', '?')}"
            parts = _PARTS.get(stage.name)
            if parts is not None:
                n = len(list((run_dir / parts).glob("part-*.parquet")))
                detail += f", {n} part{'s' * (n != 1)} written in {parts}/"
            out.append(StageStatus(stage.name, "partial", None, detail))
    return out
