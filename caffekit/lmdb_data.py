"""Caffe's Data layer and DataTransformer, for the torch backend.

Semantics copied from Caffe (data_layer.cpp, data_reader.cpp, data_transformer.cpp):
records are read in key order and the reader wraps around at the end; each image is
cropped (TRAIN: h_off = Rand(H - crop + 1), TEST: (H - crop) / 2), the mean image is
subtracted at the same offset (or per-channel mean values), the result is multiplied by
``scale`` and, when ``mirror`` is on and a coin says so, flipped left-right.

One difference, on purpose: the batch for iteration i is a pure function of (seed, i),
and the reader position of iteration i is i * batch_size (mod the record count). So a
resumed run sees exactly the batches an uninterrupted run would have (Caffe restarts its
reader at the first record on resume).

In a data-parallel run of N workers (caffekit/distributed.py), worker r reads the r-th
batch_size records of each group of N x batch_size, as Caffe's solvers share one reader:
together the workers read at iteration i what one process with batch N x batch_size reads,
with the same crops and mirrors (worker r skips the random draws of the r x batch_size
images before its own).
"""
import queue
import threading
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np

from caffekit import formats
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2


class LmdbSource:
    """A read-only LMDB of Datums, addressed by position in key order."""

    def __init__(self, path):
        import lmdb  # a host dependency, imported where needed

        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise KitError(f"{self.path}: LMDB not found (run `make dataset` first, or check --data-dir)")
        try:
            self.env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as exc:
            raise KitError(f"{self.path}: cannot open LMDB ({exc})") from None
        with self.env.begin() as txn:
            self.keys = list(txn.cursor().iternext(keys=True, values=False))
        if not self.keys:
            raise KitError(f"{self.path}: LMDB holds no records")
        first = self.datum(0)
        self.shape = formats.datum_to_array(first).shape

    def __len__(self) -> int:
        return len(self.keys)

    def datum(self, position: int) -> caffe_pb2.Datum:
        with self.env.begin() as txn:
            value = txn.get(self.keys[position % len(self.keys)])
        try:
            return formats.parse_datum(value)
        except Exception as exc:  # a DecodeError from protobuf
            raise KitError(f"{self.path}: record {self.keys[position % len(self.keys)]!r} is not a Datum ({exc})") \
                from None

    def image_label(self, position: int) -> Tuple[np.ndarray, int]:
        datum = self.datum(position)
        try:
            image = formats.datum_to_array(datum)
        except ValueError as exc:
            raise KitError(f"{self.path}: record {position}: {exc}") from None
        if image.shape != self.shape:
            raise KitError(f"{self.path}: record {position} has shape {image.shape}, the first has {self.shape}")
        return image, datum.label

    def close(self) -> None:
        self.env.close()


class Transformer:
    """Caffe's DataTransformer for raw uint8 Datums."""

    def __init__(self, param: caffe_pb2.TransformationParameter, train: bool, image_shape, mean_path=None,
                 source: str = "transform_param"):
        self.crop = int(param.crop_size)
        self.scale = float(param.scale)
        self.mirror = bool(param.mirror)
        self.train = train
        channels, height, width = image_shape
        if self.crop and (self.crop > height or self.crop > width):
            raise KitError(f"{source}: crop_size {self.crop} is larger than the images ({height}x{width})")
        self.mean = None
        if param.HasField("mean_file"):
            if param.mean_value:
                raise KitError(f"{source}: mean_file and mean_value are both set (Caffe allows one)")
            path = Path(mean_path or param.mean_file)
            mean = formats.read_mean(path)
            if tuple(mean.shape) != tuple(image_shape):
                raise KitError(f"{path}: mean image has shape {tuple(mean.shape)}, the LMDB images are "
                               f"{tuple(image_shape)}")
            self.mean = mean.astype(np.float32)
        elif param.mean_value:
            values = list(param.mean_value)
            if len(values) not in (1, channels):
                raise KitError(f"{source}: give 1 mean_value or {channels}, not {len(values)}")
            self.mean = np.broadcast_to(np.asarray(values, np.float32).reshape(-1, 1, 1),
                                        (channels, height, width))
        self.out_shape = (channels, self.crop or height, self.crop or width)

    def offsets(self, height: int, width: int, rng: np.random.Generator):
        """(do_mirror, h_off, w_off) in Caffe's order: mirror coin first, then the crop."""
        do_mirror = bool(self.mirror and rng.integers(2))
        if not self.crop:
            return do_mirror, 0, 0
        if self.train:
            return do_mirror, int(rng.integers(height - self.crop + 1)), int(rng.integers(width - self.crop + 1))
        return do_mirror, (height - self.crop) // 2, (width - self.crop) // 2

    def __call__(self, image: np.ndarray, rng: np.random.Generator, out: np.ndarray) -> None:
        """Write the transformed ``image`` (uint8 C x H x W) into ``out`` (float32)."""
        _, height, width = image.shape
        do_mirror, h, w = self.offsets(height, width, rng)
        ch, cw = self.out_shape[1:]
        window = (slice(None), slice(h, h + ch), slice(w, w + cw))
        np.subtract(image[window], self.mean[window], out=out, dtype=np.float32) if self.mean is not None \
            else np.copyto(out, image[window], casting="unsafe")
        if self.scale != 1:
            out *= np.float32(self.scale)
        if do_mirror:
            out[...] = out[:, :, ::-1]


