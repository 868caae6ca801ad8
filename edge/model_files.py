"""Find and check the compiled models: models/ir/<net>/<PRECISION>/<net>.{xml,bin,json}.

Everything the runner needs to know about a model (labels, age bins, input size, how the
training images were framed) comes from the JSON written beside the IR by
scripts/compile_ir.py, not from constants in the runner.
"""
import json
import os
from collections import namedtuple

NETS = (("age", "age_net"), ("gender", "gender_net"))
PRECISIONS = ("FP16", "FP32", "INT8")
EDGE_DIR = os.path.dirname(os.path.abspath(__file__))
METADATA_FORMAT = "agegender-edge-kit IR metadata"


class EdgeError(Exception):
    """A problem the user can fix, reported as one line (exit code 2)."""


ModelFiles = namedtuple("ModelFiles", "task net folder xml bin meta")


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


def model_files(models_dir, task, net, precision):
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
    if meta.get("format") != METADATA_FORMAT:
        raise EdgeError("{}: not a model metadata file of this kit".format(meta_path))
    if meta.get("task") != task or meta.get("net") != net or meta.get("precision") != precision:
        raise EdgeError("{}: describes the {} {} model, expected {} {} (mismatched model files)".format(
            meta_path, meta.get("net"), meta.get("precision"), net, precision))
    if len(meta.get("labels", ())) != meta.get("output", {}).get("classes"):
        raise EdgeError("{}: {} labels for {} outputs".format(meta_path, len(meta.get("labels", ())),
                                                              meta.get("output", {}).get("classes")))
    return ModelFiles(task, net, folder, xml, bin_, meta)


def all_model_files(models_dir, precision):
    models_dir = find_models_dir(models_dir)
    return [model_files(models_dir, task, net, precision) for task, net in NETS]


def check_outputs(files, input_shape, classes):
    """Compare what the loaded model says with its JSON (a .bin or .xml copied from another net)."""
    meta = files.meta
    if list(input_shape) != list(meta["input"]["shape"]) or classes != meta["output"]["classes"]:
        raise EdgeError("{}: model has input {} and {} outputs, its JSON says {} and {} (mismatched model files)"
                        .format(files.xml, list(input_shape), classes, meta["input"]["shape"],
                                meta["output"]["classes"]))
