"""Age and gender of every face in images, a folder, a video or a camera.

    python edge/run_inference.py --image photo.jpg
    python edge/run_inference.py --image a.jpg b.jpg --json --output annotated/
    python edge/run_inference.py --dir photos/ --device MYRIAD
    python edge/run_inference.py --video clip.mp4 --output annotated.mp4
    python edge/run_inference.py --camera 0 --show
    python edge/run_inference.py --image 25_1_2_2017.jpg.chip.jpg --no-detect   # already a face crop
    python edge/run_inference.py --image group.jpg --save-crops crops/  # what the nets see, one PNG per face

Models: <models>/joint_net/<PRECISION>/joint_net.xml (one request per face answers both tasks; the
default when compiled), else age_net and gender_net likewise (--model pair|joint chooses), with the
JSON that scripts/compile_ir.py writes beside them (outputs, labels, input format, training size).
Without OpenVINO installed the runner uses OpenCV DNN on the caffemodels named in that JSON (CPU only).
Each face is printed with its age bin, its age in years (the joint net's expected age over the years,
or the pair's expected age over the bin centres) and its gender.

Faces: BlazeFace (<models>/face_detector/, built by `make detector`) finds faces and their eyes,
nose and mouth; each face is warped upright into the framing of a UTKFace chip (the nets' training
images) by its eyes and mouth. Short range (faces within about 2 m) for video and camera, full
range on the whole photo plus short range on overlapping tiles (groups, small faces) for photos;
--range chooses. Without a built detector, or with
--detector haar, OpenCV's Haar cascade finds the faces (no keypoints: framed from the box).
In a video or camera stream each face keeps an id while it stays in view ("track" in the JSON),
and its label is the mean of its last frames' probabilities; "raw" holds the frame's own answer.

--output: a file name ending in an image suffix (.jpg .jpeg .png .bmp .webp .tif .tiff) or, for
a video or camera, a video suffix (.mp4 .avi .mkv .mov); a path without suffix, ending in /, or an
existing folder is a folder (one PNG per image, <video>.mp4 per stream). Other suffixes are an
error. Files are written under a temporary name beside the target, renamed when complete.

Exit codes:
  0    done; at least one face in every image (or somewhere in the video)
  2    error, one line "error: <file>: <problem>" on stderr: bad option, missing or mismatched
       model files, unreadable image or video, output that cannot be written, requested device
       absent (the message lists those present). With several images, one that cannot be read
       or whose annotated copy cannot be written is reported on its own line, the others are
       still processed, and the exit code is 2 at the end
  3    no face found in at least one image (the others are still reported), or in no frame
       of a video or camera stream
  130  interrupted (Ctrl-C): the requests in flight are finished, nothing more is reported
"""
import argparse
import collections
import functools
import json
import os
import signal
import sys
import threading
import time

import cv2
import numpy as np

from engines import BACKENDS, DEVICES, make_engine
from blazeface import Detection
from engines import import_openvino
from face_detection import DETECTORS, RANGES, centre_crop, face_chip, load_detector, resized_chip
from tracking import Tracker
from media import OutputTarget, VideoOutput, frame_rate, image_files, open_capture, read_image, write_image
from model_files import MODEL_CHOICES, PRECISIONS, EdgeError, all_model_files, find_models_dir

EXIT_OK, EXIT_ERROR, EXIT_NO_FACE, EXIT_INTERRUPTED = 0, 2, 3, 130

ANSWER_FIELDS = ("age", "age_prob", "age_years", "gender", "gender_prob")
# index: 1, 2, ... as printed (and in --save-crops names); track: the face's id across frames (streams);
# score, keypoints: the detector's; raw: this frame's own answer where the label is smoothed over a track.
Face = collections.namedtuple("Face", ("index", "box") + ANSWER_FIELDS + ("track", "score", "keypoints", "raw"))


def read_answers(answers):
    """The nets' answers, ``[(head, values)]`` (a head as the IR JSON's "outputs" lists it), as
    ({"age": bin probabilities, "gender": probabilities, "age_years": [years]}, (age head, gender head)),
    whichever nets answered."""
    by_task = dict((head["task"], (head, values)) for head, values in answers)
    age_head, age = by_task["age"]
    gender_head, gender = by_task["gender"]
    if "age_years" in by_task:
        years = float(by_task["age_years"][1][0])
    else:  # a bin classifier: the expected age over the bin centres (what its MAE measures)
        years = float(np.dot(age, age_head["age_bin_centres"]))
    return {"age": np.asarray(age), "gender": np.asarray(gender), "age_years": np.array([years])}, \
        (age_head, gender_head)


