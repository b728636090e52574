"""Tests of the activation shards (``nlrw.model.shards``): round trips, shuffling, and every kind of
bad input: wrong arrays given to the writer, damaged or inconsistent sets given to the reader,
and a writer killed by a signal."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from nlrw import ShardError
from nlrw.model.shards import ShardReader, ShardWriter, to_torch

HERE = Path(__file__).resolve().parent


def rows_with_ids(start: int, n: int, width: int) -> np.ndarray:
    """float32 rows whose first column is the row id, so order and identity are visible."""
    rows = np.random.default_rng(start).standard_normal((n, width), dtype=np.float32)
    rows[:, 0] = np.arange(start, start + n)
    return rows


def write_set(path: Path, data: np.ndarray, rows_per_shard: int, **kw: object) -> None:
    with ShardWriter(path, width=data.shape[1], rows_per_shard=rows_per_shard, **kw) as w:  # type: ignore[arg-type]
        # Uneven pieces: a partial shard, then several full shards from one call, then the rest.
        for piece in np.split(data, [3, 3 + 2 * rows_per_shard + 1]):
            if len(piece):
                w.write(piece)


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def shard_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != "manifest.json")


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("batch_rows", [1, 5, 8, 13, 1000])
def test_roundtrip_in_order(tmp_path: Path, batch_rows: int) -> None:
    data = rows_with_ids(0, 61, 7)
    write_set(tmp_path, data, rows_per_shard=8)
    m = manifest(tmp_path)
    assert m["format"] == "nlrw-shards" and m["version"] == 1 and m["complete"]
    assert (m["width"], m["dtype"], m["rows_per_shard"], m["total_rows"]) == (7, "float32", 8, 61)
    assert [s["rows"] for s in m["shards"]] == [8] * 7 + [5]
    assert all(s["file"].endswith(".safetensors") and len(s["xxh3"]) == 16 for s in m["shards"])

    reader = ShardReader(tmp_path, batch_rows=batch_rows)
    batches = list(reader)
    assert len(batches) == len(reader) == -(-61 // batch_rows)
    assert reader.num_rows == 61 and reader.num_shards == 8 and reader.complete
    assert all(b.dtype == np.float32 and b.shape[1] == 7 for b in batches)
    assert all(len(b) == batch_rows for b in batches[:-1])
    np.testing.assert_array_equal(np.concatenate(batches), data)
    # A second pass gives the same again.
    np.testing.assert_array_equal(np.concatenate(list(reader)), data)


def test_drop_last(tmp_path: Path) -> None:
    data = rows_with_ids(0, 30, 4)
    write_set(tmp_path, data, rows_per_shard=8)
    batches = list(ShardReader(tmp_path, batch_rows=7, drop_last=True))
    assert [len(b) for b in batches] == [7, 7, 7, 7]
    assert len(ShardReader(tmp_path, batch_rows=7, drop_last=True)) == 4
    np.testing.assert_array_equal(np.concatenate(batches), data[:28])


def test_shards_are_plain_safetensors(tmp_path: Path) -> None:
    data = rows_with_ids(0, 20, 5)
    write_set(tmp_path, data, rows_per_shard=8)
    tensors = load_file(str(tmp_path / "shard-000001.safetensors"))
    assert list(tensors) == ["activations"]
    np.testing.assert_array_equal(tensors["activations"], data[8:16])


def test_half_dtypes_and_torch(tmp_path: Path) -> None:
    f16 = rows_with_ids(0, 9, 4).astype(np.float16)
    with ShardWriter(tmp_path / "f16", width=4, dtype="float16", rows_per_shard=4) as w:
        w.write(f16)
    out = np.concatenate(list(ShardReader(tmp_path / "f16", batch_rows=3)))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, f16)

    bf16 = torch.randn(11, 6).to(torch.bfloat16)
    with ShardWriter(tmp_path / "bf16", width=6, dtype=torch.bfloat16, rows_per_shard=4) as w:
        w.write(bf16[:5])
        w.write(bf16[5:].view(torch.int16).numpy().view(np.uint16))  # uint16 bit patterns
    batches = list(ShardReader(tmp_path / "bf16", batch_rows=4))
    assert all(b.dtype == np.uint16 for b in batches)
    back = torch.cat([to_torch(b, "bfloat16") for b in batches])
    assert back.dtype == torch.bfloat16
    assert torch.equal(back, bf16)
    assert torch.equal(to_torch(out, "float16"), torch.from_numpy(f16))
    with pytest.raises(TypeError, match="float32"):
        to_torch(out, "float32")


def test_batches_are_writable_copies_on_write(tmp_path: Path) -> None:
    data = rows_with_ids(0, 16, 3)
    write_set(tmp_path, data, rows_per_shard=8)
    for batch in ShardReader(tmp_path, batch_rows=4):
        batch[:] = -1  # views of the private mapping: allowed, and never reach the file
    ShardReader(tmp_path).verify()
    np.testing.assert_array_equal(np.concatenate(list(ShardReader(tmp_path))), data)


def test_abandoned_pass_stops(tmp_path: Path) -> None:
    write_set(tmp_path, rows_with_ids(0, 200, 2), rows_per_shard=10)
    reader = ShardReader(tmp_path, batch_rows=1, prefetch=1)
    for i, _ in enumerate(reader):
        if i == 3:
            break  # the generator closes the Rust iterator, which stops its thread
    iterator = iter(reader)
    next(iterator)
    del iterator
    assert sum(len(b) for b in reader) == 200


# --- shuffling ----------------------------------------------------------------------------


def test_shuffle_is_seeded_and_visits_every_row_once(tmp_path: Path) -> None:
    data = rows_with_ids(0, 103, 3)
    write_set(tmp_path, data, rows_per_shard=10)

    def order(seed: int, epoch: int = 0, buffer: int | None = None) -> list[int]:
        reader = ShardReader(
            tmp_path, batch_rows=8, shuffle=True, seed=seed, shuffle_buffer_rows=buffer
        )
        reader.set_epoch(epoch)
        batches = list(reader)
        rows = np.concatenate(batches)
        # Each row arrives intact (all its values), not just its id.
        np.testing.assert_array_equal(rows, data[rows[:, 0].astype(int)])
        return rows[:, 0].astype(int).tolist()

    a = order(1)
    assert sorted(a) == list(range(103))
    assert a != sorted(a)
    assert a == order(1)
    assert a != order(2)
    assert a != order(1, epoch=1)
    for buffer in (1, 5, 10_000):
        assert sorted(order(3, buffer=buffer)) == list(range(103))


# --- bad input to the writer --------------------------------------------------------------


def assert_nothing_written(path: Path) -> None:
    m = manifest(path)
    assert m["total_rows"] == 0 and m["shards"] == [] and not m["complete"]
    assert shard_files(path) == []


@pytest.mark.parametrize(
    ("rows", "error", "match"),
    [
        (np.zeros((4, 3), np.float64), TypeError, "rows: expected dtype float32.*float64"),
        (np.zeros((4, 3), np.float16), TypeError, "rows: expected dtype float32"),
        (np.zeros((4, 3), ">f4"), TypeError, "rows: expected dtype float32"),
        (np.zeros((3, 4), np.float32).T, ValueError, "C-contiguous"),
        (np.zeros((8, 3), np.float32)[::2], ValueError, "C-contiguous"),
        (np.zeros((0, 3), np.float32), ValueError, "empty"),
        (np.zeros((4, 5), np.float32), ValueError, r"shape \[n, 3\]"),
        (np.zeros(3, np.float32), ValueError, r"shape \[n, 3\]"),
        ([[0.0, 0.0, 0.0]], TypeError, "numpy array or torch tensor"),
        (torch.zeros(4, 3, dtype=torch.float64), TypeError, "float32 tensor"),
        (torch.zeros(3, 4).T, ValueError, "contiguous"),
    ],
)
def test_write_rejects_bad_rows(tmp_path: Path, rows: object, error: type, match: str) -> None:
    with ShardWriter(tmp_path, width=3, rows_per_shard=2) as w:
        with pytest.raises(error, match=match):
            w.write(rows)  # type: ignore[arg-type]
        assert w.rows_written == 0
        w.abort()
    assert_nothing_written(tmp_path)


def test_bfloat16_writer_takes_only_bf16_bits(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, width=2, dtype="bfloat16") as w:
        with pytest.raises(TypeError, match=r"bfloat16 \(bfloat16 rows are passed as uint16"):
            w.write(np.zeros((2, 2), np.float32))
        with pytest.raises(TypeError, match="bfloat16 tensor"):
            w.write(torch.zeros(2, 2, dtype=torch.float16))
        w.abort()
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width"),
        ({"width": 3, "rows_per_shard": 0}, "rows_per_shard"),
        ({"width": 3, "dtype": "int8"}, "dtype"),
        ({"width": 3, "dtype": np.float64}, "dtype"),
        ({"width": 3, "resume": True, "overwrite": True}, "at most one"),
    ],
)
def test_writer_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShardWriter(tmp_path / "set", **kwargs)
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_rows": 0}, "batch_rows"),
        ({"prefetch": 0}, "prefetch"),
        ({"shuffle_buffer_rows": 0}, "shuffle_buffer_rows"),
        ({"seed": -1}, "seed"),
    ],
)
def test_reader_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    write_set(tmp_path, rows_with_ids(0, 4, 2), rows_per_shard=2)
    with pytest.raises(ValueError, match=match):
        ShardReader(tmp_path, **kwargs)


def test_existing_set_needs_resume_or_overwrite(tmp_path: Path) -> None:
    data = rows_with_ids(0, 20, 3)
    write_set(tmp_path, data, rows_per_shard=8)
    with pytest.raises(FileExistsError, match=f"{tmp_path}.*overwrite=True or resume=True"):
        ShardWriter(tmp_path, width=3, rows_per_shard=8)
    with pytest.raises(ValueError, match="already complete"):
        ShardWriter(tmp_path, width=3, rows_per_shard=8, resume=True)
    with ShardWriter(tmp_path, width=3, rows_per_shard=8, overwrite=True) as w:
        w.write(data[:5])
    assert ShardReader(tmp_path).num_rows == 5
    assert shard_files(tmp_path) == ["shard-000000.safetensors"]


def test_exception_in_with_block_leaves_resumable_set(tmp_path: Path) -> None:
    data = rows_with_ids(0, 40, 3)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, width=3, rows_per_shard=8) as w:
        w.write(data[:21])
        raise RuntimeError("collection failed")
    reader = ShardReader(tmp_path)
    assert not reader.complete and reader.num_rows == 16  # the buffered 5 rows are dropped
    np.testing.assert_array_equal(np.concatenate(list(reader)), data[:16])

    with pytest.raises(ValueError, match=r"cannot resume.*width=3"):
        ShardWriter(tmp_path, width=4, rows_per_shard=8, resume=True)
    with ShardWriter(tmp_path, width=3, rows_per_shard=8, resume=True) as w:
        assert w.rows_written == w.rows_committed == 16
        w.write(data[w.rows_written :])
    reader = ShardReader(tmp_path)
    assert reader.complete
    np.testing.assert_array_equal(np.concatenate(list(reader)), data)


def test_closed_writer_rejects_writes(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, width=2)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write(np.zeros((1, 2), np.float32))


# --- damaged or inconsistent sets ---------------------------------------------------------


@pytest.fixture
def shard_set(tmp_path: Path) -> Path:
    write_set(tmp_path, rows_with_ids(0, 20, 4), rows_per_shard=8)
    return tmp_path


def read_all(path: Path, **kw: object) -> list[np.ndarray]:
    return list(ShardReader(path, batch_rows=4, **kw))  # type: ignore[arg-type]


def test_truncated_shard(shard_set: Path) -> None:
    shard = shard_set / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    for verify in (True, False):
        with pytest.raises(ShardError, match=r"shard-000001\.safetensors: truncated"):
            read_all(shard_set, verify=verify)
    with pytest.raises(ShardError, match="shard-000001"):
        ShardReader(shard_set).verify()


@pytest.mark.parametrize("where", [0, 3, 20, 100, -1])
def test_flipped_byte(shard_set: Path, where: int) -> None:
    shard = shard_set / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[where] ^= 0x04
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000001\.safetensors: checksum mismatch"):
        read_all(shard_set)
    with pytest.raises(ShardError, match="shard-000001"):
        ShardReader(shard_set).verify()


def test_error_arrives_after_good_batches(shard_set: Path) -> None:
    shard = shard_set / "shard-000002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1
    shard.write_bytes(bytes(data))
    iterator = iter(ShardReader(shard_set, batch_rows=4))
    good = [next(iterator) for _ in range(4)]  # the two intact shards
    np.testing.assert_array_equal(np.concatenate(good)[:, 0], np.arange(16))
    with pytest.raises(ShardError, match="shard-000002"):
        next(iterator)
    with pytest.raises(StopIteration):
        next(iterator)


def _replace_shard(path: Path, name: str, array: np.ndarray) -> None:
    """Puts a valid safetensors file of another shape/dtype in place of shard ``name`` and
    fixes the manifest's byte count, so only the header can tell."""
    save_file({"activations": array}, str(path / name), metadata={"format": "nlrw-shards/1"})
    m = manifest(path)
    for entry in m["shards"]:
        if entry["file"] == name:
            entry["bytes"] = (path / name).stat().st_size
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((4, 8), np.float32), r"shape is \[4, 8\], the manifest says \[8, 4\]"),
        (np.zeros((8, 8), np.float16), "dtype is F16, the manifest says float32"),
    ],
)
def test_shard_disagreeing_with_manifest(shard_set: Path, array: np.ndarray, match: str) -> None:
    _replace_shard(shard_set, "shard-000001.safetensors", array)
    with pytest.raises(ShardError, match=rf"shard-000001\.safetensors: .*{match}"):
        read_all(shard_set, verify=False)
    with pytest.raises(ShardError, match=r"shard-000001\.safetensors: checksum mismatch"):
        read_all(shard_set)


