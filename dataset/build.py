"""Build the Caffe training data from a face dataset: balanced train LMDBs, test LMDBs, mean file, manifest.

    python -m dataset.build --utkface ~/UTKFace --out data --race asian --size 256 --test-fraction 0.2 --seed 1
    python -m dataset.build --source adience --input ~/adience --fold 0 --out data/adience_fold0
    python -m dataset.build --source imdb-wiki --input ~/imdb-wiki --out data/imdb-wiki --encoded

--source (dataset/sources.py) picks the module that reads the labels: utkface (the default: labels in the file
names), adience (fold files; --fold k tests on fold k and trains on the other four), imdb-wiki (.mat files and
their filters). The source yields the faces; everything below is the same for every source.

Writes into --out: lmdb/{age,gender}_{train,test}_lmdb (raw uint8 BGR CHW Datums, or JPEG ones when raw
would exceed RAW_LIMIT_BYTES or with --encoded; keys ``%08d_<file>``
in the order Caffe reads them; train pre-shuffled), mean.binaryproto and mean.npy (the mean of the train
split's original images, each once, before oversampling: one mean for both tasks, so both nets subtract
the same image), {age,gender}_test.csv (the test records in LMDB order with the true age), splits/{train,test}.txt,
and manifest.json (configuration, skipped files, duplicate groups, class counts and the age labels, the
source's labelling rules, output hashes, versions).
--hold-out FILE keeps the faces listed there (one file name per line, e.g. another build's splits/test.txt)
and every byte-identical copy of them out of this build: a pre-training set built from all races that
never sees the Asian test faces.
Every output is written under a temporary name and renamed only when all are complete.

Scale: the images are worked on in --workers processes (dataset/pool.py), a bounded number of records in
flight, each written to its LMDB and dropped; the LMDBs are committed every --chunk records into
--out/.partial-build, with a progress file, so that after Ctrl-C or a kill the same command resumes after
the last committed record (dataset/partial.py). The records are the same whatever the number of workers and
however often the build was interrupted.
"""
import argparse
import collections
import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from caffekit import formats, models, tasks
from caffekit.atomic import atomic_path
from caffekit.errors import EXIT_INTERRUPTED, KitError, cli
from caffekit.proto import caffe_pb2
from caffekit.tasks import AGE_LABELS, GENDER_LABELS
from dataset import augment, imdb_wiki, lmdb_io, sources, split, utkface
from dataset import partial as partial_module
from dataset.lmdb_io import value_digest, write_lmdb
from dataset.partial import Partial
from dataset.pool import ordered_map

TASK_LABELS = {"age": AGE_LABELS, "gender": GENDER_LABELS}  # UTKFace's; a build reads its source's age labels
JOINT_SIZE = 72  # the joint net's LMDB images: random 64 x 64 crops in training, the centre one at test time
# The joint net's train records: "age" = the age net's plan (every face once, plus flipped/noisy copies until each
# decade bin matches the largest); "natural" = every train face once, in a seeded order (the prior stays the data's).
# The default is "natural", as the plain baseline trains: with the joint net's current schedule it scored
# 73.5% / 95.1% 1-off / MAE 3.93 / gender 87.9% on the validation split (docs/experiments.md, JointNet); "age"
# shows the rare decades' few faces up to ten times and needs the prior correction to undo the shifted prior.
# "wild" = every train face once plus one wild copy of it (dataset/augment.py: cut out of a photo as the runner cuts).
JOINT_PLANS = ("age", "natural", "wild")
DEFAULT_JOINT_PLAN = "natural"


def joint_labels(face) -> Dict[str, int]:
    """The joint net's two labels: the age in years (its image LMDB) and the gender (its label LMDB)."""
    return {"age": models.age_year_label(face.age), "gender": face.gender}


def label_datum_bytes(label: int) -> bytes:
    """A 1 x 1 x 1 Datum whose one pixel and label are ``label``: read by a second Data layer with one top,
    it gives the net a second label blob in the image LMDB's key order (stock Caffe has one label a Datum)."""
    return caffe_pb2.Datum(channels=1, height=1, width=1, data=bytes([label]), label=label).SerializeToString()
