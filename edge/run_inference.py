"""Age and gender of every face in images, a folder, a video or a camera.

    python edge/run_inference.py --image photo.jpg
    python edge/run_inference.py --image a.jpg b.jpg --json --output annotated/
    python edge/run_inference.py --dir photos/ --device MYRIAD
    python edge/run_inference.py --video clip.mp4 --output annotated.mp4
    python edge/run_inference.py --camera 0 --show
    python edge/run_inference.py --image 25_1_2_2017.jpg.chip.jpg --no-detect   # already a face crop

Models: <models>/age_net/<PRECISION>/age_net.xml and gender_net likewise, with the JSON that
scripts/compile_ir.py writes beside them (labels, input format). Without OpenVINO installed
the runner uses OpenCV DNN on the caffemodels named in that JSON (CPU only).

Exit codes:
  0    done; at least one face in every image (or somewhere in the video)
  2    error, one line on stderr: bad option, missing or mismatched model files, unreadable
       image or video, requested device absent (the message lists those present); an
       unreadable image among several is reported and the others are still processed
  3    no face found in at least one image (the others are still reported), or in no frame
       of a video or camera stream
  130  interrupted (Ctrl-C)
"""
import argparse
import collections
import functools
import json
import os
import sys
import threading
import time

import cv2
import numpy as np

from engines import BACKENDS, DEVICES, make_engine
from face_detection import FaceDetector, chip_box, net_input
from model_files import PRECISIONS, EdgeError, all_model_files

EXIT_OK, EXIT_ERROR, EXIT_NO_FACE, EXIT_INTERRUPTED = 0, 2, 3, 130
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v", ".mov": "mp4v"}

Face = collections.namedtuple("Face", "box age age_prob gender gender_prob")


def build_argparser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    source = parser.add_argument_group("input (one kind)")
    source.add_argument("--image", nargs="+", metavar="FILE", help="one or more image files")
    source.add_argument("--dir", help="every image in a folder")
    source.add_argument("--video", metavar="FILE", help="a video file")
    source.add_argument("--camera", type=int, metavar="N", help="camera number (0 = the first)")
    model = parser.add_argument_group("model")
    model.add_argument("--models", default="models/ir", help="folder of compiled IRs (default: models/ir, "
                       "relative to the working folder or to the folder above edge/)")
    model.add_argument("--precision", choices=PRECISIONS, default="FP16", help="default FP16 (NCS2)")
    model.add_argument("--device", choices=DEVICES, help="default: MYRIAD when plugged in, else CPU")
    model.add_argument("--engine", choices=BACKENDS, default="auto",
                       help="auto: OpenVINO when installed, else OpenCV DNN on the caffemodel")
    model.add_argument("--caffe-model", action="append", default=[], metavar="TASK=FILE",
                       help="caffemodel for the OpenCV engine, e.g. age=models/age_net/x.caffemodel")
    behaviour = parser.add_argument_group("faces and output")
    behaviour.add_argument("--no-detect", action="store_true",
                           help="each input is already a face crop (like UTKFace files)")
    behaviour.add_argument("--json", action="store_true", help="one JSON object per input on stdout")
    behaviour.add_argument("--output", metavar="PATH",
                           help="annotated copy: an image or video file, or a folder")
    behaviour.add_argument("--show", action="store_true", help="show annotated frames in a window")
    behaviour.add_argument("--max-frames", type=int, metavar="N", help="stop a video or camera after N frames")
    return parser


