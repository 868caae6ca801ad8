"""How the joint net's age figures depend on what is read off its posterior over years.

The deploy net's `age_years` is the expected age under softmax(age_fc). This prints, on one data folder's test
split, the MAE of the expected age after a temperature T (softmax(T * age_fc): T > 1 sharpens the posterior, so a
long tail moves the mean less), the MAE of the posterior's median and argmax, and the bins' exact / 1-off
accuracy under the same T, for the centre crop and the 10-crop average of the probabilities.

    python experiments/age_posterior.py --data-dir data/val_natural --models-dir models/val_natural
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caffekit import evaluation, models, tasks, training  # noqa: E402

TEMPERATURES = (0.8, 1.0, 1.2, 1.5, 2.0, 3.0)


def softmax(logits, temperature):
    z = logits * temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def figures(prob, ages):
    years = np.arange(prob.shape[1])
    bins = prob @ models.age_bin_matrix().T
    true_bins = np.array([tasks.age_to_bin(int(a)) for a in ages])
    predicted = bins.argmax(1)
    median = (np.cumsum(prob, 1) >= 0.5).argmax(1)
    return {"exact": float(np.mean(predicted == true_bins)),
            "one_off": float(np.mean(np.abs(predicted - true_bins) <= 1)),
            "mae_expected": float(np.mean(np.abs(prob @ years - ages))),
            "mae_median": float(np.mean(np.abs(median - ages))),
            "mae_argmax": float(np.mean(np.abs(prob.argmax(1) - ages))),
            "bias_expected_under10": float(np.mean((prob @ years - ages)[ages < 10]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--weights", type=Path)
    args = parser.parse_args()
    model = models.model("joint")
    net_dir = args.models_dir / model.name
    weights = args.weights or training.newest_snapshot(net_dir)
    deploy = net_dir / "deploy.prototxt"
    classifier = evaluation.OpenCvClassifier(deploy if deploy.is_file() else Path("caffe_models/joint_net/deploy.prototxt"),
                                             weights)
    found = evaluation.predict(classifier, args.data_dir / "lmdb" / "joint_test_lmdb",
                               args.data_dir / "joint_mean.binaryproto", outputs=["age_fc", "gender"], progress=False)
    ages = evaluation.read_test_csv(args.data_dir / "joint_test.csv", found.keys, "age")
    genders = evaluation.read_test_csv(args.data_dir / "joint_test.csv", found.keys, "gender")
    result = {"weights": str(weights), "faces": int(len(ages))}
    for crops, outputs in (("centre", found.centre), ("10crop", found.ten_crop)):
        # 10-crop: the mean of the crops' logits stands in for the mean of their probabilities here.
        logits = outputs["age_fc"]
        result[crops] = {f"T={t}": figures(softmax(logits, t), ages) for t in TEMPERATURES}
        result[crops]["gender"] = float(np.mean(outputs["gender"].argmax(1) == genders))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