JPEG_QUALITY = 95  # for JPEG-encoded Datums
# Raw Datums decode to the exact pixels and need no decoding in training, but take 3 x size^2 bytes each: a
# UTKFace build (the all-races pre-training set: 16 GB) stays raw, IMDB-WIKI (about 0.5M faces, hundreds of
# GB raw) is written as JPEG (about 8x smaller). --raw / --encoded override.
RAW_LIMIT_BYTES = 20e9
MEAN_SAVE_IMAGES = 4096  # a mean's sums are saved for a resume after every this many images


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def raw_datum_bytes(image_hwc: np.ndarray, label: int) -> bytes:
    """The serialized raw Datum of a uint8 H x W x 3 BGR image, byte for byte what
    ``formats.array_to_datum(image.transpose(2, 0, 1), label).SerializeToString()`` gives, at a third
    of the cost: OpenCV splits the planes (CHW) faster than NumPy copies a transposed view, and the
    fields are written around them without protobuf's extra copies."""
    height, width, channels = image_hwc.shape
    planes = cv2.split(image_hwc)
    header = (b"\x08" + _varint(channels) + b"\x10" + _varint(height) + b"\x18" + _varint(width)
              + b"\x22" + _varint(image_hwc.size))
    return b"".join([header, *(plane.data for plane in planes), b"\x28" + _varint(label)])


# ---------------------------------------------------------------- per-image work, run in worker processes
class ImageJobs:
    """The per-image steps of a build, run in worker processes (dataset/pool.py). Each result is a pure
    function of its job, so neither the number of workers nor an interrupted and resumed build changes it."""

    def __init__(self, folder: Path, size: int, seed: int, encoded: bool):
        self.folder, self.size, self.seed, self.encoded = folder, size, seed, encoded

    def check(self, name: str):
        """(name, sha256, image shape or None, reason) of one candidate file."""
        try:
            data = (self.folder / name).read_bytes()
        except OSError as exc:
            return name, "", None, f"unreadable file ({exc.strerror})"
        image, reason = utkface.check_image(data)
        return name, hashlib.sha256(data).hexdigest(), None if image is None else image.shape, reason

    def load(self, name: str, size: Optional[int] = None) -> np.ndarray:
        """A checked file, resized; it passed the checks earlier, so a failure now means it changed."""
        try:
            return utkface.load(self.folder / name, size or self.size)
        except (OSError, ValueError) as exc:
            raise KitError(f"{self.folder / name}: changed or vanished during the build ({exc})") from None

    def pixel_sum(self, names_size) -> np.ndarray:
        """Exact (integer) pixel sums of resized originals: the mean cannot depend on the order of the work."""
        names, size = names_size
        total = np.zeros((size, size, 3), np.uint64)
        for name in names:
            total += self.load(name, size)
        return total

    def mean(self, faces, size: int, imap, progress: bool, desc: str, partial: Partial) -> np.ndarray:
        """The C x H x W float32 mean of ``faces`` resized to ``size``: exact integer sums of chunks of 64,
        saved every MEAN_SAVE_IMAGES so that a resumed build goes on from there."""
        total, done = partial.mean_sum(desc.replace(" ", "_"), (size, size, 3))
        chunks = (([face.name for face in faces[i:i + 64]], size) for i in range(done, len(faces), 64))
        with _bar(None, progress, total=len(faces), initial=done, desc=desc) as bar:
            for chunk_sum in imap(self.pixel_sum, chunks, batch=1):
                total += chunk_sum
                step = min(64, len(faces) - done)
                done += step
                bar.update(step)
                if done % MEAN_SAVE_IMAGES == 0 or done == len(faces):
                    partial.save_mean_sum(desc.replace(" ", "_"), total, done)
        return (total / len(faces)).astype(np.float32).transpose(2, 0, 1)

    def record(self, job) -> tuple:
        """(key, serialized Datum, its sha256) of one LMDB record."""
        key, name, copy, label, size = job
        if size == 0:  # a label Datum (no image)
            value = label_datum_bytes(label)
            return key.encode(), value, value_digest(value)
        if copy < 0:  # cut from the original's own size, as the runner cuts from a photo
            image = augment.wild(self.load(name, augment.WILD_CHIP), self.seed, name, -copy, size)
        else:
            image = self.load(name, size)
        if copy > 0:
            image = augment.augment(image, self.seed, name, copy)
        if self.encoded:
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            datum = caffe_pb2.Datum(data=jpeg.tobytes(), label=label, encoded=True)
            value = datum.SerializeToString()
        else:
            value = raw_datum_bytes(image, label)
        return key.encode(), value, value_digest(value)


# ---------------------------------------------------------------- stages
def _bar(iterable, progress: bool, **kwargs):
    # disable=None: bars on a terminal only, so logs and captured output stay clean.
    return tqdm(iterable, disable=None if progress else True, leave=False, **kwargs)


def check_images(candidates, jobs: "ImageJobs", imap, progress: bool, partial: Partial):
    """Candidates whose file is a usable image (with their sha256), and the others with reasons. Each check
    is kept in the partial build as it is made, so a resumed build checks only the files not yet checked."""
    usable, skipped = [], []
    by_name = {face.name: face for face in candidates}
    names = [face.name for face in candidates]
    done = partial.read_checks(names)
    with partial.append_checks(len(done)) as keep:
        made = imap(jobs.check, names[len(done):], batch=64)
        new = ([name, sha, shape is not None, reason] for name, sha, shape, reason in made)
        checks = itertools.chain(done, map(keep, new))
        for name, sha, ok, reason in _bar(checks, progress, total=len(candidates), desc="check images"):
            if ok:
                usable.append(by_name[name]._replace(sha256=sha))
            else:
                skipped.append({"file": name, "reason": reason})
    return usable, skipped


