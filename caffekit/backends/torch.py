"""The torch backend: Caffe's Solver::Solve over torch modules, in this process.

Test every test_interval (including iteration 0 unless test_initialization is false), forward and
backward over iter_size batches, the SGD update of caffekit/solver.py, snapshots every ``snapshot``
iterations and after training. Ctrl-C snapshots the current iteration and stops; ``resume``
continues from a .solverstate with the same schedule and the same batches. The run starts with a
line naming the CPU, its features and the precision chosen (caffekit/hardware.py), and prints an
estimate of the whole schedule's wall time once its first iterations are timed (caffekit/estimate.py).

Under torchrun the run is data-parallel, with Caffe's multi-GPU semantics (caffekit/distributed.py): each worker
trains on its own batch, the gradients are averaged by DistributedDataParallel, and rank 0 alone tests, writes
and prints, while the others wait for it. On CUDA the batches come pinned from background threads and are copied
to the GPU on a side stream while the previous one computes (Feed); fp16 autocast runs with a GradScaler.
"""
import contextlib
import random
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from caffekit import distributed, formats, graph, hardware, solver as solver_lib
from caffekit.backends import Backend
from caffekit.errors import KitError
from caffekit.estimate import ScheduleEstimate
from caffekit.proto import caffe_pb2
from caffekit.snapshots import SOLVERSTATE, snapshot_name
from caffekit.training import RunConfig, TrainLog, data_layers, find_resume_files, plot_curves, prepare_run, \
    save_run, write_config


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, progress: bool = True):
        self.progress = progress

    def describe(self, config: RunConfig) -> str:
        import torch

        if config.threads:
            torch.set_num_threads(int(config.threads))
        cpu = hardware.read_cpu()
        device = hardware.choose_device(config.device)
        _, reason = hardware.choose_precision(config.precision, device, cpu)
        return hardware.describe(cpu, device, torch.get_num_threads(), reason)

    def train(self, config: RunConfig, later_iterations: int = 0) -> Path:
        """Prepare the run and train it. Raises KeyboardInterrupt after the snapshot when stopped by
        Ctrl-C (the CLI turns that into a non-zero exit)."""
        if config.weights and config.resume:
            raise KitError("give --weights or --resume, not both (as caffe train)")
        # Everything that can fail on bad input fails here, before any output is written.
        resume_files = find_resume_files(config.resume) if config.resume else None
        start_model = None
        if config.weights:
            start_model = formats.read_caffemodel(config.weights)
        elif resume_files:
            start_model = formats.read_caffemodel(resume_files[0])
        param, net = prepare_run(config)
        trainer = Trainer(config, param, net, progress=self.progress)
        if config.weights:
            config.extra["weights_copied"] = trainer.load_weights(config.weights, start_model)
        if resume_files:
            trainer.restore(resume_files[1], start_model)
        # Every worker has read what it needs (and decided which stage this is) before rank 0 writes.
        distributed.barrier()
        if trainer.workers.main:
            save_run(config, param, net)
        last = trainer.run(later_iterations)
        if trainer.interrupted:
            raise KeyboardInterrupt
        if last is None:
            raise KitError(f"{config.solver}: the run wrote no snapshot (snapshot_after_train is false and no "
                           f"snapshot interval was reached)")
        if trainer.workers.main:
            print(f"trained {config.net} to iteration {trainer.solver.iter}; last snapshot: {last}")
        return last


class StopRequest:
    """SIGINT sets a flag that the loop checks between iterations (Caffe's SolverAction::STOP),
    so the weights are never snapshotted halfway through an update. A second Ctrl-C interrupts, unless
    ``escalate`` is off: under torchrun every worker gets Ctrl-C twice, from the terminal and forwarded by
    torchrun, which itself kills the workers 30 s later."""

    def __init__(self, escalate: bool = True):
        self.requested = False
        self.previous = None
        self.escalate = escalate

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = True
        if self.escalate:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


class SmoothedLoss:
    """Caffe's UpdateSmoothedLoss: the mean of the last ``size`` iterations' losses (average_loss),
    updated in Caffe's order of operations so the logged values match its log."""

    def __init__(self, size: int):
        self.size = int(size)
        self.losses: List[float] = []
        self.oldest = 0  # once full: the slot the next loss replaces
        self.value = 0.0

    def add(self, loss: float) -> float:
        if len(self.losses) < self.size:
            self.losses.append(loss)
            self.value = (self.value * (len(self.losses) - 1) + loss) / len(self.losses)
        else:
            self.value += (loss - self.losses[self.oldest]) / self.size
            self.losses[self.oldest] = loss
            self.oldest = (self.oldest + 1) % self.size
        return self.value


