"""Explanations that travel: bring explanations written elsewhere (EleutherAI delphi, or a
JSON object) into a run directory, and write a run's explanations in delphi's layout.

**Import** (``nlrw import-explanations RUN_DIR SOURCE``) reads one of two layouts:

* a **delphi results folder**::

      run_config.json                               model, sparse_model, hookpoints, ...
      explanations/<hookpoint>_latent<i>.txt        one JSON string each
      scores/detection/<hookpoint>_latent<i>.txt    optional: a JSON list of records
                                                    {"activating": bool, "prediction":
                                                    bool/0/1/null, "probability": float/null}

  A detection file becomes the latent's ``balanced_accuracy = (TPR + TNR) / 2`` over the
  records with a prediction (delphi's ``accuracy``; a failed prompt's ``null`` prediction is
  left out) and its ``auroc`` over each record's probability (its 0/1 prediction when delphi
  ran without log-probabilities);
* a single **JSON object** ``{"<latent>": "<explanation>", ...}`` for one hookpoint (the
  layout of EleutherAI's published explanation sets).

It writes ``explanations.parquet`` (and ``scores.parquet`` when scores came along) in the
schemas of :mod:`nlrw.explain` and :mod:`nlrw.score`, so the later stages read them as their
own, plus the provenance columns ``source`` and ``imported_at``; ``backend`` is
``"imported"`` and ``model`` the explainer named by the source. A usable explanation keeps
``status = "ok"`` (what every later stage reads); an empty one is ``"failed"``. The stage
records (``stages/explain.json``, ``stages/score.json`` and ``explain.json``) say
``status = "imported"``: ``nlrw run`` then keeps them whatever the explain and score options
say, and continues with the stages after them. Stages after the imported ones that had
already run are marked for a re-run (their outputs belonged to other explanations); without
imported scores, an old ``scores.parquet`` is removed and the score stage scores the imported
explanations.

Everything is checked before anything is written, against the run's coder
(``transcoder/<hookpoint>/cfg.json``): the source's hookpoint (delphi names hookpoints from the
base model, ``layers.6.mlp``, which matches the run's ``gpt_neox.layers.6.mlp``), its width
when the source records one (delphi's latent cache splits ``latents/<hookpoint>/<a>_<b>
.safetensors``, or the ``cfg.json`` of a ``sparse_model`` folder), every latent id against
the coder's width, and every file's form; an :class:`InteropError` names the file and the
line, key or record at fault, and nothing is written.

**Export** (``nlrw export-explanations RUN_DIR OUT``) writes the run's usable explanations and
detection scores in delphi's layout (each detection record also keeps nlrw's ``window``), so
delphi users can read them and ``import`` reads them back unchanged.

Why this module is long: two input layouts (delphi's folders and a JSON object), the
export, and a one-line error for every malformed case of each; every check sits next to the
format it guards.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from nlrw.lib.io import atomic_path, atomic_write_json, atomic_write_text
from nlrw.lib.provenance import git_revision, versions
from nlrw.lib.rundir import RunDir

__all__ = [
    "EXPLANATION_SCHEMA",
    "SCORE_SCHEMA",
    "Coder",
    "Imported",
    "InteropError",
    "export_explanations",
    "import_explanations",
    "read_source",
    "run_coder",
    "same_hookpoint",
]

Layout = Literal["delphi", "json"]

_PROVENANCE: dict[str, Any] = {"source": pl.String, "imported_at": pl.String}


def _schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    from nlrw import explain, score

    return {**explain.SCHEMA, **_PROVENANCE}, {**score.SCHEMA, **_PROVENANCE}


EXPLANATION_SCHEMA, SCORE_SCHEMA = _schemas()
"""The explain and score stages' schemas plus the provenance columns of an import."""

_NAME = re.compile(r"^(?P<hookpoint>.+)_latent(?P<latent>[0-9]+)\.txt$")
_SPLIT = re.compile(r"^(?P<start>[0-9]+)_(?P<end>[0-9]+)\.safetensors$")
_INTEGER = re.compile(r"^[0-9]+$")