def read_hold_out(path: Path) -> set:
    """The file names listed in ``path``, one per line (a splits/test.txt)."""
    try:
        names = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except OSError as exc:
        raise KitError(f"{path}: cannot read the hold-out list ({exc.strerror})") from None
    if not names:
        raise KitError(f"{path}: the hold-out list is empty (expected file names, one per line)")
    return names


def hold_out(usable, names: set):
    """``usable`` without the listed faces and without any byte-identical copy of them (a duplicate under
    another name, e.g. with another race in its name, would otherwise leak the held-out face)."""
    held_shas = {face.sha256 for face in usable if face.name in names}
    kept = [face for face in usable if face.name not in names and face.sha256 not in held_shas]
    return kept, {"names_listed": len(names), "faces_removed": len(usable) - len(kept),
                  "copies_under_other_names": sum(face.name not in names for face in usable
                                                  if face.sha256 in held_shas)}


def skipped_by_reason(skipped: List[dict]) -> Dict[str, int]:
    """How many records each reason left out, commonest first (a source such as IMDB-WIKI skips thousands)."""
    counts = collections.Counter(entry["reason"] for entry in skipped)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _summary(skipped: List[dict]) -> str:
    """The commonest reasons, each with a file that has it: ``2 zero-byte file (e.g. 30_0_2_x.jpg.chip.jpg)``."""
    by_reason = collections.defaultdict(list)
    for entry in skipped:
        by_reason[entry["reason"]].append(entry["file"])
    commonest = sorted(by_reason.items(), key=lambda item: -len(item[1]))[:3]
    return "; ".join(f"{len(files)} {reason} (e.g. {files[0]})" for reason, files in commonest)


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def format_tables(classes: Dict[str, dict]) -> str:
    """The class tables: records per class of each split, before and after oversampling."""
    lines = []
    for task, table in classes.items():
        lines.append(f"{task:<8}{'train':>8}{'train+oversampled':>20}{'test':>8}")
        rows = zip(table["labels"], table["train"], table["train_oversampled"], table["test"])
        for label, before, after, test in rows:
            lines.append(f"{label:<8}{before:>8}{after:>20}{test:>8}")
        lines.append(f"{'total':<8}{sum(table['train']):>8}{sum(table['train_oversampled']):>20}"
                     f"{sum(table['test']):>8}")
        lines.append("")
    return "\n".join(lines)


def _versions() -> dict:
    import google.protobuf
    import lmdb
    import tqdm as tqdm_module

    return {"python": sys.version.split()[0], "numpy": np.__version__, "opencv": cv2.__version__,
            "lmdb": lmdb.__version__, "protobuf": google.protobuf.__version__, "tqdm": tqdm_module.__version__}


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _test_csv(items: List[split.Item], task: str) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["key", "source", "age", "gender", "label"])
    for index, item in enumerate(items):
        face = item.face
        label = joint_labels(face)["age"] if task == "joint" else face.label(task)
        writer.writerow([item.key(index), face.name, face.age, face.gender, label])
    return text.getvalue()


@contextlib.contextmanager
def _cleanup_new_folders(out: Path):
    """Remove the (empty) folders this build created if it fails, so nothing partial is left."""
    missing = [path for path in (out / "lmdb", out / "splits", out) if not path.exists()]
    try:
        yield
    except BaseException:
        for path in missing:  # children first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


