"""Compile trained Caffe nets to OpenVINO IR for the Neural Compute Stick 2 and CPUs.

    python scripts/compile_ir.py --net all --data-dir data --models-dir models --precision FP16 FP32
    python scripts/compile_ir.py --net age --data-dir data --models-dir models --precision INT8
    python scripts/compile_ir.py --net age --data-dir data --models-dir models --weights my.caffemodel --precision FP16

Reads caffe_models/<net>/deploy.prototxt, the caffemodel (default: the newest snapshot
<models-dir>/<net>/*_iter_N.caffemodel) and <data-dir>/mean.binaryproto. Writes
<models-dir>/ir/<net>/<PRECISION>/<net>.xml/.bin with <net>.json beside them (labels,
age bins, input format, hashes of the sources, the measured check). FP16 and FP32 IRs are
checked against OpenCV's Caffe importer; INT8 reports its test accuracy against FP32.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as `python scripts/compile_ir.py` without installing

from caffekit import models, openvino_ir, training  # noqa: E402
from caffekit.errors import KitError, cli  # noqa: E402


def newest_snapshot(models_dir: Path, net_name: str) -> Path:
    folder = models_dir / net_name
    found = training.newest_snapshot(folder) if folder.is_dir() else None
    if found is None:
        raise KitError(f"{folder}: no *_iter_N.caffemodel snapshot found (train first with "
                       f"`make train-{net_name[:-4]}`, or pass --weights)")
    return found


def compile_net(key: str, args) -> None:
    entry = models.for_dataset(key, args.data_dir)  # the dataset's labels (Adience: 8 age groups)
    net_name = entry.name
    weights = args.weights or newest_snapshot(args.models_dir, net_name)
    # The deploy training wrote beside its snapshots (resized to the dataset's classes), else the shipped one.
    trained_deploy = args.models_dir / net_name / "deploy.prototxt"
    deploy = trained_deploy if args.deploy_dir is None and trained_deploy.is_file() else \
        (args.deploy_dir or REPO / "caffe_models") / net_name / "deploy.prototxt"
    net = openvino_ir.CaffeNet(deploy, weights)
    expected = [head.output for head in entry.heads] if len(entry.heads) > 1 else [net.output_blob]
    if net.output_blobs != expected:
        raise KitError(f"{deploy}: outputs {net.output_blobs}, the {net_name} registry lists {expected}")
    for head in entry.heads:
        blob = head.output if len(entry.heads) > 1 else net.output_blob
        if head.labels is not None and net.output_size(blob) != len(head.labels):
            raise KitError(f"{weights}: output {blob} has {net.output_size(blob)} values, the {head.task} head "
                           f"has {len(head.labels)} classes")
    mean_file = args.data_dir / entry.mean_file
    ir_root = args.models_dir / "ir"
    print(f"{net_name}: {weights}")
    float_precisions = [p for p in args.precision if p != "INT8"]
    if float_precisions:
        images, source = openvino_ir.check_images(args.data_dir, entry.data, net.size)
        for precision in float_precisions:
            start = time.perf_counter()
            meta = openvino_ir.compile_precision(net, entry, precision, mean_file, ir_root, images, source)
            check = meta["check"]
            if "skipped" in check:
                print(f"  {precision}: {openvino_ir.ir_paths(ir_root, net_name, precision)['xml']}  "
                      f"numerical check skipped: {check['skipped']}")
                continue
            print(f"  {precision}: {openvino_ir.ir_paths(ir_root, net_name, precision)['xml']}  "
                  f"max |p_IR - p_OpenCV| = {check['max_prob_difference']:.2g} "
                  f"(limit {check['tolerance']:g}, {source}; at the CPU's default precision: "
                  f"{check['max_prob_difference_cpu_default_precision']:.2g}) [{time.perf_counter() - start:.1f} s]")
    if "INT8" in args.precision:
        start = time.perf_counter()
        meta = openvino_ir.quantize_int8(net, entry, mean_file, ir_root, args.data_dir,
                                         progress=lambda line: print("  " + line))
        q = meta["int8"]
        for name, head in q["heads"].items():
            print(f"  INT8: {openvino_ir.ir_paths(ir_root, net_name, 'INT8')['xml']}  {name} test accuracy "
                  f"{100 * head['int8_accuracy']:.1f}% vs FP32 {100 * head['fp32_accuracy']:.1f}% "
                  f"(loss {head['accuracy_loss_points']:.2f} points on {q['test_images']} images, "
                  f"{100 * head['agreement_with_fp32']:.1f}% same class) [{time.perf_counter() - start:.1f} s]")
        if max(head["accuracy_loss_points"] for head in q["heads"].values()) > 1.0:
            print("  warning: INT8 loses more than 1 point of test accuracy", file=sys.stderr)


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--net", choices=tuple(models.MODELS) + ("all",), default="all",
                        help="all: the pair, and the joint net when it is trained")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data", help="holds mean.binaryproto and lmdb/")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models",
                        help="snapshots in <net>/, IRs written to ir/")
    parser.add_argument("--weights", type=Path, help="a caffemodel (only with one --net)")
    parser.add_argument("--deploy-dir", type=Path,
                        help="folder with <net>/deploy.prototxt (default: the one training wrote in "
                             "MODELS_DIR/<net>/, else caffe_models)")
    parser.add_argument("--precision", nargs="+", choices=openvino_ir.PRECISIONS, default=["FP16", "FP32"])
    args = parser.parse_args(argv)
    if args.weights and args.net == "all":
        raise KitError("--weights names one caffemodel: use it with one --net")
    if args.net == "all":
        keys = list(models.PAIR) + [key for key in models.MODELS if key not in models.PAIR
                                    and training.newest_snapshot(args.models_dir / models.model(key).name)
                                    if (args.models_dir / models.model(key).name).is_dir()]
    else:
        keys = [args.net]
    for key in keys:
        compile_net(key, args)


if __name__ == "__main__":
    main()
