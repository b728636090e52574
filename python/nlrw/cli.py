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
import types
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import tyro

from nlrw import ShardError
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
from nlrw.lib.rundir import RunDir
from nlrw.pipeline import RunConfig, load_preset, preset_names

# Config dataclasses appear without a prefix: `nlrw collect --n-tokens 1000`.
_Flat = tyro.conf.arg(name="")
_RunDir = Annotated[Path, tyro.conf.arg(metavar="RUN_DIR", help="the run directory")]


def info() -> None:
    """Print nlrw's version, its dependencies' versions and what this machine offers."""
    import torch

    from nlrw import _core
    from nlrw.lib.provenance import versions

    print(f"nlrw {metadata.version('nlrw')} (Rust core {_core.__version__})")
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    for package, version in versions().items():
        print(f"  {package:<13} {version}")
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch threads {torch.get_num_threads()}, CUDA devices {cuda}")


def shards_verify(path: Path, /) -> None:
    """Check every shard of an activation shard set against its manifest (checksums too)."""
    from nlrw.model.shards import ShardReader

    reader = ShardReader(path, batch_rows=1)
    reader.verify()
    print(f"{path}: {reader.num_rows} rows of width {reader.width} ({reader.dtype}), all shards ok")


# --- stage subcommands ---------------------------------------------------------------------
#
# `nlrw STAGE RUN_DIR [options]` runs one stage with the run's own config (RUN_DIR/config.json,
# the demo preset's for a new directory) for everything not given, under the run lock, and
# records it as `nlrw run` does; a change to a stage already run is refused unless --overwrite.
# The defaults tyro shows are the run's: `commands` fills them in from the RUN_DIR it finds in
# argv (see `_with_defaults`).

_DEMO = load_preset("demo")


def _stage(name: str, cfg: Any, run_dir: Path, overwrite: bool) -> Any:
    from nlrw.pipeline import run_stage

    _check_defaults(run_dir)
    return run_stage(name, cfg, run_dir, overwrite=overwrite)


def _print_summary(summary: Any) -> None:
    import json

    from nlrw.lib.provenance import to_jsonable

    if summary is not None:
        print(json.dumps(to_jsonable(summary), indent=1))


def collect(
    run_dir: _RunDir,
    /,
    cfg: Annotated[CollectConfig, _Flat] = _DEMO.collect,
    overwrite: bool = False,
) -> None:
    """Collect activations at a hookpoint into RUN_DIR/activations (resumes a killed run).

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("collect", cfg, run_dir, overwrite))


def train(
    run_dir: _RunDir, /, cfg: Annotated[TrainConfig, _Flat] = _DEMO.train, overwrite: bool = False
) -> None:
    """Train a transcoder (or SAE) on RUN_DIR/activations into RUN_DIR/transcoder, at the
    run's collect hookpoint.

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("train", cfg, run_dir, overwrite))


def recovery(
    run_dir: _RunDir,
    /,
    cfg: Annotated[RecoveryConfig, _Flat] = _DEMO.recovery,
    overwrite: bool = False,
) -> None:
    """Measure the loss recovered by RUN_DIR's transcoder spliced into the subject model
    (RUN_DIR/transcoder/recovery.json).

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("recovery", cfg, run_dir, overwrite))


def cache(
    run_dir: _RunDir, /, cfg: Annotated[CacheConfig, _Flat] = _DEMO.cache, overwrite: bool = False
) -> None:
    """Encode held-out activations with RUN_DIR's transcoder into RUN_DIR/latents: sparse
    latents, per-latent statistics and quantile tables, top activating windows.

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("cache", cfg, run_dir, overwrite))


def contexts(
    run_dir: _RunDir,
    /,
    cfg: Annotated[ContextsConfig, _Flat] = _DEMO.contexts,
    overwrite: bool = False,
) -> None:
    """Draw RUN_DIR's evaluation and calibration contexts from held-out text
    (RUN_DIR/contexts.parquet) and store the transcoder's true latents on their last token.

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("contexts", cfg, run_dir, overwrite))


def explain(
    run_dir: _RunDir,
    /,
    cfg: Annotated[ExplainConfig, _Flat] = _DEMO.explain,
    overwrite: bool = False,
) -> None:
    """Explain RUN_DIR's cached latents with an LLM into RUN_DIR/explanations.parquet.

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("explain", cfg, run_dir, overwrite))


