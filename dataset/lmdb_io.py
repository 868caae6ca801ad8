"""Writing and hashing LMDBs of Caffe Datum records.

The content hash of an LMDB covers what Caffe reads, not ``data.mdb``, whose free pages and layout
vary from run to run: the sha256 of its records in key order, each as ``len(key)`` (little-endian
uint32), the key, and the sha256 of the value. Hashing each value separately lets the worker processes that make
the records hash them in parallel, and lets a resumed build hash again what an interrupted one committed.
"""
import hashlib
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple

import lmdb

PAGE = 4096
# Commit about this many bytes per transaction: big enough to be fast, small enough that
# LMDB's dirty-page list never spills.
TXN_BYTES = 256 << 20
# ... and at least every this many records: each commit is a point an interrupted build resumes from.
COMMIT_RECORDS = 1024


def value_digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class RecordHash:
    def __init__(self):
        self._sha = hashlib.sha256()
        self.records = 0

    def update(self, key: bytes, digest_of_value: bytes) -> None:
        self._sha.update(struct.pack("<I", len(key)) + key + digest_of_value)
        self.records += 1

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def map_size(n_records: int, max_value_bytes: int) -> int:
    """An upper bound of the LMDB's size: each value in its own overflow pages, plus the B-tree."""
    pages_per_record = (max_value_bytes + 64 + PAGE - 1) // PAGE + 1
    return (n_records * pages_per_record + 1024) * PAGE * 5 // 4


def committed(path: Path) -> Tuple[RecordHash, bytes]:
    """The content hash so far and the last key of an LMDB that an interrupted build left: what it committed
    is kept, and the build goes on after the last key (each value is read and hashed again, not remade)."""
    digest, last = RecordHash(), b""
    for key, value in read_records(path):
        digest.update(key, value_digest(value))
        last = key
    return digest, last


def write_lmdb(path: Path, records: Iterable[Tuple[bytes, bytes, bytes]], n_records: int,
               max_value_bytes: int, commit_every: int = COMMIT_RECORDS, resume: Optional[RecordHash] = None,
               last_key: bytes = b"", on_commit: Optional[Callable[[int, bytes], None]] = None) -> dict:
    """Write ``records`` (key, value, value_digest(value)) in the order given (keys must increase) into the
    LMDB folder ``path``; returns the record count and content hash of the whole LMDB.

    Records are committed every ``commit_every`` records (or TXN_BYTES), and ``on_commit(records, last key)``
    is told after each commit: a resume point. ``resume`` (with ``last_key``, from ``committed``) continues
    an LMDB already holding that many records; ``records`` then holds the rest, and ``n_records`` counts all."""
    digest = resume or RecordHash()

    def open_env():
        # writemap: records are copied straight into the file's pages instead of into malloc'd pages that a
        # commit then writes out; this halves the write time of a raw build (I/O-bound on a small VM).
        return lmdb.open(str(path), map_size=map_size(n_records, max_value_bytes), subdir=True, writemap=True,
                         map_async=True, meminit=False, sync=False, metasync=False, readahead=False)

    env = open_env()
    used_bytes = mapped_bytes = 0
    try:
        txn = env.begin(write=True)
        pending_bytes = pending = 0
        previous = last_key
        for key, value, digest_of_value in records:
            if key <= previous:
                raise ValueError(f"LMDB keys out of order: {key!r} after {previous!r}")
            previous = key
            txn.put(key, value, append=True)
            digest.update(key, digest_of_value)
            pending_bytes += len(value)
            pending += 1
            if pending >= commit_every or pending_bytes >= TXN_BYTES:
                txn.commit()
                if on_commit:
                    on_commit(digest.records, key)
                mapped_bytes += pending_bytes
                if mapped_bytes >= TXN_BYTES:
                    # The pages written through the map count as this process's resident memory until it is
                    # unmapped: a map held for a whole 100 GB LMDB would look like 100 GB of memory.
                    env.close()
                    env, mapped_bytes = open_env(), 0
                txn = env.begin(write=True)
                pending_bytes = pending = 0
        txn.commit()
        if on_commit and pending:
            on_commit(digest.records, previous)
        used_bytes = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        # No fsync: the page cache writes the data out in its own time (a killed process loses nothing
        # committed; a power cut may, and the build's check of the last key then starts that LMDB over).
    except BaseException:
        txn.abort()
        raise
    finally:
        env.close()
    # writemap sized the file to map_size (sparse); cut it to the pages in use, the size LMDB writes
    # without writemap, so the file's apparent size is its real size.
    os.truncate(Path(path) / "data.mdb", used_bytes)
    return {"records": digest.records, "sha256": digest.hexdigest()}


def read_records(path) -> Iterable[Tuple[bytes, bytes]]:
    """(key, value) of every record, in key order (the order Caffe's Data layer reads)."""
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            for key, value in txn.cursor():
                yield bytes(key), bytes(value)
    finally:
        env.close()


def lmdb_hash(path) -> dict:
    digest = RecordHash()
    for key, value in read_records(path):
        digest.update(key, value_digest(value))
    return {"records": digest.records, "sha256": digest.hexdigest()}
