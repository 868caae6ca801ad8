"""JointNet's four-block trunk of 2026-12-03 beside the shipped three-block one: definitions to train, and timing.

Until 2026-12-04 the trunk had a residual block of 32 channels at 32x32 (res1) between the stem and res2: 30% of
the multiply-adds and the largest activations (64 x 32 x 32 x 32 per batch). The shipped trunk feeds res2 and its
projection from the stem directly (0.045 G multiply-adds, 1.24 M parameters, against 0.064 G and 1.25 M), and
pre-trains 6,000 iterations in the time the four-block trunk's 4,500 took. `--out DIR` writes the four-block
trunk as train_val.prototxt and deploy.prototxt, res1 put back into caffe_models/joint_net/'s files (its layers
are res2_b's with 32 channels, so every other layer, comment and setting stays the shipped one), and beside them
the two solvers `make train-joint` takes, pointing at that net (stage 1: 4,500 iterations, the schedule of
solver_pretrain_short.prototxt; stage 2: solver_finetune.prototxt), to reproduce the older rows of the README:

    python experiments/trunk_variants.py --out logs/four_blocks
    make train-joint PRETRAIN_SOLVER=logs/four_blocks/solver_pretrain.prototxt \
        SOLVER=logs/four_blocks/solver_finetune.prototxt MODELS_DIR=models/four_blocks DATA_DIR=data/val
    python scripts/evaluate.py --net joint --data-dir data/val --models-dir models/four_blocks \
        --deploy logs/four_blocks/deploy.prototxt     # test-joint's report with that deploy net

`--time` times one training step (forward, backward, Caffe's SGD update; batch 64) of both trunks, one step of
each per round so that a shared machine's drift falls on both alike, and prints the medians and the ratio:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python experiments/trunk_variants.py --time --precision fp32
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
BLOCK = "res1"          # the block put back: res1_a, res1_b (each conv + BatchNorm + Scale), res1 (the sum), ReLUs
STEM = "conv1"          # the stem's top, which res1 reads and res2 reads in the shipped trunk
TEMPLATE = "res2_b"     # a 3x3 stride-1 unit of the shipped trunk (conv, _bn, _scale), 64 channels
CHANNELS = 32
STAGE_SOLVERS = {"solver_pretrain.prototxt": "solver_pretrain_short.prototxt",  # 4,500 iterations
                 "solver_finetune.prototxt": "solver_finetune.prototxt"}


def layer_blocks(prototxt: str):
    """The text split before each top-level layer; a block's comments after it stay with it."""
    return re.split(r"(?m)^(?=layer \{)", prototxt)


def layer_name(block: str) -> str:
    found = re.search(r'name: "([^"]+)"', block)
    return found.group(1) if block.startswith("layer") and found else ""


def with_block(prototxt: str) -> str:
    """The shipped prototxt text with BLOCK between the stem and res2, as the four-block trunk had it."""
    blocks = layer_blocks(prototxt)
    named = {layer_name(b): b for b in blocks}
    if BLOCK in named:
        raise SystemExit(f"{SHIPPED}: already has a layer {BLOCK!r}")

    def unit(name: str, bottom: str) -> str:
        text = "".join(named[TEMPLATE + part].replace(TEMPLATE, name) for part in ("", "_bn", "_scale"))
        text = text.replace(f'bottom: "res2_a" top: "{name}"', f'bottom: "{bottom}" top: "{name}"')
        return text.replace("num_output: 64", f"num_output: {CHANNELS}")

    block = (unit(f"{BLOCK}_a", STEM)
             + f'layer {{ name: "{BLOCK}_a_relu" type: "ReLU" bottom: "{BLOCK}_a" top: "{BLOCK}_a" }}\n'
             + unit(f"{BLOCK}_b", f"{BLOCK}_a")
             + f'layer {{ name: "{BLOCK}" type: "Eltwise" bottom: "{BLOCK}_b" bottom: "{STEM}" top: "{BLOCK}" '
               'eltwise_param { operation: SUM } }\n'
             + f'layer {{ name: "{BLOCK}_relu" type: "ReLU" bottom: "{BLOCK}" top: "{BLOCK}" }}\n')
    out = []
    for b in blocks:
        if layer_name(b) in ("res2_a", "res2_proj"):
            b = b.replace(f'bottom: "{STEM}"', f'bottom: "{BLOCK}"')
        out.append(b)
        if layer_name(b) == f"{STEM}_relu":
            out.append(block)
    return "".join(out)


def write_variant(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("train_val", "deploy"):
        (out / f"{kind}.prototxt").write_text(with_block((SHIPPED / f"{kind}.prototxt").read_text()))
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
        variant.write_text(with_block((SHIPPED / "train_val.prototxt").read_text()))
        steps = {"three blocks (shipped)": bench_train.training_step("joint_net", 64, precision),
                 "four blocks": bench_train.training_step("joint_net", 64, precision, prototxt=variant)}
    times = bench_train.interleaved(steps, rounds)
    shipped, four = times.values()
    print(f"JointNet training step, batch 64, {precision}, {torch.get_num_threads()} threads, medians of {rounds} "
          f"interleaved rounds: three blocks {statistics.median(shipped) * 1e3:.1f} ms, four blocks "
          f"{statistics.median(four) * 1e3:.1f} ms, four / three x{statistics.median(f / s for s, f in zip(shipped, four)):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the four-block trunk's prototxts and solvers here")
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