class DataLayer:
    """A Data layer of one phase: batches of (data float32 N x C x H x W, labels float32 N)."""

    def __init__(self, layer: caffe_pb2.LayerParameter, train: bool, seed: int, source_path=None,
                 mean_path=None, shard: Tuple[int, int] = (0, 1)):
        p = layer.data_param
        if p.backend != caffe_pb2.DataParameter.LMDB:
            raise KitError(f"layer {layer.name!r}: only the LMDB backend is supported (add `backend: LMDB`)")
        if not p.batch_size:
            raise KitError(f"layer {layer.name!r}: data_param.batch_size is missing")
        self.name = layer.name
        self.batch_size = int(p.batch_size)
        self.source = LmdbSource(source_path or p.source)
        self.transform = Transformer(layer.transform_param, train, self.source.shape, mean_path,
                                     source=f"layer {layer.name!r}")
        self.train = train
        self.seed = int(seed)
        self.tops = list(layer.top)
        self.rank, self.workers = (int(v) for v in shard)  # (worker r, of N) in a data-parallel run

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.batch_size,) + tuple(self.transform.out_shape)

    def batch(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Batch number ``index`` of this layer: records index*batch_size onwards (wrapping); of worker r of
        N, the r-th batch_size records from index*N*batch_size."""
        # Caffe mirrors at random whenever mirror is on, in TEST too; crops are random only in TRAIN.
        rng = np.random.default_rng([self.seed, index, int(self.train)])
        _, height, width = self.source.shape
        for _ in range(self.rank * self.batch_size):  # the draws of the workers before this one
            self.transform.offsets(height, width, rng)
        data = np.empty(self.shape, np.float32)
        labels = np.empty(self.batch_size, np.float32)
        start = (index * self.workers + self.rank) * self.batch_size
        for i in range(self.batch_size):
            image, label = self.source.image_label(start + i)
            self.transform(image, rng, data[i])
            labels[i] = label
        return data, labels

    def batches(self, first: int, prefetch: int = 3, threads: int = 1, convert=None) -> "Prefetcher":
        return Prefetcher(self, first, prefetch, threads, convert)


class Prefetcher:
    """Prepares batches first, first+1, ... in background threads (numpy and LMDB release the GIL): thread t of
    T makes batches first+t, first+t+T, ... into a queue of its own, so they come out in order however the
    threads are scheduled. ``convert`` turns each batch into what the consumer wants (pinned tensors for a GPU),
    off the main thread too."""

    def __init__(self, layer: DataLayer, first: int, depth: int = 3, threads: int = 1, convert=None):
        self.layer = layer
        self.convert = convert
        self.first = self.next_index = first
        per_thread = max(1, -(-depth // threads))
        self.queues = [queue.Queue(maxsize=per_thread) for _ in range(threads)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(first + t, threads, self.queues[t]), daemon=True,
                                         name=f"prefetch-{layer.name}-{t}") for t in range(threads)]
        for thread in self.threads:
            thread.start()

    def _make(self, index: int):
        batch = self.layer.batch(index)
        return self.convert(batch) if self.convert is not None else batch

    def _run(self, index: int, step: int, out: "queue.Queue") -> None:
        while not self.stop.is_set():
            try:
                item = (index, self._make(index), None)
            except BaseException as exc:  # re-raised on the main thread
                item = (index, None, exc)
            while not self.stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            index += step

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> Tuple[np.ndarray, np.ndarray]:
        index, batch, error = self.queues[(self.next_index - self.first) % len(self.queues)].get()
        if error is not None:
            raise error
        assert index == self.next_index
        self.next_index += 1
        return batch

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)