def test_manifest_disagreeing_with_shards(shard_set: Path) -> None:
    # Same bytes per row, other dtype and width: sizes and checksums still match the files.
    m = manifest(shard_set)
    m.update(dtype="float16", width=8)
    (shard_set / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"shard-000000\.safetensors: .*dtype is F32"):
        read_all(shard_set)


def test_missing_manifest(shard_set: Path) -> None:
    (shard_set / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"manifest\.json: missing manifest"):
        ShardReader(shard_set)
    with pytest.raises(ShardError, match="missing manifest"):
        ShardReader(shard_set / "nowhere")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "invalid manifest"),
        ('{"format": "other"}', "invalid manifest"),
        ("[]", "invalid manifest"),
    ],
)
def test_invalid_manifest(shard_set: Path, text: str, match: str) -> None:
    (shard_set / "manifest.json").write_text(text)
    with pytest.raises(ShardError, match=rf"manifest\.json: {match}"):
        ShardReader(shard_set)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(total_rows=21), "total_rows"),
        (lambda m: m.update(version=2), "version 2"),
        (lambda m: m["shards"][0].update(file="../escape.safetensors"), "invalid shard file"),
        (lambda m: m["shards"][0].update(rows=7), "only the last shard"),
        (lambda m: m["shards"][0].update(xxh3="xyz"), "invalid xxh3"),
        (lambda m: m.update(dtype="int8"), "unknown variant"),
    ],
)
def test_inconsistent_manifest(shard_set: Path, edit, match: str) -> None:
    m = manifest(shard_set)
    edit(m)
    (shard_set / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=rf"manifest\.json: invalid manifest: .*{match}"):
        ShardReader(shard_set)


