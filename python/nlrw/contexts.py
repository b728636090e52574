"""The ``contexts`` stage: the evaluation contexts of the rewriting experiment, and what the
transcoder really does on them.

**Where they come from.** ``source = "held-out"`` (nlrw's default): documents of the corpus's
held-out split that the ``collect`` stage did *not* read for its eval split (that split feeds
the latent cache, hence the explanations' examples); training documents never appear there.
``source = "from-cache"`` reproduces the paper: windows cut from the cache's own source
sequences (``activations/<cache.source>/tokens.npy``), the text the explanations were built
from.

**Sampling.** Documents are tokenized in the held-out visiting order (``collect``'s, seeded),
separated by the separator token, and cut into consecutive non-overlapping *sequences* of
``sequence_len`` tokens (for ``from-cache``: the cache's stored sequences). From sequence
``s`` one position ``w`` is drawn (``positions``): ``uniform`` (nlrw's default) from
``[ctx_len, sequence_len - 1]`` by ``numpy.random.default_rng([seed, s])``, each sequence's
draw independent of how many others there are; ``paper`` in the paper's range ``33..223``
(clipped to the sequence) from one ``numpy.random.default_rng(42)`` stream, one draw per
sequence in order (the authors' seed and range; their generator is not published); the
context is
``input_ids = seq[w - ctx_len : w]`` and ``target_id = seq[w]``, the token that follows it in
the source. The first ``n_contexts`` sequences give the ``eval`` split, the next
``n_calibration`` the ``calibration`` split (fits of the extra calibrations use only those).

**The marked token.** The last token of ``input_ids``: the simulator rates the latent there, and
the evaluation replaces the hookpoint's output at that position and scores ``target_id``.

**True activations.** The subject (float32) runs on each context up to the hookpoint; at the
last position the coder's input ``x`` (the MLP input for a transcoder, the hookpoint's output for
an SAE), the module's output ``y``, and the coder's top-k latents are stored in
``contexts/activations.safetensors``. These are the reference for calibration and metrics and
the "true values" of the evaluation.

Outputs: ``contexts.parquet`` (``context_id, split, input_ids, target_id, source, document,
offset``) and ``contexts/activations.safetensors``, written atomically with ``contexts.json``
(provenance) last: a run killed before that record re-runs the whole stage (it takes seconds).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import polars as pl
import torch

from nlrw.config.contexts import ContextsConfig
from nlrw.lib.io import atomic_path, atomic_write_json
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.lib.rundir import RunDir

__all__ = [
    "ContextActivations",
    "ContextsConfig",
    "load_context_activations",
    "read_contexts",
    "run",
    "true_activations",
]

_FORMAT = "nlrw.context_activations.v1"


class ContextActivations(NamedTuple):
    """What the subject and the coder do at the last position of each context (rows in
    ``context_id`` order)."""

    x: torch.Tensor
    """float32 ``[n, d_in]``: the coder's input."""
    y: torch.Tensor
    """float32 ``[n, d_out]``: the hookpoint module's real output."""
    values: torch.Tensor
    """float32 ``[n, k]``: the coder's true top-k latent values, descending."""
    indices: torch.Tensor
    """int64 ``[n, k]``: their latent ids."""


SCHEMA: dict[str, Any] = {
    "context_id": pl.Int32,
    "split": pl.String,
    "input_ids": pl.List(pl.Int32),
    "target_id": pl.Int32,
    "source": pl.String,
    "document": pl.Int64,
    "offset": pl.Int64,
}


def _paths(run_dir: Path) -> tuple[Path, Path, Path]:
    return (
        RunDir(run_dir).contexts,
        RunDir(run_dir).context_activations,
        RunDir(run_dir).contexts_record,
    )


# ------------------------------------------------------------------------ sequences


class _Sequence(NamedTuple):
    tokens: npt.NDArray[np.int32]
    documents: npt.NDArray[np.int64]
    """Per token: the document it comes from."""
    offsets: npt.NDArray[np.int64]
    """Per token: its position in that document (cache sequences: in the sequence)."""


