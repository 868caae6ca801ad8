#!/usr/bin/env python3
"""Evaluate AgeNet, GenderNet or the joint net on the test LMDB through OpenCV's Caffe importer.

    python scripts/evaluate.py --net age --data-dir data --models-dir models
    python scripts/evaluate.py --net gender --weights models/gender_net/gender_net_iter_6000.caffemodel
    python scripts/evaluate.py --net joint      # both tasks from one net, beside the pair's figures

Single centre crop and the 10-crop average; accuracy, per-class recall, the confusion matrix
(printed and PNG), for age also 1-off accuracy and the MAE of the expected age, for gender the
accuracy within each decade of true age. Outputs in
MODELS_DIR/<net>_net/eval/: report.json, confusion_centre.png, confusion_10crop.png.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffekit import evaluation, models, tasks, training  # noqa: E402
from caffekit.errors import KitError, cli  # noqa: E402


def build_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", required=True, choices=sorted(training.NETS))
    parser.add_argument("--data-dir", default="data", help="holds lmdb/<task>_test_lmdb and mean.binaryproto")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--weights", help="caffemodel (default: the newest snapshot in MODELS_DIR/<net>_net)")
    parser.add_argument("--deploy", help="deploy prototxt (default: MODELS_DIR/<net>_net/deploy.prototxt, "
                                         "else caffe_models/<net>_net/deploy.prototxt)")
    parser.add_argument("--batch", type=int, default=16, help="images per OpenCV forward (x10 crops)")
    parser.add_argument("--out", help="output folder (default: MODELS_DIR/<net>_net/eval)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


@cli
def main(argv=None) -> int:
    args = build_argparser().parse_args(argv)
    task = args.net
    net = training.NETS[task]
    model_dir = Path(args.models_dir) / net
    data_dir = Path(args.data_dir)
    weights = Path(args.weights) if args.weights else training.newest_snapshot(model_dir)
    if weights is None:
        raise KitError(f"{model_dir}: no *_iter_N.caffemodel snapshot found (train first, or give --weights)")
    deploy = Path(args.deploy) if args.deploy else model_dir / "deploy.prototxt"
    if not args.deploy and not deploy.is_file():
        deploy = training.REPO / "caffe_models" / net / "deploy.prototxt"
    if task == "joint":
        return evaluate_joint(args, net, weights, deploy, model_dir, data_dir)
    # The dataset's own labels (UTKFace: 9 decade bins; Adience: its 8 groups), from its manifest.
    class_names = list(models.for_dataset(task, data_dir).head(task).labels)
    classifier = evaluation.OpenCvClassifier(deploy, weights)
    lmdb_path = data_dir / "lmdb" / f"{task}_test_lmdb"
    started = time.time()
    predictions = evaluation.predict(classifier, lmdb_path, data_dir / "mean.binaryproto", args.batch,
                                     progress=not args.no_progress)
    if predictions.labels.max(initial=0) >= len(class_names) or predictions.labels.min(initial=0) < 0:
        raise KitError(f"{lmdb_path}: labels outside 0..{len(class_names) - 1} for the {task} task")
    probs_width = predictions.centre.shape[1]
    if probs_width != len(class_names):
        raise KitError(f"{weights}: the net outputs {probs_width} classes, the {task} task has {len(class_names)}")
    centres = tasks.age_scheme(class_names)["centres"] if task == "age" else None
    true_ages = evaluation.read_true_ages(data_dir / f"{task}_test.csv", predictions.keys)
    out_dir = Path(args.out) if args.out else model_dir / "eval"
    report = {"net": net, "weights": str(weights), "deploy": str(deploy), "test_lmdb": str(lmdb_path),
              "classes": class_names, "seconds": None, "protocols": {}}
    for protocol, probs in (("centre", predictions.centre), ("10crop", predictions.ten_crop)):
        result = evaluation.metrics(predictions.labels, probs, class_names, true_ages, centres)
        if task == "gender" and true_ages is not None:
            result["accuracy_by_age"] = evaluation.accuracy_by_age(predictions.labels, probs, true_ages)
        report["protocols"][protocol] = result
        line = f"{net} {protocol:>6}: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['count']})"
        if "one_off_accuracy" in result:
            line += f", 1-off {result['one_off_accuracy']:.4f}"
        if "mae_years" in result:
            line += f", MAE {result['mae_years']:.2f} years"
        print(line)
        print("per-class recall: " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -"
                                               for k, v in result["per_class_recall"].items()))
        if "accuracy_by_age" in result:
            print("accuracy by true age: " + ", ".join(f"{k} {v['accuracy']:.3f} ({v['correct']}/{v['count']})"
                                                      for k, v in result["accuracy_by_age"].items()))
        print(f"confusion matrix ({protocol}; rows: true, columns: predicted)")
        print(evaluation.format_confusion(result["confusion_matrix"], class_names))
        print()
        evaluation.plot_confusion(result["confusion_matrix"], class_names, out_dir / f"confusion_{protocol}.png",
                                  f"{net} ({protocol}): accuracy {result['accuracy']:.3f}")
    report["seconds"] = round(time.time() - started, 2)
    evaluation.write_report(out_dir / "report.json", report)
    print(f"report: {out_dir / 'report.json'}")
    return 0


def evaluate_joint(args, net: str, weights: Path, deploy: Path, model_dir: Path, data_dir: Path) -> int:
    entry = models.model("joint")
    classifier = evaluation.OpenCvClassifier(deploy, weights)
    lmdb_path = data_dir / "lmdb" / f"{entry.data}_test_lmdb"
    started = time.time()
    outputs = [head.output for head in entry.heads]
    predictions = evaluation.predict(classifier, lmdb_path, data_dir / entry.mean_file, args.batch,
                                     progress=not args.no_progress, outputs=outputs)
    csv_path = data_dir / f"{entry.data}_test.csv"
    true_ages = evaluation.read_test_csv(csv_path, predictions.keys, "age")
    genders = evaluation.read_test_csv(csv_path, predictions.keys, "gender").astype(np.int64)
    out_dir = Path(args.out) if args.out else model_dir / "eval"
    report = {"net": net, "weights": str(weights), "deploy": str(deploy), "test_lmdb": str(lmdb_path),
              "protocols": {}, "pair_on_the_same_faces": pair_reports(Path(args.models_dir), len(true_ages))}
    for protocol in ("centre", "10crop"):
        probs = predictions.centre if protocol == "centre" else predictions.ten_crop
        result = evaluation.joint_metrics(probs, true_ages, genders)
        report["protocols"][protocol] = result
        age, gender = result["age"], result["gender"]
        print(f"{net} {protocol:>6}: age {age['accuracy']:.4f} ({age['correct']}/{age['count']}), 1-off "
              f"{age['one_off_accuracy']:.4f}, MAE {age['mae_years']:.2f} years; gender {gender['accuracy']:.4f} "
              f"({gender['correct']}/{gender['count']})")
        pair = report["pair_on_the_same_faces"].get(protocol)
        if pair:
            print(f"{'pair':>9} {protocol:>6}: age {pair['age_accuracy']:.4f}, 1-off {pair['age_one_off_accuracy']:.4f}, "
                  f"MAE {pair['age_mae_years']:.2f} years (bin centres); gender {pair['gender_accuracy']:.4f}")
        print("gender accuracy by true age: " + ", ".join(
            f"{k} {v['accuracy']:.3f} ({v['correct']}/{v['count']})" for k, v in gender["accuracy_by_age"].items()))
        for task, names in (("age", tasks.AGE_LABELS), ("gender", tasks.GENDER_LABELS)):
            evaluation.plot_confusion(result[task]["confusion_matrix"], names,
                                      out_dir / f"confusion_{task}_{protocol}.png",
                                      f"{net} {task} ({protocol}): accuracy {result[task]['accuracy']:.3f}")
    report["seconds"] = round(time.time() - started, 2)
    evaluation.write_report(out_dir / "report.json", report)
    print(f"report: {out_dir / 'report.json'}")
    return 0


def pair_reports(models_dir: Path, faces: int) -> dict:
    """The Levi & Hassner pair's figures from their own reports, when both exist and scored as many faces
    (the dataset gives every net the same test faces)."""
    import json

    reports = {}
    for key in models.PAIR:
        path = models_dir / models.model(key).name / "eval" / "report.json"
        try:
            reports[key] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
    out = {}
    for protocol in ("centre", "10crop"):
        age, gender = (reports[key]["protocols"].get(protocol, {}) for key in models.PAIR)
        if age.get("count") != faces or gender.get("count") != faces:
            return {}
        out[protocol] = {"age_accuracy": age["accuracy"], "age_one_off_accuracy": age.get("one_off_accuracy"),
                         "age_mae_years": age.get("mae_years"), "gender_accuracy": gender["accuracy"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
