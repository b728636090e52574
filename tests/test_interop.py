"""Importing explanations from delphi folders and JSON objects, exporting in delphi's layout.

Every run directory here is a real smoke run (tiny random subject, trained coder, cache,
contexts), built once and copied per test; the sources are hand-made folders and files in
the layouts delphi and EleutherAI's explanation sets use.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from nlrw import explain, score
from nlrw.cli import main
from nlrw.interop import (
    InteropError,
    export_explanations,
    import_explanations,
    run_coder,
    same_hookpoint,
)
from nlrw.pipeline import RunDirError, load_preset, run, status

HOOKPOINT = "model.layers.1.mlp"  # the smoke preset's
DELPHI_HOOKPOINT = "layers.1.mlp"  # delphi names modules from the base model
WIDTH = 256  # the smoke preset's train.num_latents


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run up to the contexts stage: a coder and a cache, no explanations yet."""
    path = tmp_path_factory.mktemp("base")
    run(load_preset("smoke"), path, until="contexts", log=lambda _: None)
    return path


@pytest.fixture
def run_dir(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "run"))


def active_latents(run_dir: Path, n: int = 3) -> list[int]:
    stats = pl.read_parquet(run_dir / "latents" / "stats.parquet")
    top = stats.filter(pl.col("count") > 0).sort("count", "latent", descending=[True, False])
    return top["latent"].head(n).to_list()


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def delphi_folder(
    root: Path,
    explanations: dict[int, Any],
    scores: dict[int, Any] | None = None,
    *,
    hookpoint: str = DELPHI_HOOKPOINT,
    config: dict[str, Any] | None = None,
) -> Path:
    """A delphi results folder as delphi's __main__ writes it."""
    write_json(
        root / "run_config.json",
        config
        if config is not None
        else {
            "model": "tiny-random-llama",
            "sparse_model": "EleutherAI/some-transcoder",
            "hookpoints": [hookpoint],
            "explainer_model": "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
            "explainer_provider": "offline",
            "max_latents": None,
        },
    )
    for latent, text in explanations.items():
        write_json(root / "explanations" / f"{hookpoint}_latent{latent}.txt", text)
    for latent, records in (scores or {}).items():
        write_json(root / "scores" / "detection" / f"{hookpoint}_latent{latent}.txt", records)
    return root


def detection(activating: list[bool], prediction: list[Any], probability=None) -> list[dict]:
    """Records as delphi's classifier writes them (str_tokens and activations cut short)."""
    probability = probability or [None] * len(activating)
    return [
        {
            "str_tokens": ["a", "b"],
            "activations": [0.0, 1.0],
            "distance": 0 if a else -1,
            "activating": a,
            "prediction": p,
            "probability": q,
            "correct": None if p is None else bool(p) == a,
        }
        for a, p, q in zip(activating, prediction, probability, strict=True)
    ]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------


def test_hookpoints_match_with_or_without_the_base_model_prefix() -> None:
    assert same_hookpoint("layers.6.mlp", "gpt_neox.layers.6.mlp")
    assert same_hookpoint("model.layers.1.mlp", "layers.1.mlp")
    assert same_hookpoint("model.layers.1.mlp", "model.layers.1.mlp")
    assert not same_hookpoint("layers.1.mlp", "model.layers.11.mlp")
    assert not same_hookpoint("layers.1.mlp", "model.layers.1.mlp.act")
    assert not same_hookpoint("mlp", "model.layers.1.mlp")