# ---------------------------------------------------------------- inputs
def image_files(args):
    if args.image:
        return list(args.image)
    if not os.path.isdir(args.dir):
        raise EdgeError("{}: folder not found".format(args.dir))
    names = sorted(n for n in os.listdir(args.dir) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise EdgeError("{}: no images ({})".format(args.dir, " ".join(IMAGE_EXTENSIONS)))
    return [os.path.join(args.dir, n) for n in names]


def open_stream(args):
    capture = cv2.VideoCapture(args.video if args.video is not None else args.camera)
    if not capture.isOpened():
        what = args.video if args.video is not None else "camera {}".format(args.camera)
        raise EdgeError("{}: cannot open{}".format(what, "" if args.video is None or os.path.isfile(args.video)
                                                   else " (file not found)"))
    return capture


# ---------------------------------------------------------------- the pipeline
class Job(object):
    """One image or frame on its way through detection and both nets."""

    def __init__(self, index, name, frame, boxes, inputs, started):
        self.index, self.name, self.frame, self.boxes = index, name, frame, boxes
        self.inputs, self.started = inputs, started
        self.probs = {}
        self.remaining = 0

    def faces(self, labels):
        faces = []
        for i, box in enumerate(self.boxes):
            age, gender = self.probs["age"][i], self.probs["gender"][i]
            faces.append(Face(list(box), labels["age"][int(np.argmax(age))], float(np.max(age)),
                              labels["gender"][int(np.argmax(gender))], float(np.max(gender))))
        return faces


class Pipeline(object):
    """Keeps requests in flight on both nets and hands back finished jobs in input order.

    Detection of the next frame runs on this thread while the device works on earlier faces;
    ``infer_async`` blocks only when every request of a net is busy.
    """

    def __init__(self, engines):
        self.engines = engines
        self.pending = collections.OrderedDict()
        self.lock = threading.Lock()
        for task, engine in engines.items():
            engine.set_callback(functools.partial(self._on_result, task))

    def _on_result(self, task, userdata, probs):
        index, face = userdata
        with self.lock:
            job = self.pending[index]
            job.probs[task][face] = probs
            job.remaining -= 1

    def submit(self, job):
        with self.lock:
            job.probs = {task: [None] * len(job.inputs) for task in self.engines}
            job.remaining = len(job.inputs) * len(self.engines)
            self.pending[job.index] = job
        for face, image in enumerate(job.inputs):
            for engine in self.engines.values():
                engine.infer_async(image, (job.index, face))

    def finished(self):
        done = []
        with self.lock:
            while self.pending and next(iter(self.pending.values())).remaining == 0:
                done.append(self.pending.popitem(last=False)[1])
        return done

    def drain(self):
        for engine in self.engines.values():
            engine.wait_all()
        return self.finished()


def prepare(index, name, frame, detector, size):
    """A Job: the faces of ``frame`` (or the whole frame with --no-detect) as net inputs."""
    started = time.perf_counter()
    if detector is None:
        boxes = [(0, 0, frame.shape[1], frame.shape[0])]
        chips = boxes
    else:
        boxes = detector.detect(frame)
        chips = [chip_box(box, frame.shape) for box in boxes]
    return Job(index, name, frame, boxes, [net_input(frame, chip, size) for chip in chips], started)


# ---------------------------------------------------------------- output
def describe(job, faces):
    if not faces:
        return "{}: no face found".format(job.name)
    lines = []
    for i, face in enumerate(faces):
        x, y, w, h = face.box
        lines.append("{}: face {} at x={} y={} w={} h={}: age {} ({:.0%}), {} ({:.0%})".format(
            job.name, i + 1, x, y, w, h, face.age, face.age_prob, face.gender, face.gender_prob))
    return "\n".join(lines)


def as_json(job, faces, ms):
    return json.dumps({"image": job.name, "faces": [f._asdict() for f in faces], "ms": round(ms, 2)})


def annotate(frame, faces, fps=None):
    out = frame.copy()
    for face in faces:
        x, y, w, h = face.box
        colour = (60, 60, 230) if face.gender == "Female" else (230, 140, 40)
        cv2.rectangle(out, (x, y), (x + w, y + h), colour, 2)
        text = "{} {:.0%}, {} {:.0%}".format(face.gender, face.gender_prob, face.age, face.age_prob)
        scale = max(0.4, min(1.0, w / 180.0))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        if tw + 6 > out.shape[1]:  # a face filling a small image: shrink the label to stay readable in full
            scale *= (out.shape[1] - 6) / float(tw)
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x = max(0, min(x, out.shape[1] - tw - 4))
        top = max(y - th - base - 4, 0)
        cv2.rectangle(out, (x, top), (x + tw + 4, top + th + base + 4), colour, -1)
        cv2.putText(out, text, (x + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    if fps is not None:
        cv2.putText(out, "{:.1f} FPS".format(fps), (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 0), 2,
                    cv2.LINE_AA)
    return out


def write_image(path, image):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        os.makedirs(folder)
    if not cv2.imwrite(path, image):
        raise EdgeError("{}: cannot write image".format(path))


def image_output_path(output, name, several):
    if output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(output):
        if several:
            raise EdgeError("--output {}: several inputs need a folder, not a file name".format(output))
        return output
    return os.path.join(output, os.path.splitext(os.path.basename(name))[0] + ".png")


def show(window, image):
    try:
        cv2.imshow(window, image)
        return cv2.waitKey(1) & 0xFF in (27, ord("q"))
    except cv2.error:
        raise EdgeError("--show needs an OpenCV build with a GUI (pip install opencv-python), "
                        "or use --output instead")


class Reporter(object):
    """Prints each finished job (text or JSON) and writes its annotated copy."""

    def __init__(self, args, labels, several):
        self.args, self.labels, self.several = args, labels, several
        self.without_face = 0
        self.with_face = 0
        self.writer = None
        self.stop = False

    def report(self, job, fps=None):
        faces = job.faces(self.labels)
        ms = 1000 * (time.perf_counter() - job.started)
        if faces:
            self.with_face += 1
        else:
            self.without_face += 1
        print(as_json(job, faces, ms) if self.args.json else describe(job, faces), flush=True)
        if self.args.output or self.args.show:
            image = annotate(job.frame, faces, fps)
            if self.args.output:
                self.save(job, image)
            if self.args.show and show("age and gender", image):
                self.stop = True

    def save(self, job, image):
        if self.args.video is None and self.args.camera is None:
            write_image(image_output_path(self.args.output, job.name, self.several), image)
            return
        if self.writer is None:
            self.writer = open_video_writer(self.args, image.shape)
        self.writer.write(image)

    def close(self):
        if self.writer is not None:
            self.writer.release()


def open_video_writer(args, shape):
    output = args.output
    extension = os.path.splitext(output)[1].lower()
    if extension not in VIDEO_EXTENSIONS:
        stem = os.path.splitext(os.path.basename(args.video))[0] if args.video else "camera{}".format(args.camera)
        output, extension = os.path.join(output, stem + ".mp4"), ".mp4"
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        os.makedirs(folder)
    writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*VIDEO_EXTENSIONS[extension]), 25.0,
                             (shape[1], shape[0]))
    if not writer.isOpened():
        raise EdgeError("{}: cannot write video ({} codec)".format(output, VIDEO_EXTENSIONS[extension]))
    return writer


# ---------------------------------------------------------------- main
def load_engines(args, mode):
    caffemodels = {}
    for item in args.caffe_model:
        task, _, path = item.partition("=")
        if task not in ("age", "gender") or not path:
            raise EdgeError("--caffe-model {}: expected age=FILE or gender=FILE".format(item))
        caffemodels[task] = path
    engines = collections.OrderedDict()
    for files in all_model_files(args.models, args.precision):
        engines[files.task] = make_engine(files, args.device, args.engine, mode, caffemodels.get(files.task))
    sizes = {engine.size for engine in engines.values()}
    if len(sizes) != 1:
        raise EdgeError("the age and gender nets expect different input sizes ({})".format(sorted(sizes)))
    return engines


def run_images(args, pipeline, reporter, detector, size):
    paths = image_files(args)
    unreadable = 0
    for index, path in enumerate(paths):
        # Checked first: OpenCV's imread would add its own warning line for a missing file.
        exists = os.path.isfile(path)
        frame = cv2.imread(path, cv2.IMREAD_COLOR) if exists else None
        if frame is None:
            print("error: {}: cannot read image{}".format(path, "" if exists else " (file not found)"),
                  file=sys.stderr)
            unreadable += 1
            continue
        pipeline.submit(prepare(index, path, frame, detector, size))
        for job in pipeline.finished():
            reporter.report(job)
    for job in pipeline.drain():
        reporter.report(job)
    if unreadable:
        return EXIT_ERROR
    return EXIT_NO_FACE if reporter.without_face else EXIT_OK


def run_stream(args, pipeline, reporter, detector, size, engines):
    capture = open_stream(args)
    name = args.video if args.video is not None else "camera{}".format(args.camera)
    start, cpu_start = time.perf_counter(), time.process_time()  # process time: all threads, this process
    frames, last_print = 0, start
    try:
        while not reporter.stop and (args.max_frames is None or frames < args.max_frames):
            ok, frame = capture.read()
            if not ok:
                break
            pipeline.submit(prepare(frames, "{}#{}".format(name, frames), frame, detector, size))
            frames += 1
            for job in pipeline.finished():
                reporter.report(job, fps=(job.index + 1) / (time.perf_counter() - start))
            now = time.perf_counter()
            if now - last_print > 2.0:
                print("{} frames, {:.1f} FPS".format(frames, frames / (now - start)), file=sys.stderr)
                last_print = now
        for job in pipeline.drain():
            reporter.report(job, fps=(job.index + 1) / (time.perf_counter() - start))
    finally:
        capture.release()
    if frames == 0:
        raise EdgeError("{}: no frames could be read".format(name))
    elapsed = time.perf_counter() - start
    cpu_ms = 1000 * (time.process_time() - cpu_start) / frames
    in_flight = max(getattr(engine, "requests_in_flight", 1) for engine in engines.values())
    print("{}: {} frames in {:.1f} s = {:.1f} FPS, {:.1f} ms CPU per frame (detection and both nets, {} requests "
          "in flight per net, {})".format(name, frames, elapsed, frames / elapsed, cpu_ms, in_flight,
                                          next(iter(engines.values())).name), file=sys.stderr)
    return EXIT_OK if reporter.with_face else EXIT_NO_FACE


def main(argv=None):
    args = build_argparser().parse_args(argv)
    sources = [s for s in ("image", "dir", "video", "camera") if getattr(args, s) is not None]
    if len(sources) != 1:
        raise EdgeError("give exactly one input: --image, --dir, --video or --camera")
    stream = args.video is not None or args.camera is not None
    several = stream or args.dir is not None or len(args.image or ()) > 1
    engines = load_engines(args, "throughput" if several else "latency")
    labels = {task: engine.labels for task, engine in engines.items()}
    size = next(iter(engines.values())).size
    try:
        detector = None if args.no_detect else FaceDetector()
    except RuntimeError as exc:
        raise EdgeError("{} (or use --no-detect with face crops)".format(exc))
    pipeline = Pipeline(engines)
    reporter = Reporter(args, labels, several)
    try:
        if stream:
            return run_stream(args, pipeline, reporter, detector, size, engines)
        return run_images(args, pipeline, reporter, detector, size)
    finally:
        reporter.close()


def entry_point(argv=None):
    try:
        code = main(argv)
    except EdgeError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