def score(
    run_dir: _RunDir, /, cfg: Annotated[ScoreConfig, _Flat] = _DEMO.score, overwrite: bool = False
) -> None:
    """Detection-score RUN_DIR's explanations into RUN_DIR/scores.parquet.

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("score", cfg, run_dir, overwrite))


def simulate(
    run_dir: _RunDir,
    /,
    cfg: Annotated[SimulateConfig, _Flat] = _DEMO.simulate,
    overwrite: bool = False,
    merge: bool = False,
) -> None:
    """Simulate RUN_DIR's explained latents on its contexts with an LLM
    (RUN_DIR/simulations.parquet). With --shard i/n only part i runs (without the run lock,
    so that the shards run side by side, and without a stage record); once every shard has
    finished, --merge (same options) writes the merged table.

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
        merge: only merge the parts the shards wrote (names any that are missing).
    """
    if cfg.shard is None and not merge:
        _print_summary(_stage("simulate", cfg, run_dir, overwrite))
        return
    from nlrw import simulate as stage

    _check_defaults(run_dir)
    table = stage.merge(cfg, run_dir) if merge else stage.run(cfg, run_dir, overwrite=overwrite)
    print(
        f"{table.height} (latent, context) prompts, {table['latent'].n_unique()} latents, "
        f"mean digit mass {table['digit_mass'].mean()}"
    )


def simulate_distributed(
    run_dir: _RunDir,
    /,
    cfg: Annotated[SimulateConfig, _Flat] = _DEMO.simulate,
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
    from nlrw.simulate_ray import simulate_distributed as run_distributed

    _check_defaults(run_dir)
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
    run_dir: _RunDir,
    /,
    cfg: Annotated[CalibrateConfig, _Flat] = _DEMO.calibrate,
    overwrite: bool = False,
) -> None:
    """Calibrate RUN_DIR's simulated scores into activations (RUN_DIR/calibration.parquet)
    and measure each calibration against the true activations on the eval contexts.

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("calibrate", cfg, run_dir, overwrite))