def labelled(values, heads):
    """The ANSWER_FIELDS of probabilities ``values`` (see read_answers)."""
    age_head, gender_head = heads
    age, gender = values["age"], values["gender"]
    return (age_head["labels"][int(np.argmax(age))], float(np.max(age)), round(float(values["age_years"][0]), 1),
            gender_head["labels"][int(np.argmax(gender))], float(np.max(gender)))


class OneLineParser(argparse.ArgumentParser):
    """Option errors as one line, like every other error (argparse's own adds the usage)."""

    def error(self, message):
        if message.startswith("argument "):
            message = message[len("argument "):]
        self.exit(EXIT_ERROR, "error: {} (see --help)\n".format(message))


def at_least(minimum, what):
    """An argparse type: a whole number >= ``minimum`` (a negative camera number crashes OpenCV)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("{} must be a whole number, not {!r}".format(what, text))
        if value < minimum:
            raise argparse.ArgumentTypeError("{} must be {} or more, not {}".format(what, minimum, value))
        return value
    return parse


def build_argparser():
    parser = OneLineParser(description=__doc__.splitlines()[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    source = parser.add_argument_group("input (one kind)")
    source.add_argument("--image", nargs="+", metavar="FILE", help="one or more image files")
    source.add_argument("--dir", help="every image in a folder")
    source.add_argument("--video", metavar="FILE", help="a video file")
    source.add_argument("--camera", type=at_least(0, "the camera number"), metavar="N",
                        help="camera number (0 = the first)")
    model = parser.add_argument_group("model")
    model.add_argument("--models", default="models/ir", help="folder of compiled IRs (default: models/ir, "
                       "relative to the working folder or to the folder above edge/)")
    model.add_argument("--model", choices=MODEL_CHOICES, default="auto",
                       help="joint: one net for both tasks; pair: AgeNet + GenderNet; auto: joint when compiled")
    model.add_argument("--precision", choices=PRECISIONS, default="FP16", help="default FP16 (NCS2)")
    model.add_argument("--device", choices=DEVICES, help="default: MYRIAD when plugged in, else CPU")
    model.add_argument("--engine", choices=BACKENDS, default="auto",
                       help="auto: OpenVINO when installed, else OpenCV DNN on the caffemodel")
    model.add_argument("--caffe-model", action="append", default=[], metavar="TASK=FILE",
                       help="caffemodel for the OpenCV engine, e.g. age=models/age_net/x.caffemodel")
    behaviour = parser.add_argument_group("faces and output")
    behaviour.add_argument("--no-detect", action="store_true",
                           help="each input is already a face crop (like UTKFace files)")
    behaviour.add_argument("--detector", choices=DETECTORS, default="auto",
                           help="auto: BlazeFace when built (make detector), else OpenCV's Haar cascade")
    behaviour.add_argument("--range", choices=RANGES, default="auto", dest="detector_range",
                           help="BlazeFace: short (faces within ~2 m), full (the full-range model: rooms; "
                                "needs OpenVINO), tiled (the whole photo plus short range on tiles: faces of "
                                "any size); auto: short for video and camera, tiled for photos")
    behaviour.add_argument("--no-align", action="store_true",
                           help="frame faces from their boxes instead of aligning them by eyes and mouth")
    behaviour.add_argument("--save-crops", metavar="DIR",
                           help="write each face as the nets receive it: DIR/<input stem>_<face>.png")
    behaviour.add_argument("--json", action="store_true", help="one JSON object per input on stdout")
    behaviour.add_argument("--output", metavar="PATH", help="annotated copy: an image or video file, "
                           "or a folder (no suffix, or ending in /)")
    behaviour.add_argument("--show", action="store_true", help="show annotated frames in a window")
    behaviour.add_argument("--max-frames", type=at_least(1, "the number of frames"), metavar="N",
                           help="stop a video or camera after N frames")
    return parser


# ---------------------------------------------------------------- Ctrl-C
class CtrlC(object):
    """Ctrl-C as a flag the loops check between inputs. A KeyboardInterrupt raised anywhere, with
    requests in flight, makes Python shut down while OpenVINO's threads still call back into it,
    and the process aborts ("FATAL: exception not rethrown", exit 134) instead of exiting with 130.
    Installed until the requests are finished, so a second Ctrl-C does not cut that short."""

    def __init__(self):
        self.pressed = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.pressed = True

    def check(self):
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------- the pipeline
class Job(object):
    """One image or frame on its way through detection and both nets."""

    def __init__(self, index, name, frame, detections, inputs, started):
        self.index, self.name, self.frame, self.detections = index, name, frame, detections
        self.boxes = [detection.box for detection in detections]
        self.inputs, self.started = inputs, started  # inputs: {net: [one crop per face]}
        self.outputs = {}
        self.remaining = 0

    def answers(self, heads):
        """Per face, read_answers of every net's outputs; ``heads``: {net: its heads} (the pair's two nets
        both call their output "prob")."""
        return [read_answers([(head, self.outputs[net][i][head["name"]]) for net in self.outputs
                              for head in heads[net]])
                for i in range(len(self.boxes))]

    def faces(self, heads, tracker=None):
        """The Face records; with a ``tracker`` (streams), each labelled by its track's recent mean."""
        answers = self.answers(heads)
        tracked = tracker.update(self.boxes, [values for values, _ in answers]) if tracker is not None else None
        faces = []
        for i, (detection, (values, net_heads)) in enumerate(zip(self.detections, answers)):
            raw = labelled(values, net_heads)
            track, shown = (None, raw) if tracked is None else (tracked[i][0], labelled(tracked[i][1], net_heads))
            keypoints = None if detection.keypoints is None else \
                [[round(float(x), 1), round(float(y), 1)] for x, y in detection.keypoints]
            faces.append(Face(i + 1, list(detection.box), *shown, track=track,
                              score=None if detection.score is None else round(float(detection.score), 3),
                              keypoints=keypoints, raw=None if tracked is None else dict(zip(ANSWER_FIELDS, raw))))
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

    def _on_result(self, net, userdata, outputs):
        index, face = userdata
        with self.lock:
            job = self.pending[index]
            job.outputs[net][face] = outputs
            job.remaining -= 1

    def submit(self, job):
        faces = len(job.boxes)
        with self.lock:
            job.outputs = dict((net, [None] * faces) for net in self.engines)
            job.remaining = faces * len(self.engines)
            self.pending[job.index] = job
        for face in range(faces):
            for net, engine in self.engines.items():
                engine.infer_async(job.inputs[net][face], (job.index, face))

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

    def close(self):
        """Waits for the requests still in flight and drops their results (stopping early)."""
        for engine in self.engines.values():
            engine.close()


