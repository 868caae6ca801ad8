"""Every stage of the kit end to end, as `make demo` runs it.

    python scripts/demo.py --out demo                      # generated smoke set (not real faces)
    python scripts/demo.py --out demo --utkface ~/UTKFace  # real faces

Each stage is the same command a user would type (dataset.build, scripts/train.py,
scripts/evaluate.py, scripts/compile_ir.py, edge/run_inference.py), run on a short
schedule so the whole demo stays within a few minutes on 2 cores. The numbers it
prints show that the pipeline works, not how accurate a fully trained net is.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from caffekit import atomic, photos
from caffekit.clean import DEMO_MARKER
from caffekit.errors import KitError, cli

REPO = Path(__file__).resolve().parents[1]
DEMO_ITERATIONS = 40  # per net: enough for the loss to fall, short enough for CI
DEMO_ENTRIES = {DEMO_MARKER, "faces", "data", "models", "annotated.png", "annotated_pair.png"}  # all it writes


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


def claim(out: Path) -> None:
    """Mark ``out`` as the demo's, so that `make clean` may delete it; refuse a folder holding anything else."""
    if out.exists() and not out.is_dir():
        raise KitError(f"{out}: exists and is not a folder; give another --out")
    # Hidden .tmp-/.old- entries are a killed run's temporaries, which the next write removes.
    strangers = sorted(name for name in (os.listdir(out) if out.exists() else [])
                       if name not in DEMO_ENTRIES and not atomic.LEFTOVER.match(name))
    if strangers:
        raise KitError(f"{out}: exists and is not a demo folder (it holds {', '.join(strangers[:3])}); "
                       "give another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by scripts/demo.py; `make clean` deletes this folder\n")


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo", help="folder for everything the demo writes")
    parser.add_argument("--utkface", type=Path, help="a UTKFace folder; default: a generated smoke set")
    parser.add_argument("--iterations", type=int, default=DEMO_ITERATIONS, help="training iterations per net")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    claim(out)
    py = sys.executable
    data, models = out / "data", out / "models"
    if args.utkface:
        faces = args.utkface.resolve()
    else:
        faces = out / "faces"
        run_stage("generate the smoke set", [py, "-m", "dataset.demo", "--out", faces])
    run_stage("dataset", [py, "-m", "dataset.build", "--utkface", faces, "--out", data, "--race", "asian"])
    for net in ("age", "gender", "joint"):
        run_stage(f"train {net}", [py, "scripts/train.py", "--net", net, "--backend", "torch",
                                   "--data-dir", data, "--models-dir", models, "--max-iter", args.iterations])
        run_stage(f"evaluate {net}", [py, "scripts/evaluate.py", "--net", net,
                                      "--data-dir", data, "--models-dir", models])
    run_stage("compile for the NCS2 (FP16) and CPUs (FP32)",
              [py, "scripts/compile_ir.py", "--net", "all", "--data-dir", data, "--models-dir", models,
               "--precision", "FP16", "FP32"])
    run_stage("face detector (BlazeFace, out of the mediapipe 0.10.14 wheel)",
              [py, "scripts/build_detector.py", "--models-dir", models])
    image = first_test_image(faces)
    run_stage("edge runner, joint net (one request per face)",
              [py, "edge/run_inference.py", "--models", models / "ir", "--device", "CPU", "--image", image,
               "--no-detect", "--output", out / "annotated.png"])
    run_stage("edge runner, AgeNet + GenderNet", [py, "edge/run_inference.py", "--models", models / "ir",
                                                  "--model", "pair", "--device", "CPU", "--image", image,
                                                  "--no-detect", "--output", out / "annotated_pair.png"])
    group = photos.fetch(photos.PHOTOS[0])
    run_stage(f"edge runner on a group photo ({group.name}): BlazeFace finds and aligns each face",
              [py, "edge/run_inference.py", "--models", models / "ir", "--device", "CPU", "--image", group,
               "--output", out / "annotated_group.png", "--save-crops", out / "crops"])
    print(f"\ndemo finished: everything is in {out}; annotated face: {out / 'annotated.png'}, group photo: "
          f"{out / 'annotated_group.png'} (the smoke-trained nets' labels mean nothing; the boxes do), what the "
          f"nets saw of each face: {out / 'crops'}")


if __name__ == "__main__":
    main()
