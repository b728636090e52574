"""The default corpus: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (its R
lazy-load database read with ``rdata``), one row per paragraph, cached as parquet; and the split
that holds one book out for evaluation."""

from __future__ import annotations

import gzip
import logging
import os
import re
import subprocess
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nlrw.assets.base import AssetError, cache_dir, public_mode
from nlrw.lib.io import atomic_path

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

AUSTEN_BOOKS: tuple[str, ...] = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
"""The six novels, as named in ``janeaustenr``, in order of publication."""

AUSTEN_HELD_OUT_BOOK = "persuasion"
"""The book :func:`split_held_out` holds out for evaluation: the last novel Austen completed
(83k words, about 12% of the corpus), so the held-out text is unseen in both training and
explanation contexts."""

_AUSTEN_DEB = "r-cran-janeaustenr"
_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
_CORPUS_FORMAT = 1
_HEADING = re.compile(r"^(chapter|volume)\s+([ivxlc]+|\d+)\.?$", re.IGNORECASE)
_CHAPTER = re.compile(r"^chapter\s", re.IGNORECASE)
_END_MARKS = frozenset({"the end", "finis"})
_EDITORIAL = "A NOTE ON THE TEXT"  # the Signet editors' note closing Northanger Abbey


def _paragraphs(lines: Sequence[str]) -> list[tuple[int, str]]:
    """Paragraphs of one book as ``(chapter, text)``.

    A paragraph is a run of consecutive non-empty lines, each stripped, joined with one space.
    Kept: the novel's text from the first chapter heading on. Dropped: the front matter before
    it (title, author, date; Northanger Abbey's advertisement), the chapter and volume headings
    themselves, paragraphs without a letter (``* * * * *``), the closing ``THE END``/``FINIS``,
    and the editors' note after ``A NOTE ON THE TEXT``. ``chapter`` counts chapter headings
    from 1 through the whole book (Emma's volumes do not restart it).
    """
    paras: list[str] = []
    cur: list[str] = []
    for line in [*lines, ""]:
        s = line.strip()
        if s:
            cur.append(s)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    out: list[tuple[int, str]] = []
    chapter = 0
    for p in paras:
        if p == _EDITORIAL:
            break
        if _HEADING.match(p):
            if _CHAPTER.match(p):
                chapter += 1
            continue
        if chapter == 0 or p.lower() in _END_MARKS or not re.search(r"[A-Za-z]", p):
            continue
        out.append((chapter, p))
    return out


def _read_lazyload(data_dir: Path) -> dict[str, list[str]]:
    """Read an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``) of character vectors."""
    import rdata

    def r_object(raw: bytes) -> Any:
        with warnings.catch_warnings():
            # The objects have no RDS/RDA magic: rdata says "Unknown file type: assumed RDS".
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = r_object(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    books: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        n = int.from_bytes(blob[:4], "big")
        raw = zlib.decompress(blob[4:])
        if len(raw) != n:
            raise AssetError(f"{data_dir}/Rdata.rdb: object {name!r} is corrupt")
        books[str(name)] = ["" if x is None else str(x) for x in r_object(raw)]
    return books


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise AssetError(
            f"{cmd[0]} not found: the Austen corpus comes from the Debian package {_AUSTEN_DEB}; "
            f"on a system without apt/dpkg, fetch its .deb and pass it as austen_corpus(source=...)"
        ) from e


def _download_deb(workdir: Path) -> Path:
    """``apt-get download`` the corpus .deb into ``workdir`` (``apt-get update`` once if needed)."""
    r = _run(["apt-get", "download", _AUSTEN_DEB], workdir)
    if r.returncode != 0:
        log.info("apt-get download failed (%s); running apt-get update once", r.stderr.strip())
        u = _run(["apt-get", "update"], workdir)
        r = _run(["apt-get", "download", _AUSTEN_DEB], workdir)
        if r.returncode != 0:
            raise AssetError(
                f"apt-get download {_AUSTEN_DEB} failed: {r.stderr.strip()}"
                + (f"; apt-get update also failed: {u.stderr.strip()}" if u.returncode else "")
                + ". Run `sudo apt-get update`, or fetch the .deb and pass it as"
                " austen_corpus(source=...)"
            )
    debs = sorted(workdir.glob(f"{_AUSTEN_DEB}_*.deb"))
    if not debs:
        raise AssetError(f"apt-get download {_AUSTEN_DEB} left no .deb in {workdir}")
    return debs[-1]


def _data_dir(source: Path, workdir: Path) -> Path:
    """The ``data`` directory holding ``Rdata.rdx``: from a .deb, an extracted tree or itself."""
    if source.is_file():
        r = _run(["dpkg", "-x", str(source), str(workdir / "x")], workdir)
        if r.returncode != 0:
            raise AssetError(f"dpkg -x {source} failed: {r.stderr.strip()}")
        source = workdir / "x"
    for cand in (source, source / _AUSTEN_DATA):
        if (cand / "Rdata.rdx").is_file() and (cand / "Rdata.rdb").is_file():
            return cand
    raise AssetError(f"no {_AUSTEN_DATA}/Rdata.rdx and Rdata.rdb under {source}")


def _corpus_table(books: dict[str, list[str]]) -> Any:
    import pyarrow as pa

    missing = [b for b in AUSTEN_BOOKS if b not in books]
    if missing:
        raise AssetError(f"the Austen data lack the books {missing} (found {sorted(books)})")
    text: list[str] = []
    book_col: list[str] = []
    chapter_col: list[int] = []
    para_col: list[int] = []
    for book in AUSTEN_BOOKS:
        for i, (chapter, p) in enumerate(_paragraphs(books[book])):
            text.append(p)
            book_col.append(book)
            chapter_col.append(chapter)
            para_col.append(i)
    return pa.table(
        {
            "text": pa.array(text, pa.string()),
            "book": pa.array(book_col, pa.string()),
            "chapter": pa.array(chapter_col, pa.int32()),
            "paragraph": pa.array(para_col, pa.int32()),
        }
    )


def _dataset(table: Any) -> Dataset:
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(table))