# ---------------------------------------------------------------- the build
def _manifest(folder, out, race, size, test_fraction, seed, encoded, source, candidates, usable, faces, skipped,
              groups, train, test, classes, held_out, source_name="utkface", fold=None, rules=None) -> dict:
    where = {"utkface": str(folder)} if source_name == "utkface" else {"input": str(folder)}
    split_info = {"stratified_by": ["age_bin", "gender"]} if fold is None else {
        "by": "the source's own subject-disjoint folds", "test_fold": fold,
        "train_folds": sorted({face.fold for face in train})}
    return {
        "config": {"source": source_name, **where, "out": str(out), "race": race, "size": size,
                   "test_fraction": None if fold is not None else test_fraction, "fold": fold, "seed": seed,
                   "datum": "JPEG-encoded (encoded: true)" if encoded else "raw uint8 BGR CHW",
                   "keys": "%08d_<source file>[~aug<k>], key order = the order Caffe reads"},
        "source": {**source, "selected": len(candidates), "usable": len(usable), "distinct": len(faces),
                   "skipped": len(skipped)},
        "skipped": skipped,
        "skipped_by_reason": skipped_by_reason(skipped),
        "labels": {"source": source_name, "age": classes["age"]["labels"],
                   "age_scheme": tasks.age_scheme(classes["age"]["labels"])["name"],
                   "gender": classes["gender"]["labels"], "rules": rules or {}},
        "held_out": held_out,
        "duplicates": {"rule": "byte-identical files (sha256) form a group; the (age bin, gender) label with "
                               "the most votes keeps one copy (first file by name); a tie drops the group",
                       "groups": len(groups),
                       "conflicting": sum(group["conflict"] for group in groups),
                       "dropped": sum(group["kept"] is None for group in groups),
                       "details": groups},
        "split": {**split_info, "train": len(train), "test": len(test)},
        "classes": classes,
        "augmentation": {"applies_to": "train split only, each task oversampled separately",
                         "flip": "odd copies mirrored horizontally",
                         "gaussian_noise_sigma": list(augment.NOISE_SIGMA), "rng": "numpy PCG64, seeded"},
        "mean": {"images": len(train), "shape": [1, 3, size, size], "channels": "BGR",
                 "of": "the train split's original images, each once, before oversampling; "
                       "one mean shared by both tasks"},
        "outputs": {},
        "versions": _versions(),
    }


def lmdb_records(plans: Dict[str, List[split.Item]], size: int, joint_size: int):
    """(LMDB path, record count, jobs) of every LMDB of a build. ``jobs(start)`` makes the jobs from record
    ``start`` on, ``(key, file, copy, label, image size or 0 for a label Datum)``, lazily, as workers take them."""
    def jobs_of(items, label, image_size):
        return lambda start=0: ((item.key(i), item.face.name, item.copy, label(item.face), image_size)
                                for i, item in enumerate(items) if i >= start)

    for name, items in plans.items():
        task, split_name = name.split("_")
        if task != "joint":
            yield f"lmdb/{name}_lmdb", len(items), jobs_of(items, lambda face, task=task: face.label(task), size)
            continue
        for head, suffix, image_size in (("age", "", joint_size), ("gender", "_gender", 0)):
            yield f"lmdb/joint_{split_name}{suffix}_lmdb", len(items), jobs_of(
                items, lambda face, head=head: joint_labels(face)[head], image_size)


def write_partial_lmdbs(plans, jobs: "ImageJobs", imap, partial: Partial, record_bytes: int, progress: bool,
                        joint_size: int, commit_every: int) -> Dict[str, dict]:
    """Every LMDB into the partial build, each continued after its last committed key; their outputs."""
    outputs = {}
    for relative, n_records, make_jobs in lmdb_records(plans, jobs.size, joint_size):
        state = partial.lmdb_state(relative, n_records)
        if state["output"] is None:
            write_partial_lmdb(relative, n_records, make_jobs, jobs, imap, partial, record_bytes, progress,
                               commit_every)
        outputs[relative] = state["output"]
    return outputs


def write_partial_lmdb(relative, n_records, make_jobs, jobs, imap, partial, record_bytes, progress, commit_every):
    """One LMDB: what an interrupted run committed is kept (hashed again from the LMDB), the rest is made."""
    path = partial.lmdb_path(relative)
    digest, last = lmdb_io.RecordHash(), b""
    if path.exists():
        try:
            digest, last = lmdb_io.committed(path)
        except lmdb_io.lmdb.Error as exc:  # e.g. cut short by a power cut before the page cache reached the disk
            partial.restart_lmdb(relative, f"it cannot be read ({exc})")
        # The jobs are a pure function of the fingerprinted inputs: the committed records are the first
        # ones of the plan exactly when the last committed key is the plan's key at that place.
        planned = next(make_jobs(digest.records - 1), ("",))[0] if 0 < digest.records <= n_records else ""
        if digest.records and planned.encode() != last:
            partial.restart_lmdb(relative, f"its last key {last.decode()!r} is not the plan's")
            digest, last = lmdb_io.RecordHash(), b""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = imap(jobs.record, make_jobs(digest.records))
    bar = _bar(records, progress, total=n_records, initial=digest.records, desc=relative)
    output = write_lmdb(path, bar, n_records, record_bytes, commit_every, digest, last,
                        lambda count, key: partial.committed(relative, count, key))
    partial.lmdb_done(relative, output)


