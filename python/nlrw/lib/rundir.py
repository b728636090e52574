"""The run directory: one name for every artifact a stage writes, and the small readers that
later stages use to look at earlier stages' records.

A stage reads an earlier stage's outputs through :class:`RunDir`, never by importing a later
stage or the pipeline, and never by spelling a path by hand. The layout (unchanged since run
format 2; old run directories resume)::

    config.json  .lock  stages/<stage>.json  .replaced/<stage>/      (the pipeline's)
    activations/{train,eval}/  activations/collect.json                (collect)
    transcoder/<hookpoint>/  transcoder/train.json                     (train)
    transcoder/recovery.json                                           (recovery)
    latents/{stats,top_windows,positions}.parquet  latents/cache.json  (cache)
    contexts.parquet  contexts/activations.safetensors  contexts.json  (contexts)
    explanations.parquet  explanations.parts/  explain.json            (explain)
    scores.parquet  scores.parts/  score.json                          (score)
    simulations[_shuffled][_positions].parquet  simulations.parts/
    simulate.json                                                      (simulate)
    calibration*.parquet  calibration.safetensors  calibrate.json      (calibrate)
    eval/  eval.json                                                   (evaluate)
    report/  report.json                                               (report)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["STAGE_FILES", "RunDir"]

STAGE_FILES: dict[str, tuple[str, ...]] = {
    "collect": ("activations",),
    "train": ("transcoder/*",),
    "recovery": ("transcoder/recovery.json",),
    "cache": ("latents",),
    "contexts": ("contexts.parquet", "contexts.json", "contexts"),
    "explain": ("explanations.parquet", "explain.json", "explanations.parts"),
    "score": ("scores.parquet", "score.json", "scores.parts"),
    "simulate": (
        "simulations.parquet",
        "simulations_shuffled.parquet",
        "simulations_positions.parquet",
        "simulations_shuffled_positions.parquet",
        "simulate.json",
        "simulations.parts",
    ),
    "calibrate": ("calibration*.parquet", "calibration.safetensors", "calibrate.json"),
    "evaluate": ("eval", "eval.json"),
    "report": ("report", "report.json"),
}
"""Everything each stage writes in the run directory (names or globs; folders whole)."""


class RunDir:
    """The paths of one run directory, by artifact (attributes are plain :class:`Path`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        r = self.root = Path(root)
        # the pipeline's own files
        self.config = r / "config.json"
        self.lock = r / ".lock"
        self.stages = r / "stages"
        self.replaced = r / ".replaced"
        # collect
        self.activations = r / "activations"
        self.collect_record = self.activations / "collect.json"
        # train, recovery
        self.transcoder = r / "transcoder"
        self.recovery_record = self.transcoder / "recovery.json"
        # cache
        self.latents = r / "latents"
        self.latent_stats = self.latents / "stats.parquet"
        self.top_windows = self.latents / "top_windows.parquet"
        self.cache_record = self.latents / "cache.json"
        # contexts
        self.contexts = r / "contexts.parquet"
        self.context_activations = r / "contexts" / "activations.safetensors"
        self.contexts_record = r / "contexts.json"
        # explain, score
        self.explanations = r / "explanations.parquet"
        self.explanations_parts = r / "explanations.parts"
        self.explain_record = r / "explain.json"
        self.scores = r / "scores.parquet"
        self.scores_parts = r / "scores.parts"
        self.score_record = r / "score.json"
        # simulate
        self.simulations = r / "simulations.parquet"
        self.simulations_shuffled = r / "simulations_shuffled.parquet"
        self.simulations_positions = r / "simulations_positions.parquet"
        self.simulations_shuffled_positions = r / "simulations_shuffled_positions.parquet"
        self.simulations_parts = r / "simulations.parts"
        self.simulate_record = r / "simulate.json"
        # calibrate
        self.calibration = r / "calibration.parquet"
        self.calibration_shuffled = r / "calibration_shuffled.parquet"
        self.calibrate_record = r / "calibrate.json"
        # evaluate, report
        self.eval = r / "eval"
        self.eval_record = r / "eval.json"
        self.report = r / "report"
        self.report_record = r / "report.json"

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def split(self, name: str) -> Path:
        """An activation shard set written by collect (``train`` or ``eval``)."""
        return self.activations / name

    def coder(self, hookpoint: str) -> Path:
        """The trained or adopted coder of ``hookpoint`` (sparsify's layout)."""
        return self.transcoder / hookpoint

    def stage_record(self, stage: str) -> Path:
        """``stages/<stage>.json``: the pipeline's done/running mark of one stage."""
        return self.stages / f"{stage}.json"

    def read_json(self, path: Path, *, stage: str) -> dict[str, Any]:
        """A JSON record, with a missing file named together with the stage that writes it."""
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{path} is missing: run the {stage} stage first (is {self.root} a run directory?)"
            ) from e

    def subject_model(self) -> str:
        """The subject model this run collected from (``activations/collect.json``)."""
        return str(self.read_json(self.collect_record, stage="collect")["config"]["model"])
