#!/usr/bin/env python3
"""Levi & Hassner's Adience protocol, the summary: mean and standard deviation over the five folds' evaluations.

    python scripts/evaluate_folds.py models/adience_fold_0 models/adience_fold_1 ... --out models/adience_folds.json

Each argument is one fold's MODELS_DIR, holding age_net/eval/report.json and gender_net/eval/report.json as
scripts/evaluate.py writes them (`make evaluate-folds` builds, trains and tests each fold with FOLD=k, then runs
this). Reports exact and 1-off age accuracy (1-off: the adjacent Adience group counts) and gender accuracy per
fold, then mean +- the sample standard deviation (n - 1) over the folds, as the paper's table does; for the
single centre crop and the 10-crop average. Levi & Hassner's single-crop figures: age 49.5 +- 4.4 exact,
84.6 +- 1.7 1-off; gender 85.9 +- 1.4.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffekit import atomic, models  # noqa: E402
from caffekit.errors import KitError, cli  # noqa: E402

# (figure, net, the report's key) in the order the table shows them.
FIGURES = (("age exact", "age", "accuracy"), ("age 1-off", "age", "one_off_accuracy"),
           ("gender", "gender", "accuracy"))
PROTOCOLS = ("centre", "10crop")
PAPER = {"age exact": (49.5, 4.4), "age 1-off": (84.6, 1.7), "gender": (85.9, 1.4)}  # single crop, in %


def read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KitError(f"{path}: no evaluation report (run `make test-age test-gender` for this fold)") from None
    except (OSError, ValueError) as exc:
        raise KitError(f"{path}: not a readable report.json ({exc.__class__.__name__})") from None


def fold_figures(fold_dir: Path) -> Dict[str, Dict[str, float]]:
    """{protocol: {figure: value}} of one fold's two reports."""
    reports = {net: read_report(fold_dir / models.model(net).name / "eval" / "report.json") for net in models.PAIR}
    figures = {}
    for protocol in PROTOCOLS:
        row = {}
        for figure, net, key in FIGURES:
            path = fold_dir / models.model(net).name / "eval" / "report.json"
            try:
                row[figure] = float(reports[net]["protocols"][protocol][key])
            except (KeyError, TypeError, ValueError):
                raise KitError(f"{path}: no {key} for the {protocol} protocol") from None
        figures[protocol] = row
    return figures


def summarise(values: Sequence[float]) -> dict:
    values = np.asarray(values, float)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "stderr": std / np.sqrt(len(values)), "folds": len(values)}


def aggregate(fold_dirs: Sequence[Path]) -> dict:
    per_fold = [fold_figures(Path(folder)) for folder in fold_dirs]
    summary = {protocol: {figure: summarise([fold[protocol][figure] for fold in per_fold])
                          for figure, _, _ in FIGURES} for protocol in PROTOCOLS}
    return {"folds": [str(folder) for folder in fold_dirs], "per_fold": per_fold, "summary": summary,
            "std": "sample standard deviation over the folds (n - 1)",
            "levi_hassner_2015_single_crop_percent": {k: {"mean": m, "std": s} for k, (m, s) in PAPER.items()}}


def format_table(result: dict) -> List[str]:
    """Per-fold figures and mean +- std in percent, one block per protocol; the paper's beside the centre crop."""
    folds = "".join(f"{'fold ' + str(i):>9}" for i in range(len(result["per_fold"])))
    lines = []
    for protocol in PROTOCOLS:
        lines.append(f"{protocol:<12}{folds}{'mean +- std':>16}" + (f"{'paper':>15}" if protocol == "centre" else ""))
        for figure, _, _ in FIGURES:
            stats = result["summary"][protocol][figure]
            paper = f"{PAPER[figure][0]:>9.1f} +- {PAPER[figure][1]:.1f}" if protocol == "centre" else ""
            lines.append(f"  {figure:<10}" + "".join(f"{100 * fold[protocol][figure]:>9.1f}"
                                                    for fold in result["per_fold"])
                         + f"{100 * stats['mean']:>9.1f} +- {100 * stats['std']:<4.1f}{paper}")
    return lines


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folds", nargs="+", type=Path, help="each fold's MODELS_DIR, fold 0 first")
    parser.add_argument("--out", type=Path, help="write the per-fold figures and the summary there (JSON)")
    args = parser.parse_args(argv)
    result = aggregate(args.folds)
    print("\n".join(format_table(result)))
    if args.out:
        atomic.write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"summary: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