LOADER_THREADS = {"cpu": 1, "cuda": 4}  # per Data layer: on the CPU the cores are the net's; a GPU needs feeding


class Feed:
    """The input blobs of one phase's Data layers, batch after batch, on the device.

    On CUDA the batches arrive pinned from the Prefetcher's threads and ``prepare`` starts copying the next
    one on a side stream (non_blocking) while the current one computes, so the GPU waits neither on LMDB
    decoding nor on the copy. On the CPU the arrays are used where they are."""

    def __init__(self, torch, layers, streams, device, memory_format):
        self.torch, self.layers, self.streams, self.device = torch, layers, streams, device
        self.memory_format = memory_format
        self.copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: Optional[Dict[str, object]] = None

    def prepare(self) -> None:
        """Start bringing the next batch onto the device (nothing to do when one is on its way)."""
        if self.ready is not None:
            return
        torch = self.torch
        batches = [next(stream) for stream in self.streams]
        inputs = {}
        with torch.cuda.stream(self.copies) if self.copies is not None else contextlib.nullcontext():
            for layer, (data, labels) in zip(self.layers, batches):
                tensor = torch.as_tensor(data).to(self.device, non_blocking=True)
                inputs[layer.tops[0]] = tensor.contiguous(memory_format=self.memory_format) if tensor.dim() == 4 \
                    else tensor
                if len(layer.tops) > 1:
                    inputs[layer.tops[1]] = torch.as_tensor(labels).to(self.device, non_blocking=True)
        self.ready = inputs

    def take(self) -> Dict[str, object]:
        """The next batch, ready for the compute stream."""
        self.prepare()
        inputs, self.ready = self.ready, None
        if self.copies is not None:
            current = self.torch.cuda.current_stream(self.device)
            current.wait_stream(self.copies)
            for tensor in inputs.values():
                tensor.record_stream(current)  # not reused by the allocator before the compute is done
        return inputs

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


def memory_format(torch, device, precision: str):
    """The layout of the trainer's 4-D tensors. channels_last (NHWC in memory; shapes and Caffe's NCHW
    order unchanged) on the CPU: JointNet's step 1.1-1.3x faster there than NCHW, AgeNet's a little
    (scripts/bench_train.py --nchw compares). On CUDA only with autocast, where tensor cores want it."""
    if device.type == "cpu" or precision in ("bf16", "fp16"):
        return torch.channels_last
    return torch.contiguous_format


def pinned(torch, device):
    """A Prefetcher ``convert``: a batch as tensors in page-locked memory, which a CUDA copy can read
    asynchronously (from pageable memory it cannot)."""

    def convert(batch):
        # A new thread's CUDA calls go to GPU 0: without this, every worker would open a context there.
        torch.cuda.set_device(device)
        return tuple(torch.from_numpy(array).pin_memory() for array in batch)

    return convert


def scaled_update(torch, solver: solver_lib.SgdSolver):
    """Caffe's SGD update dressed as a torch optimizer, only so that GradScaler.step can unscale the
    gradients, skip the update when they overflowed, and otherwise call it; ``rate`` is None after a skip."""

    class CaffeUpdate(torch.optim.Optimizer):
        def __init__(self):
            super().__init__(solver.params, {})
            self.rate: Optional[float] = None

        def step(self, closure=None):
            self.rate = solver.apply_update()

    return CaffeUpdate()


