"""The runner's files: what is wrong with an input path, said as it is; where annotated copies go;
writing them under a temporary name renamed when complete, so that an interrupted run never leaves
a half-written file under the name asked for.

OpenCV and the libraries below it (FFmpeg, libjpeg) print their own warnings to stderr when a file
cannot be opened; ``quiet_opencv`` keeps those off, so stderr carries only the runner's one-line
errors.
"""
import contextlib
import errno
import math
import os
import stat
import sys
import tempfile

import cv2

from model_files import EdgeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v", ".mov": "mp4v"}
DEFAULT_FPS = 25.0  # for annotated video when the input does not say its frame rate (many cameras)


@contextlib.contextmanager
def quiet_opencv():
    """OpenCV's log and whatever its libraries write to stderr (file descriptor 2) go nowhere."""
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    level = logging.getLogLevel() if logging is not None else None
    if logging is not None:
        logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        saved = None
    if saved is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        if logging is not None:
            logging.setLogLevel(level)


# ---------------------------------------------------------------- inputs
def path_problem(path, what, folder_hint):
    """Why ``path`` is not a readable regular file, or None; ``what`` it should be ("an image"), and
    ``folder_hint`` what to do instead, for a folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "link loop (a symbolic link that leads back to itself)"
        if os.path.islink(path):
            return "broken link (its target {} does not exist)".format(os.readlink(path))
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "file not found"
        return "cannot read ({})".format(exc.strerror)
    if stat.S_ISDIR(mode):
        return "a folder, not {} ({})".format(what, folder_hint)
    if not stat.S_ISREG(mode):
        return "not a regular file (a device, socket or pipe)"
    if not os.access(path, os.R_OK):
        return "cannot read (permission denied)"
    return None


def read_image(path, in_folder):
    """The image at ``path`` (u8 BGR), or EdgeError saying why not."""
    problem = path_problem(path, "an image", "subfolders are not searched" if in_folder else
                           "use --dir for the images in a folder")
    if problem is None:
        with quiet_opencv():
            frame = cv2.imread(path, cv2.IMREAD_COLOR)
        if frame is not None:
            return frame
        problem = "cannot read image ({})".format("empty file" if os.path.getsize(path) == 0 else
                                                  "not an image, or a damaged one")
    raise EdgeError("{}: {}".format(path, problem))


def image_files(folder):
    """The images of ``folder``, by name (sorted); subfolders are not searched."""
    if not os.path.isdir(folder):
        raise EdgeError("{}: {}".format(folder, "not a folder (use --image for image files)"
                                        if os.path.exists(folder) else "folder not found"))
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise EdgeError("{}: no images ({})".format(folder, " ".join(IMAGE_EXTENSIONS)))
    return [os.path.join(folder, n) for n in names]


def open_capture(video, camera):
    """An opened cv2.VideoCapture of the video file or the camera, or EdgeError."""
    if video is not None:
        problem = path_problem(video, "a video", "a video is one file")
        if problem is not None:
            raise EdgeError("{}: {}".format(video, problem))
    with quiet_opencv():
        capture = cv2.VideoCapture(video if video is not None else camera)
    if capture.isOpened():
        return capture
    if video is not None:
        raise EdgeError("{}: cannot open (not a video, or a format this OpenCV cannot read)".format(video))
    raise EdgeError("camera {}: cannot open (no such camera, or it is in use)".format(camera))


def frame_rate(capture):
    """The input's frames per second; DEFAULT_FPS when it says 0 or NaN (cameras often do)."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    return fps if fps > 0 and math.isfinite(fps) else DEFAULT_FPS