def test_a_delphi_folder_with_detection_scores_is_imported_and_the_run_continues(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    a, b, c = active_latents(run_dir)
    labels = [True, True, True, True, False, False, False, False]
    source = delphi_folder(
        tmp_path / "delphi",
        {a: 'The word "the" after a comma', b: "  Names of people  ", c: ""},
        {
            # Answered: activating 3 of 4 right, non-activating 2 of 3 (one prompt failed).
            a: detection(labels, [True, True, True, False, False, False, True, None]),
            # With log-probabilities: the AUROC reads them.
            b: detection(
                labels,
                [1, 1, 0, 0, 0, 0, 0, 0],
                [0.9, 0.8, 0.4, 0.3, 0.1, 0.2, 0.35, 0.05],
            ),
        },
    )
    assert main(["import-explanations", str(run_dir), str(source)]) == 0
    out = capsys.readouterr().out
    assert "imported 3 explanations (1 failed, 2 ok, detection scores of 2)" in out

    table = pl.read_parquet(run_dir / "explanations.parquet")
    assert set(explain.SCHEMA) < set(table.columns) and {"source", "imported_at"} < set(
        table.columns
    )
    rows = {r["latent"]: r for r in table.iter_rows(named=True)}
    assert sorted(rows) == sorted([a, b, c])
    assert rows[a]["explanation"] == 'The word "the" after a comma'
    assert rows[b]["explanation"] == "Names of people"
    assert (rows[a]["status"], rows[b]["status"], rows[c]["status"]) == ("ok", "ok", "failed")
    assert rows[a]["backend"] == "imported"
    assert rows[a]["model"] == "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
    assert rows[a]["source"] == str(source)

    scores = pl.read_parquet(run_dir / "scores.parquet")
    assert set(score.SCHEMA) < set(scores.columns)
    s = {r["latent"]: r for r in scores.iter_rows(named=True)}
    assert s[a]["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert (s[a]["n_activating"], s[a]["n_non_activating"]) == (4, 4)
    assert s[b]["balanced_accuracy"] == pytest.approx((2 / 4 + 4 / 4) / 2)
    # Every activating probability beats every non-activating one but 0.35 > 0.3.
    assert s[b]["auroc"] == pytest.approx(15 / 16)
    assert s[b]["probs"][:2] == [0.9, 0.8]

    states = {st.name: st.state for st in status(run_dir)}
    assert states["explain"] == states["score"] == "imported"
    assert json.loads((run_dir / "explain.json").read_text())["status"] == "imported"

    lines: list[str] = []
    run(load_preset("smoke"), run_dir, log=lines.append)
    assert f"[explain] imported from {source}, kept" in lines
    assert f"[score] imported from {source}, kept" in lines
    assert (run_dir / "report" / "index.html").is_file()
    # Imported explanations are never overwritten, and they are the ones simulated.
    assert_frame_equal(pl.read_parquet(run_dir / "explanations.parquet"), table)
    simulated = pl.read_parquet(run_dir / "simulations.parquet")["latent"].unique().sort()
    assert simulated.to_list() == sorted([a, b])
    assert [st.state for st in status(run_dir)].count("done") == len(status(run_dir)) - 2


def test_a_json_object_is_imported_scored_and_replaced_by_a_later_import(
    run_dir: Path, tmp_path: Path
) -> None:
    a, b, c = active_latents(run_dir)
    source = write_json(tmp_path / "explanations.json", {str(a): "Commas", str(b): "Verbs"})
    done = import_explanations(run_dir, source, explainer_model="some-explainer")
    assert done.scores is None
    assert done.explanations["model"].to_list() == ["some-explainer"] * 2

    lines: list[str] = []
    run(load_preset("smoke"), run_dir, log=lines.append)
    assert "[score] running" in lines  # the score stage scores the imported explanations
    scores = pl.read_parquet(run_dir / "scores.parquet")
    assert scores.select("latent", "explanation").rows() == sorted([(a, "Commas"), (b, "Verbs")])
    assert (run_dir / "report" / "index.html").is_file()

    # A second import replaces the first: what was computed from it is re-run.
    second = write_json(tmp_path / "second.json", {str(c): "Full stops"})
    import_explanations(run_dir, second)
    assert not (run_dir / "scores.parquet").exists()
    record = json.loads((run_dir / "stages" / "simulate.json").read_text())
    assert record["status"] == "invalidated"
    lines.clear()
    run(load_preset("smoke"), run_dir, log=lines.append)
    assert "[simulate] re-running (config changed)" in lines
    simulated = pl.read_parquet(run_dir / "simulations.parquet")["latent"].unique()
    assert simulated.to_list() == [c]


def test_imported_explanations_are_refused_once_the_coder_is_replaced(
    run_dir: Path, tmp_path: Path
) -> None:
    source = write_json(tmp_path / "e.json", {str(active_latents(run_dir)[0]): "Commas"})
    import_explanations(run_dir, source)
    cfg = load_preset("smoke")
    retrained = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, k=4))
    with pytest.raises(RunDirError, match="belongs to a coder the train stage has since replaced"):
        run(retrained, run_dir, rerun=True, log=lambda _: None)
    assert pl.read_parquet(run_dir / "explanations.parquet")["explanation"].to_list() == ["Commas"]


