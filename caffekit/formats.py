"""Caffe's file formats: Datum records, BlobProto (mean files, weights), prototxt, caffemodel."""
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from caffekit import atomic
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2


# ---------------------------------------------------------------- Datum
def array_to_datum(image_chw: np.ndarray, label: int) -> caffe_pb2.Datum:
    """A raw (not encoded) Datum from a uint8 C x H x W image, as convert_imageset writes."""
    if image_chw.dtype != np.uint8 or image_chw.ndim != 3:
        raise ValueError(f"expected a uint8 CxHxW array, got {image_chw.dtype} {image_chw.shape}")
    channels, height, width = image_chw.shape
    return caffe_pb2.Datum(channels=channels, height=height, width=width,
                           data=np.ascontiguousarray(image_chw).tobytes(), label=int(label))


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """The uint8 C x H x W image of a Datum, decoding it when ``encoded`` is set."""
    if datum.encoded:
        import cv2  # only encoded Datums need OpenCV

        image = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError("encoded Datum does not decode as an image")
        return image.transpose(2, 0, 1)
    if datum.float_data:
        raise ValueError("float Datums are not supported (the kit stores uint8 images)")
    shape = (datum.channels, datum.height, datum.width)
    expected = int(np.prod(shape))
    if len(datum.data) != expected:
        raise ValueError(f"Datum of shape {shape} holds {len(datum.data)} bytes, expected {expected}")
    return np.frombuffer(datum.data, np.uint8).reshape(shape)


def parse_datum(value: bytes) -> caffe_pb2.Datum:
    datum = caffe_pb2.Datum()
    datum.ParseFromString(value)
    return datum


# ---------------------------------------------------------------- BlobProto
def blob_to_array(blob: caffe_pb2.BlobProto) -> np.ndarray:
    """A float32 array of a BlobProto's data, shaped by ``shape`` or the legacy 4-D fields."""
    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    values = blob.double_data if len(blob.double_data) else blob.data
    data = np.asarray(values, dtype=np.float32)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"blob of shape {shape} holds {data.size} values")
    return data.reshape(shape)


def array_to_blob(array: np.ndarray, legacy_4d: bool = False) -> caffe_pb2.BlobProto:
    """A BlobProto of ``array``; ``legacy_4d`` writes num/channels/height/width as
    compute_image_mean does (mean files), otherwise the ``shape`` field."""
    array = np.asarray(array, dtype=np.float32)
    blob = caffe_pb2.BlobProto()
    if legacy_4d:
        blob.num, blob.channels, blob.height, blob.width = array.reshape((1,) * (4 - array.ndim) + array.shape).shape
    else:
        blob.shape.dim.extend(array.shape)
    blob.data.extend(array.ravel().tolist())
    return blob


def read_blob(path, what: str = "blob") -> np.ndarray:
    """The array of a ``.binaryproto`` file holding one BlobProto (a mean image, an infogain matrix)."""
    path = Path(path)
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
        return blob_to_array(blob)
    except FileNotFoundError:
        raise KitError(f"{path}: {what} file not found (run `make dataset` first)") from None
    except (DecodeError, ValueError) as exc:
        raise KitError(f"{path}: not a Caffe BlobProto {what} file ({exc})") from None


def read_mean(path) -> np.ndarray:
    """The C x H x W float32 mean image of a ``mean.binaryproto``."""
    mean = read_blob(path, "mean")
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3 or mean.shape[0] not in (1, 3):
        raise KitError(f"{path}: mean blob has shape {mean.shape}, expected 1 x C x H x W")
    return mean


def write_mean(path, mean_chw: np.ndarray) -> None:
    atomic.write_bytes(path, array_to_blob(mean_chw[np.newaxis], legacy_4d=True).SerializeToString())


# ---------------------------------------------------------------- prototxt, caffemodel
def _read_text(path, message, what: str):
    path = Path(path)
    try:
        text_format.Parse(path.read_text(), message)
    except FileNotFoundError:
        raise KitError(f"{path}: {what} not found") from None
    except text_format.ParseError as exc:
        raise KitError(f"{path}: invalid {what}: {exc}") from None
    return message


def read_net(path) -> caffe_pb2.NetParameter:
    """A network definition (``.prototxt``, V1 or V2 syntax)."""
    return _read_text(path, caffe_pb2.NetParameter(), "network prototxt")


def read_solver(path) -> caffe_pb2.SolverParameter:
    return _read_text(path, caffe_pb2.SolverParameter(), "solver prototxt")


def write_prototxt(path, message) -> None:
    atomic.write_text(path, text_format.MessageToString(message))


def read_caffemodel(path) -> caffe_pb2.NetParameter:
    path = Path(path)
    net = caffe_pb2.NetParameter()
    try:
        data = path.read_bytes()
        net.ParseFromString(data)
    except FileNotFoundError:
        raise KitError(f"{path}: caffemodel not found") from None
    except DecodeError:
        raise KitError(f"{path}: not a valid caffemodel (truncated or not a Caffe NetParameter)") from None
    if not net.layer and not net.layers:
        raise KitError(f"{path}: caffemodel holds no layers")
    return net


def write_caffemodel(path, net: caffe_pb2.NetParameter) -> None:
    atomic.write_bytes(path, net.SerializeToString())