class Trainer:
    """Caffe's Solver over torch modules. Build with a prepared (resolved) solver and net."""

    def __init__(self, config: RunConfig, param: caffe_pb2.SolverParameter, net: caffe_pb2.NetParameter,
                 progress: bool = True):
        import torch

        from caffekit import lmdb_data, torchnet

        self.torch = torch
        self.config = config
        self.param = param
        self.net_param = net
        self.progress = progress
        self.out_dir = Path(config.out_dir)
        source = config.net_resolved or "network"
        if config.threads:
            torch.set_num_threads(int(config.threads))
        self.workers = distributed.workers()
        self.device = distributed.device(hardware.choose_device(config.device))
        self.precision, _ = hardware.choose_precision(config.precision, self.device, hardware.read_cpu())
        self._set_up_cuda()
        hardware.keep_freed_tensors()
        process_group = distributed.start(self.device)
        seed = param.random_seed if param.random_seed >= 0 else random.SystemRandom().randrange(2 ** 31)
        self.seed = distributed.from_main(int(seed), self.device)
        config.extra.update(seed_used=self.seed, precision_used=self.precision, device_used=str(self.device),
                            torch=torch.__version__, threads_used=torch.get_num_threads())
        data = data_layers(net, source)
        shard = (self.workers.rank, self.workers.size)
        self.train_data = [lmdb_data.DataLayer(layer, train=True, seed=self.seed, shard=shard)
                           for layer in data[graph.TRAIN]]
        # Caffe's root solver alone tests (solver.cpp, TestAll): the other workers need no test data.
        self.has_test = graph.TEST in data and bool(param.test_iter)
        self.test_data = None
        if self.has_test and self.workers.main:
            self.test_data = [lmdb_data.DataLayer(layer, train=False, seed=self.seed) for layer in data[graph.TEST]]
        for layers in (self.train_data, self.test_data or []):
            counts = {len(layer.source) for layer in layers}
            if len(counts) > 1:
                raise KitError(f"{source}: the LMDBs of one phase hold different record counts "
                               f"({', '.join(f'{layer.source.path}: {len(layer.source)}' for layer in layers)})")
        self.train_net = torchnet.CaffeNet(net, graph.TRAIN, self._input_shapes(self.train_data), source, self.seed)
        self.test_net = None
        if self.test_data is not None:
            self.test_net = torchnet.CaffeNet(net, graph.TEST, self._input_shapes(self.test_data), source, self.seed)
        self.memory_format = memory_format(torch, self.device, self.precision)
        self.train_net.to(self.device, memory_format=self.memory_format)
        if self.test_net is not None:
            self.test_net.share_params(self.train_net)  # after .to(): the test net uses the moved tensors
        info = self.train_net.param_info
        # Looked up at run time, so a test can swap in a deliberately wrong update rule.
        self.solver = solver_lib.SgdSolver(param, self.train_net.params(), [p.lr_mult for p in info],
                                           [p.decay_mult for p in info])
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.scaled = scaled_update(torch, self.solver) if self.scaler is not None else None
        self.last_snapshot: Optional[Path] = None
        self.snapshot_iter: Optional[int] = None
        self.interrupted = False
        self.stop_agreed = False
        if self.workers.distributed:
            self._announce(process_group)

    def _set_up_cuda(self) -> None:
        torch = self.torch
        if self.device.type != "cuda":
            return
        # The input shapes never change: cuDNN may time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
        # fp32 asked for means Caffe's fp32: TF32 would round the inputs of convolutions and products to 10 bits.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.precision != "fp32"

    def _announce(self, process_group: str) -> None:
        """The line saying how the run is split, and the same in config.json."""
        n, batch, iter_size = self.workers.size, self.train_data[0].batch_size, int(self.param.iter_size)
        accumulated = f" x iter_size {iter_size}" if iter_size > 1 else ""
        self.config.extra["distributed"] = {"workers": n, "backend": process_group, "batch_per_worker": batch,
                                            "effective_batch": n * batch * iter_size}
        if self.workers.main:
            print(f"distributed: {n} workers ({process_group}), effective batch {n} x {batch}{accumulated}")

    @staticmethod
    def _input_shapes(layers) -> Dict[str, Tuple[int, ...]]:
        shapes = {}
        for layer in layers:
            shapes[layer.tops[0]] = layer.shape
            if len(layer.tops) > 1:
                shapes[layer.tops[1]] = (layer.batch_size,)
        return shapes

    # -- weights in and out
    def load_weights(self, path, model=None) -> List[str]:
        model = model if model is not None else formats.read_caffemodel(path)
        copied = self.train_net.load_weights(graph.read_weights(model), str(path))
        if not copied:
            raise KitError(f"{path}: no layer of this network found in the caffemodel")
        return copied

    def restore(self, path, model=None) -> None:
        model_path, state_path, state = find_resume_files(path)
        weights = graph.read_weights(model if model is not None else formats.read_caffemodel(model_path))
        self.train_net.load_weights(weights, str(model_path), require_all=True)
        self.solver.restore(state, str(state_path))
        self.config.extra["resumed_from"] = str(state_path)

    def snapshot(self) -> Path:
        """<prefix>_iter_N.caffemodel (train-phase layers and blobs, as Caffe's Net::ToProto)
        and .solverstate, each written atomically; by rank 0 alone, which holds what every worker holds
        (BatchNorm's statistics apart: its own)."""
        iteration = self.solver.iter
        model_path = snapshot_name(self.param.snapshot_prefix, iteration)
        self.last_snapshot, self.snapshot_iter = model_path, iteration
        if self.workers.main:
            self._write_snapshot(model_path, snapshot_name(self.param.snapshot_prefix, iteration, suffix=SOLVERSTATE))
        return model_path

    def _write_snapshot(self, model_path: Path, state_path: Path) -> None:
        layers = []
        for layer in self.train_net.layers:
            copy = caffe_pb2.LayerParameter()
            copy.CopyFrom(layer)
            if not copy.HasField("phase"):
                copy.phase = graph.TRAIN  # Caffe's Net::Init stamps the phase on every layer
            layers.append(copy)
        model = graph.weights_to_model(self.net_param.name, layers, self.train_net.weights())
        formats.write_caffemodel(model_path, model)
        solver_lib.write_solverstate(state_path, self.solver.state(str(model_path)))

    # -- one pass
    def _autocast(self):
        torch = self.torch
        if self.precision in ("bf16", "fp16"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
        return torch.autocast(self.device.type, enabled=False)

    def test(self, feed: Feed) -> Dict[str, float]:
        """Caffe's TestClassification: every net output averaged over test_iter batches."""
        torch = self.torch
        totals: Dict[str, float] = {}
        iters = int(self.param.test_iter[0])
        with torch.no_grad(), self._autocast():
            for _ in range(iters):
                blobs = self.test_net(feed.take())
                feed.prepare()
                for name in self.test_net.outputs:
                    value = blobs[name]
                    if value.dim() == 0:
                        totals[name] = totals.get(name, 0.0) + float(value)
        return {name: total / iters for name, total in totals.items()}

    # -- the loop, Caffe's Solve and Step
    def run(self, later_iterations: int = 0) -> Optional[Path]:
        """Train to max_iter (or until Ctrl-C, then ``interrupted``); returns the last snapshot.
        ``later_iterations``: those of a stage that follows, for the wall-time estimate."""
        param = self.param
        self.start_iter = self.solver.iter
        self.log = TrainLog(self.out_dir / "train_log.csv", self.start_iter)
        self.title = f"{self.net_param.name or self.config.net}: {param.lr_policy} lr {param.base_lr:g}, " \
                     f"{self.precision} on {self.device.type}"
        self.smoothed = SmoothedLoss(param.average_loss)
        self.estimate = ScheduleEstimate(int(param.max_iter) - self.start_iter, later_iterations,
                                         "the fine-tuning stage")
        self.started = time.time()
        # After the weights are loaded: DDP starts every worker from rank 0's parameters.
        self.model = distributed.wrap(self.train_net, self.device)
        self._open_streams()
        if self.workers.main:
            write_config(self.config)
        self.bar = None
        if self.progress and self.workers.main:
            from tqdm import tqdm

            self.bar = tqdm(total=int(param.max_iter), initial=self.start_iter, unit="it", desc=self.config.net,
                            dynamic_ncols=True)
        try:
            with StopRequest(escalate=not self.workers.distributed) as stop:
                while self.solver.iter < param.max_iter and not self._stopping(stop):
                    if self._test_due():
                        self._test_and_log(stop)
                        if self._stopping(stop):
                            break
                    self._step(stop)
                self.interrupted = self._stopping(stop)
                self._finish(stop)
        finally:
            self._close()
        distributed.barrier()  # rank 0's snapshot is on disk before any worker moves on (to stage 2)
        return self.last_snapshot

    def _stopping(self, stop: StopRequest) -> bool:
        """Whether to stop now: Ctrl-C here, or, in a data-parallel run, seen by any worker at the last
        allreduce (they must all stop at the same iteration, or the others wait for ever)."""
        return self.stop_agreed if self.workers.distributed else stop.requested

    def _open_streams(self) -> None:
        """Batch streams positioned where an uninterrupted run would be at start_iter."""
        param = self.param
        threads = LOADER_THREADS[self.device.type]
        convert = pinned(self.torch, self.device) if self.device.type == "cuda" else None
        first = self.start_iter * int(param.iter_size)
        self.train_feed = Feed(self.torch, self.train_data,
                               [layer.batches(first, threads=threads, convert=convert) for layer in self.train_data],
                               self.device, self.memory_format)
        self.test_feed = None
        if self.test_data is not None:
            tests_before = sum(1 for i in range(0, self.start_iter, int(param.test_interval))
                               if i > 0 or param.test_initialization)
            first = tests_before * int(param.test_iter[0])
            self.test_feed = Feed(self.torch, self.test_data,
                                  [layer.batches(first, threads=threads, convert=convert) for layer in self.test_data],
                                  self.device, self.memory_format)

    def _test_due(self) -> bool:
        iteration = self.solver.iter
        return (self.has_test and iteration % self.param.test_interval == 0
                and (iteration > 0 or self.param.test_initialization))

    def _snapshot_due(self) -> bool:
        return bool(self.param.snapshot) and self.solver.iter % self.param.snapshot == 0

    def _seconds(self) -> float:
        return self.log.seconds_before + time.time() - self.started

    def _say(self, text: str) -> None:
        if self.workers.main:
            (self.bar.write if self.bar is not None else print)(text)

    def _test_and_log(self, stop: StopRequest) -> None:
        """Rank 0 tests while the others wait; then all agree whether to stop (which is also the wait)."""
        if self.workers.main:
            results = self.test(self.test_feed)
            weights = self.test_net.loss_weights
            test_loss = sum(value * weights.get(name, 0.0) for name, value in results.items())
            accuracy = next((value for name, value in results.items() if name not in weights), "")
            self.log.update(self.solver.iter, test_loss=float(test_loss), test_accuracy=accuracy,
                            seconds=self._seconds())
            self._say(f"Iteration {self.solver.iter}, test: " +
                      ", ".join(f"{k} = {v:.4f}" for k, v in results.items()))
        _, self.stop_agreed = distributed.mean_and_any(0.0, stop.requested, self.device)

    def _synchronised(self, last: bool):
        """DDP averages the gradients in the backward pass of the last of iter_size passes only; the others
        accumulate locally (Caffe too reduces once per iteration)."""
        if last or not self.workers.distributed:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _forward_backward(self, last: bool) -> float:
        with self._synchronised(last):
            with self._autocast():
                blobs = self.model(self.train_feed.take())
                loss = self.train_net.loss(blobs)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.train_feed.prepare()  # the next batch travels to the device while this one computes
        return float(loss.detach())

    def _update(self) -> float:
        """Caffe's update; returns the rate. In fp16 through the GradScaler, which skips it (and halves its
        scale) when the scaled gradients overflowed."""
        if self.scaler is None:
            return self.solver.apply_update()
        self.scaled.rate = None
        self.scaler.step(self.scaled)
        self.scaler.update()
        if self.scaled.rate is not None:
            return self.scaled.rate
        for p in self.solver.params:
            p.grad = None
        return self.solver.rate()

    def _step(self, stop: StopRequest) -> None:
        """One iteration: iter_size forward/backward passes, the update, the log; then the snapshot."""
        torch, param, iteration = self.torch, self.param, self.solver.iter
        # Per-iteration seeds make dropout a function of (seed, iteration), so resuming reproduces an
        # uninterrupted run; each worker draws its own masks (Caffe seeds solver r with random_seed + r).
        torch.manual_seed((self.seed + self.workers.rank) * 1_000_003 + iteration)
        loss_sum = sum(self._forward_backward(last=k == param.iter_size - 1) for k in range(param.iter_size))
        # The loss of the whole N x batch_size batch, so every worker logs (and stops on) the same number.
        loss_value, self.stop_agreed = distributed.mean_and_any(loss_sum / param.iter_size, stop.requested,
                                                                self.device)
        if not np.isfinite(loss_value):
            raise KitError(f"training diverged at iteration {iteration} (loss {loss_value}); "
                           "lower base_lr in the solver")
        smoothed = self.smoothed.add(loss_value)
        rate = self._update()
        self.log.update(iteration, loss=loss_value, smoothed_loss=smoothed, lr=rate, seconds=self._seconds())
        displayed = bool(param.display) and iteration % param.display == 0
        if displayed:
            self._say(f"Iteration {iteration}, loss = {smoothed:.6g}, lr = {rate:.6g}")
        self.solver.iter += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{rate:.3g}")
        estimate = self.estimate.iteration_done(time.monotonic())
        if estimate:
            self._say(estimate)
        if self._snapshot_due():
            self.snapshot()
            self._write_log(plot=True)
        elif displayed:
            self._write_log(plot=False)

    def _finish(self, stop: StopRequest) -> None:
        """Caffe's end of Solve: the last snapshot and test, or the snapshot of an interrupted run."""
        if self.interrupted:
            self._say(f"interrupted: snapshotting iteration {self.solver.iter}")
            if self.snapshot_iter != self.solver.iter:
                self.snapshot()
            return
        if self.param.snapshot_after_train and not self._snapshot_due():
            self.snapshot()
        if self._test_due() and self.solver.iter > self.start_iter:
            self._test_and_log(stop)

    def _write_log(self, plot: bool) -> None:
        if not self.workers.main:
            return
        self.log.write()
        if plot:
            plot_curves(self.log, self.out_dir / "learning_curve.png", self.title)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for feed in (self.train_feed, self.test_feed):
            if feed is not None:
                feed.close()
        if self.log.rows:
            self._write_log(plot=True)