class InteropError(ValueError):
    """A source that cannot be imported (or a run that cannot be exported); the message names
    the file and the line, key or record at fault."""


@dataclass(frozen=True)
class Coder:
    """What an import is checked against: the run's coder."""

    hookpoint: str
    num_latents: int
    path: Path
    """The coder's folder, ``RUN_DIR/transcoder/<hookpoint>``."""


@dataclass(frozen=True)
class Imported:
    """A parsed, validated source: the tables an import writes, and its provenance."""

    explanations: pl.DataFrame
    scores: pl.DataFrame | None
    provenance: dict[str, Any]


# --------------------------------------------------------------------------------------------
# The run's coder
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    """A JSON file, or an :class:`InteropError` naming the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InteropError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as e:
        raise InteropError(f"{path}: line {e.lineno} column {e.colno}: {e.msg}") from e


def _unique_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise InteropError(f"{path}: key {key!r} appears twice")
            out[key] = value
        return out

    return hook


def _coder_width(cfg_path: Path) -> int:
    raw = _read_json(cfg_path)
    try:
        width = int(raw.get("num_latents") or 0) or int(raw["d_in"]) * int(
            raw.get("expansion_factor", 32)
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise InteropError(f"{cfg_path}: no num_latents or d_in x expansion_factor ({e})") from e
    return width


def run_coder(run_dir: str | Path) -> Coder:
    """The run's coder: its hookpoint (``config.json``, else ``activations/collect.json``) and
    width (``transcoder/<hookpoint>/cfg.json``, sparsify's layout)."""

    run_dir = Path(run_dir)
    hookpoint = None
    for path, keys in (
        (RunDir(run_dir).config, ("config", "collect", "hookpoint")),
        (RunDir(run_dir).collect_record, ("config", "hookpoint")),
    ):
        if path.is_file():
            value: Any = _read_json(path)
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, str):
                hookpoint = value
                break
    if hookpoint is None:
        raise FileNotFoundError(
            f"{run_dir} has no config.json or activations/collect.json naming a hookpoint: "
            "is it a run directory? (run `nlrw run --until train` first)"
        )
    folder = RunDir(run_dir).coder(hookpoint)
    cfg_path = folder / "cfg.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} is missing: the run has no coder at {hookpoint!r} yet; run the train "
            "stage first (`nlrw run --until train`)"
        )
    return Coder(hookpoint, _coder_width(cfg_path), folder)


def same_hookpoint(a: str, b: str) -> bool:
    """Whether two hookpoint names name the same module: equal, or equal once the longer
    loses one leading component (delphi names modules from the base model, ``layers.6.mlp``,
    where nlrw names them from the causal LM, ``gpt_neox.layers.6.mlp``)."""
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    return long.endswith("." + short) and long.count(".") == short.count(".") + 1


# --------------------------------------------------------------------------------------------
# Reading a source
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _latent(path: Path, text: str, where: str, coder: Coder) -> int:
    if not _INTEGER.match(text):
        raise InteropError(f"{path}: {where} {text!r} is not a latent id (a decimal integer)")
    latent = int(text)
    if latent >= coder.num_latents:
        raise InteropError(
            f"{path}: {where} {text!r}: latent {latent} is out of range, the run's coder at "
            f"{coder.hookpoint!r} has {coder.num_latents:,} latents (0..{coder.num_latents - 1})"
        )
    return latent


def _explanation_row(latent: int, text: str, where: str, base: dict[str, Any]) -> dict[str, Any]:
    text = text.strip()
    return {
        **base,
        "latent": latent,
        "explanation": text or None,
        "status": "ok" if text else "failed",
        "reason": None if text else f"empty explanation in {where}",
    }


def _base_row(source: Path, model: str | None, imported_at: str) -> dict[str, Any]:
    return {
        "backend": "imported",
        "model": model,
        "temperature": None,
        "seed": None,
        "prompt_hash": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "attempts": 0,
        "windows": [],
        "source": str(source),
        "imported_at": imported_at,
    }


