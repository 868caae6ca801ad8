"""Every stage of the kit end to end, as `make demo` runs it.

    python scripts/demo.py --out demo                      # generated smoke set (not real faces)
    python scripts/demo.py --out demo --utkface ~/UTKFace  # real faces

Each stage is the same command a user would type (dataset.build, scripts/train.py,
scripts/evaluate.py, scripts/compile_ir.py, edge/run_inference.py), run on a short
schedule so the whole demo stays within a few minutes on 2 cores. The numbers it
prints show that the pipeline works, not how accurate a fully trained net is.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

from caffekit.errors import KitError, cli

REPO = Path(__file__).resolve().parents[1]
DEMO_ITERATIONS = 40  # per net: enough for the loss to fall, short enough for CI


def run_stage(title: str, args) -> None:
    print(f"\n=== {title}\n$ {' '.join(map(str, args))}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([str(a) for a in args], cwd=REPO)
    if result.returncode != 0:
        raise KitError(f"demo stage '{title}' failed with exit code {result.returncode}")
    print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


def first_test_image(faces: Path) -> Path:
    images = sorted(faces.glob("*.jpg"))
    if not images:
        raise KitError(f"{faces}: no images to run the edge runner on")
    return images[0]


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo", help="folder for everything the demo writes")
    parser.add_argument("--utkface", type=Path, help="a UTKFace folder; default: a generated smoke set")
    parser.add_argument("--iterations", type=int, default=DEMO_ITERATIONS, help="training iterations per net")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    py = sys.executable
    data, models = out / "data", out / "models"
    if args.utkface:
        faces, race = args.utkface.resolve(), "asian"
    else:
        faces, race = out / "faces", "asian"
        run_stage("generate the smoke set", [py, "-m", "dataset.demo", "--out", faces])
    run_stage("dataset", [py, "-m", "dataset.build", "--utkface", faces, "--out", data, "--race", race])
    for net in ("age", "gender"):
        run_stage(f"train {net}", [py, "scripts/train.py", "--net", net, "--backend", "torch",
                                   "--data-dir", data, "--models-dir", models, "--max-iter", args.iterations])
        run_stage(f"evaluate {net}", [py, "scripts/evaluate.py", "--net", net,
                                      "--data-dir", data, "--models-dir", models])
    run_stage("compile for the NCS2 (FP16) and CPUs (FP32)",
              [py, "scripts/compile_ir.py", "--net", "all", "--data-dir", data, "--models-dir", models,
               "--precision", "FP16", "FP32"])
    image = first_test_image(faces)
    run_stage("edge runner", [py, "edge/run_inference.py", "--models", models / "ir", "--device", "CPU",
                              "--image", image, "--no-detect", "--output", out / "annotated.png"])
    print(f"\ndemo finished: everything is in {out}; annotated face: {out / 'annotated.png'}")


if __name__ == "__main__":
    main()