def austen_corpus(*, source: str | os.PathLike[str] | None = None) -> Dataset:
    """Jane Austen's six novels as a ``datasets.Dataset``, one row per paragraph.

    Columns: ``text`` (the paragraph, its lines joined with single spaces), ``book`` (one of
    :data:`AUSTEN_BOOKS`, rows in that order), ``chapter`` (1-based within the book) and
    ``paragraph`` (0-based index within the book, over the kept rows). Front matter, headings
    and end marks are dropped (see the rule in ``_paragraphs``): 9,994 rows, 716,715 words.

    The first call downloads Debian's ``r-cran-janeaustenr`` with ``apt-get download``
    (running ``apt-get update`` once if that fails), unpacks it with ``dpkg -x`` in a temporary
    directory under the cache, reads its R lazy-load database with ``rdata``, and caches the
    rows as ``cache_dir()/corpus/austen-v1.parquet`` (atomic); later calls read that file.

    Args:
        source: instead of downloading, a ``.deb`` of ``r-cran-janeaustenr``, an extracted
            package tree, or its ``data`` directory. The result is then not cached.
    """
    import pyarrow.parquet as pq

    cached = None
    if source is None:
        cached = cache_dir() / "corpus" / f"austen-v{_CORPUS_FORMAT}.parquet"
        if cached.is_file():
            return _dataset(pq.read_table(cached))
    base = cache_dir() / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="austen.", dir=base) as work:
        workdir = Path(work)
        src = _download_deb(workdir) if source is None else Path(source).expanduser()
        table = _corpus_table(_read_lazyload(_data_dir(src, workdir)))
    if cached is not None:
        with atomic_path(cached) as tmp:
            pq.write_table(table, tmp)
            public_mode(tmp)
    return _dataset(table)


def split_held_out(ds: Dataset, book: str = AUSTEN_HELD_OUT_BOOK) -> tuple[Dataset, Dataset]:
    """Split a corpus by book: ``(rows of every other book, rows of book)``, order kept.

    By default the held-out book is :data:`AUSTEN_HELD_OUT_BOOK`.

    Raises:
        ValueError: no row belongs to ``book``.
    """
    books = ds["book"]
    held = [i for i, b in enumerate(books) if b == book]
    if not held:
        raise ValueError(f"no rows of book {book!r} (books: {sorted(set(books))})")
    keep = set(held)
    rest = [i for i in range(len(books)) if i not in keep]
    return ds.select(rest), ds.select(held)
