"""JointNet at another input size: definitions to train, and the training step's cost against the shipped 64x64.

Issue 14 asks for the input size chosen by measurement. Its plain baseline found 64x64 for 10 epochs better than
96x96 for 5 (the same compute): at this budget more epochs beat more pixels. This asks the question the other way:
a smaller input costs fewer multiply-adds per image, so the same minutes on an AVX2-only CPU buy more iterations.

`--out DIR --crop N` writes the shipped definitions with an N x N input (every image Data layer's crop_size, the
deploy net's Input) and beside them the two solvers `make train-joint` takes, pointing at that net: stage 1
with `--max-iter` iterations (test_interval a third of it), stage 2 the shipped solver_finetune.prototxt. The
LMDB images must keep the shipped ratio of crop to image (64 of 72), so build the data with `--joint-size`
N * 9 / 8 (64 for a 56 crop):

    python -m dataset.build ... --joint-size 64 --out data/val64 ...     # the arguments `make -n dataset-val` shows
    python experiments/input_size.py --crop 56 --max-iter 7800 --out logs/in56
    make train-joint DATA_DIR=data/val64 PRETRAIN_SOLVER=logs/in56/solver_pretrain.prototxt \
        SOLVER=logs/in56/solver_finetune.prototxt MODELS_DIR=models/in56
    python scripts/evaluate.py --net joint --data-dir data/val64 --models-dir models/in56 \
        --deploy logs/in56/deploy.prototxt

`--time` times one training step (forward, backward, Caffe's SGD update; batch 64) at both sizes, one step of
each per round so that a shared machine's drift falls on both alike, and prints the medians and the ratio:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python experiments/input_size.py --crop 56 --time
"""
import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

SHIPPED = REPO / "caffe_models" / "joint_net"
SHIPPED_CROP = 64


def with_crop(prototxt: str, crop: int) -> str:
    """The shipped train_val or deploy text with an ``crop`` x ``crop`` input."""
    text, crops = re.subn(r"crop_size: \d+", f"crop_size: {crop}", prototxt)
    text, inputs = re.subn(r"dim: \d+ dim: \d+ \}", f"dim: {crop} dim: {crop} }}", text)
    if not crops + inputs:
        raise SystemExit("no crop_size or Input shape found in the shipped prototxt")
    return text


def write_variant(out: Path, crop: int, max_iter: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("train_val", "deploy"):
        (out / f"{kind}.prototxt").write_text(with_crop((SHIPPED / f"{kind}.prototxt").read_text(), crop))
    net = f'net: "{out / "train_val.prototxt"}"'
    stage1 = re.sub(r'(?m)^net: ".*"$', net, (SHIPPED / "solver_pretrain.prototxt").read_text())
    stage1 = re.sub(r"(?m)^max_iter: \d+", f"max_iter: {max_iter}", stage1)
    stage1 = re.sub(r"(?m)^test_interval: \d+", f"test_interval: {max(1, max_iter // 3)}", stage1)
    (out / "solver_pretrain.prototxt").write_text(stage1)
    stage2 = re.sub(r'(?m)^net: ".*"$', net, (SHIPPED / "solver_finetune.prototxt").read_text())
    (out / "solver_finetune.prototxt").write_text(stage2)
    print(f"wrote {out}/train_val.prototxt, deploy.prototxt ({crop}x{crop}), solver_pretrain.prototxt "
          f"({max_iter} iterations), solver_finetune.prototxt")


def time_steps(crop: int, precision: str, rounds: int) -> None:
    import torch

    import bench_train

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        variant = Path(tmp) / "train_val.prototxt"
        variant.write_text(with_crop((SHIPPED / "train_val.prototxt").read_text(), crop))
        steps = {SHIPPED_CROP: bench_train.training_step("joint_net", 64, precision),
                 crop: bench_train.training_step("joint_net", 64, precision, prototxt=variant)}
    times = bench_train.interleaved(steps, rounds)
    shipped, variant_times = times[SHIPPED_CROP], times[crop]
    ratio = statistics.median(s / v for s, v in zip(shipped, variant_times))
    print(f"JointNet training step, batch 64, {precision}, {torch.get_num_threads()} threads, medians of {rounds} "
          f"interleaved rounds: {SHIPPED_CROP}x{SHIPPED_CROP} {statistics.median(shipped) * 1e3:.1f} ms, {crop}x{crop} "
          f"{statistics.median(variant_times) * 1e3:.1f} ms; {SHIPPED_CROP} / {crop} x{ratio:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=56, help="the input size (default 56)")
    parser.add_argument("--out", type=Path, help="write the prototxts and solvers here")
    parser.add_argument("--max-iter", type=int, default=6000, help="stage 1's iterations in --out's solver")
    parser.add_argument("--time", action="store_true", help="time both sizes' training steps, interleaved")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if not args.out and not args.time:
        parser.error("give --out DIR, --time or both")
    if not 16 <= args.crop <= 256:
        parser.error(f"--crop {args.crop}: expected 16 to 256 pixels")
    if args.out:
        write_variant(args.out.resolve(), args.crop, args.max_iter)
    if args.time:
        time_steps(args.crop, args.precision, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