def write_outputs(out: Path, plans: Dict[str, List[split.Item]], train, test, partial: Partial,
                  lmdbs: Dict[str, dict], means: Dict[str, np.ndarray], manifest: dict, joint_size: int = 0) -> None:
    """Move the finished LMDBs out of the partial build and write every other output, each under a temporary
    name; rename them all only once all are complete."""
    with contextlib.ExitStack() as renames:
        def staged(relative: str) -> Path:
            # The renames run when the stack closes, after every write succeeded; on an error or Ctrl-C
            # each temporary is removed instead. The manifest, entered first, is renamed last.
            return renames.enter_context(atomic_path(out / relative))

        manifest_tmp = staged("manifest.json")
        for relative, output in lmdbs.items():
            os.replace(partial.lmdb_path(relative), staged(relative))
            manifest["outputs"][relative] = output

        names = ["mean.binaryproto", "mean.npy", "age_test.csv", "gender_test.csv", "splits"]
        if joint_size:
            names += ["joint_mean.binaryproto", "joint_test.csv", "joint_infogain.binaryproto"]
        files = {relative: staged(relative) for relative in names}
        formats.write_mean(files["mean.binaryproto"], means["mean"])
        with open(files["mean.npy"], "wb") as stream:  # np.save on a name would append ".npy"
            np.save(stream, means["mean"], allow_pickle=False)
        for task in TASK_LABELS:
            files[f"{task}_test.csv"].write_text(_test_csv(plans[f"{task}_test"], task))
        if joint_size:
            formats.write_mean(files["joint_mean.binaryproto"], means["joint mean"])
            files["joint_test.csv"].write_text(_test_csv(plans["joint_test"], "joint"))
            files["joint_infogain.binaryproto"].write_bytes(models.infogain_file())
        splits = files.pop("splits")
        splits.mkdir()
        for name, faces in (("train", train), ("test", test)):
            files[f"splits/{name}.txt"] = splits / f"{name}.txt"
            files[f"splits/{name}.txt"].write_text("".join(f"{face.name}\n" for face in faces))
        for relative, path in files.items():
            manifest["outputs"][relative] = {"sha256": _file_sha256(path)}
        manifest_tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def estimate_bytes(plans: Dict[str, List[split.Item]], size: int, joint_size: int) -> int:
    """The raw LMDBs' size: each image value (3 x size x size bytes and a header) in its own 4 KB pages."""
    def pages(value_bytes: int) -> int:
        return (value_bytes + 64 + lmdb_io.PAGE - 1) // lmdb_io.PAGE * lmdb_io.PAGE

    total = 0
    for name, items in plans.items():
        if name.startswith("joint"):
            total += len(items) * (pages(3 * joint_size * joint_size) + 64)  # + the 1 x 1 label Datum
        else:
            total += len(items) * pages(3 * size * size)
    return total


def choose_datum(encoded: Optional[bool], raw_bytes: int) -> Tuple[bool, str]:
    """Raw or JPEG-encoded Datums, and why: as asked, else raw up to RAW_LIMIT_BYTES of raw records."""
    if encoded is not None:
        return encoded, "--encoded given" if encoded else "--raw given"
    size = f"the raw records would take {raw_bytes / 1e9:.1f} GB"
    if raw_bytes > RAW_LIMIT_BYTES:
        return True, f"{size}, above the {RAW_LIMIT_BYTES / 1e9:g} GB limit for raw (--raw overrides)"
    return False, f"{size}, within the {RAW_LIMIT_BYTES / 1e9:g} GB limit for raw (--encoded overrides)"