def prepare(index, name, frame, detector, engines):
    """A Job: the faces of ``frame`` (or the whole frame with --no-detect) as each net's inputs, framed as
    its training images were: a UTKFace-like chip at the IR JSON's training size (aligned by the
    keypoints where the detector gives them), then the centre crop of the net's input size."""
    started = time.perf_counter()
    if detector is None:
        detections = [Detection((0, 0, frame.shape[1], frame.shape[0]), None, None)]
    else:
        detections = detector.detect(frame)
    crops = {}
    inputs = {}
    for net, engine in engines.items():
        framing = (engine.size, engine.training_size)
        if framing not in crops:  # the pair's two nets share one crop
            if detector is None:
                chips = [resized_chip(frame, detections[0].box, engine.training_size)]
            else:
                chips = [face_chip(frame, detection, engine.training_size, detector.framing)
                         for detection in detections]
            crops[framing] = [centre_crop(chip, engine.size) for chip in chips]
        inputs[net] = crops[framing]
    return Job(index, name, frame, detections, inputs, started)


# ---------------------------------------------------------------- output
def describe(job, faces):
    if not faces:
        return "{}: no face found".format(job.name)
    lines = []
    for face in faces:
        x, y, w, h = face.box
        track = "" if face.track is None else " (track {})".format(face.track)
        lines.append("{}: face {}{} at x={} y={} w={} h={}: age {} ({:.0%}), {:.0f} years, {} ({:.0%})".format(
            job.name, face.index, track, x, y, w, h, face.age, face.age_prob, face.age_years, face.gender,
            face.gender_prob))
    return "\n".join(lines)