def evaluate(
    run_dir: _RunDir,
    /,
    cfg: Annotated[EvaluateConfig, _Flat] = _DEMO.evaluate,
    overwrite: bool = False,
) -> None:
    """Measure RUN_DIR's next-token CE with latents rewritten from their calibrated
    simulations (RUN_DIR/eval/), against clean, transcoder, zero-ablation and random-k, with
    the subject model and hookpoint of the run's collect stage.

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("evaluate", cfg, run_dir, overwrite))


def report(
    run_dir: _RunDir,
    /,
    cfg: Annotated[ReportConfig, _Flat] = _DEMO.report,
    overwrite: bool = False,
) -> None:
    """Render RUN_DIR/report/: a self-contained index.html, report.md and the PNG figures.

    Args:
        overwrite: redo the stage (replacing its outputs) if it was run with other options.
    """
    _print_summary(_stage("report", cfg, run_dir, overwrite))


def status(run_dir: Path, /) -> None:
    """Print each stage's state in a run directory: done, partial, stale, damaged,
    replacing, imported or not started."""
    from nlrw.pipeline import status as pipeline_status

    for s in pipeline_status(run_dir):
        took = f"{s.seconds:8.1f} s" if s.seconds is not None else " " * 10
        print(f"{s.name:<10} {s.state:<12} {took}  {s.detail}")


def verify(run_dir: _RunDir, /) -> None:
    """Check every finished stage's outputs in full against its record: each file present,
    of its size and digest when written. A damaged stage is an error naming its file;
    `nlrw run RUN_DIR` redoes it and the stages after it."""
    import json

    from nlrw.pipeline import STAGES
    from nlrw.pipeline import status as pipeline_status
    from nlrw.pipeline import verify as verify_run

    problems = verify_run(run_dir)
    states = {s.name: s.state for s in pipeline_status(run_dir)}
    damaged = dict(problems)
    for stage in STAGES:
        state = states[stage.name]
        if state == "done":
            record = json.loads(RunDir(run_dir).stage_record(stage.name).read_text())
            state = "ok" if "outputs" in record else "no outputs recorded (`nlrw run` adds them)"
        print(f"{stage.name:<10} {damaged.get(stage.name, state)}")
    if problems:
        listed = "; ".join(f"{name}: {problem}" for name, problem in problems)
        raise ValueError(
            f"{run_dir}: {len(problems)} damaged stage{'s' * (len(problems) != 1)} ({listed}); "
            f"`nlrw run --run-dir {run_dir}` redoes them and what follows"
        )


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


# --- defaults from the run directory --------------------------------------------------------
#
# tyro needs every default before it parses, and a run's defaults are in RUN_DIR/config.json:
# so `commands` finds RUN_DIR in argv first (`_run_dir_from_argv`). Each command then checks
# that the RUN_DIR tyro parsed is the one its defaults came from (`_check_defaults`); if argv
# was read wrongly it raises `_Reparse` and `main` parses again with the right one.


class _Reparse(Exception):
    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


_defaults_from: list[Path | None] = [None]
"""The config.json the parsed command's defaults came from (None: the demo preset's)."""


def _config_of(run_dir: Path | None) -> Path | None:
    path = None if run_dir is None else RunDir(run_dir).config
    return path.resolve() if path is not None and path.is_file() else None


def _check_defaults(run_dir: Path) -> None:
    if _config_of(run_dir) != _defaults_from[0]:
        raise _Reparse(run_dir)


def _option_value(argv: Sequence[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _run_dir_from_argv(argv: Sequence[str]) -> Path | None:
    """RUN_DIR of a stage subcommand: the first positional argument holding a config.json
    (tyro's own parse is checked against it)."""
    for arg in argv[1:]:
        if not arg.startswith("-") and (Path(arg) / "config.json").is_file():
            return Path(arg)
    return None


def _with_defaults(command: Callable[..., Any], cfg: Any) -> Callable[..., Any]:
    """A copy of a stage subcommand whose ``cfg`` default is ``cfg`` (the run's)."""
    defaults = command.__defaults__ or ()
    copy = types.FunctionType(
        command.__code__, command.__globals__, command.__name__, (cfg, *defaults[1:])
    )
    copy.__doc__, copy.__qualname__ = command.__doc__, command.__qualname__
    copy.__annotations__, copy.__module__ = dict(command.__annotations__), command.__module__
    return copy


def _run_command(argv: Sequence[str], known_run_dir: Path | None) -> Callable[..., None]:
    from nlrw.pipeline import load_run_config

    named = _preset_from_argv(argv)
    given = known_run_dir or _option_value(argv, "--run-dir", "--run_dir")
    guess = Path(given) if given else Path("runs") / Path(named or "demo").stem
    from_run = None if named is not None or not argv else load_run_config(guess)
    default = from_run or load_preset(named or "demo")
    _defaults_from[0] = _config_of(guess) if from_run is not None else None

    def run(
        cfg: Annotated[RunConfig, _Flat] = default,
        preset: str | None = named,
        run_dir: Path | None = None,
        until: str | None = None,
        dry_run: bool = False,
        rerun: bool = False,
    ) -> None:
        """Run the whole pipeline, skipping finished stages and resuming the rest. A new run
        starts from a preset (demo by default); an existing run directory resumes with its
        own config.json. Override any value, e.g. --collect.n-tokens 50000; an override or
        --preset that changes a stage the run has already run is refused (listing them)
        unless --rerun.

        Args:
            preset: a shipped preset name or a TOML file (it sets the defaults shown here);
                default: the run directory's config.json if it has one, else demo.
            run_dir: the run directory (default: runs/<preset>).
            until: stop after this stage.
            dry_run: print the resolved config and each stage's work size, run nothing.
            rerun: redo the stages the given options or preset change (their outputs are
                replaced).
        """
        from nlrw.pipeline import run as run_pipeline

        target = run_dir or Path("runs") / Path(preset or "demo").stem
        if preset is None and _config_of(target) != _defaults_from[0]:
            raise _Reparse(target)
        if dry_run:
            _print_plan(cfg, preset or str(target / "config.json"), target)
            return
        run_pipeline(cfg, target, until=until, rerun=rerun)

    run.__doc__ = (run.__doc__ or "") + f"\n        Shipped presets: {', '.join(preset_names())}."
    return run


def _print_plan(cfg: RunConfig, preset: str, run_dir: Path) -> None:
    import json

    from nlrw.lib.provenance import to_jsonable
    from nlrw.pipeline import chained_hashes, changed_stages, work_sizes

    print(f"# preset {preset!r}, run directory {run_dir} (dry run: nothing is written)")
    print(json.dumps(to_jsonable(cfg), indent=2))
    hashes = chained_hashes(cfg)
    print("# work per stage")
    for name, size in work_sizes(cfg).items():
        print(f"{name:<10} {hashes[name]}  {size}")
    changed = changed_stages(cfg, run_dir) if run_dir.is_dir() else []
    if changed:
        names = ", ".join(name for name, _, _ in changed)
        print(f"# stages of {run_dir} this config changes (refused without --rerun): {names}")


def _preset_from_argv(argv: Sequence[str]) -> str | None:
    """The value of --preset (the run command's defaults depend on it), None if not given."""
    return _option_value(argv, "--preset")


_STAGE_COMMANDS: dict[str, tuple[str, Callable[..., Any]]] = {
    "collect": ("collect", collect),
    "train": ("train", train),
    "recovery": ("recovery", recovery),
    "cache": ("cache", cache),
    "contexts": ("contexts", contexts),
    "explain": ("explain", explain),
    "score": ("score", score),
    "simulate": ("simulate", simulate),
    "simulate-distributed": ("simulate", simulate_distributed),
    "calibrate": ("calibrate", calibrate),
    "evaluate": ("evaluate", evaluate),
    "report": ("report", report),
}
"""Subcommand: (the stage whose config it takes, the function)."""


def commands(
    argv: Sequence[str], known_run_dir: Path | None = None
) -> dict[str, Callable[..., Any]]:
    """The subcommands. ``run``'s defaults come from the preset named in ``argv``, else from
    the run directory's config.json, else the demo preset; a stage subcommand's from its
    RUN_DIR's config.json, else the demo preset (``known_run_dir``: RUN_DIR as parsed)."""
    from nlrw.pipeline import load_run_config

    subcommand = argv[0] if argv else ""
    # For any other subcommand, run's defaults only feed the help text: the demo preset's.
    run = _run_command(argv, known_run_dir) if subcommand == "run" else _run_command([], None)
    stage_commands = dict(_STAGE_COMMANDS)
    if subcommand in _STAGE_COMMANDS:
        run_dir = known_run_dir or _run_dir_from_argv(argv)
        base = load_run_config(run_dir) if run_dir is not None else None
        _defaults_from[0] = _config_of(run_dir) if base is not None else None
        stage, command = _STAGE_COMMANDS[subcommand]
        stage_commands[subcommand] = (stage, _with_defaults(command, getattr(base or _DEMO, stage)))
    return {
        "run": run,
        "status": status,
        **{name: command for name, (_, command) in stage_commands.items()},
        "import-explanations": import_explanations,
        "export-explanations": export_explanations,
        "info": info,
        "shards-verify": shards_verify,
        "verify": verify,
    }


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (a path, a device, a server, a damaged file, a bad option):
    printed as one line. Anything else is a bug and keeps its traceback."""
    from polars.exceptions import PolarsError

    from nlrw.backends.base import BackendError

    return (ShardError, OSError, ValueError, ImportError, BackendError, PolarsError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nlrw`` console script and ``python -m nlrw``.

    A user error ends as one ``nlrw: error: ...`` line and exit status 2; ``--debug``
    (anywhere in the arguments) shows its traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    known_run_dir: Path | None = None
    try:
        for _ in range(2):
            try:
                tyro.extras.subcommand_cli_from_dict(
                    commands(args, known_run_dir),
                    prog="nlrw",
                    description="Partially rewrite a transformer in natural language. "
                    "--debug (with any subcommand) shows the traceback of an error.",
                    args=args,
                )
                return 0
            except _Reparse as again:  # argv's RUN_DIR was read wrongly: parse with tyro's
                known_run_dir = again.run_dir
        raise AssertionError("the run directory's defaults did not settle")
    except KeyboardInterrupt:
        if debug:
            raise
        print("nlrw: interrupted (finished parts are kept; run again to resume)", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        # A stage module's advice names its Python argument; on the command line it is a flag.
        flag = "--rerun" if args[:1] == ["run"] else "--overwrite"
        message = message.replace("overwrite=True", flag)
        print(f"nlrw: error: {message}", file=sys.stderr)
        return 2
