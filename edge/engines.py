"""One engine interface, two back ends: OpenVINO (IR, any device) and OpenCV DNN (caffemodel, CPU).

    engine = make_engine(files, device="CPU", backend="auto", mode="throughput")
    outputs = engine.infer(face)                # face: u8 BGR H x W x 3; {output name: 1-D array}
    engine.set_callback(fn)                     # fn(userdata, outputs), called as results arrive
    engine.infer_async(face, userdata); engine.wait_all()
    engine.close()                              # waits for what is in flight, drops it (stopping early)

The OpenVINO IR carries its own preprocessing (u8 -> f32, NHWC -> NCHW, minus the training
mean), so its engine passes pixels through untouched. OpenCV's Caffe importer has nothing
of the kind: the OpenCV engine does the same steps itself, with the mean image saved beside
the IR (<net>.mean.npy), and that is the only place in edge/ that touches pixel values.
"""
import hashlib
import os

import numpy as np

from model_files import OPENCV_FIELDS, EdgeError, check_fields, check_outputs

BACKENDS = ("auto", "openvino", "opencv")
DEVICES = ("MYRIAD", "CPU", "GPU", "NPU", "AUTO")


def import_openvino():
    """(Core, AsyncInferQueue, version) from OpenVINO 2023.1+ (``openvino``) or 2022.x (``openvino.runtime``)."""
    try:
        from openvino import AsyncInferQueue, Core
    except ImportError:
        try:
            from openvino.runtime import AsyncInferQueue, Core
        except ImportError:
            return None
    try:
        from openvino import __version__ as version
    except ImportError:
        from openvino.runtime import get_version
        version = get_version()
    return Core, AsyncInferQueue, version


def first_line(exc):
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # OpenVINO puts the reason after "Exception from ..." / "Check ... failed at ..." lines.
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0][:300]


class Engine(object):
    """Classifies face crops; results of async requests go to the callback on the main thread's terms."""

    name = "engine"

    def __init__(self, files):
        self.files = files
        self.outputs = files.outputs  # the heads, from the JSON: name, task, size, labels
        self.output_names = [output["name"] for output in files.outputs]
        self.size = files.meta["input"]["shape"][1]
        self.training_size = files.meta["training_size"]
        self._callback = None

    def set_callback(self, callback):
        self._callback = callback

    def infer(self, face):
        raise NotImplementedError

    def infer_async(self, face, userdata):
        self._callback(userdata, self.infer(face))

    def wait_all(self):
        pass

    def close(self):
        """Waits for the requests in flight, if any, dropping their results and errors."""


class OpenVINOEngine(Engine):
    def __init__(self, files, device, mode, openvino=None):
        super(OpenVINOEngine, self).__init__(files)
        Core, AsyncInferQueue, self.version = openvino or import_openvino()
        core = Core()
        self.device = resolve_device(core, device)
        if self.device.startswith("MYRIAD") and files.meta["precision"] == "INT8":
            raise EdgeError("the Neural Compute Stick 2 (MYRIAD) runs FP16 models: use --precision FP16")
        self.name = "OpenVINO {} {} {}".format(self.version.split("-")[0], self.device, files.meta["precision"])
        config = {"PERFORMANCE_HINT": "THROUGHPUT" if mode == "throughput" else "LATENCY"}
        try:
            model = core.read_model(files.xml, files.bin)
        except RuntimeError as exc:
            raise EdgeError("{}: cannot read the IR ({})".format(files.xml, first_line(exc)))
        try:
            self.compiled = core.compile_model(model, self.device, config)
        except RuntimeError:
            # Older plugins (MYRIAD in 2022.3 among them) may not take every hint: try without.
            try:
                self.compiled = core.compile_model(model, self.device)
            except RuntimeError as exc:
                raise EdgeError("{}: cannot load on {} ({})".format(files.xml, self.device, first_line(exc)))
        sizes = {}
        for port in self.compiled.outputs:
            names = port.get_names()
            name = next((n for n in self.output_names if n in names), sorted(names)[0] if names else "?")
            sizes[name] = int(np.prod(list(port.get_shape())[1:]))
        check_outputs(files, list(self.compiled.inputs[0].get_shape()), sizes)
        self.ports = [self.compiled.output(name) for name in self.output_names]
        self.request = self.compiled.create_infer_request()
        self._queue = None
        self._AsyncInferQueue = AsyncInferQueue
        self._errors = []

    def _read(self, request):
        # Copies: the request's tensors are reused by the next inference.
        return dict((name, np.array(request.get_tensor(port).data).reshape(-1))
                    for name, port in zip(self.output_names, self.ports))

    def infer(self, face):
        self.request.infer({0: face[np.newaxis]})
        return self._read(self.request)

    def _on_done(self, request, userdata):
        # Runs on an OpenVINO thread: copy the output before the request is reused, and keep
        # any exception for the main thread (raising here would be lost).
        try:
            self._callback(userdata, self._read(request))
        except Exception as exc:  # noqa: BLE001 - re-raised in wait_all
            self._errors.append(exc)

    def infer_async(self, face, userdata):
        if self._queue is None:
            self._queue = self._make_queue()
            self._queue.set_callback(self._on_done)
        self._queue.start_async({0: face[np.newaxis]}, userdata)  # blocks while every request is busy
        self._raise_callback_errors()

    def _make_queue(self):
        # As many requests in flight as the device wants. Asked for explicitly: AsyncInferQueue(compiled, 0)
        # means the same in current OpenVINO, but 2022.3 (the NCS2's last release) refuses it ("Please
        # specify number of infer requests directly!").
        try:
            jobs = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        except (RuntimeError, TypeError, ValueError):
            jobs = 2
        try:
            return self._AsyncInferQueue(self.compiled, max(1, jobs))
        except RuntimeError as exc:
            raise EdgeError("{}: cannot start {} inference requests on {} ({})".format(
                self.files.xml, jobs, self.device, first_line(exc)))

    def wait_all(self):
        if self._queue is not None:
            self._queue.wait_all()
        self._raise_callback_errors()

    def close(self):
        # Python must not shut down while OpenVINO's threads may still call _on_done: the process
        # would abort ("FATAL: exception not rethrown") instead of exiting with its code. The queue
        # itself is kept: deleting it here sometimes aborts too ("terminate called without an
        # active exception", OpenVINO 2026.4).
        if self._queue is not None:
            self._queue.wait_all()
        del self._errors[:]

    def _raise_callback_errors(self):
        if self._errors:
            raise self._errors.pop(0)

    @property
    def requests_in_flight(self):
        return len(self._queue) if self._queue is not None else 1


