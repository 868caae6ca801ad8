"""The real `caffe train`, from a native build on PATH or inside the docker/caffe image.

Caffe trains from the resolved solver and net that prepare_run wrote; its glog output is copied to
the console and to caffe_train.log, then turned into train_log.csv and learning_curve.png, as the
torch backend leaves them. --weights goes through an iteration-0 solverstate (see weights_solverstate).
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from caffekit import atomic, formats, graph, training
from caffekit.backends import Backend
from caffekit.errors import KitError
from caffekit.lmdb_data import LmdbSource
from caffekit.proto import caffe_pb2
from caffekit.snapshots import snapshot_name
from caffekit.training import REPO, RunConfig

DOCKER_IMAGE = "caffekit-caffe:cpu"


class CaffeBackend(Backend):
    name = "caffe"

    def check(self) -> None:
        """Fail before anything is written when the engine is missing."""
        if shutil.which("caffe") is None:
            raise KitError("caffe: not found on PATH (build Caffe, use --backend docker, or --backend torch)")

    def command(self, config: RunConfig, start_state: Optional[Path]) -> List[str]:
        return caffe_command(config, shutil.which("caffe"), start_state)

    def train(self, config: RunConfig, later_iterations: int = 0) -> Path:
        self.check()
        if config.resume:
            training.find_resume_files(config.resume)  # one-line error before anything is written
        if config.weights:
            formats.read_caffemodel(config.weights)
        param, net_param = training.prepare_run(config)
        training.save_run(config, param, net_param)
        start_state = weights_solverstate(config, net_param) if config.weights else None
        code = run_caffe(config, self.command(config, start_state))
        if code != 0:
            raise KitError(f"caffe train failed with exit status {code} "
                           f"(log: {Path(config.out_dir) / 'caffe_train.log'})")
        print(f"trained {config.net}; snapshots in {config.out_dir}")
        return snapshot_name(config.snapshot_prefix, param.max_iter)


class DockerBackend(CaffeBackend):
    """`caffe train` inside the docker/caffe image: the repo, data and models folders are mounted at the
    same absolute paths, so the resolved prototxts work unchanged inside the container."""
    name = "docker"
    image = DOCKER_IMAGE

    def check(self) -> None:
        """The engine reachable, and the image built from docker/caffe unless it exists."""
        if not shutil.which("docker"):
            raise KitError("docker: not found on PATH (install Docker, or use --backend torch)")
        info = subprocess.run(["docker", "info"], capture_output=True, text=True)
        if info.returncode != 0:
            reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
            raise KitError(f"docker: the Docker engine is not reachable ({reason})")
        if subprocess.run(["docker", "image", "inspect", self.image], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0:
            print(f"building {self.image} from docker/caffe (once; a few minutes)", file=sys.stderr)
            if subprocess.run(["docker", "build", "-t", self.image, str(REPO / "docker" / "caffe")]).returncode != 0:
                raise KitError(f"{REPO / 'docker' / 'caffe' / 'Dockerfile'}: docker build failed "
                               f"(see the output above)")

    def command(self, config: RunConfig, start_state: Optional[Path]) -> List[str]:
        mounts: List[Path] = []
        for path in (REPO, Path(config.data_dir).resolve(), Path(config.models_dir).resolve()):
            if not any(path == mount or mount in path.parents for mount in mounts):
                mounts.append(path)
        command = ["docker", "run", "--rm", "--init", "-u", f"{os.getuid()}:{os.getgid()}", "-w", str(REPO)]
        for path in mounts:
            command += ["-v", f"{path}:{path}"]
        return command + [self.image] + caffe_command(config, "caffe", start_state)


def caffe_command(config: RunConfig, caffe: str, start_state: Optional[Path] = None) -> List[str]:
    """`caffe train` on the resolved solver, resuming from --resume or from ``start_state``."""
    command = [caffe, "train", "-solver", config.solver_resolved]
    if config.resume:
        _, state_path, _ = training.find_resume_files(config.resume)
        command += ["-snapshot", str(Path(state_path).resolve())]
    elif start_state:
        command += ["-snapshot", str(Path(start_state).resolve())]
    return command


def weights_solverstate(config: RunConfig, net: caffe_pb2.NetParameter) -> Path:
    """An iteration-0 SolverState (zero momentum) naming --weights as its learned_net.

    Resuming from it is what `caffe train -weights` does: Caffe's Restore copies the layers by
    name with the same CopyTrainedLayersFrom. Used instead of -weights because some Caffe builds
    (the SSD fork among them) silently ignore -weights in `caffe train`.
    """
    inputs = {}
    for data in training.data_layers(net, config.net_resolved)[graph.TRAIN]:
        source = LmdbSource(data.data_param.source)
        channels, height, width = source.shape
        source.close()
        crop = data.transform_param.crop_size
        batch = data.data_param.batch_size
        inputs[data.top[0]] = (batch, channels, crop or height, crop or width)
        if len(data.top) > 1:
            inputs[data.top[1]] = (batch,)
    layers = graph.net_layers(net, graph.TRAIN, config.net_resolved)
    shapes = graph.blob_shapes(layers, inputs)
    state = caffe_pb2.SolverState(iter=0, learned_net=str(Path(config.weights).resolve()), current_step=0)
    for layer in layers:
        if layer.bottom:
            for shape in graph.learnable_shapes(layer, shapes):
                state.history.append(formats.array_to_blob(np.zeros(shape, np.float32)))
    path = Path(config.out_dir) / "init_from_weights.solverstate"
    atomic.write_bytes(path, state.SerializeToString())
    return path


def run_caffe(config: RunConfig, command: List[str]) -> int:
    """Run Caffe from the repository root, copying its log to the console and to caffe_train.log,
    then turn the log into train_log.csv and learning_curve.png."""
    log_path = Path(config.out_dir) / "caffe_train.log"
    print("running: " + " ".join(shlex.quote(c) for c in command), file=sys.stderr)
    with log_path.open("w") as log:
        try:
            process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
        except FileNotFoundError:
            raise KitError(f"{command[0]}: not found") from None
        try:
            for line in process.stdout:
                sys.stderr.write(line)
                log.write(line)
            code = process.wait()
        except KeyboardInterrupt:
            # Caffe's own SIGINT handling snapshots and stops; wait for it.
            process.wait()
            caffe_log_to_csv(log_path, Path(config.out_dir))
            raise
    caffe_log_to_csv(log_path, Path(config.out_dir))
    return code


_ITER_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = ([-\d.e+naif]+)")
_ITER_LR = re.compile(r"Iteration (\d+), lr = ([-\d.e+]+)")
_ITER_TEST = re.compile(r"Iteration (\d+), Testing net")
_TEST_OUT = re.compile(r"Test net output #\d+: (\S+) = ([-\d.e+naif]+)")


def caffe_log_to_csv(log_path: Path, out_dir: Path) -> None:
    """train_log.csv from a Caffe log (glog lines), so both backends leave the same outputs."""
    log = training.TrainLog(out_dir / "train_log.csv", 0)
    test_iter = None
    for line in log_path.read_text(errors="replace").splitlines():
        if m := _ITER_TEST.search(line):
            test_iter = int(m.group(1))
        elif (m := _TEST_OUT.search(line)) and test_iter is not None:
            name, value = m.group(1), float(m.group(2))
            log.update(test_iter, **({"test_loss": value} if "loss" in name else {"test_accuracy": value}))
        elif m := _ITER_LOSS.search(line):
            log.update(int(m.group(1)), smoothed_loss=float(m.group(2)))
        elif m := _ITER_LR.search(line):
            log.update(int(m.group(1)), lr=float(m.group(2)))
    if log.rows:
        log.write()
        training.plot_curves(log, out_dir / "learning_curve.png", "caffe train")
