#!/usr/bin/env python3
"""Torch-backend training throughput (forward + backward + Caffe SGD update), images per second.

    python scripts/bench_train.py --net age --batch 50 --threads 2
    python scripts/bench_train.py --precision fp32 bf16 --iters 8 --json bench/train_speed.json

Times the same code path as `scripts/train.py --backend torch` (caffekit.torchnet + caffekit.solver)
on random 227x227 batches, so it measures compute, not the LMDB reader (which runs in a
background thread during training). Reports the median of --iters timed iterations after --warmup.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffekit import atomic, formats, graph, models, training  # noqa: E402
from caffekit.errors import cli  # noqa: E402
from caffekit.proto import caffe_pb2  # noqa: E402


def training_step(net_name: str, batch: int, precision: str, nchw: bool = False, fused: bool = True,
                  prototxt=None):
    """One training step of the net on a fixed random batch, as the trainer runs it: a function to time.
    ``nchw`` and ``fused=False`` give the trainer's old layout and its old layer-by-layer BatchNorm + Scale;
    ``prototxt`` another train_val definition of the same net (default: caffe_models/<net>/train_val.prototxt)."""
    import torch

    from caffekit import hardware, solver as solver_lib, torchnet
    from caffekit.backends import torch as torch_backend

    hardware.keep_freed_tensors()  # as the trainer does

    layout = torch.contiguous_format if nchw else torch_backend.memory_format(torch, torch.device("cpu"), precision)
    net = formats.read_net(prototxt or training.REPO / "caffe_models" / net_name / "train_val.prototxt")
    shapes, labels = {}, []
    for data in training.data_layers(net, net_name)[graph.TRAIN]:
        crop = data.transform_param.crop_size
        if crop:  # an image layer: its data top, and its label top when it has one
            shapes[data.top[0]] = (batch, 3, crop, crop)
            labels += list(data.top[1:])
        else:  # a label-Datum layer (1 x 1 x 1 per record)
            shapes[data.top[0]] = (batch, 1, 1, 1)
            labels.append(data.top[0])
    for name in labels:
        shapes.setdefault(name, (batch,))
    with tempfile.TemporaryDirectory() as tmp:
        # The InfogainLoss matrix `make dataset` would write: timing the compute needs no dataset.
        for layer in net.layer:
            if layer.type == "InfogainLoss" and layer.infogain_loss_param.source:
                layer.infogain_loss_param.source = str(Path(tmp) / "infogain.binaryproto")
                Path(layer.infogain_loss_param.source).write_bytes(models.infogain_file())
        model = torchnet.CaffeNet(net, graph.TRAIN, shapes, net_name, seed=1)  # reads the matrix here
    if not fused:
        model.steps = torchnet.execution_steps(model.layers, fuse=False)
    param = caffe_pb2.SolverParameter(base_lr=0.001, lr_policy="fixed", momentum=0.9, weight_decay=5e-4)
    info = model.param_info
    sgd = solver_lib.SgdSolver(param, model.params(), [p.lr_mult for p in info], [p.decay_mult for p in info])
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for name, shape in shapes.items():
        if name in labels:  # a valid class for every loss that reads it
            reader = next(layer for layer in model.layers if len(layer.bottom) > 1 and layer.bottom[1] == name)
            classes = model.shapes[reader.bottom[0]][1]
            inputs[name] = torch.randint(0, classes, shape, generator=generator).float()
        else:
            inputs[name] = (torch.randn(shape, generator=generator) * 50).contiguous(memory_format=layout)
    model = model.to(memory_format=layout)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.loss(model(inputs))
        loss.backward()
        sgd.apply_update()

    step.channels_last = layout == torch.channels_last
    return step


def interleaved(steps: dict, rounds: int, warmup: int = 2) -> dict:
    """{name: per-round seconds} of each step in ``steps``, one call of each per round, so that a shared
    machine's drift falls on all of them alike; the first ``warmup`` rounds are not kept."""
    times = {name: [] for name in steps}
    for round_ in range(warmup + rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def bench(net_name: str, batch: int, precision: str, iters: int, warmup: int, nchw: bool = False) -> dict:
    import torch

    step = training_step(net_name, batch, precision, nchw)
    times, cpu_times = [], []
    for i in range(warmup + iters):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    cpu_median = statistics.median(cpu_times)
    threads = torch.get_num_threads()
    # On a shared machine the wall time includes waiting for the CPU; CPU seconds / threads is
    # the wall time the same work takes when the cores are free (an estimate, upper bound).
    return {"net": net_name, "batch": batch, "precision": precision, "channels_last": step.channels_last,
            "threads": threads, "median_s": round(median, 4), "images_per_s": round(batch / median, 1),
            "cpu_s_per_iteration": round(cpu_median, 4),
            "images_per_s_if_cores_free": round(batch * threads / cpu_median, 1),
            "times_s": [round(t, 4) for t in times]}


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="age", choices=sorted(training.NETS))
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--iters", type=int, default=6, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nchw", action="store_true",
                        help="NCHW input and weights (the trainer's layout on the CPU is channels_last)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = []
    for precision in args.precision:
        result = bench(training.NETS[args.net], args.batch, precision, args.iters, args.warmup,
                       args.nchw)
        results.append(result)
        print(f"{result['net']} batch {args.batch} {precision:>4} ({args.threads} threads, "
              f"{'channels_last' if result['channels_last'] else 'NCHW'}): "
              f"{result['images_per_s']:.1f} images/s (median {result['median_s'] * 1000:.0f} ms/iteration; "
              f"{result['cpu_s_per_iteration']:.2f} CPU s/iteration = "
              f"{result['images_per_s_if_cores_free']:.1f} images/s on {args.threads} free cores)")
    if args.json:
        atomic.write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