def _read_json_object(
    path: Path, coder: Coder, hookpoint: str | None, model: str | None
) -> Imported:
    chosen = hookpoint if hookpoint is not None else coder.hookpoint
    if not same_hookpoint(chosen, coder.hookpoint):
        raise InteropError(
            f"{path} holds explanations of hookpoint {chosen!r}, but the run's coder is at "
            f"{coder.hookpoint!r}"
        )
    data = _read_json(path)
    if not isinstance(data, dict):
        raise InteropError(
            f'{path}: expected one JSON object {{"<latent>": "<explanation>", ...}}, got '
            f"{type(data).__name__}"
        )
    if not data:
        raise InteropError(f"{path}: the object holds no explanations")
    imported_at = _now()
    base = _base_row(path, model, imported_at)
    rows: dict[int, dict[str, Any]] = {}
    keys: dict[int, str] = {}
    for key, value in data.items():
        latent = _latent(path, key, "key", coder)
        if latent in rows:
            raise InteropError(
                f"{path}: keys {keys[latent]!r} and {key!r} are both latent {latent}"
            )
        if not isinstance(value, str):
            raise InteropError(
                f"{path}: key {key!r}: the explanation must be a JSON string, got "
                f"{type(value).__name__}"
            )
        keys[latent] = key
        rows[latent] = _explanation_row(latent, value, f"{path} key {key!r}", base)
    table = pl.DataFrame([rows[k] for k in sorted(rows)], schema=EXPLANATION_SCHEMA)
    provenance = {
        "layout": "json",
        "source": str(path),
        "hookpoint": chosen,
        "explainer_model": model,
        "imported_at": imported_at,
    }
    return Imported(table, None, provenance)


