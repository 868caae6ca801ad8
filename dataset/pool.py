"""Worker processes for the build: results in job order, a bounded number of records in flight.

Processes, not threads: decoding, resizing, noise and JPEG coding are only partly outside the GIL, and
the Python around them (protobuf, the Datum writer, hashing calls) is not at all, so threads left the
second core half idle. Jobs travel in batches to keep the cost of sending them small next to the work.

Memory stays bounded whatever the size of the set: jobs are pulled from their (lazy) iterator only as
results are consumed, so at most ``in_flight`` jobs are queued, being worked on, or done and waiting to be
read. A record the caller has written and dropped is gone; nothing holds a list of images.

Determinism: a job's result depends on the job alone (no shared state, no order), and the results come
back in job order, so 1 worker (run here, no pool) and N processes give the same results.
"""
import collections
import concurrent.futures
import contextlib
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
import time
from typing import Callable, Iterable, Iterator

IN_FLIGHT = 128  # records: 128 raw 256 x 256 Datums are 25 MB
BATCH = 16       # jobs a worker is sent at a time


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the main process alone reports it and stops the pool, so the
    # workers must not print tracebacks of their own. A killed main process must not leave them waiting.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would only compete


def _started(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _run_batch(func: Callable, jobs: list) -> list:
    return [func(job) for job in jobs]


def _context():
    # spawn, not fork: a process that already runs threads (OpenVINO's, torch's, a test runner's) can hold a lock
    # at the moment of the fork, and the child then waits on it for ever (the whole test suite hung so once).
    # Not forkserver either: its workers are the server's children, so PR_SET_PDEATHSIG cannot tie them to this
    # process, and a build killed with SIGKILL left them running.
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def ordered_map(workers: int, in_flight: int = IN_FLIGHT):
    """Yield ``imap(func, jobs, batch=BATCH)``: ``func`` over ``jobs`` in ``workers`` processes (1: in this
    one), results in job order, at most ``in_flight`` jobs pulled and not yet consumed. ``func`` must pickle
    (a module-level function or a method of a small object)."""
    if workers <= 1:
        yield lambda func, jobs, batch=BATCH: map(func, jobs)
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=_context(), initializer=_worker_init)
    # Start every worker now and let each run _worker_init (PR_SET_PDEATHSIG) before the first real job: the
    # executor starts workers one at a time as jobs wait, and a build killed while one was still starting left
    # it running. Each sleeping job keeps its worker busy, so the next goes to a new one.
    list(pool.map(_started, [0.2] * workers))

    def imap(func: Callable, jobs: Iterable, batch: int = BATCH) -> Iterator:
        jobs, batch = iter(jobs), max(1, min(batch, in_flight))
        ahead = max(1, in_flight // batch)
        pending = collections.deque()
        while True:
            while len(pending) < ahead:
                chunk = list(itertools.islice(jobs, batch))
                if not chunk:
                    break
                pending.append(pool.submit(_run_batch, func, chunk))
            if not pending:
                return
            results = pending.popleft().result()
            while results:  # hand them over one by one, so that each is dropped once consumed
                yield results.pop(0)

    try:
        yield imap
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error or Ctrl-C, drop the queued work