def test_missing_shard_file(shard_set: Path) -> None:
    (shard_set / "shard-000000.safetensors").unlink()
    with pytest.raises(ShardError, match=r"shard-000000\.safetensors: missing shard file"):
        read_all(shard_set)


def test_stray_files_are_ignored(shard_set: Path) -> None:
    (shard_set / ".shard-000003.safetensors.tmp").write_bytes(b"half a shard")
    (shard_set / "shard-000009.safetensors").write_bytes(b"junk")
    assert sum(len(b) for b in read_all(shard_set)) == 20


# --- a writer killed by a signal ----------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from nlrw.model.shards import ShardWriter

    path, width, rows_per_shard, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    def rows(start, n):
        out = np.zeros((n, width), np.float32)
        out[:, 0] = np.arange(start, start + n)
        return out

    with ShardWriter(path, width=width, rows_per_shard=rows_per_shard) as w:
        if mode == "pause":  # two full shards and part of a third, then wait for the signal
            w.write(rows(0, 2 * rows_per_shard + 5))
            print("READY", flush=True)
            time.sleep(60)
        else:  # write shard after shard until killed, mid-write at some point
            start = 0
            while True:
                w.write(rows(start, rows_per_shard // 3))
                start += rows_per_shard // 3
    """
)


def run_child(path: Path, width: int, rows_per_shard: int, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(width), str(rows_per_shard), mode],
        stdout=subprocess.PIPE,
        text=True,
    )


def check_prefix(path: Path, rows_per_shard: int) -> int:
    """The set reads as whole shards holding rows 0..n; returns n."""
    reader = ShardReader(path, batch_rows=rows_per_shard)
    assert not reader.complete
    reader.verify()
    batches = list(reader)
    n = sum(len(b) for b in batches)
    assert n == reader.num_rows and n % rows_per_shard == 0
    if n:
        np.testing.assert_array_equal(np.concatenate(batches)[:, 0], np.arange(n))
    return n


def resume_and_finish(path: Path, width: int, rows_per_shard: int, total: int) -> None:
    with ShardWriter(path, width=width, rows_per_shard=rows_per_shard, resume=True) as w:
        start = w.rows_written
        rows = np.zeros((total - start, width), np.float32)
        rows[:, 0] = np.arange(start, total)
        w.write(rows)
    assert not any(p.name.startswith(".") for p in path.iterdir())
    reader = ShardReader(path, batch_rows=1000)
    assert reader.complete
    np.testing.assert_array_equal(np.concatenate(list(reader))[:, 0], np.arange(total))


def test_writer_killed_mid_shard(tmp_path: Path) -> None:
    child = run_child(tmp_path, 4, 10, "pause")
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert check_prefix(tmp_path, 10) == 20  # the 5 buffered rows died with the process
    resume_and_finish(tmp_path, 4, 10, 57)


def test_writer_killed_at_a_random_point(tmp_path: Path) -> None:
    # Shards of 2 MB: the kill lands while one is being written, hashed or committed.
    width, rows_per_shard = 1024, 512
    child = run_child(tmp_path, width, rows_per_shard, "loop")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if len(manifest(tmp_path)["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    n = check_prefix(tmp_path, rows_per_shard)
    assert n >= 3 * rows_per_shard
    resume_and_finish(tmp_path, width, rows_per_shard, n + 700)


# --- fuzzing ------------------------------------------------------------------------------


def test_fuzz_reader_with_atheris(tmp_path: Path) -> None:
    """A short fixed-seed atheris run of ``tests/fuzz_shards.py`` (run it directly to fuzz
    longer): every damaged set must read as batches or ShardError, never crash."""
    pytest.importorskip("atheris")
    # libFuzzer's RSS limit reads the peak RSS (ru_maxrss), which a forked child starts with
    # the parent's: after other tests loaded models, pytest itself may hold gigabytes. Give
    # the fuzzer 2 GB on top of what it inherits.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz_shards.py"),
            "-runs=2000",
            "-seed=1",
            "-max_len=512",
            "-max_total_time=120",
            f"-rss_limit_mb={inherited_mb + 2048}",
            f"-artifact_prefix={tmp_path}{os.sep}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 2000 runs" in proc.stderr
