"""The ``nlrw`` command line: one subcommand per stage, generated from typed functions.

Each subcommand is a plain function whose signature, config dataclass and docstrings become
its options and help text (tyro). ``nlrw run`` starts from a preset (``--preset``, default
``demo``) and takes any config value as an override, e.g. ``--collect.n-tokens 50000``.
Errors a user can fix (a bad path, a corrupt shard, an invalid option) are printed as one
``nlrw: error: ...`` line with exit status 2, not as a traceback.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import tyro

from nlrw import ShardError
from nlrw.cache import CacheConfig
from nlrw.calibrate import CalibrateConfig
from nlrw.collect import CollectConfig
from nlrw.contexts import ContextsConfig
from nlrw.evaluate import EvaluateConfig
from nlrw.explain import ExplainConfig
from nlrw.pipeline import RunConfig, load_preset, preset_names
from nlrw.report import ReportConfig
from nlrw.score import ScoreConfig
from nlrw.simulate import SimulateConfig
from nlrw.train import TrainConfig

# Config dataclasses appear without a prefix: `nlrw collect --n-tokens 1000`.
_Flat = tyro.conf.arg(name="")


def info() -> None:
    """Print nlrw's version, its dependencies' versions and what this machine offers."""
    import torch

    from nlrw import _core
    from nlrw.provenance import versions

    print(f"nlrw {metadata.version('nlrw')} (Rust core {_core.__version__})")
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    for package, version in versions().items():
        print(f"  {package:<13} {version}")
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch threads {torch.get_num_threads()}, CUDA devices {cuda}")


def shards_verify(path: Path, /) -> None:
    """Check every shard of an activation shard set against its manifest (checksums too)."""
    from nlrw.shards import ShardReader

    reader = ShardReader(path, batch_rows=1)
    reader.verify()
    print(f"{path}: {reader.num_rows} rows of width {reader.width} ({reader.dtype}), all shards ok")


def collect(cfg: Annotated[CollectConfig, _Flat], run_dir: Path, overwrite: bool = False) -> None:
    """Collect activations at a hookpoint into RUN_DIR/activations (resumes a killed run)."""
    from nlrw import collect as stage

    result = stage.run(cfg, run_dir, overwrite=overwrite)
    print(
        f"{result.n_train_tokens} train + {result.n_eval_tokens} eval tokens in {result.train_dir}"
    )


def train(
    cfg: Annotated[TrainConfig, _Flat],
    run_dir: Path,
    hookpoint: str = "model.layers.15.mlp",
    overwrite: bool = False,
) -> None:
    """Train a transcoder (or SAE) on RUN_DIR/activations into RUN_DIR/transcoder."""
    from nlrw.pipeline import train_transcoder

    print(train_transcoder(cfg, run_dir, hookpoint, overwrite))


def cache(
    cfg: Annotated[CacheConfig, _Flat],
    run_dir: Path,
    hookpoint: str = "model.layers.15.mlp",
    overwrite: bool = False,
) -> None:
    """Encode held-out activations with RUN_DIR's transcoder into RUN_DIR/latents: sparse
    latents, per-latent statistics and quantile tables, top activating windows."""
    from nlrw import cache as stage

    print(stage.run(cfg, run_dir, hookpoint=hookpoint, overwrite=overwrite))


def explain(cfg: Annotated[ExplainConfig, _Flat], run_dir: Path, overwrite: bool = False) -> None:
    """Explain RUN_DIR's cached latents with an LLM into RUN_DIR/explanations.parquet."""
    from nlrw import explain as stage

    table = stage.run(cfg, run_dir, overwrite=overwrite)
    print(table.select("latent", "status", "explanation"))


def score(cfg: Annotated[ScoreConfig, _Flat], run_dir: Path, overwrite: bool = False) -> None:
    """Detection-score RUN_DIR's explanations into RUN_DIR/scores.parquet."""
    from nlrw import score as stage

    table = stage.run(cfg, run_dir, overwrite=overwrite)
    print(table.select("latent", "balanced_accuracy", "shuffled_balanced_accuracy", "auroc"))


def contexts(cfg: Annotated[ContextsConfig, _Flat], run_dir: Path, overwrite: bool = False) -> None:
    """Draw RUN_DIR's evaluation and calibration contexts from held-out text
    (RUN_DIR/contexts.parquet) and store the transcoder's true latents on their last token."""
    from nlrw import contexts as stage

    table = stage.run(cfg, run_dir, overwrite=overwrite)
    print(table.group_by("split", maintain_order=True).len())


