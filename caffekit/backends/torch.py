"""The torch backend: Caffe's Solver::Solve over torch modules, in this process.

Test every test_interval (including iteration 0 unless test_initialization is false), forward and
backward over iter_size batches, the SGD update of caffekit/solver.py, snapshots every ``snapshot``
iterations and after training. Ctrl-C snapshots the current iteration and stops; ``resume``
continues from a .solverstate with the same schedule and the same batches. The run starts with a
line naming the CPU, its features and the precision chosen (caffekit/hardware.py), and prints an
estimate of the whole schedule's wall time once its first iterations are timed (caffekit/estimate.py).
"""
import random
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from caffekit import formats, graph, hardware, solver as solver_lib
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
        save_run(config, param, net)
        last = trainer.run(later_iterations)
        if trainer.interrupted:
            raise KeyboardInterrupt
        if last is None:
            raise KitError(f"{config.solver}: the run wrote no snapshot (snapshot_after_train is false and no "
                           f"snapshot interval was reached)")
        print(f"trained {config.net} to iteration {trainer.solver.iter}; last snapshot: {last}")
        return last


class StopRequest:
    """SIGINT sets a flag that the loop checks between iterations (Caffe's SolverAction::STOP),
    so the weights are never snapshotted halfway through an update. A second Ctrl-C interrupts."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = True
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
        self.device = hardware.choose_device(config.device)
        self.precision, _ = hardware.choose_precision(config.precision, self.device, hardware.read_cpu())
        seed = param.random_seed if param.random_seed >= 0 else random.SystemRandom().randrange(2 ** 31)
        self.seed = int(seed)
        config.extra.update(seed_used=self.seed, precision_used=self.precision, device_used=str(self.device),
                            torch=torch.__version__, threads_used=torch.get_num_threads())
        data = data_layers(net, source)
        self.train_data = [lmdb_data.DataLayer(layer, train=True, seed=self.seed) for layer in data[graph.TRAIN]]
        self.test_data = None
        if graph.TEST in data and param.test_iter:
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
        self.train_net.to(self.device)
        if self.test_net is not None:
            self.test_net.share_params(self.train_net)  # after .to(): the test net uses the moved tensors
        info = self.train_net.param_info
        # Looked up at run time, so a test can swap in a deliberately wrong update rule.
        self.solver = solver_lib.SgdSolver(param, self.train_net.params(), [p.lr_mult for p in info],
                                           [p.decay_mult for p in info])
        self.last_snapshot: Optional[Path] = None
        self.snapshot_iter: Optional[int] = None
        self.interrupted = False

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
        and .solverstate, each written atomically."""
        iteration = self.solver.iter
        model_path = snapshot_name(self.param.snapshot_prefix, iteration)
        state_path = snapshot_name(self.param.snapshot_prefix, iteration, suffix=SOLVERSTATE)
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
        self.last_snapshot, self.snapshot_iter = model_path, iteration
        return model_path

    # -- one pass
    def _inputs(self, layers, batches) -> Dict[str, object]:
        """The next batch of every Data layer, as the net's input blobs on the device."""
        torch = self.torch
        inputs = {}
        for layer, stream in zip(layers, batches):
            data, labels = next(stream)
            x, y = torch.from_numpy(data), torch.from_numpy(labels)
            if self.device.type == "cuda":
                x, y = x.pin_memory().to(self.device, non_blocking=True), y.to(self.device)
            inputs[layer.tops[0]] = x
            if len(layer.tops) > 1:
                inputs[layer.tops[1]] = y
        return inputs

    def _autocast(self):
        torch = self.torch
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def test(self, batches) -> Dict[str, float]:
        """Caffe's TestClassification: every net output averaged over test_iter batches."""
        torch = self.torch
        totals: Dict[str, float] = {}
        iters = int(self.param.test_iter[0])
        with torch.no_grad(), self._autocast():
            for _ in range(iters):
                blobs = self.test_net(self._inputs(self.test_data, batches))
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
        self._open_streams()
        write_config(self.config)
        self.bar = None
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=int(param.max_iter), initial=self.start_iter, unit="it", desc=self.config.net,
                            dynamic_ncols=True)
        try:
            with StopRequest() as stop:
                while self.solver.iter < param.max_iter and not stop.requested:
                    if self._test_due():
                        self._test_and_log()
                        if stop.requested:
                            break
                    self._step()
                self.interrupted = stop.requested
                self._finish()
        finally:
            self._close()
        return self.last_snapshot

    def _open_streams(self) -> None:
        """Batch streams positioned where an uninterrupted run would be at start_iter."""
        param = self.param
        self.train_batches = [layer.batches(self.start_iter * int(param.iter_size)) for layer in self.train_data]
        self.test_batches = None
        if self.test_data is not None:
            tests_before = sum(1 for i in range(0, self.start_iter, int(param.test_interval))
                               if i > 0 or param.test_initialization)
            self.test_batches = [layer.batches(tests_before * int(param.test_iter[0])) for layer in self.test_data]

    def _test_due(self) -> bool:
        iteration = self.solver.iter
        return (self.test_batches is not None and iteration % self.param.test_interval == 0
                and (iteration > 0 or self.param.test_initialization))

    def _snapshot_due(self) -> bool:
        return bool(self.param.snapshot) and self.solver.iter % self.param.snapshot == 0

    def _seconds(self) -> float:
        return self.log.seconds_before + time.time() - self.started

    def _say(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def _test_and_log(self) -> None:
        results = self.test(self.test_batches)
        weights = self.test_net.loss_weights
        test_loss = sum(value * weights.get(name, 0.0) for name, value in results.items())
        accuracy = next((value for name, value in results.items() if name not in weights), "")
        self.log.update(self.solver.iter, test_loss=float(test_loss), test_accuracy=accuracy, seconds=self._seconds())
        self._say(f"Iteration {self.solver.iter}, test: " + ", ".join(f"{k} = {v:.4f}" for k, v in results.items()))

    def _step(self) -> None:
        """One iteration: iter_size forward/backward passes, the update, the log; then the snapshot."""
        torch, param, iteration = self.torch, self.param, self.solver.iter
        # Per-iteration seeds make dropout a function of (seed, iteration), so resuming reproduces an
        # uninterrupted run.
        torch.manual_seed(self.seed * 1_000_003 + iteration)
        loss_sum = 0.0
        for _ in range(param.iter_size):
            with self._autocast():
                blobs = self.train_net(self._inputs(self.train_data, self.train_batches))
                loss = self.train_net.loss(blobs)
            loss.backward()
            loss_sum += float(loss.detach())
        loss_value = loss_sum / param.iter_size
        if not np.isfinite(loss_value):
            raise KitError(f"training diverged at iteration {iteration} (loss {loss_value}); "
                           "lower base_lr in the solver")
        smoothed = self.smoothed.add(loss_value)
        rate = self.solver.apply_update()
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

    def _finish(self) -> None:
        """Caffe's end of Solve: the last snapshot and test, or the snapshot of an interrupted run."""
        if self.interrupted:
            self._say(f"interrupted: snapshotting iteration {self.solver.iter}")
            if self.snapshot_iter != self.solver.iter:
                self.snapshot()
            return
        if self.param.snapshot_after_train and not self._snapshot_due():
            self.snapshot()
        if self._test_due() and self.solver.iter > self.start_iter:
            self._test_and_log()

    def _write_log(self, plot: bool) -> None:
        self.log.write()
        if plot:
            plot_curves(self.log, self.out_dir / "learning_curve.png", self.title)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for stream in self.train_batches + (self.test_batches or []):
            stream.close()
        if self.log.rows:
            self._write_log(plot=True)