def test_export_then_import_round_trips(base: Path, tmp_path: Path) -> None:
    own = Path(shutil.copytree(base, tmp_path / "own"))
    run(load_preset("smoke"), own, until="score", log=lambda _: None)
    out = tmp_path / "delphi"
    assert main(["export-explanations", str(own), str(out)]) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["hookpoints"] == [HOOKPOINT]
    assert config["explainer_model"] == "tiny-random-llama"
    ours = pl.read_parquet(own / "explanations.parquet").filter(pl.col("status") == "ok")
    assert ours.height > 0
    files = sorted(p.name for p in (out / "explanations").iterdir())
    assert files == sorted(f"{HOOKPOINT}_latent{lat}.txt" for lat in ours["latent"])
    records = json.loads(next((out / "scores" / "detection").iterdir()).read_text())
    assert {"activating", "prediction", "probability", "window"} <= set(records[0])
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_explanations(own, out)

    other = Path(shutil.copytree(base, tmp_path / "other"))
    done = import_explanations(other, out)
    assert done.provenance["layout"] == "delphi"
    back = pl.read_parquet(other / "explanations.parquet")
    kept = ["latent", "explanation", "status"]
    assert_frame_equal(back.select(kept), ours.select(kept))
    columns = ["latent", "explanation", "balanced_accuracy", "auroc", "n_activating"]
    columns += ["n_non_activating", "windows", "labels", "probs"]
    assert_frame_equal(
        pl.read_parquet(other / "scores.parquet").select(columns),
        pl.read_parquet(own / "scores.parquet").select(columns),
    )


# --------------------------------------------------------------------------------------------
# Malformed sources: an error naming the file and the line, key or record; nothing written
# --------------------------------------------------------------------------------------------


def _delphi(**kw: Any):
    def make(root: Path, latents: list[int]) -> Path:
        a, b = latents[:2]
        explanations = kw.get("explanations", {a: "Commas", b: "Verbs"})
        return delphi_folder(root / "delphi", explanations, kw.get("scores"), **kw.get("opts", {}))

    return make


def _file(name: str, text: str):
    def make(root: Path, latents: list[int]) -> Path:
        folder = delphi_folder(root / "delphi", {latents[0]: "Commas"})
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        return folder

    return make


def _json(text: str):
    def make(root: Path, latents: list[int]) -> Path:
        path = root / "explanations.json"
        path.write_text(text.replace("A", str(latents[0])))
        return path

    return make