def _held_out_sequences(run_dir: Path, collect_cfg: Any, length: int) -> Iterator[_Sequence]:
    """Consecutive ``length``-token sequences of the held-out documents collect left unread."""
    from nlrw.collect import load_corpus, separator_token_id
    from nlrw.model.subject import load_tokenizer

    record = json.loads(RunDir(run_dir).collect_record.read_text())
    eval_split = record["splits"].get("eval") or {}
    used = int(eval_split.get("documents_read", 0))
    tokenizer = load_tokenizer(collect_cfg.model)
    sep = separator_token_id(tokenizer)
    docs = load_corpus(collect_cfg).eval_documents()
    buffer = np.empty(0, np.int32)
    owners = np.empty(0, np.int64)
    offsets = np.empty(0, np.int64)
    for i, (index, text) in enumerate(docs):
        if i < used:  # read by collect's eval split: the cache (and explanations) saw it
            continue
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            continue
        n = len(ids) + 1
        buffer = np.concatenate([buffer, np.asarray(ids, np.int32), [sep]]).astype(np.int32)
        owners = np.concatenate([owners, np.full(n, index, np.int64)])
        offsets = np.concatenate([offsets, np.arange(n, dtype=np.int64)])
        while buffer.size >= length:
            yield _Sequence(buffer[:length].copy(), owners[:length], offsets[:length])
            buffer, owners, offsets = buffer[length:], owners[length:], offsets[length:]


def _cache_sequences(run_dir: Path) -> Iterator[_Sequence]:
    record_path = RunDir(run_dir).cache_record
    try:
        source = Path(json.loads(record_path.read_text())["activations"])
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"contexts.source = 'from-cache' needs the latent cache: {record_path} is missing "
            "(run the cache stage)"
        ) from e
    tokens = np.load(source / "tokens.npy", mmap_mode="r")
    documents = np.load(source / "documents.npy", mmap_mode="r")
    for s in range(tokens.shape[0]):
        n = tokens.shape[1]
        yield _Sequence(
            np.asarray(tokens[s], np.int32), np.full(n, documents[s]), np.arange(n, dtype=np.int64)
        )


def draw_position(sequence: int, seed: int, ctx_len: int, length: int) -> int:
    """Position ``w`` of the target token in a sequence: uniform in ``[ctx_len, length - 1]``
    from ``numpy.random.default_rng([seed, sequence])``."""
    rng = np.random.default_rng([seed, sequence])
    return int(rng.integers(ctx_len, length))


PAPER_POSITIONS = (33, 223)
"""The paper's range of window ends (inclusive) and its seed."""
PAPER_SEED = 42


def build_contexts(cfg: ContextsConfig, run_dir: Path, collect_cfg: Any) -> pl.DataFrame:
    """The ``contexts.parquet`` table (no model run)."""
    need = cfg.n_contexts + cfg.n_calibration
    if cfg.source == "held-out":
        sequences = _held_out_sequences(run_dir, collect_cfg, cfg.sequence_len)
    else:
        sequences = _cache_sequences(run_dir)
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMA}
    paper = np.random.default_rng(PAPER_SEED)
    for s, seq in enumerate(sequences):
        if s == need:
            break
        length = len(seq.tokens)
        if length <= cfg.ctx_len:
            raise ValueError(
                f"the cache's sequences hold {length} tokens, too short for contexts of "
                f"ctx_len = {cfg.ctx_len} plus their next token"
            )
        if cfg.positions == "paper":
            lo, hi = PAPER_POSITIONS
            w = min(int(paper.integers(lo, hi + 1)), length - 1)
            if w < cfg.ctx_len:
                raise ValueError(
                    f"contexts.positions = paper: position {w} of a {length}-token sequence "
                    f"leaves less than ctx_len = {cfg.ctx_len} tokens before it"
                )
        else:
            w = draw_position(s, cfg.seed, cfg.ctx_len, length)
        rows["context_id"].append(s)
        rows["split"].append("eval" if s < cfg.n_contexts else "calibration")
        rows["input_ids"].append(seq.tokens[w - cfg.ctx_len : w].tolist())
        rows["target_id"].append(int(seq.tokens[w]))
        rows["source"].append(cfg.source)
        rows["document"].append(int(seq.documents[w - cfg.ctx_len]))
        rows["offset"].append(int(seq.offsets[w - cfg.ctx_len]))
    found = len(rows["context_id"])
    if found < need:
        where = "held-out documents left after collect's eval split"
        if cfg.source == "from-cache":
            where = "sequences in the latent cache's source"
        raise ValueError(
            f"asked for {cfg.n_contexts} eval + {cfg.n_calibration} calibration contexts but "
            f"the {where} give only {found} sequences; lower contexts.n_contexts / "
            "contexts.n_calibration (or contexts.sequence_len)"
        )
    return pl.DataFrame(rows, schema=SCHEMA)


