"""Fuzz the activation-shard reader with atheris: no damaged shard set may crash the process.

Each fuzz input is decoded (``atheris.FuzzedDataProvider``) into damage to a small valid shard
set — a replaced manifest, flipped bytes, a truncation, a rewritten safetensors header, a
replaced shard — with the manifest's byte count patched to match where that lets the damage
reach the header parser. The set is then opened and read in full (checksums on or off,
shuffled or not). The only acceptable outcomes are batches of the right width or
``nlrw.ShardError``; any other exception, or a crash of the Rust extension, is a finding.

``tests/test_shards.py`` runs this for a few thousand inputs with a fixed seed. To fuzz longer::

    .venv/bin/python tests/fuzz_shards.py -max_total_time=600          # ten minutes
    .venv/bin/python tests/fuzz_shards.py -runs=100000 -seed=7 corpus/  # any libFuzzer flags
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from nlrw import ShardError
    from nlrw.model.shards import ShardReader, ShardWriter

WIDTH = 3


def _template(root: Path) -> dict[str, bytes]:
    """A valid three-shard float16 set (the last shard short), as file name -> bytes."""
    src = root / "template"
    rows = np.arange(10 * WIDTH, dtype=np.float16).reshape(10, WIDTH)
    with ShardWriter(src, width=WIDTH, dtype="float16", rows_per_shard=4) as writer:
        writer.write(rows)
    return {p.name: p.read_bytes() for p in sorted(src.iterdir())}


ROOT = Path(tempfile.mkdtemp(prefix="nlrw-fuzz-shards-"))
FILES = _template(ROOT)
SHARDS = sorted(name for name in FILES if name.endswith(".safetensors"))
SCRATCH = ROOT / "scratch"
SCRATCH.mkdir()


def _relist(name: str, data: bytes) -> None:
    """Makes the manifest's byte count of ``name`` match ``data`` (checksum left stale)."""
    manifest = json.loads(FILES["manifest.json"])
    for entry in manifest["shards"]:
        if entry["file"] == name:
            entry["bytes"] = len(data)
    (SCRATCH / "manifest.json").write_text(json.dumps(manifest))


@atheris.instrument_func
def _damage(fdp: atheris.FuzzedDataProvider) -> None:
    for name, data in FILES.items():
        (SCRATCH / name).write_bytes(data)
    name = SHARDS[fdp.ConsumeIntInRange(0, len(SHARDS) - 1)]
    shard = bytearray(FILES[name])
    op = fdp.ConsumeIntInRange(0, 4)
    if op == 0:  # arbitrary manifest
        (SCRATCH / "manifest.json").write_bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 800)))
        return
    if op == 1:  # flipped bytes
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            shard[fdp.ConsumeIntInRange(0, len(shard) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
    elif op == 2:  # truncation
        del shard[fdp.ConsumeIntInRange(0, len(shard) - 1) :]
    elif op == 3:  # rewritten header, possibly with a lying length prefix
        header_len = int.from_bytes(shard[:8], "little")
        header = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 400)).encode()
        claimed = len(header) if fdp.ConsumeBool() else fdp.ConsumeInt(8) % 2**64
        shard = bytearray(claimed.to_bytes(8, "little") + header + shard[8 + header_len :])
    else:  # arbitrary shard
        shard = bytearray(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400)))
    (SCRATCH / name).write_bytes(bytes(shard))
    if fdp.ConsumeBool():
        _relist(name, bytes(shard))


@atheris.instrument_func
def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    _damage(fdp)
    verify = fdp.ConsumeBool()
    shuffle = fdp.ConsumeBool()
    batch_rows = fdp.ConsumeIntInRange(1, 7)
    try:
        reader = ShardReader(SCRATCH, batch_rows=batch_rows, verify=verify, shuffle=shuffle)
        for batch in reader:
            if batch.ndim != 2 or batch.shape[1] != reader.width or batch.shape[0] < 1:
                raise AssertionError(f"bad batch shape {batch.shape}")
        if verify:
            reader.verify()
    except ShardError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
