"""JointNet's trunk without its 32x32 block: the definitions to train, and its training step timed against the default.

The default trunk spends 30% of its multiply-adds and the largest activations (64 x 32 x 32 x 32 per batch) in
res1, the residual block at 32x32 after the stem. `--out DIR` writes the trunk without it ("no_res1": the stem
feeds res2 and its projection directly; 0.045 G multiply-adds, 1.24 M parameters against 0.064 G, 1.25 M) as
train_val.prototxt and deploy.prototxt, cut from caffe_models/joint_net/ so every other layer, comment and
setting stays the shipped one, and beside them the two solvers `make train-joint` takes (stage 1: a copy of
solver_pretrain_long.prototxt, 6,000 iterations; stage 2: solver_finetune.prototxt), pointing at that net:

    python experiments/trunk_variants.py --out logs/no_res1
    make train-joint test-joint PRETRAIN_SOLVER=logs/no_res1/solver_pretrain.prototxt \
        SOLVER=logs/no_res1/solver_finetune.prototxt MODELS_DIR=models/no_res1 DATA_DIR=data/val
    python scripts/evaluate.py --net joint --data-dir data/val --models-dir models/no_res1 \
        --deploy logs/no_res1/deploy.prototxt     # test-joint's report with the variant's deploy net

`--time` times one training step (forward, backward, Caffe's SGD update; batch 64) of both trunks, one step of
each per round so that a shared machine's drift falls on both alike, and prints the medians and the ratio:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python experiments/trunk_variants.py --time --precision fp32
"""
import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

SHIPPED = REPO / "caffe_models" / "joint_net"
DROPPED_BLOCK = "res1"   # its layers are named res1_a*, res1_b*, res1 (the sum) and res1_relu
FED_INSTEAD = "conv1"    # the stem's top, which res1 read and res2 now reads
STAGE_SOLVERS = {"solver_pretrain.prototxt": "solver_pretrain_long.prototxt",
                 "solver_finetune.prototxt": "solver_finetune.prototxt"}


def without_block(prototxt: str) -> str:
    """The prototxt text without the layers of DROPPED_BLOCK, its consumers fed from FED_INSTEAD."""
    blocks = re.split(r"(?m)^(?=layer \{)", prototxt)
    kept = []
    for block in blocks:
        name = re.search(r'name: "([^"]+)"', block)
        if block.startswith("layer") and name and (name.group(1) in (DROPPED_BLOCK, DROPPED_BLOCK + "_relu")
                                                   or name.group(1).startswith(DROPPED_BLOCK + "_")):
            continue
        kept.append(block)
    text = "".join(kept).replace(f'bottom: "{DROPPED_BLOCK}"', f'bottom: "{FED_INSTEAD}"')
    if f'"{DROPPED_BLOCK}' in text:
        raise SystemExit(f"{SHIPPED}: a layer still refers to {DROPPED_BLOCK} after the cut")
    return text


def write_variant(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("train_val", "deploy"):
        (out / f"{kind}.prototxt").write_text(without_block((SHIPPED / f"{kind}.prototxt").read_text()))
    for name, source in STAGE_SOLVERS.items():
        text = (SHIPPED / source).read_text()
        (out / name).write_text(re.sub(r'(?m)^net: ".*"$', f'net: "{out / "train_val.prototxt"}"', text))
    print(f"wrote {out}/train_val.prototxt, deploy.prototxt, " + ", ".join(STAGE_SOLVERS))


def time_steps(precision: str, rounds: int) -> None:
    import torch

    import bench_train

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        variant = Path(tmp) / "train_val.prototxt"
        variant.write_text(without_block((SHIPPED / "train_val.prototxt").read_text()))
        read_net = bench_train.formats.read_net
        steps = {"default": bench_train.training_step("joint_net", 64, precision)}
        try:  # training_step reads caffe_models/joint_net/train_val.prototxt: hand it the variant instead
            bench_train.formats.read_net = lambda path: read_net(variant)
            steps["no_res1"] = bench_train.training_step("joint_net", 64, precision)
        finally:
            bench_train.formats.read_net = read_net
    times = {name: [] for name in steps}
    for round_ in range(rounds + 2):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_ >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["default"], times["no_res1"]))
    print(f"JointNet training step, batch 64, {precision}, {torch.get_num_threads()} threads, medians of {rounds} "
          f"interleaved rounds: default {statistics.median(times['default']) * 1e3:.1f} ms, no_res1 "
          f"{statistics.median(times['no_res1']) * 1e3:.1f} ms, default / no_res1 x{ratio:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the variant's prototxts and solvers here")
    parser.add_argument("--time", action="store_true", help="time both trunks' training steps, interleaved")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if not args.out and not args.time:
        parser.error("give --out DIR, --time or both")
    if args.out:
        write_variant(args.out.resolve())
    if args.time:
        time_steps(args.precision, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
