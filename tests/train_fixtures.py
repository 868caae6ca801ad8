"""Small Caffe datasets for the training and evaluation tests: LMDBs of real UTKFace faces
(or synthetic images when the copy is absent), a mean file and the test CSV, laid out as
`make dataset` lays out DATA_DIR."""
import csv
from pathlib import Path

import numpy as np

from caffe_fixtures import write_lmdb
from caffekit import formats
from caffekit.tasks import age_to_bin

REPO = Path(__file__).resolve().parents[1]


def utkface_records(utkface_dir, count: int, seed: int = 0):
    """(path, age, gender) of ``count`` UTKFace files with well-formed names, in a fixed random order."""
    files = sorted(Path(utkface_dir).glob("*.jpg"))
    rng = np.random.default_rng(seed)
    records = []
    for i in rng.permutation(len(files)):
        parts = files[i].name.split("_")
        if len(parts) == 4 and all(p.isdigit() for p in parts[:3]):
            records.append((files[i], int(parts[0]), int(parts[1])))
            if len(records) == count:
                break
    return records


def load_image(path, size: int) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)


def synthetic_records(count: int, size: int, seed: int = 0):
    """Images whose colour depends on the gender and whose brightness gradient on the age: learnable."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        age, gender = int(rng.integers(1, 90)), int(rng.integers(2))
        image = rng.integers(0, 60, (3, size, size), dtype=np.int64)
        image[gender] += 120
        image += np.linspace(0, age * 1.5, size, dtype=np.int64)[None, None, :]
        yield f"synthetic_{i}.png", age, gender, np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(data_dir: Path, utkface_dir=None, train: int = 200, test: int = 60, size: int = 256,
                 seed: int = 0) -> Path:
    """DATA_DIR with lmdb/{age,gender}_{train,test}_lmdb, mean.binaryproto and <task>_test.csv."""
    data_dir = Path(data_dir)
    if utkface_dir is not None:
        records = [(p.name, age, gender, load_image(p, size))
                   for p, age, gender in utkface_records(utkface_dir, train + test, seed)]
    else:
        records = list(synthetic_records(train + test, size, seed))
    splits = {"train": records[:train], "test": records[train:]}
    mean = np.mean([r[3] for r in splits["train"]], axis=0, dtype=np.float64).astype(np.float32)
    formats.write_mean(data_dir / "mean.binaryproto", mean)
    for task in ("age", "gender"):
        for split, items in splits.items():
            write_lmdb(data_dir / "lmdb" / f"{task}_{split}_lmdb", [image for *_, image in items],
                       [age_to_bin(age) if task == "age" else gender for _, age, gender, _ in items])
        with (data_dir / f"{task}_test.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["key", "file", "age", "gender", "label"])
            for i, (name, age, gender, _) in enumerate(splits["test"]):
                writer.writerow([f"{i:08d}", name, age, gender, age_to_bin(age) if task == "age" else gender])
    return data_dir


def small_solver(path: Path, net: str = "caffe_models/age_net/train_val.prototxt", **fields) -> Path:
    """A solver prototxt for short test runs."""
    values = dict(net=f'"{net}"', base_lr=0.01, lr_policy='"fixed"', momentum=0.9, weight_decay=0.0005,
                  max_iter=30, display=10, snapshot=0, snapshot_prefix='"age_net"', random_seed=1,
                  solver_mode="CPU")
    values.update(fields)
    lines = []
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key}: {item}")
    path.write_text("\n".join(lines) + "\n")
    return path


def small_net(path: Path, source: Path, batch: int = 8, size: int = 256, crop: int = 227,
              mirror: bool = True, dropout: float = 0.5, classes: int = 9) -> Path:
    """Our AgeNet train_val with a small batch (and optional dropout/mirror changes)."""
    text = source.read_text()
    text = text.replace("batch_size: 50", f"batch_size: {batch}")
    text = text.replace("crop_size: 227", f"crop_size: {crop}")
    if not mirror:
        text = text.replace("mirror: true", "mirror: false")
    text = text.replace("dropout_ratio: 0.5", f"dropout_ratio: {dropout}")
    if classes != 9:
        text = text.replace("num_output: 9", f"num_output: {classes}")
    path.write_text(text)
    return path
