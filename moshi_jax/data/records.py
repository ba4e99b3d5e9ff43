"""Tokenized datasets on disk: ArrayRecord shards of per-file token grids plus an `index.json`.

A tokenized dataset is a directory:

    index.json                      what is in it (kind, config used, counts, shards, per-record meta, skipped files)
    shard-00000.array_record ...    one record per audio file (or text document)

One record = one grid `codes [S, F]` (S streams, F frames at 12.5 Hz; -1 = no token) and a small JSON meta dict.
Audio datasets store `S = 1 + C * K`: the text stream, then K Mimi codebooks of channel 0 (the model's voice),
then K of channel 1 (the user) when the file is stereo (C = 2; C = 1 for mono files). Text-only datasets store
`S = 1` (text tokens, no padding). Values fit int16 for vocabularies below 32768, otherwise int32 is used.

Record bytes: b"MJXR" | uint32 little-endian header length | header JSON {"dtype", "shape", "meta"} | raw array
(C order). No pickle: a record cannot execute code when read.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"MJXR"
INDEX_NAME = "index.json"
FORMAT = "moshi_jax.tokenized/1"
KINDS = ("audio", "text")


class RecordError(ValueError):
    """A record or a tokenized dataset directory is malformed (names the file and the problem)."""


def encode_record(codes: np.ndarray, meta: dict[str, Any] | None = None) -> bytes:
    """codes: integer [S, F] -> record bytes (int16 when every value fits, else int32)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise RecordError(f"a record holds an integer [streams, frames] array, got {codes.dtype} {codes.shape}")
    small = codes.size == 0 or (int(codes.min()) >= -(1 << 15) and int(codes.max()) < (1 << 15))
    arr = np.ascontiguousarray(codes, dtype="<i2" if small else "<i4")
    header = json.dumps({"dtype": arr.dtype.str, "shape": list(arr.shape), "meta": meta or {}}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + arr.tobytes()


def decode_record(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """Record bytes -> (codes int32 [S, F], meta)."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise RecordError("not a moshi-jax token record (bad magic bytes)")
    (n,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8:8 + n])
        dtype, shape = np.dtype(header["dtype"]), tuple(header["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"corrupt record header: {e}") from e
    body = data[8 + n:]
    if len(body) != dtype.itemsize * int(np.prod(shape)):
        raise RecordError(f"corrupt record: {len(body)} bytes of data for shape {shape} {dtype}")
    codes = np.frombuffer(body, dtype=dtype).reshape(shape).astype(np.int32)
    return codes, header.get("meta", {})


class ShardWriter:
    """Writes records into `shard-NNNNN.array_record` files of at most `records_per_shard` records each."""

    def __init__(self, out_dir: str | Path, records_per_shard: int = 1024):
        from array_record.python.array_record_module import ArrayRecordWriter

        if records_per_shard <= 0:
            raise ValueError(f"records_per_shard must be > 0, got {records_per_shard}")
        self._writer_cls = ArrayRecordWriter
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.records_per_shard = records_per_shard
        self.shards: list[str] = []
        self.num_records = 0
        self._writer = None
        self._in_shard = 0

    def write(self, codes: np.ndarray, meta: dict[str, Any] | None = None) -> int:
        """Append one record; returns its global index."""
        if self._writer is None or self._in_shard >= self.records_per_shard:
            self._close_shard()
            name = f"shard-{len(self.shards):05d}.array_record"
            # group_size:1 -> every record is its own chunk: cheap random access for shuffled reads.
            self._writer = self._writer_cls(str(self.out_dir / name), "group_size:1")
            self.shards.append(name)
        self._writer.write(encode_record(codes, meta))
        self._in_shard += 1
        self.num_records += 1
        return self.num_records - 1

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._in_shard = 0

    def close(self) -> list[str]:
        self._close_shard()
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclasses.dataclass(frozen=True)
class TokenizedDataset:
    """A tokenized dataset directory, opened: its index and a random-access record reader."""

    root: Path
    index: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> TokenizedDataset:
        root = Path(root)
        path = root / INDEX_NAME
        if not path.is_file():
            hint = " (is this the output directory of `moshi-jax data tokenize`?)"
            raise RecordError(f"{root}: no {INDEX_NAME}{hint}")
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: invalid JSON: {e}") from e
        if index.get("format") != FORMAT:
            raise RecordError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
        if index.get("kind") not in KINDS:
            raise RecordError(f"{path}: kind {index.get('kind')!r}, expected one of {KINDS}")
        missing = [s for s in index["shards"] if not (root / s).is_file()]
        if missing:
            raise RecordError(f"{root}: shard files listed in {INDEX_NAME} are missing: {missing[:5]}")
        if len(index["records"]) != index["counts"]["records"]:
            raise RecordError(f"{path}: {len(index['records'])} record entries but counts.records = "
                              f"{index['counts']['records']}")
        return cls(root, index)

    @property
    def kind(self) -> str:
        return self.index["kind"]

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.index["records"]

    @property
    def shard_paths(self) -> list[str]:
        return [str(self.root / s) for s in self.index["shards"]]

    def __len__(self) -> int:
        return len(self.records)

    def source(self):
        """A Grain random-access source of raw record bytes (picklable: usable in worker processes)."""
        import grain

        return grain.sources.ArrayRecordDataSource(self.shard_paths)

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        src = self.source()
        for i in range(len(src)):
            yield decode_record(src[i])

    def read(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        return decode_record(self.source()[i])


def write_index(out_dir: str | Path, *, kind: str, config: dict[str, Any], shards: Sequence[str],
                records: Sequence[dict[str, Any]], skipped: Sequence[dict[str, Any]],
                counts: dict[str, Any] | None = None) -> Path:
    """Write `index.json` last (atomically): a directory without it is not a dataset (e.g. an aborted job)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    counts = {"records": len(records), "skipped": len(skipped), "frames": int(sum(r["num_frames"] for r in records)),
              **(counts or {})}
    index = {"format": FORMAT, "kind": kind, "config": config, "counts": counts, "shards": list(shards),
             "records": list(records), "skipped": list(skipped)}
    path = Path(out_dir) / INDEX_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(path)
    return path
