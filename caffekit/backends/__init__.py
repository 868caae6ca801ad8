"""Training backends behind one interface: ``backend.train(config) -> the final snapshot's caffemodel``.

torch (caffekit/backends/torch.py) follows Caffe's solver in this process; caffe and docker
(caffekit/backends/caffe.py) run the real `caffe train`, natively or inside the docker/caffe image,
and turn its log into the same train_log.csv. Every backend trains from the solver and net that
caffekit.training.prepare_run resolved, and leaves the same files in MODELS_DIR/<net>/.
"""
import shutil
from pathlib import Path
from typing import Optional

from caffekit.training import RunConfig

NAMES = ("auto", "torch", "caffe", "docker")


class Backend:
    name = ""

    def describe(self, config: RunConfig) -> Optional[str]:
        """One line on what the training runs on, printed once before the first stage (None: nothing to say)."""
        return None

    def train(self, config: RunConfig, later_iterations: int = 0) -> Path:
        """Train one stage; ``later_iterations`` are those of a stage that follows (for estimates)."""
        raise NotImplementedError


def choose(name: str, progress: bool = True) -> Backend:
    """``name`` from NAMES; auto: a native `caffe` on PATH, else torch."""
    if name == "auto":
        name = "caffe" if shutil.which("caffe") else "torch"
    if name == "torch":
        from caffekit.backends.torch import TorchBackend

        return TorchBackend(progress)
    from caffekit.backends.caffe import CaffeBackend, DockerBackend

    return {"caffe": CaffeBackend, "docker": DockerBackend}[name]()
