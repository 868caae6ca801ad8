"""Time the dataset build: images/s, records/s and output size, raw Datums against JPEG-encoded ones.

    python -m dataset.bench --utkface ~/UTKFace --race asian

Each format is built --runs times into a temporary folder (removed afterwards); the median run is reported.
CPU seconds count every thread and worker process of the build, so cpu/wall shows how well the two cores were
used (and a busy machine shows as wall time well above cpu/2).
"""
import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from caffekit.errors import cli
from dataset import utkface
from dataset.build import build


def folder_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the build's worker processes)."""
    return sum(usage.ru_utime + usage.ru_stime for usage in
               (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def time_build(source: Path, race: str, size: int, encoded: bool, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dataset-bench-") as tmp:
        wall, cpu = time.perf_counter(), cpu_seconds()
        manifest = build(source, Path(tmp) / "data", race=race, size=size, encoded=encoded, workers=workers,
                         progress=False)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        lmdb_bytes = folder_bytes(Path(tmp) / "data" / "lmdb")
    records = sum(output.get("records", 0) for output in manifest["outputs"].values())
    return {"wall_s": wall, "cpu_s": cpu, "images": manifest["source"]["usable"], "records": records,
            "lmdb_mb": lmdb_bytes / 1e6}


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utkface", required=True, type=Path, help="folder of UTKFace images")
    parser.add_argument("--race", default="asian", choices=list(utkface.RACES))
    parser.add_argument("--size", default=256, type=int)
    parser.add_argument("--runs", default=3, type=int, help="builds per format; the median is reported (default: 3)")
    parser.add_argument("--formats", nargs="+", default=["raw", "encoded"], choices=["raw", "encoded"])
    parser.add_argument("--workers", default=min(2, os.cpu_count() or 1), type=int, help="worker processes (default: 2)")
    args = parser.parse_args(argv)
    print(f"dataset build, race {args.race}, size {args.size}, {args.workers} worker processes, "
          f"median of {args.runs} runs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'datum':<8}{'wall s':>8}{'cpu s':>8}{'images/s':>10}{'records/s':>11}{'LMDB MB':>9}")
    for datum in args.formats:
        runs = [time_build(args.utkface, args.race, args.size, datum == "encoded", args.workers)
                for _ in range(args.runs)]
        median = sorted(runs, key=lambda run: run["wall_s"])[len(runs) // 2]
        walls = ", ".join(f"{run['wall_s']:.1f}" for run in runs)
        print(f"{datum:<8}{median['wall_s']:>8.1f}{median['cpu_s']:>8.1f}"
              f"{median['images'] / median['wall_s']:>10.0f}{median['records'] / median['wall_s']:>11.0f}"
              f"{median['lmdb_mb']:>9.0f}   (wall of each run: {walls})")

if __name__ == "__main__":
    main()
