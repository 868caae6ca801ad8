"""Find and check the compiled models: models/ir/<net>/<PRECISION>/<net>.{xml,bin,json}.

Everything the runner needs to know about a model (labels, age bins, input size, how the
training images were framed) comes from the JSON written beside the IR by
scripts/compile_ir.py, not from constants in the runner.
"""
import json
import os
from collections import namedtuple

PAIR = ("age_net", "gender_net")  # the Levi & Hassner nets: one task each, two requests per face
JOINT = "joint_net"               # one request per face answers both tasks
MODEL_CHOICES = ("auto", "pair", "joint")
PRECISIONS = ("FP16", "FP32", "INT8")
EDGE_DIR = os.path.dirname(os.path.abspath(__file__))
METADATA_FORMAT = "agegender-edge-kit IR metadata"


class EdgeError(Exception):
    """A problem the user can fix, reported as one line (exit code 2)."""


ModelFiles = namedtuple("ModelFiles", "key net folder xml bin meta meta_path outputs")


def _is_text(value):
    return isinstance(value, str) and bool(value)


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_labels(value):
    return isinstance(value, list) and bool(value) and all(_is_text(v) for v in value)


def _is_shape(value):
    return isinstance(value, list) and len(value) == 4 and all(_is_count(v) for v in value)


# Every key of the JSON that the runner reads, checked when the file is loaded, so that a damaged
# or foreign file is reported with its name and the key instead of failing later where it is used.
FIELDS = (("task", "a string", _is_text), ("net", "a string", _is_text),
          ("precision", "a string", _is_text),
          ("input.shape", "a list of 4 positive integers (N, H, W, C)", _is_shape),
          ("training_size", "a positive integer", _is_count),
          ("outputs", "a list of outputs", lambda value: isinstance(value, list) and bool(value)))
# Each entry of "outputs": one head of the net.
OUTPUT_FIELDS = (("name", "a string", _is_text), ("task", "a string", _is_text), ("size", "a positive integer", _is_count))
CLASS_TASKS = ("age", "gender")  # heads of class probabilities, which carry labels
# Read only by the OpenCV engine, which checks them when it is chosen.
OPENCV_FIELDS = (("caffe.deploy", "a file name", _is_text), ("caffe.caffemodel", "a path", _is_text),
                 ("caffe.caffemodel_sha256", "a sha256 hex digest", _is_text), ("mean.file", "a file name", _is_text))


def check_fields(meta, path, fields):
    """Raise EdgeError naming ``path`` and the first of ``fields`` that is missing or of the wrong kind."""
    for key, kind, valid in fields:
        value, parts = meta, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(value, dict):
                raise EdgeError('{}: "{}" should be an object, not {}'.format(
                    path, ".".join(parts[:depth]), _shown(value)))
            if part not in value:
                raise EdgeError('{}: no "{}" (not a model metadata file of this kit, or a damaged one)'.format(
                    path, ".".join(parts[:depth + 1])))
            value = value[part]
        if not valid(value):
            raise EdgeError('{}: "{}" should be {}, not {}'.format(path, key, kind, _shown(value)))


def _shown(value):
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def find_models_dir(path):
    """``path`` as given (relative to the working folder), else relative to the folder above edge/."""
    if os.path.isdir(path):
        return path
    if not os.path.isabs(path):
        beside = os.path.join(os.path.dirname(EDGE_DIR), path)
        if os.path.isdir(beside):
            return beside
    raise EdgeError("{}: models folder not found (compile with `make compile-ncs`, or pass --models DIR)"
                    .format(path))


def _read_json(path):
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, ValueError) as exc:
        raise EdgeError("{}: cannot read model metadata ({})".format(path, exc))


def check_outputs_meta(meta, path):
    """The "outputs" entries: each with its fields, labels for the class heads, age bins for age."""
    for i, output in enumerate(meta["outputs"]):
        where = "{} (outputs[{}])".format(path, i)
        check_fields(output, where, OUTPUT_FIELDS)
        if output["task"] in CLASS_TASKS:
            check_fields(output, where, (("labels", "a list of strings", _is_labels),))
            if len(output["labels"]) != output["size"]:
                raise EdgeError("{}: {} labels for {} outputs".format(where, len(output["labels"]), output["size"]))
        if output["task"] == "age":
            check_fields(output, where, (("age_bin_centres", "a list of numbers",
                                          lambda v: isinstance(v, list) and len(v) == output["size"]),))


def model_files(models_dir, net, precision):
    """The checked files of one net at one precision."""
    folder = os.path.join(models_dir, net, precision)
    xml, bin_, meta_path = (os.path.join(folder, net + ext) for ext in (".xml", ".bin", ".json"))
    for path in (xml, bin_, meta_path):
        if not os.path.isfile(path):
            present = sorted(p for p in PRECISIONS if os.path.isdir(os.path.join(models_dir, net, p)))
            hint = "precisions present: {}".format(", ".join(present)) if present else \
                "compile with `make compile-ncs`" + (" / `make compile-int8`" if precision == "INT8" else "")
            raise EdgeError("{}: missing ({})".format(path, hint))
    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise EdgeError("{}: not a model metadata file of this kit (a JSON {}, not an object)".format(
            meta_path, "list" if isinstance(meta, list) else type(meta).__name__))
    if meta.get("format") != METADATA_FORMAT:
        raise EdgeError("{}: not a model metadata file of this kit".format(meta_path))
    check_fields(meta, meta_path, FIELDS)
    check_outputs_meta(meta, meta_path)
    if meta["net"] != net or meta["precision"] != precision:
        raise EdgeError("{}: describes the {} {} model, expected {} {} (mismatched model files)".format(
            meta_path, meta["net"], meta["precision"], net, precision))
    return ModelFiles(net[:-len("_net")], net, folder, xml, bin_, meta, meta_path, meta["outputs"])


def all_model_files(models_dir, precision, choice="auto"):
    """The nets to run: the joint net (one request per face) when compiled and ``choice`` allows, else the pair."""
    models_dir = find_models_dir(models_dir)
    joint_there = os.path.isdir(os.path.join(models_dir, JOINT, precision))
    if choice == "joint" or (choice == "auto" and joint_there):
        return [model_files(models_dir, JOINT, precision)]
    return [model_files(models_dir, net, precision) for net in PAIR]


def check_outputs(files, input_shape, output_sizes):
    """Compare what the loaded model says with its JSON (a .bin or .xml copied from another net)."""
    meta = files.meta
    expected = {output["name"]: output["size"] for output in files.outputs}
    if list(input_shape) != list(meta["input"]["shape"]) or output_sizes != expected:
        raise EdgeError("{}: model has input {} and outputs {}, its JSON says {} and {} (mismatched model files)"
                        .format(files.xml, list(input_shape), output_sizes, meta["input"]["shape"], expected))