def build(utkface_dir, out, race: Optional[str] = None, size: int = 256, test_fraction: float = 0.2, seed: int = 1,
          encoded: Optional[bool] = None, workers: Optional[int] = None, progress: bool = True,
          hold_out_lists: Sequence[Path] = (), joint_size: int = JOINT_SIZE, joint_plan: str = DEFAULT_JOINT_PLAN,
          source: str = "utkface", fold: Optional[int] = None, source_options: Optional[dict] = None,
          commit_every: int = lmdb_io.COMMIT_RECORDS) -> dict:
    """Build every output into ``out`` from the ``source`` dataset in the folder ``utkface_dir``; returns the
    manifest. ``race`` (UTKFace only) defaults to asian; ``fold`` (sources with folds) defaults to 0;
    ``encoded`` None: JPEG Datums only when raw ones would exceed RAW_LIMIT_BYTES. ``workers`` processes
    (default: up to 2). The work goes into ``out``/.partial-build, committed every ``commit_every`` records:
    a rerun after an interrupt resumes it (dataset/partial.py); Ctrl-C raises BuildInterrupted."""
    folder, out = Path(utkface_dir), Path(out)
    race = race or sources.DEFAULT_RACE.get(source, "all")
    hold_out_lists = [Path(path) for path in hold_out_lists]
    held_names = set().union(*map(read_hold_out, hold_out_lists)) if hold_out_lists else None
    if source not in sources.SOURCES:
        raise KitError(f"source {source!r}: expected one of {', '.join(sources.SOURCES)}")
    if source == "utkface" and race not in utkface.RACES:
        raise KitError(f"race {race!r}: expected one of {', '.join(utkface.RACES)}")
    if fold is None and source in sources.FOLDS:
        fold = 0  # a random split would put one person's photos on both sides
    if fold is not None and not 0 <= fold < sources.FOLDS.get(source, 0):
        raise KitError(f"fold {fold}: " + (f"{source} has folds 0..{sources.FOLDS[source] - 1}" if source in
                                           sources.FOLDS else f"{source} has no folds (split by --test-fraction)"))
    if size < 8:
        raise KitError(f"size {size}: expected at least 8 pixels")
    if joint_size and joint_size < 8:
        raise KitError(f"joint size {joint_size}: expected 0 (no joint LMDBs) or at least 8 pixels")
    if joint_plan not in JOINT_PLANS:
        raise KitError(f"joint plan {joint_plan!r}: expected one of {', '.join(JOINT_PLANS)}")
    if not 0 < test_fraction < 1:
        raise KitError(f"test fraction {test_fraction}: expected a number between 0 and 1")
    if commit_every < 1:
        raise KitError(f"chunk {commit_every}: expected at least 1 record per commit")
    workers = workers or min(2, os.cpu_count() or 1)
    _check_writable(out)

    scanned = sources.scan(source, folder, race, **(source_options or {}))
    candidates, skipped, counts = scanned.faces, scanned.skipped, scanned.counts
    task_labels = {"age": list(scanned.age_labels), "gender": GENDER_LABELS}
    config = {"source": source, "input": str(folder.resolve()), "race": race, "size": size, "seed": seed,
              "test_fraction": test_fraction, "fold": fold, "joint_size": joint_size, "joint_plan": joint_plan,
              "encoded": encoded, "source_options": source_options or {},
              "hold_out": hashlib.sha256("\n".join(sorted(held_names or ())).encode()).hexdigest()}
    jobs = ImageJobs(scanned.images, size, seed, bool(encoded))
    # The pool first: every worker is up (spawned, its parent-death signal set) before the first job is sent.
    with ordered_map(workers) as imap, _cleanup_new_folders(out), _kept_on_interrupt(out) as opened:
        partial = opened(Partial.open(out, partial_module.fingerprint(config, scanned.images, candidates), config))
        if partial.resumed:
            print(f"resuming the unfinished build in {partial.folder} ({partial.summary()})", file=sys.stderr)
        usable, bad_images = check_images(candidates, jobs, imap, progress, partial)
        skipped = sorted(skipped + bad_images, key=lambda entry: entry["file"])
        if not usable:
            what = "image" if race == "all" else f"{race} image"
            detail = f" ({_summary(skipped)})" if skipped else f" ({counts.get('other_race', 0)} of other races)"
            raise KitError(f"{folder}: no usable {what} among {counts['files']} files{detail}")

        held_out = None
        if held_names is not None:
            usable, held_out = hold_out(usable, held_names)
            held_out["list"] = " + ".join(map(str, hold_out_lists))
            if not held_out["faces_removed"]:
                raise KitError(f"{held_out['list']}: none of the {len(held_names)} file names listed is a usable "
                               f"image of {folder} (a list from another folder?)")
        faces, groups = split.dedup(usable)
        if fold is None:
            train, test = split.stratified_split(faces, test_fraction, seed)
        else:
            train, test = split.by_fold(faces, fold)
            if not test or not train:
                raise KitError(f"{folder}: fold {fold} has {len(test)} usable distinct faces, the other folds "
                               f"{len(train)}: too few to train and test (all held out?)")
        if not train or not test:
            raise KitError(f"{folder}: only {len(faces)} usable distinct images, too few to split into train and test")
        test_items = split.shuffled(test, seed)
        plans = {}
        for task, labels in task_labels.items():
            plans[f"{task}_train"] = split.oversample(train, task, len(labels), seed)
            plans[f"{task}_test"] = test_items
        classes = {task: {"labels": labels,
                          "train": split.class_counts(train, task, len(labels)),
                          "train_oversampled": split.class_counts(plans[f"{task}_train"], task, len(labels)),
                          "test": split.class_counts(test, task, len(labels))}
                   for task, labels in task_labels.items()}
        if joint_size:
            plans["joint_train"] = (plans["age_train"] if joint_plan == "age" else
                                    split.with_wild_copies(train, seed) if joint_plan == "wild" else
                                    split.shuffled(train, seed, stream=3))
            plans["joint_test"] = test_items
            classes.update(joint_classes(train, plans["joint_train"], test))

        raw_bytes = estimate_bytes(plans, size, joint_size)
        jobs.encoded, why = choose_datum(encoded, raw_bytes)
        # An upper bound of one record (a JPEG of a noisy image stays well under the raw size plus a page).
        record_bytes = 3 * size * size + (4096 if jobs.encoded else 64)
        total = sum(len(items) for items in plans.values()) + (len(plans.get("joint_train", ())) +
                                                                len(plans.get("joint_test", ())))
        left = 1 - partial.records_committed() / total
        needed = int(raw_bytes * left / (8 if jobs.encoded else 1))
        if _free_bytes(out) < needed * 1.05:
            raise KitError(f"{out}: the build needs about {needed / 1e9:.1f} GB more, {_free_bytes(out) / 1e9:.1f} GB "
                           "free" + ("" if jobs.encoded else " (--encoded needs about 8x less)"))

        manifest = _manifest(folder, out, race, size, test_fraction, seed, jobs.encoded, counts, candidates, usable,
                             faces, skipped, groups, train, test, classes, held_out, source, fold, scanned.rules)
        manifest["config"]["datum_choice"] = why
        manifest["config"]["joint_size"] = joint_size
        manifest["config"]["joint_plan"] = joint_plan
        if joint_plan == "wild":
            manifest["augmentation"]["wild_copies"] = {
                "joint train only": "one per face: rotated up to +-{:g} degrees, scaled {:g}x-{:g}x, pasted over a "
                                    "background and cut out by an inverse off by the runner's alignment error".format(
                                        augment.WILD_ANGLE, *augment.WILD_SCALE),
                "alignment_error_sd": augment.WILD_JITTER}
        lmdbs = write_partial_lmdbs(plans, jobs, imap, partial, record_bytes, progress, joint_size, commit_every)
        means = {"mean": jobs.mean(train, size, imap, progress, "mean", partial)}
        if joint_size:
            means["joint mean"] = jobs.mean(train, joint_size, imap, progress, "joint mean", partial)
        write_outputs(out, plans, train, test, partial, lmdbs, means, manifest, joint_size)
        partial.remove()
    return manifest


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C during a build, with what was kept for a rerun to resume."""


@contextlib.contextmanager
def _kept_on_interrupt(out: Path):
    """Yield ``opened(partial)``, which registers the partial build: on Ctrl-C it is kept (and the interrupt
    says so), on a KitError (wrong inputs: nothing worth resuming) it is removed."""
    held = []

    def opened(partial: Partial) -> Partial:
        held.append(partial)
        return partial

    try:
        yield opened
    except KitError:
        for partial in held:
            partial.remove()
        raise
    except KeyboardInterrupt:
        kept = f"{held[0].summary()} in {held[0].folder}" if held else "nothing written yet"
        raise BuildInterrupted(kept) from None
    finally:
        for partial in held:
            partial.close()


def joint_classes(train, train_plan, test) -> Dict[str, dict]:
    """Class counts of the joint net's heads (one class a year, and gender) for the prior correction."""
    def counts(items, head: str, n: int) -> List[int]:
        values = [0] * n
        for item in items:
            values[joint_labels(item.face if isinstance(item, split.Item) else item)[head]] += 1
        return values

    years = [str(year) for year in range(models.AGE_YEAR_CLASSES)]
    return {f"joint_{head}": {"labels": labels, "train": counts(train, head, len(labels)),
                              "train_oversampled": counts(train_plan, head, len(labels)),
                              "test": counts(test, head, len(labels))}
            for head, labels in (("age", years), ("gender", GENDER_LABELS))}


