"""Writing and hashing LMDBs of Caffe Datum records.

The content hash of an LMDB is the sha256 of its records in key order, each as
``len(key) len(value)`` (two little-endian uint32) followed by the key and the value bytes.
It hashes what Caffe reads, not ``data.mdb``, whose free pages and layout vary from run to run.
"""
import hashlib
import struct
from pathlib import Path
from typing import Iterable, Tuple

import lmdb

PAGE = 4096
# Commit about this many bytes per transaction: big enough to be fast, small enough that
# LMDB's dirty-page list never spills.
TXN_BYTES = 256 << 20


class RecordHash:
    def __init__(self):
        self._sha = hashlib.sha256()
        self.records = 0

    def update(self, key: bytes, value: bytes) -> None:
        self._sha.update(struct.pack("<II", len(key), len(value)))
        self._sha.update(key)
        self._sha.update(value)
        self.records += 1

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def map_size(n_records: int, max_value_bytes: int) -> int:
    """An upper bound of the LMDB's size: each value in its own overflow pages, plus the B-tree."""
    pages_per_record = (max_value_bytes + 64 + PAGE - 1) // PAGE + 1
    return (n_records * pages_per_record + 1024) * PAGE * 5 // 4


def write_lmdb(path: Path, records: Iterable[Tuple[bytes, bytes]], n_records: int, max_value_bytes: int) -> dict:
    """Write ``records`` (key, value) in the order given (keys must increase) into a new LMDB folder."""
    digest = RecordHash()
    env = lmdb.open(str(path), map_size=map_size(n_records, max_value_bytes), subdir=True,
                    meminit=False, sync=False, metasync=False, readahead=False)
    try:
        txn = env.begin(write=True)
        pending = 0
        previous = b""
        for key, value in records:
            if key <= previous:
                raise ValueError(f"LMDB keys out of order: {key!r} after {previous!r}")
            previous = key
            txn.put(key, value, append=True)
            digest.update(key, value)
            pending += len(value)
            if pending >= TXN_BYTES:
                txn.commit()
                txn = env.begin(write=True)
                pending = 0
        txn.commit()
        # No fsync: the page cache writes the data out in its own time. A build is all-or-nothing through
        # the atomic rename; waiting here for gigabytes to reach the disk would only make it slower.
    except BaseException:
        txn.abort()
        raise
    finally:
        env.close()
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
        digest.update(key, value)
    return {"records": digest.records, "sha256": digest.hexdigest()}