# ------------------------------------------------------------------------ activations


def context_activations(
    subject: Any, coder: Any, hookpoint: str, input_ids: torch.Tensor, batch_size: int
) -> ContextActivations:
    """Runs the subject up to ``hookpoint`` on ``input_ids`` ``[n, ctx_len]`` and encodes the
    last position with the coder (float32)."""
    from nlrw.model.subject import capture

    kind = coder.cfg.kind
    xs, ys, vals, idxs = [], [], [], []
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size].to(subject.device)
        acts = capture(subject.model, hookpoint, batch, kind="transcoder")
        assert acts.x is not None
        x_in, y = acts.x[:, -1].float(), acts.y[:, -1].float()
        x = x_in if kind == "transcoder" else y
        with torch.inference_mode():
            latents = coder.encode(x.to(coder.device, coder.dtype))
        xs.append(x.cpu())
        ys.append(y.cpu())
        vals.append(latents.values.float().cpu())
        idxs.append(latents.indices.long().cpu())
    return ContextActivations(torch.cat(xs), torch.cat(ys), torch.cat(vals), torch.cat(idxs))


# ------------------------------------------------------------------------ the stage


def _identity(cfg: ContextsConfig, run_dir: Path) -> dict[str, Any]:
    """What the outputs depend on: the config, the collection and the coder."""
    upstream: dict[str, Any] = {"config": cfg}
    for name in ("activations/collect.json", "latents/cache.json"):
        path = run_dir / name
        if path.is_file():
            upstream[name] = json.loads(path.read_text()).get("config_hash")
    return {"hash": config_hash(upstream)}