def _check_writable(out: Path) -> None:
    """Fail before the long work if ``out`` cannot be created or written."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KitError(f"{out}: cannot write there ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KitError(f"{out}: cannot write there ({existing} is not writable)")


def build_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", "--utkface", dest="input", required=True, type=Path,
                        help="the source's folder: UTKFace images (*.jpg.chip.jpg); Adience's aligned/ and "
                             "fold_<k>_data.txt; IMDB-WIKI's imdb_crop/ and/or wiki_crop/ with their .mat")
    parser.add_argument("--source", default="utkface", choices=list(sources.SOURCES),
                        help="which dataset the folder holds (default: utkface)")
    parser.add_argument("--fold", type=int,
                        help="adience: fold k (0..4) is the test split, the other four train (default: 0)")
    parser.add_argument("--out", default=Path("data"), type=Path, help="output folder (default: data)")
    parser.add_argument("--race", choices=list(utkface.RACES),
                        help="utkface: faces to use (default: asian; the other sources have no race labels: all)")
    parser.add_argument("--size", default=256, type=int, help="square image size in the LMDBs (default: 256)")
    parser.add_argument("--test-fraction", default=0.2, type=float, help="share of faces for test (default: 0.2)")
    parser.add_argument("--seed", default=1, type=int, help="seed of the split, oversampling and order (default: 1)")
    datum = parser.add_mutually_exclusive_group()
    datum.add_argument("--encoded", action="store_true", default=None,
                       help="store JPEG-encoded Datums (quality 95): about 8x smaller, not pixel-exact "
                            f"(default: when raw records would exceed {RAW_LIMIT_BYTES / 1e9:g} GB)")
    datum.add_argument("--raw", dest="encoded", action="store_false",
                       help="store raw Datums, which decode back to the exact resized pixels, whatever the size")
    parser.add_argument("--workers", type=int, help="worker processes (default: up to 2, one per core)")
    parser.add_argument("--chunk", type=int, default=lmdb_io.COMMIT_RECORDS,
                        help="records per committed chunk: how much an interrupted build can lose "
                             f"(default: {lmdb_io.COMMIT_RECORDS})")
    parser.add_argument("--joint-size", default=JOINT_SIZE, type=int,
                        help=f"image size of the joint net's LMDBs (default: {JOINT_SIZE}; 0: no joint LMDBs)")
    parser.add_argument("--joint-plan", default=DEFAULT_JOINT_PLAN, choices=JOINT_PLANS,
                        help="the joint net's train records: natural = every train face once (default), age = "
                             "balanced over decade bins like the age net's, wild = every face once plus a copy cut "
                             "out of a pasted frame as the runner cuts faces from photos")
    imdb = parser.add_argument_group("imdb-wiki filters (dataset/imdb_wiki.py)")
    imdb.add_argument("--databases", nargs="+", choices=list(imdb_wiki.DATABASES),
                      help="which .mat files to read (default: those present)")
    imdb.add_argument("--min-face-score", type=float,
                      help=f"skip records whose face_score is lower (default: {imdb_wiki.MIN_FACE_SCORE})")
    imdb.add_argument("--allow-second-face", action="store_true", default=None,
                      help="keep photos with a second face (default: skipped)")
    imdb.add_argument("--ages", type=int, nargs=2, metavar=("FIRST", "LAST"),
                      help=f"ages to keep (default: {imdb_wiki.AGES[0]} {imdb_wiki.AGES[1]})")
    parser.add_argument("--hold-out", type=Path, metavar="FILE", nargs="+", default=[],
                        help="leave out the faces named in the FILEs (one per line, e.g. data/splits/test.txt) and "
                             "their byte-identical copies: for a pre-training set that excludes a test split "
                             "(and a validation split)")
    return parser


@cli
def main(argv=None) -> None:
    args = build_argparser().parse_args(argv)
    options = {key: getattr(args, key) for key in ("databases", "min_face_score", "allow_second_face", "ages")
               if getattr(args, key) is not None}
    if options and args.source != "imdb-wiki":
        raise KitError(f"--{next(iter(options)).replace('_', '-')}: an imdb-wiki filter, not for --source {args.source}")
    if args.workers is not None and args.workers < 1:
        raise KitError(f"--workers {args.workers}: expected at least 1")
    try:
        manifest = build(args.input, args.out, args.race, args.size, args.test_fraction, args.seed, args.encoded,
                         workers=args.workers, hold_out_lists=args.hold_out, joint_size=args.joint_size,
                         joint_plan=args.joint_plan, source=args.source, fold=args.fold, source_options=options,
                         commit_every=args.chunk)
    except BuildInterrupted as interrupt:
        print(f"interrupted: {interrupt}; rerun the same command to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    print(format_tables({task: table for task, table in manifest["classes"].items() if task in TASK_LABELS}))
    source, duplicates = manifest["source"], manifest["duplicates"]
    selected = f"{source['selected']} {manifest['config']['race']}" if args.source == "utkface" else \
        f"{source['selected']} passed the label rules"
    print(f"{source['files']} {'files' if args.source == 'utkface' else 'records'}, {selected}, "
          f"{source['skipped']} skipped, "
          f"{duplicates['groups']} duplicate groups ({duplicates['dropped']} dropped for conflicting labels), "
          f"{manifest['split']['train']} train / {manifest['split']['test']} test faces"
          + (f" (test: fold {manifest['config']['fold']})" if manifest["config"]["fold"] is not None else ""))
    if args.source != "utkface" and manifest["skipped_by_reason"]:
        print("skipped: " + "; ".join(f"{count} {reason}" for reason, count in manifest["skipped_by_reason"].items()))
    if manifest["held_out"]:
        held = manifest["held_out"]
        print(f"held out {held['faces_removed']} faces listed in {held['list']} "
              f"({held['copies_under_other_names']} of them copies under other names)")
    print(f"wrote {args.out}/lmdb/*_lmdb ({manifest['config']['datum']}: {manifest['config']['datum_choice']}), "
          "mean.binaryproto, mean.npy, *_test.csv, splits/, manifest.json")


if __name__ == "__main__":
    main()