def _delphi_config(source: Path) -> dict[str, Any]:
    path = source / "run_config.json"
    config = _read_json(path)
    if not isinstance(config, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(config).__name__}")
    hookpoints = config.get("hookpoints")
    if not isinstance(hookpoints, list) or not all(isinstance(h, str) for h in hookpoints):
        raise InteropError(
            f"{path}: key 'hookpoints' must be a list of strings, got {hookpoints!r}"
        )
    for key in ("model", "sparse_model", "explainer_model"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise InteropError(f"{path}: key {key!r} must be a string, got {config[key]!r}")
    return config


def _files_by_latent(
    folder: Path, hookpoints: Sequence[str], hookpoint: str, coder: Coder
) -> dict[int, Path]:
    """``<hookpoint>_latent<i>.txt`` files of ``folder`` for ``hookpoint``, by latent; a name of
    another form, or of a hookpoint ``run_config.json`` does not list, is an error."""
    out: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        match = _NAME.match(path.name)
        if match is None or not path.is_file():
            raise InteropError(
                f"{path}: not a delphi result file (expected <hookpoint>_latent<i>.txt)"
            )
        if match["hookpoint"] not in hookpoints:
            raise InteropError(
                f"{path}: hookpoint {match['hookpoint']!r} is not among run_config.json's "
                f"hookpoints {list(hookpoints)}"
            )
        if match["hookpoint"] == hookpoint:
            out[_latent(path, match["latent"], "latent", coder)] = path
    return out


def _source_width(source: Path, config: dict[str, Any], hookpoint: str) -> tuple[int, Path] | None:
    """The width the delphi run recorded for ``hookpoint``: the end of its last latent-cache
    split, or its sparse model's ``cfg.json`` when that folder is here."""
    splits = source / "latents" / hookpoint
    ends = [
        int(m["end"])
        for p in (splits.iterdir() if splits.is_dir() else ())
        if (m := _SPLIT.match(p.name))
    ]
    if ends:
        return max(ends) + 1, splits
    sparse_model = config.get("sparse_model")
    if sparse_model:
        for folder in (Path(sparse_model), source / sparse_model):
            cfg_path = folder / hookpoint / "cfg.json"
            if cfg_path.is_file():
                return _coder_width(cfg_path), cfg_path
    return None


def _flag(path: Path, index: int, record: dict[str, Any], key: str, nullable: bool) -> Any:
    value = record.get(key)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise InteropError(
        f"{path}: record {index}: {key!r} must be true or false"
        + (" (or null)" if nullable else "")
        + f", got {value!r}"
    )


def _detection_row(path: Path, latent: int, explanation: str | None, base: dict[str, Any]):
    from nlrw.lib.metrics import auroc, balanced_accuracy

    records = _read_json(path)
    if not isinstance(records, list):
        raise InteropError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    labels: list[bool] = []
    predictions: list[float] = []
    probs: list[float] = []
    windows: list[int | None] = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InteropError(f"{path}: record {i} is not an object ({record!r})")
        labels.append(_flag(path, i, record, "activating", nullable=False))
        prediction = _flag(path, i, record, "prediction", nullable=True)
        probability = record.get("probability")
        if probability is not None and (
            isinstance(probability, bool)
            or not isinstance(probability, int | float)
            or not 0.0 <= probability <= 1.0
        ):
            raise InteropError(
                f"{path}: record {i}: 'probability' must be a number in [0, 1] or null, got "
                f"{probability!r}"
            )
        window = record.get("window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
            raise InteropError(f"{path}: record {i}: 'window' must be an integer, got {window!r}")
        windows.append(window)
        predictions.append(math.nan if prediction is None else float(prediction))
        probs.append(float(probability) if probability is not None else predictions[-1])
    y = np.asarray(labels, dtype=bool)
    pred, p = np.asarray(predictions), np.asarray(probs)
    answered, rated = ~np.isnan(pred), ~np.isnan(p)
    return {
        **base,
        "latent": latent,
        "explanation": explanation,
        "balanced_accuracy": balanced_accuracy(pred[answered], y[answered], 0.5),
        "auroc": auroc(p[rated], y[rated]),
        "shuffled_balanced_accuracy": math.nan,
        "shuffled_auroc": math.nan,
        "shuffled_from": None,
        "n_activating": int(y.sum()),
        "n_non_activating": int((~y).sum()),
        "mean_mass": math.nan,
        "windows": windows,
        "labels": labels,
        "probs": probs,
        "shuffled_probs": [],
    }


def _read_delphi(source: Path, coder: Coder, hookpoint: str | None, model: str | None) -> Imported:
    config = _delphi_config(source)
    listed: list[str] = config["hookpoints"]
    config_path = source / "run_config.json"
    candidates = [h for h in listed if same_hookpoint(h, coder.hookpoint)]
    if hookpoint is not None:
        if hookpoint not in listed:
            raise InteropError(f"{config_path}: hookpoints {listed} do not include {hookpoint!r}")
        candidates = [hookpoint] if hookpoint in candidates else []
    if len(candidates) != 1:
        raise InteropError(
            f"{config_path}: hookpoints {listed} "
            + ("hold no" if not candidates else "hold more than one")
            + f" match for the run's coder at {coder.hookpoint!r}"
            + ("; pass --hookpoint to choose" if candidates else "")
        )
    chosen = candidates[0]
    width = _source_width(source, config, chosen)
    if width is not None and width[0] != coder.num_latents:
        raise InteropError(
            f"{width[1]}: the source's coder at {chosen!r} has {width[0]:,} latents, the run's "
            f"coder at {coder.hookpoint!r} has {coder.num_latents:,}"
        )
    folder = source / "explanations"
    if not folder.is_dir():
        raise InteropError(
            f"{folder} is missing: a delphi results folder keeps its explanations there"
        )
    files = _files_by_latent(folder, listed, chosen, coder)
    if not files:
        raise InteropError(f"{folder} holds no explanations of hookpoint {chosen!r}")
    model = model if model is not None else config.get("explainer_model")
    imported_at = _now()
    base = _base_row(source, model, imported_at)
    rows = []
    for latent, path in sorted(files.items()):
        text = _read_json(path)
        if not isinstance(text, str):
            raise InteropError(f"{path}: expected one JSON string, got {type(text).__name__}")
        rows.append(_explanation_row(latent, text, str(path), base))
    explanations = pl.DataFrame(rows, schema=EXPLANATION_SCHEMA)
    scores = None
    detection = source / "scores" / "detection"
    if detection.is_dir():
        text_of = {int(r["latent"]): r["explanation"] for r in rows}
        score_base = {
            "backend": "imported",
            "model": model,
            "prompt_hash": None,
            "source": str(source),
            "imported_at": imported_at,
        }
        score_rows = []
        for latent, path in sorted(_files_by_latent(detection, listed, chosen, coder).items()):
            if latent not in text_of:
                raise InteropError(
                    f"{path}: detection scores of latent {latent}, which has no explanation in "
                    f"{folder}"
                )
            score_rows.append(_detection_row(path, latent, text_of[latent], score_base))
        scores = pl.DataFrame(score_rows, schema=SCORE_SCHEMA) if score_rows else None
    provenance = {
        "layout": "delphi",
        "source": str(source),
        "hookpoint": chosen,
        "explainer_model": model,
        "model": config.get("model"),
        "sparse_model": config.get("sparse_model"),
        "imported_at": imported_at,
    }
    return Imported(explanations, scores, provenance)


def read_source(
    source: str | Path,
    coder: Coder,
    *,
    hookpoint: str | None = None,
    explainer_model: str | None = None,
) -> Imported:
    """Parse and check ``source`` (a delphi results folder or a JSON object file) against
    ``coder``; writes nothing.

    Args:
        hookpoint: the source's hookpoint (a JSON object's; default: the coder's), or which of
            a delphi run's hookpoints to import (default: the one matching the coder's).
        explainer_model: the model that wrote the explanations (default: a delphi run's
            ``explainer_model``; unknown for a JSON object).
    """
    source = Path(source).absolute()
    if source.is_dir():
        if not (source / "run_config.json").is_file():
            raise InteropError(
                f"{source} is a folder without run_config.json: not a delphi results folder"
            )
        return _read_delphi(source, coder, hookpoint, explainer_model)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    return _read_json_object(source, coder, hookpoint, explainer_model)


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def _status_counts(table: pl.DataFrame) -> dict[str, int]:
    return {str(s): int(c) for s, c in table["status"].value_counts().sort("status").iter_rows()}


def _mean(values: pl.Series) -> float | None:
    kept = values.drop_nans().drop_nulls()
    return float(kept.mean()) if len(kept) else None  # type: ignore[arg-type]


def import_explanations(
    run_dir: str | Path,
    source: str | Path,
    *,
    hookpoint: str | None = None,
    explainer_model: str | None = None,
) -> Imported:
    """Import ``source``'s explanations (and detection scores) into ``run_dir``: see the
    module docstring. Holds the run directory's lock; nothing is written unless every check
    passes."""
    from nlrw.pipeline import STAGES, locked

    run_dir = Path(run_dir)
    coder = run_coder(run_dir)
    imported = read_source(source, coder, hookpoint=hookpoint, explainer_model=explainer_model)
    provenance = {**imported.provenance, "run_hookpoint": coder.hookpoint}
    stages = RunDir(run_dir).stages
    names = [s.name for s in STAGES]
    with locked(run_dir):
        hashes = _stage_hashes(run_dir)
        coder_hash = _record(stages / "train.json").get("hash")
        explanations = imported.explanations
        with atomic_path(RunDir(run_dir).explanations) as tmp:
            explanations.write_parquet(tmp)
        counts = _status_counts(explanations)
        record = {
            "stage": "explain",
            "status": "imported",
            **provenance,
            "n_latents": explanations.height,
            "status_counts": counts,
            "versions": versions(),
            "git_revision": git_revision(),
        }
        atomic_write_json(RunDir(run_dir).explain_record, record)
        imported_stages = ["explain"]
        if imported.scores is not None:
            scores = imported.scores
            with atomic_path(RunDir(run_dir).scores) as tmp:
                scores.write_parquet(tmp)
            summary = {
                "latents": scores.height,
                "mean_balanced_accuracy": _mean(scores["balanced_accuracy"]),
            }
            atomic_write_json(
                RunDir(run_dir).score_record,
                {"stage": "score", "status": "imported", **provenance, **summary},
            )
            imported_stages.append("score")
            summaries = {"explain": counts, "score": summary}
        else:
            # Scores of other explanations: the score stage scores the imported ones.
            for name in ("scores.parquet", "score.json"):
                (run_dir / name).unlink(missing_ok=True)
            summaries = {"explain": counts}
        for name in imported_stages:
            atomic_write_json(
                stages / f"{name}.json",
                {
                    "status": "imported",
                    "hash": hashes.get(name),
                    "coder_hash": coder_hash,
                    "source": provenance["source"],
                    "finished_at": provenance["imported_at"],
                    "seconds": 0.0,
                    "summary": summaries[name],
                },
            )
        after = names[names.index(imported_stages[-1]) + 1 :]
        for name in after:
            if (stages / f"{name}.json").is_file():
                # A record whose hash matches no config: the pipeline re-runs the stage,
                # replacing outputs computed from the explanations replaced here.
                atomic_write_json(
                    stages / f"{name}.json",
                    {
                        "status": "invalidated",
                        "hash": None,
                        "reason": f"explanations imported from {provenance['source']} at "
                        f"{provenance['imported_at']}",
                    },
                )
    return Imported(imported.explanations, imported.scores, provenance)


def _record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _stage_hashes(run_dir: Path) -> dict[str, str]:
    hashes = _record(RunDir(run_dir).config).get("stage_hashes")
    return hashes if isinstance(hashes, dict) else {}


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_explanations(run_dir: str | Path, out: str | Path) -> Path:
    """Write ``run_dir``'s usable explanations (``status == "ok"``) and detection scores to
    ``out`` in delphi's layout; ``out`` must not exist or be empty. The folder appears whole
    (written beside it, then renamed)."""
    run_dir, out = Path(run_dir), Path(out)
    coder = run_coder(run_dir)
    path = RunDir(run_dir).explanations
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run the explain stage or import explanations first"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    table = pl.read_parquet(path).filter(pl.col("status") == "ok").sort("latent")
    scores_path = RunDir(run_dir).scores
    scores = pl.read_parquet(scores_path) if scores_path.is_file() else None
    threshold = (
        _record(RunDir(run_dir).score_record).get("config", {}).get("threshold", 0.5)
        if scores is not None
        else 0.5
    )
    config = _record(RunDir(run_dir).config).get("config", {})
    models = table["model"].drop_nulls().unique().to_list()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        atomic_write_json(
            tmp / "run_config.json",
            {
                "model": config.get("collect", {}).get("model"),
                "sparse_model": str(coder.path.parent.absolute()),
                "hookpoints": [coder.hookpoint],
                "explainer_model": models[0] if len(models) == 1 else None,
                "name": run_dir.absolute().name,
            },
        )
        for latent, text in table.select("latent", "explanation").iter_rows():
            atomic_write_text(
                tmp / "explanations" / f"{coder.hookpoint}_latent{latent}.txt",
                json.dumps(text, ensure_ascii=False),
            )
        for row in scores.iter_rows(named=True) if scores is not None else ():
            records = [
                {
                    "activating": bool(label),
                    "prediction": None if _nan(p) else bool(p > threshold),
                    "probability": None if _nan(p) else float(p),
                    "correct": None if _nan(p) else bool(p > threshold) == bool(label),
                    "window": window,
                }
                for label, p, window in zip(
                    row["labels"],
                    row["probs"],
                    _padded(row["windows"], len(row["labels"])),
                    strict=True,
                )
            ]
            atomic_write_text(
                tmp / "scores" / "detection" / f"{coder.hookpoint}_latent{row['latent']}.txt",
                json.dumps(records),
            )
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _nan(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _padded(windows: list[int | None] | None, n: int) -> list[int | None]:
    windows = list(windows or [])
    return windows if len(windows) == n else [None] * n