def simulate(
    cfg: Annotated[SimulateConfig, _Flat],
    run_dir: Path,
    overwrite: bool = False,
    merge: bool = False,
) -> None:
    """Simulate RUN_DIR's explained latents on its contexts with an LLM
    (RUN_DIR/simulations.parquet). With --shard i/n only part i runs; once every shard has
    finished, --merge (same options) writes the merged table.

    Args:
        merge: only merge the parts the shards wrote (names any that are missing).
    """
    from nlrw import simulate as stage

    table = stage.merge(cfg, run_dir) if merge else stage.run(cfg, run_dir, overwrite=overwrite)
    print(
        f"{table.height} (latent, context) prompts, {table['latent'].n_unique()} latents, "
        f"mean digit mass {table['digit_mass'].mean()}"
    )


def simulate_distributed(
    run_dir: Path,
    /,
    cfg: Annotated[SimulateConfig, _Flat],
    n_workers: int = 2,
    address: str | None = None,
    max_retries: int = 2,
    num_gpus_per_worker: float = 0.0,
) -> None:
    """Run the simulate stage on a Ray cluster (the nlrw[ray] extra): one worker process (a Ray
    actor with its own simulator) per shard i/N, Ray's retries for dead workers, then the parts
    merged into RUN_DIR/simulations.parquet. On several nodes RUN_DIR must be on a filesystem
    every node mounts at the same path.

    Args:
        n_workers: worker processes (Ray actors), one shard each.
        address: Ray cluster to join: auto (started by `ray start` on this machine), HOST:6379
            or ray://HOST:10001; omitted: a local Ray instance for this command.
        max_retries: restarts of a dead worker (its shard resumes from its finished parts).
        num_gpus_per_worker: GPUs each worker reserves (1: one worker per GPU).
    """
    from nlrw.distributed import simulate_distributed as run_distributed

    table = run_distributed(
        cfg,
        run_dir,
        n_workers=n_workers,
        address=address,
        max_retries=max_retries,
        num_gpus_per_worker=num_gpus_per_worker,
    )
    print(
        f"{table.height} (latent, context) prompts, {table['latent'].n_unique()} latents, "
        f"mean digit mass {table['digit_mass'].mean()}"
    )


def calibrate(
    cfg: Annotated[CalibrateConfig, _Flat], run_dir: Path, overwrite: bool = False
) -> None:
    """Calibrate RUN_DIR's simulated scores into activations (RUN_DIR/calibration.parquet)
    and measure each calibration against the true activations on the eval contexts."""
    import polars as pl

    from nlrw import calibrate as stage

    metrics = stage.run(cfg, run_dir, overwrite=overwrite)
    print(
        metrics.group_by("calibration", maintain_order=True).agg(
            pl.col("pearson", "specificity", "sensitivity", "auroc").fill_nan(None).mean()
        )
    )


def evaluate(
    cfg: Annotated[EvaluateConfig, _Flat],
    run_dir: Path,
    hookpoint: str | None = None,
    model: str | None = None,
    overwrite: bool = False,
) -> None:
    """Measure RUN_DIR's next-token CE with latents rewritten from their calibrated
    simulations (RUN_DIR/eval/), against clean, transcoder, zero-ablation and random-k.

    Args:
        hookpoint: where the coder is spliced (default: the run's collect hookpoint).
        model: the subject model (default: the run's collect model).
    """
    from nlrw import evaluate as stage
    from nlrw.pipeline import collected_config

    collected = collected_config(run_dir)
    summary = stage.run(
        cfg,
        run_dir,
        hookpoint=hookpoint or collected.hookpoint,
        model=model or collected.model,
        overwrite=overwrite,
    )
    print(
        summary.select(
            "condition",
            "calibration",
            "fraction",
            "choice",
            "mean_ce",
            "ci_low",
            "ci_high",
            "diff_vs_zero",
            "p_value",
        )
    )


_REPORT_DEFAULTS = ReportConfig()


def report(
    run_dir: Path,
    /,
    cfg: Annotated[ReportConfig, _Flat] = _REPORT_DEFAULTS,
    overwrite: bool = False,
) -> None:
    """Render RUN_DIR/report/: a self-contained index.html, report.md and the PNG figures."""
    from nlrw import report as stage

    print(stage.run(cfg, run_dir, overwrite=overwrite))


def status(run_dir: Path, /) -> None:
    """Print each stage's state in a run directory: done, partial, stale or not started."""
    from nlrw.pipeline import status as pipeline_status

    for s in pipeline_status(run_dir):
        took = f"{s.seconds:8.1f} s" if s.seconds is not None else " " * 10
        print(f"{s.name:<10} {s.state:<12} {took}  {s.detail}")