def resolve_device(core, device):
    """``device``, or the one present: MYRIAD (the NCS2) when plugged in, else CPU."""
    available = list(core.available_devices)
    if device is None:
        return "MYRIAD" if any(d.startswith("MYRIAD") for d in available) else "CPU"
    if device in ("AUTO",) or any(d == device or d.startswith(device + ".") for d in available):
        return device
    hint = ""
    if device == "MYRIAD":
        hint = "; is the Neural Compute Stick 2 plugged in, with the udev rules installed? " \
               "The MYRIAD plugin exists only up to OpenVINO 2022.3 (edge/README.md)"
    raise EdgeError("device {} not available (present: {}){}".format(device, ", ".join(available) or "none", hint))


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class OpenCVEngine(Engine):
    """The caffemodel through OpenCV's Caffe importer (OpenCV 4.x; OpenCV 5 removed it)."""

    def __init__(self, files, caffemodel=None):
        super(OpenCVEngine, self).__init__(files)
        import cv2

        check_fields(files.meta, files.meta_path, OPENCV_FIELDS)
        caffe = files.meta["caffe"]
        deploy = os.path.join(files.folder, caffe["deploy"])
        mean_path = os.path.join(files.folder, files.meta["mean"]["file"])
        candidates = [caffemodel] if caffemodel else \
            [caffe["caffemodel"], os.path.join(files.folder, files.net + ".caffemodel")]
        found = [path for path in candidates if path and os.path.isfile(path)]
        if not found:
            raise EdgeError("{}: caffemodel not found for the OpenCV engine (looked at {}; pass --caffe-model "
                            "{}=PATH)".format(files.net, ", ".join(candidates), files.key))
        self.caffemodel = found[0]
        if _sha256(self.caffemodel) != caffe["caffemodel_sha256"]:
            raise EdgeError("{}: not the caffemodel {} was compiled from (sha256 differs; mismatched model files)"
                            .format(self.caffemodel, files.xml))
        if not hasattr(cv2.dnn, "readNetFromCaffe"):
            raise EdgeError("OpenCV {} has no Caffe importer (removed in OpenCV 5): pip install "
                            "'opencv-python-headless<5'".format(cv2.__version__))
        try:
            self.net = cv2.dnn.readNetFromCaffe(deploy, self.caffemodel)
            self.mean = np.load(mean_path).astype(np.float32)
        except (cv2.error, OSError, ValueError) as exc:
            raise EdgeError("{}: cannot load for OpenCV ({})".format(self.caffemodel, first_line(exc)))
        if self.mean.shape != (3, self.size, self.size):
            raise EdgeError("{}: mean of shape {} for a {}x{} input".format(mean_path, self.mean.shape,
                                                                              self.size, self.size))
        self.name = "OpenCV {} DNN CPU (caffemodel)".format(cv2.__version__)

    def infer(self, face):
        # The IR does these steps inside the graph; OpenCV needs them here.
        blob = face.transpose(2, 0, 1)[np.newaxis].astype(np.float32) - self.mean
        self.net.setInput(blob)
        if len(self.output_names) == 1:  # a one-task net: its last blob, whatever the IR called it
            return {self.output_names[0]: self.net.forward().reshape(-1)}
        # A joint net's outputs are its deploy blobs, named as in the IR.
        return dict((name, value.reshape(-1)) for name, value in
                    zip(self.output_names, self.net.forward(self.output_names)))

    requests_in_flight = 1


def make_engine(files, device=None, backend="auto", mode="latency", caffemodel=None):
    """The engine for one net: OpenVINO when installed (or asked for), else OpenCV DNN."""
    openvino = import_openvino() if backend in ("auto", "openvino") else None
    if backend == "openvino" and openvino is None:
        raise EdgeError("OpenVINO is not installed (pip install -r edge/requirements.txt)")
    if openvino is not None:
        return OpenVINOEngine(files, device, mode, openvino)
    if device not in (None, "CPU"):
        raise EdgeError("device {} needs the OpenVINO engine; the OpenCV engine runs on the CPU only{}".format(
            device, "" if backend == "opencv" else " (and OpenVINO is not installed)"))
    return OpenCVEngine(files, caffemodel)

