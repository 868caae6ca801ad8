"""Fetch MediaPipe's BlazeFace face detector and build its OpenVINO IRs for the edge runner.

    python scripts/build_detector.py --models-dir models
    python scripts/build_detector.py --models-dir models --wheel ~/Downloads/mediapipe-0.10.14-cp311-*.whl

Downloads the mediapipe==0.10.14 wheel with pip (not installing it; kept in
$XDG_CACHE_HOME/agegender-edge-kit, default ~/.cache/agegender-edge-kit) unless --wheel names one, takes
the short- and full-range face detection models out of it, checks their SHA-256, and writes
<models-dir>/ir/face_detector/: both .tflite files (for OpenCV's importer), FP16/ and FP32/ IRs taking
u8 BGR NHWC pixels, with ops of opsets 1-8 only (OpenVINO 2022.3, NCS2), and face_detector.json with the
anchors and decoding options. Each IR is checked against the .tflite on a face image.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as `python scripts/build_detector.py` without installing

from caffekit import detector  # noqa: E402
from caffekit.errors import cli  # noqa: E402


def summary(folder: Path, meta: dict) -> None:
    for key, entry in meta["models"].items():
        check = entry["check"]
        print(f"{key}: {folder / entry['tflite']}  ({entry['input_size']}x{entry['input_size']}, "
              f"{entry['anchors']['count']} anchors, {' '.join(entry['opsets'])})")
        for precision in detector.PRECISIONS:
            diff = check[precision]["max_abs_diff"]
            print(f"  {precision}: {folder / entry['ir'][precision]}  max |IR - tflite| regressors "
                  f"{diff['regressors']:.2g}, scores {diff['scores']:.2g}; top score "
                  f"{check[precision]['top_score']:.3f} (tflite {check['top_score_tflite']:.3f})")
        if "interpolate_rewrite" in entry:
            rewrite = entry["interpolate_rewrite"]
            print(f"  {rewrite['nodes']} Interpolate-11 -> Interpolate-4: max |diff| "
                  f"{max(rewrite['max_abs_diff'].values()):.2g}")
        opencv = entry["opencv"]
        print("  OpenCV: " + (f"loads it ({opencv['input_layout']} input), max |diff| "
                              f"{max(opencv['max_abs_diff'].values()):.2g}" if opencv["loads"]
                              else f"does not load it: {opencv['reason']}"))
    print(f"check image: {meta['models'][meta['default']]['check']['image']}")


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models-dir", type=Path, default=REPO / "models",
                        help="the detector is written to <models-dir>/ir/face_detector/")
    parser.add_argument("--wheel", type=Path, help="a mediapipe-0.10.14 wheel you have (no download)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    meta = detector.build(args.models_dir, args.wheel)
    folder = detector.output_folder(args.models_dir)
    summary(folder, meta)
    print(f"wrote {folder / detector.JSON_NAME} [{time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
    main()