# --- explanations from and for other tools (nlrw.interop) ---------------------------------


def import_explanations(
    run_dir: Path,
    source: Path,
    /,
    hookpoint: str | None = None,
    explainer_model: str | None = None,
) -> None:
    """Import explanations (and detection scores) written elsewhere into RUN_DIR: SOURCE is
    a delphi results folder (run_config.json, explanations/<hookpoint>_latent<i>.txt,
    optionally scores/detection/) or a JSON object {"<latent>": "<explanation>"} for one
    hookpoint. `nlrw run` then keeps them and continues with the stages after them.

    Args:
        hookpoint: the JSON object's hookpoint, or which of a delphi run's hookpoints to
            import (default: the one of RUN_DIR's coder).
        explainer_model: the model that wrote the explanations (default: a delphi run's
            explainer_model).
    """
    from nlrw.interop import import_explanations as run_import

    done = run_import(run_dir, source, hookpoint=hookpoint, explainer_model=explainer_model)
    counts = done.explanations["status"].value_counts().sort("status").iter_rows()
    scored = f", detection scores of {done.scores.height}" if done.scores is not None else ""
    print(
        f"{run_dir}: imported {done.explanations.height} explanations "
        f"({', '.join(f'{n} {s}' for s, n in counts)}{scored}) of hookpoint "
        f"{done.provenance['hookpoint']!r} from {done.provenance['source']}"
    )


def export_explanations(run_dir: Path, out: Path, /) -> None:
    """Write RUN_DIR's explanations and detection scores to OUT in delphi's layout
    (run_config.json, explanations/, scores/detection/); import-explanations reads it back."""
    from nlrw.interop import export_explanations as run_export

    print(run_export(run_dir, out))


def _run_command(preset: str) -> Callable[..., None]:
    default = load_preset(preset)

    def run(
        cfg: Annotated[RunConfig, _Flat] = default,
        preset: str = preset,
        run_dir: Path | None = None,
        until: str | None = None,
        dry_run: bool = False,
    ) -> None:
        """Run the whole pipeline from a preset, skipping finished stages and resuming the
        rest. Override any preset value, e.g. --collect.n-tokens 50000.

        Args:
            preset: a shipped preset name or a TOML file (it sets the defaults shown here).
            run_dir: the run directory (default: runs/<preset>).
            until: stop after this stage.
            dry_run: print the resolved config and each stage's work size, run nothing.
        """
        from nlrw.pipeline import run as run_pipeline

        target = run_dir or Path("runs") / Path(preset).stem
        if dry_run:
            _print_plan(cfg, preset, target)
            return
        run_pipeline(cfg, target, until=until)

    run.__doc__ = (run.__doc__ or "") + f"\n        Shipped presets: {', '.join(preset_names())}."
    return run


def _print_plan(cfg: RunConfig, preset: str, run_dir: Path) -> None:
    import json

    from nlrw.pipeline import chained_hashes, work_sizes
    from nlrw.provenance import to_jsonable

    print(f"# preset {preset!r}, run directory {run_dir} (dry run: nothing is written)")
    print(json.dumps(to_jsonable(cfg), indent=2))
    hashes = chained_hashes(cfg)
    print("# work per stage")
    for name, size in work_sizes(cfg).items():
        print(f"{name:<10} {hashes[name]}  {size}")


def _preset_from_argv(argv: Sequence[str]) -> str:
    """The value of --preset (the run command's defaults depend on it)."""
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return "demo"


def commands(argv: Sequence[str]) -> dict[str, Callable[..., Any]]:
    """The subcommands, with ``run``'s defaults taken from the preset named in ``argv``."""
    return {
        "run": _run_command(_preset_from_argv(argv)),
        "status": status,
        "collect": collect,
        "train": train,
        "cache": cache,
        "contexts": contexts,
        "explain": explain,
        "score": score,
        "simulate": simulate,
        "simulate-distributed": simulate_distributed,
        "calibrate": calibrate,
        "evaluate": evaluate,
        "report": report,
        "import-explanations": import_explanations,
        "export-explanations": export_explanations,
        "info": info,
        "shards-verify": shards_verify,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nlrw`` console script and ``python -m nlrw``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        tyro.extras.subcommand_cli_from_dict(
            commands(args),
            prog="nlrw",
            description="Partially rewrite a transformer in natural language.",
            args=args,
        )
    except (
        ShardError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        ImportError,
        ConnectionError,
    ) as e:
        print(f"nlrw: error: {e}", file=sys.stderr)
        return 2
    return 0