def as_json(job, faces, ms):
    records = [dict((key, value) for key, value in face._asdict().items() if value is not None) for face in faces]
    return json.dumps({"image": job.name, "faces": records, "ms": round(ms, 2)})


def annotate(frame, faces, fps=None):
    out = frame.copy()
    for face in faces:
        x, y, w, h = face.box
        colour = (60, 60, 230) if face.gender == "Female" else (230, 140, 40)
        cv2.rectangle(out, (x, y), (x + w, y + h), colour, 2)
        text = "{} {:.0%}, {:.0f} y ({})".format(face.gender, face.gender_prob, face.age_years, face.age)
        if face.track is not None:
            text = "#{} {}".format(face.track, text)
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


def show(window, image):
    try:
        cv2.imshow(window, image)
        return cv2.waitKey(1) & 0xFF in (27, ord("q"))
    except cv2.error:
        raise EdgeError("--show needs an OpenCV build with a GUI (pip install opencv-python), "
                        "or use --output instead")


def print_error(exc):
    print("error: {}".format(exc), file=sys.stderr, flush=True)


class Reporter(object):
    """Prints each finished job (text or JSON) and writes its annotated copy to ``target``."""

    def __init__(self, args, heads, target, tracker=None):
        self.args, self.heads, self.target, self.tracker = args, heads, target, tracker
        self.without_face = 0
        self.with_face = 0
        self.failed = 0  # images whose annotated copy could not be written
        self.writer = None
        self.video_fps = None  # the input's frame rate, for the annotated video
        self.stop = False

    def report_all(self, jobs, fps_since=None):
        for job in jobs:
            self.report(job, None if fps_since is None else (job.index + 1) / (time.perf_counter() - fps_since))

    def report(self, job, fps=None):
        faces = job.faces(self.heads, self.tracker)
        ms = 1000 * (time.perf_counter() - job.started)
        if self.args.save_crops:
            self.save_crops(job)
        if faces:
            self.with_face += 1
        else:
            self.without_face += 1
        print(as_json(job, faces, ms) if self.args.json else describe(job, faces), flush=True)
        if self.args.output or self.args.show:
            image = annotate(job.frame, faces, fps)
            if self.target is not None:
                self.save(job, image)
            if self.args.show and show("age and gender", image):
                self.stop = True

    def save_crops(self, job):
        """Each face as the (first) net receives it: <dir>/<input stem>_<face>.png, with the frame number
        after the stem for a stream."""
        crops = next(iter(job.inputs.values()))
        if self.args.video is None and self.args.camera is None:
            stem = os.path.splitext(os.path.basename(job.name))[0]
        else:
            stream = self.args.video if self.args.video is not None else "camera{}".format(self.args.camera)
            stem = "{}_{:06d}".format(os.path.splitext(os.path.basename(stream))[0], job.index)
        for i, crop in enumerate(crops):
            try:
                write_image(os.path.join(self.args.save_crops, "{}_{}.png".format(stem, i + 1)), crop)
            except EdgeError as exc:
                print_error(exc)
                self.failed += 1

    def save(self, job, image):
        if self.args.video is None and self.args.camera is None:
            try:
                write_image(self.target.path_for(job.name, ".png"), image)
            except EdgeError as exc:  # this image's copy only: the others still go on (exit 2 at the end)
                print_error(exc)
                self.failed += 1
            return
        if self.writer is None:
            stream = self.args.video if self.args.video is not None else "camera{}".format(self.args.camera)
            self.writer = VideoOutput(self.target.path_for(stream, ".mp4"), self.video_fps, image.shape)
        self.writer.write(image)

    def close(self):
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


# ---------------------------------------------------------------- main
def load_engines(args, mode):
    caffemodels = {}
    for item in args.caffe_model:
        key, _, path = item.partition("=")
        if key not in ("age", "gender", "joint") or not path:
            raise EdgeError("--caffe-model {}: expected age=FILE, gender=FILE or joint=FILE".format(item))
        caffemodels[key] = path
    engines = collections.OrderedDict()
    for files in all_model_files(args.models, args.precision, args.model):
        engines[files.key] = make_engine(files, args.device, args.engine, mode, caffemodels.get(files.key))
    heads = dict((net, engine.outputs) for net, engine in engines.items())
    tasks = set(head["task"] for outputs in heads.values() for head in outputs)
    if not {"age", "gender"} <= tasks:
        raise EdgeError("{}: the models answer {}, the runner needs an age and a gender head".format(
            args.models, ", ".join(sorted(tasks))))
    return engines, heads