MALFORMED = {
    "hookpoint not the coder's": (
        _delphi(opts={"hookpoint": "layers.0.mlp"}),
        r"run_config.json: hookpoints \['layers.0.mlp'\] hold no match for the run's coder "
        r"at 'model.layers.1.mlp'",
    ),
    "width not the coder's": (
        _file(f"latents/{DELPHI_HOOKPOINT}/256_511.safetensors", ""),
        rf"latents/{DELPHI_HOOKPOINT}: the source's coder at '{DELPHI_HOOKPOINT}' has 512 "
        "latents, the run's coder at 'model.layers.1.mlp' has 256",
    ),
    "delphi latent out of range": (
        _delphi(explanations={3: "Commas", 300: "Verbs"}),
        rf"{DELPHI_HOOKPOINT}_latent300.txt: latent '300': latent 300 is out of range, the "
        r"run's coder at 'model.layers.1.mlp' has 256 latents \(0..255\)",
    ),
    "explanation not JSON": (
        _file(f"explanations/{DELPHI_HOOKPOINT}_latent7.txt", '"unterminated'),
        rf"{DELPHI_HOOKPOINT}_latent7.txt: line 1 column 1: Unterminated string",
    ),
    "explanation not a string": (
        _file(f"explanations/{DELPHI_HOOKPOINT}_latent7.txt", '["a"]'),
        rf"{DELPHI_HOOKPOINT}_latent7.txt: expected one JSON string, got list",
    ),
    "file name not delphi's": (
        _file("explanations/notes.md", "hi"),
        r"notes.md: not a delphi result file \(expected <hookpoint>_latent<i>.txt\)",
    ),
    "file of an unlisted hookpoint": (
        _file("explanations/layers.0.mlp_latent1.txt", '"x"'),
        r"layers.0.mlp_latent1.txt: hookpoint 'layers.0.mlp' is not among run_config.json's",
    ),
    "run_config not JSON": (
        _file("run_config.json", '{\n  "hookpoints": [,]\n}'),
        r"run_config.json: line 2 column 18: Expecting value",
    ),
    "run_config without hookpoints": (
        _delphi(opts={"config": {"model": "m"}}),
        r"run_config.json: key 'hookpoints' must be a list of strings, got None",
    ),
    "detection not a list": (
        _delphi(scores={"A": {"activating": True}}),
        r"_latentA.txt: expected a JSON list of records, got dict",
    ),
    "detection label not a bool": (
        _delphi(scores={"A": [{"activating": True}, {"activating": "yes"}]}),
        r"_latentA.txt: record 1: 'activating' must be true or false, got 'yes'",
    ),
    "detection probability out of [0, 1]": (
        _delphi(scores={"A": [{"activating": True, "prediction": 1, "probability": 1.5}]}),
        r"_latentA.txt: record 0: 'probability' must be a number in \[0, 1\] or null, got 1.5",
    ),
    "detection of an unexplained latent": (
        _delphi(scores={"C": [{"activating": True, "prediction": True}]}),
        r"_latentC.txt: detection scores of latent C, which has no explanation",
    ),
    "json latent out of range": (
        _json('{"A": "Commas", "256": "Verbs"}'),
        r"explanations.json: key '256': latent 256 is out of range",
    ),
    "json key not a latent": (
        _json('{"A": "Commas", "abc": "Verbs"}'),
        r"explanations.json: key 'abc' is not a latent id",
    ),
    "json value not a string": (
        _json('{"A": 5}'),
        r"explanations.json: key 'A': the explanation must be a JSON string, got int",
    ),
    "json key twice": (
        _json('{"A": "Commas", "A": "Verbs"}'),
        r"explanations.json: key 'A' appears twice",
    ),
    "json two keys, one latent": (
        _json('{"A": "Commas", "0A": "Verbs"}'),
        r"explanations.json: keys 'A' and '0A' are both latent A",
    ),
    "json not an object": (
        _json('["Commas"]'),
        r"explanations.json: expected one JSON object .* got list",
    ),
    "json syntax": (
        _json('{\n  "A": "Commas",\n  "B" "Verbs"\n}'),
        r"explanations.json: line 3 column 7: Expecting ':' delimiter",
    ),
    "json empty": (_json("{}"), r"explanations.json: the object holds no explanations"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_sources_name_the_fault_and_write_nothing(
    run_dir: Path, tmp_path: Path, case: str
) -> None:
    make, match = MALFORMED[case]
    latents = active_latents(run_dir)
    source = make(tmp_path, latents)
    # Placeholders: A is the first explained latent, C one without an explanation.
    ids = {"A": str(latents[0]), "C": str(latents[2])}
    for path in list(source.rglob("*")) if source.is_dir() else ():
        for key, value in ids.items():
            if f"latent{key}" in path.name:
                path.rename(path.with_name(path.name.replace(f"latent{key}", f"latent{value}")))
    for key, value in ids.items():
        for form in ("latent{}", "latent {}", "'{}'", "'0{}'"):
            match = match.replace(form.format(key), form.format(value))
    before = snapshot(run_dir)
    with pytest.raises(InteropError, match=match):
        import_explanations(run_dir, source)
    assert snapshot(run_dir) == before


def test_the_cli_reports_a_malformed_source_in_one_line(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    bad = write_json(tmp_path / "e.json", {"999": "Commas"})
    assert main(["import-explanations", str(run_dir), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latent 999 is out of range" in err
    assert not (run_dir / "explanations.parquet").exists()


def test_a_json_object_of_another_hookpoint_or_without_a_coder_is_refused(
    run_dir: Path, tmp_path: Path
) -> None:
    source = write_json(tmp_path / "e.json", {"1": "Commas"})
    with pytest.raises(InteropError, match=r"hookpoint .model.layers.0.mlp., but the run.s coder"):
        import_explanations(run_dir, source, hookpoint="model.layers.0.mlp")
    with pytest.raises(FileNotFoundError, match="is it a run directory"):
        import_explanations(tmp_path / "nothing", source)
    assert run_coder(run_dir).num_latents == WIDTH