# ---------------------------------------------------------------- outputs
class OutputTarget(object):
    """Where --output puts annotated copies: one file (its suffix says image or video), or a folder
    (a path without suffix, ending in /, or an existing folder) with one file per input."""

    def __init__(self, output, stream, several):
        suffixes = tuple(VIDEO_EXTENSIONS) if stream else IMAGE_EXTENSIONS
        suffix = os.path.splitext(os.path.basename(output))[1].lower()
        self.name = None
        if output.endswith(("/", os.sep)) or os.path.isdir(output) or not suffix:
            self.folder = output
        elif suffix in suffixes:
            if several and not stream:
                raise EdgeError("--output {}: several inputs need a folder, not a file name".format(output))
            self.folder, self.name = os.path.dirname(output) or os.curdir, os.path.basename(output)
        else:
            if suffix not in IMAGE_EXTENSIONS and suffix not in VIDEO_EXTENSIONS:
                problem = "unknown suffix {}".format(suffix)
            elif stream:
                problem = "an image file name, but the input is a video"
            else:
                problem = "a video file name, but the input is images"
            raise EdgeError("--output {}: {} (an image file ends in {}, a video file in {}; a folder has no suffix "
                            "or ends in /)".format(output, problem, ", ".join(IMAGE_EXTENSIONS),
                                                   ", ".join(VIDEO_EXTENSIONS)))
        self.output = output

    def prepare(self):
        """Create the folder and try a file in it now: a folder that cannot be written would
        otherwise fail once per input, after the work of each."""
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            blocker = _file_in_the_way(self.folder)
            if blocker is not None:
                raise EdgeError("{}: {} is a file, not a folder".format(self.output, blocker))
            raise EdgeError("{}: cannot create the folder {} ({})".format(self.output, self.folder, exc.strerror))
        try:
            handle, probe = tempfile.mkstemp(dir=self.folder, prefix=".write-test-")
        except OSError as exc:
            raise EdgeError("{}: cannot write there ({})".format(self.folder, exc.strerror))
        os.close(handle)
        os.remove(probe)

    def path_for(self, input_name, suffix):
        """The output file of one input: the --output file, or <folder>/<input's stem><suffix>."""
        if self.name is not None:
            return os.path.join(self.folder, self.name)
        return os.path.join(self.folder, os.path.splitext(os.path.basename(input_name))[0] + suffix)


def _file_in_the_way(folder):
    """The nearest existing path at or above ``folder`` when it is not a folder, else None."""
    path = os.path.normpath(folder)
    while path and not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path if path and os.path.lexists(path) and not os.path.isdir(path) else None


def temporary_name(path):
    """A name beside ``path``, hidden, with the same suffix (OpenCV picks the format by suffix)."""
    folder, name = os.path.split(path)
    stem, suffix = os.path.splitext(name)
    return os.path.join(folder, ".{}.part-{}{}".format(stem, os.getpid(), suffix))


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def write_image(path, image):
    ok, data = cv2.imencode(os.path.splitext(path)[1], image)
    if not ok:
        raise EdgeError("{}: cannot encode image".format(path))
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as stream:
            stream.write(data.tobytes())
        os.replace(temporary, path)
    except OSError as exc:
        raise EdgeError("{}: cannot write image ({})".format(path, exc.strerror or exc))
    finally:
        _remove_quietly(temporary)  # left only when the write or the rename failed


class VideoOutput(object):
    """An annotated video written under a temporary name, renamed to ``path`` by close()."""

    def __init__(self, path, fps, shape):
        codec = VIDEO_EXTENSIONS[os.path.splitext(path)[1].lower()]
        self.path, self.temporary = path, temporary_name(path)
        with quiet_opencv():
            self.writer = cv2.VideoWriter(self.temporary, cv2.VideoWriter_fourcc(*codec), fps,
                                          (shape[1], shape[0]))
        if not self.writer.isOpened():
            _remove_quietly(self.temporary)
            raise EdgeError("{}: cannot write video ({} codec)".format(path, codec))

    def write(self, frame):
        self.writer.write(frame)

    def close(self):
        # The frames written so far make a complete video, also after an error or Ctrl-C.
        self.writer.release()
        try:
            os.replace(self.temporary, self.path)
        except OSError as exc:
            _remove_quietly(self.temporary)
            raise EdgeError("{}: cannot write video ({})".format(self.path, exc.strerror or exc))