def run_images(args, pipeline, reporter, detector, engines, ctrl_c):
    paths = list(args.image) if args.image else image_files(args.dir)
    unreadable = 0
    for index, path in enumerate(paths):
        ctrl_c.check()
        try:
            frame = read_image(path, in_folder=args.dir is not None)
        except EdgeError as exc:  # this input only: the others still go on (exit 2 at the end)
            print_error(exc)
            unreadable += 1
            continue
        pipeline.submit(prepare(index, path, frame, detector, engines))
        reporter.report_all(pipeline.finished())
    reporter.report_all(pipeline.drain())
    if unreadable or reporter.failed:
        return EXIT_ERROR
    return EXIT_NO_FACE if reporter.without_face else EXIT_OK


def run_stream(args, pipeline, reporter, detector, engines, ctrl_c):
    capture = open_capture(args.video, args.camera)
    name = args.video if args.video is not None else "camera{}".format(args.camera)
    reporter.video_fps = frame_rate(capture)
    start, cpu_start = time.perf_counter(), time.process_time()  # process time: all threads, this process
    frames, last_print = 0, start
    try:
        while not reporter.stop and (args.max_frames is None or frames < args.max_frames):
            ctrl_c.check()
            ok, frame = capture.read()
            if not ok:
                break
            pipeline.submit(prepare(frames, "{}#{}".format(name, frames), frame, detector, engines))
            frames += 1
            reporter.report_all(pipeline.finished(), fps_since=start)
            now = time.perf_counter()
            if now - last_print > 2.0:
                print("{} frames, {:.1f} FPS".format(frames, frames / (now - start)), file=sys.stderr)
                last_print = now
        reporter.report_all(pipeline.drain(), fps_since=start)
    finally:
        capture.release()
    if frames == 0:
        raise EdgeError("{}: no frames could be read".format(name))
    elapsed = time.perf_counter() - start
    cpu_ms = 1000 * (time.process_time() - cpu_start) / frames
    in_flight = max(getattr(engine, "requests_in_flight", 1) for engine in engines.values())
    print("{}: {} frames in {:.1f} s = {:.1f} FPS, {:.1f} ms CPU per frame ({} and {}, {} requests "
          "in flight per net, {})".format(name, frames, elapsed, frames / elapsed, cpu_ms,
                                          detector.name if detector is not None else "no detection",
                                          " + ".join(e.files.net for e in engines.values()), in_flight,
                                          next(iter(engines.values())).name), file=sys.stderr)
    return EXIT_OK if reporter.with_face else EXIT_NO_FACE


def main(argv=None):
    args = build_argparser().parse_args(argv)
    sources = [s for s in ("image", "dir", "video", "camera") if getattr(args, s) is not None]
    if len(sources) != 1:
        raise EdgeError("give exactly one input: --image, --dir, --video or --camera")
    stream = args.video is not None or args.camera is not None
    several = stream or args.dir is not None or len(args.image or ()) > 1
    target = OutputTarget(args.output, stream, several) if args.output is not None else None
    engines, heads = load_engines(args, "throughput" if several else "latency")
    try:
        detector = None if args.no_detect else load_detector(
            find_models_dir(args.models), args.detector, args.detector_range, stream,
            import_openvino() if args.engine != "opencv" else None, align=not args.no_align)
    except RuntimeError as exc:
        raise EdgeError("{} (or use --no-detect with face crops)".format(exc))
    if target is not None:
        target.prepare()
    if args.save_crops:
        OutputTarget(os.path.join(args.save_crops, ""), stream, True).prepare()
    pipeline = Pipeline(engines)
    reporter = Reporter(args, heads, target, Tracker() if stream else None)
    with CtrlC() as ctrl_c:
        try:
            if stream:
                return run_stream(args, pipeline, reporter, detector, engines, ctrl_c)
            return run_images(args, pipeline, reporter, detector, engines, ctrl_c)
        finally:
            pipeline.close()  # before Python unwinds further: OpenVINO may still call back
            reporter.close()


def entry_point(argv=None):
    try:
        code = main(argv)
    except EdgeError as exc:
        print_error(exc)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