def run(cfg: ContextsConfig, run_dir: str | Path, *, overwrite: bool = False) -> pl.DataFrame:
    """Draw the contexts, run the subject and the coder on them, write the outputs.

    Skipped (the table is returned) when ``contexts.json`` records the same config and
    upstream; ``overwrite`` forces a re-run.
    """
    from nlrw.collect import collected_config
    from nlrw.model import sparse
    from nlrw.model.subject import load_subject

    run_dir = Path(run_dir)
    table_path, acts_path, record_path = _paths(run_dir)
    key = _identity(cfg, run_dir)["hash"]
    if not overwrite and record_path.is_file() and table_path.is_file() and acts_path.is_file():
        try:
            if json.loads(record_path.read_text()).get("identity") == key:
                return pl.read_parquet(table_path)
        except json.JSONDecodeError:
            pass
    record_path.unlink(missing_ok=True)

    collect_cfg = collected_config(run_dir)
    hookpoint = collect_cfg.hookpoint
    coder_path = RunDir(run_dir).coder(hookpoint)
    table = build_contexts(cfg, run_dir, collect_cfg)

    subject = load_subject(collect_cfg.model, dtype="float32", device=None)
    coder = sparse.load(coder_path, device=subject.device)
    ids = torch.tensor(table["input_ids"].to_list(), dtype=torch.long)
    acts = context_activations(subject, coder, hookpoint, ids, cfg.batch_size)
    if acts.x.shape[1] != coder.d_in:
        raise ValueError(
            f"the coder at {coder_path} reads {coder.d_in} features but the hookpoint "
            f"{hookpoint!r} gives {acts.x.shape[1]}"
        )

    from safetensors.torch import save_file

    acts_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(acts_path) as tmp:
        save_file(
            {
                "x": acts.x.contiguous(),
                "y": acts.y.contiguous(),
                "values": acts.values.contiguous(),
                "indices": acts.indices.to(torch.int32).contiguous(),
            },
            str(tmp),
            metadata={"format": _FORMAT, "hookpoint": hookpoint, "kind": coder.cfg.kind},
        )
    with atomic_path(table_path) as tmp:
        table.write_parquet(tmp)
    counts = {s: int(n) for s, n in table["split"].value_counts().iter_rows()}
    atomic_write_json(
        record_path,
        stage_record(
            "contexts",
            cfg,
            identity=key,
            hookpoint=hookpoint,
            coder=str(coder_path),
            kind=coder.cfg.kind,
            k=coder.k,
            num_latents=coder.num_latents,
            splits=counts,
            mean_active_latents=float((acts.values > 0).sum(1).float().mean()),
        ),
    )
    return table


# ------------------------------------------------------------------------ readers


def read_contexts(run_dir: str | Path, split: str | None = None) -> pl.DataFrame:
    """``contexts.parquet`` (only ``split``'s rows when given), checked for a usable shape."""
    path = _paths(Path(run_dir))[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the contexts stage first")
    try:
        table = pl.read_parquet(path)
    except Exception as e:  # polars raises several types for a damaged file
        raise ValueError(f"{path} is not a readable parquet file: {e}") from e
    missing = set(SCHEMA) - set(table.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}")
    lengths = table["input_ids"].list.len().unique().to_list()
    if len(lengths) != 1:
        raise ValueError(f"{path}: contexts of different lengths {sorted(lengths)}")
    if split is not None:
        if split not in ("eval", "calibration"):
            raise ValueError(f"split must be 'eval' or 'calibration', not {split!r}")
        table = table.filter(pl.col("split") == split)
    return table


def load_context_activations(run_dir: str | Path) -> ContextActivations:
    """``contexts/activations.safetensors`` as tensors (rows in ``context_id`` order)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _paths(Path(run_dir))[1]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the contexts stage first")
    try:
        t = load_file(str(path))
        return ContextActivations(t["x"], t["y"], t["values"], t["indices"].long())
    except (SafetensorError, KeyError, OSError) as e:
        raise ValueError(f"{path} is damaged or not a context-activations file: {e}") from e


def true_activations(
    run_dir: str | Path, latents: npt.ArrayLike, context_ids: npt.ArrayLike
) -> npt.NDArray[np.float32]:
    """Dense ``[len(latents), len(context_ids)]`` float32: each latent's true activation at
    the last position of each context (0 where it is not among the context's top k)."""
    acts = load_context_activations(run_dir)
    lat = np.asarray(latents, np.int64)
    ctx = np.asarray(context_ids, np.int64)
    n = acts.values.shape[0]
    if ctx.size and (ctx.min() < 0 or ctx.max() >= n):
        raise ValueError(f"context ids must be in [0, {n}), got {ctx.min()}..{ctx.max()}")
    values = acts.values.numpy()[ctx]  # [m, k]
    indices = acts.indices.numpy()[ctx]
    out = np.zeros((lat.size, ctx.size), np.float32)
    position = {int(latent): r for r, latent in enumerate(lat)}
    for c in range(ctx.size):
        for v, i in zip(values[c], indices[c], strict=True):
            r = position.get(int(i))
            if r is not None and v > 0:
                out[r, c] = v
    return out
