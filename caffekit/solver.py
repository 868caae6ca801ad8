"""Caffe's SGD and Nesterov solvers: learning-rate policies, the momentum update, and SolverState files.

Follows Caffe's sgd_solver.cpp step by step, per learnable blob i:
    rate       = GetLearningRate(iter)            (policy below)
    clip       : if ||grad||_2 over all blobs > clip_gradients, scale every grad down
    normalize  : grad /= iter_size
    regularize : grad += weight_decay * decay_mult_i * w      (L2; L1 uses sign(w))
    history_i  = momentum * history_i + rate * lr_mult_i * grad
    w         -= history_i                        (SGD)
    w         -= (1 + momentum) * history_i - momentum * previous history_i   (type: "Nesterov")
The weight decay is therefore applied to the gradient before the learning rate (not
decoupled), and biases with decay_mult 0 are not decayed.
"""
import math
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch

from caffekit import atomic, formats
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2

LR_POLICIES = ("fixed", "step", "multistep", "inv", "poly", "exp", "sigmoid")
SOLVER_TYPES = ("SGD", "NESTEROV")


def solver_type(param: caffe_pb2.SolverParameter) -> str:
    """SGD or NESTEROV, from `type` or the deprecated `solver_type` enum."""
    if not param.HasField("type") and param.HasField("solver_type"):
        return caffe_pb2.SolverParameter.SolverType.Name(param.solver_type)
    return param.type.upper()


def check_solver(param: caffe_pb2.SolverParameter, source: str) -> None:
    """Reject what the torch backend does not implement, with a one-line error naming ``source``."""
    kind = solver_type(param)
    if kind not in SOLVER_TYPES:
        raise KitError(f"{source}: solver type {kind!r} is not supported by the torch backend (only "
                       f"{' and '.join(SOLVER_TYPES)}; use --backend caffe for the others)")
    if not (param.net or param.train_net or param.HasField("net_param") or param.HasField("train_net_param")):
        raise KitError(f"{source}: the solver names no network (set `net: \"path/train_val.prototxt\"`)")
    if param.test_net or param.test_net_param:
        raise KitError(f"{source}: separate test_net files are not supported (use one `net` with phases)")
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        raise KitError(f"{source}: unknown lr_policy {policy!r} (expected one of {', '.join(LR_POLICIES)})")
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise KitError(f"{source}: lr_policy {policy!r} needs stepsize > 0")
    if policy == "poly" and param.max_iter <= 0:
        raise KitError(f"{source}: lr_policy 'poly' needs max_iter > 0")
    if param.regularization_type not in ("L1", "L2"):
        raise KitError(f"{source}: unknown regularization_type {param.regularization_type!r}")
    if param.iter_size < 1:
        raise KitError(f"{source}: iter_size must be >= 1")
    if param.average_loss < 1:
        raise KitError(f"{source}: average_loss must be >= 1")
    if param.snapshot and not param.snapshot_prefix:
        raise KitError(f"{source}: snapshot is set but snapshot_prefix is not")
    if param.test_iter and param.test_interval <= 0:
        raise KitError(f"{source}: test_iter is set but test_interval is not > 0")


def learning_rate(param: caffe_pb2.SolverParameter, iteration: int, current_step: int) -> Tuple[float, int]:
    """(rate, current_step) at ``iteration``: Caffe's SGDSolver::GetLearningRate.

    ``current_step`` is state for 'multistep' (and is recomputed for 'step'), as in Caffe,
    where it is saved in the SolverState. Arithmetic in float32, as Caffe's Dtype.
    """
    f = np.float32
    base, gamma, power = f(param.base_lr), f(param.gamma), f(param.power)
    policy = param.lr_policy
    if policy == "fixed":
        rate = base
    elif policy == "step":
        current_step = iteration // param.stepsize
        rate = base * f(math.pow(gamma, current_step))
    elif policy == "exp":
        rate = base * f(math.pow(gamma, iteration))
    elif policy == "inv":
        rate = base * f(math.pow(f(1) + gamma * f(iteration), -power))
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and iteration >= param.stepvalue[current_step]:
            current_step += 1
        rate = base * f(math.pow(gamma, current_step))
    elif policy == "poly":
        rate = base * f(math.pow(f(1) - f(iteration) / f(param.max_iter), power))
    elif policy == "sigmoid":
        rate = base * (f(1) / (f(1) + f(math.exp(-gamma * (f(iteration) - f(param.stepsize))))))
    else:
        raise KitError(f"unknown lr_policy {policy!r}")
    return float(rate), current_step


class SgdSolver:
    """The parameter update of Caffe's SGDSolver over a list of torch parameters."""

    def __init__(self, param: caffe_pb2.SolverParameter, params: Sequence[torch.nn.Parameter],
                 lr_mults: Sequence[float], decay_mults: Sequence[float]):
        self.param = param
        self.params = list(params)
        self.lr_mults = [float(m) for m in lr_mults]
        self.decay_mults = [float(m) for m in decay_mults]
        self.history = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.nesterov = solver_type(param) == "NESTEROV"
        self.iter = 0
        self.current_step = 0

    def rate(self) -> float:
        rate, _ = learning_rate(self.param, self.iter, self.current_step)
        return rate

    @torch.no_grad()
    def apply_update(self) -> float:
        """Caffe's ApplyUpdate for the gradients in ``p.grad``; returns the rate used. Does not
        advance ``iter`` (the training loop does, as Caffe's Step)."""
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        grads = [g.float() for g in grads]
        clip = self.param.clip_gradients
        if clip >= 0:
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
            if norm > clip:
                for g in grads:
                    g.mul_(clip / norm)
        momentum = float(self.param.momentum)
        weight_decay = float(self.param.weight_decay)
        l2 = self.param.regularization_type == "L2"
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if self.param.iter_size != 1:
                g.mul_(1.0 / self.param.iter_size)
            local_decay = weight_decay * self.decay_mults[i]
            if local_decay:
                g.add_(p.detach().float() if l2 else torch.sign(p.detach().float()), alpha=local_decay)
            local_rate = rate * self.lr_mults[i]
            if self.nesterov:  # Caffe's NesterovSolver: step back along the old history, then over the new
                previous = self.history[i].clone()
                self.history[i].mul_(momentum).add_(g, alpha=local_rate)
                step = self.history[i].mul(1.0 + momentum).sub_(previous, alpha=momentum)
            else:
                self.history[i].mul_(momentum).add_(g, alpha=local_rate)
                step = self.history[i]
            p.sub_(step.to(p.dtype))
            p.grad = None
        return rate

    # -- SolverState
    def state(self, learned_net: str) -> caffe_pb2.SolverState:
        state = caffe_pb2.SolverState(iter=self.iter, learned_net=str(learned_net), current_step=self.current_step)
        for h in self.history:
            state.history.append(formats.array_to_blob(h.cpu().numpy()))
        return state

    def restore(self, state: caffe_pb2.SolverState, source: str) -> None:
        if len(state.history) != len(self.history):
            raise KitError(f"{source}: holds {len(state.history)} history blobs, the network has "
                           f"{len(self.history)} learnable blobs (a solverstate of another network?)")
        for i, blob in enumerate(state.history):
            array = formats.blob_to_array(blob)
            if array.size != self.history[i].numel():
                raise KitError(f"{source}: history blob {i} has {array.size} values, expected "
                               f"{self.history[i].numel()}")
            self.history[i].copy_(torch.from_numpy(array.reshape(tuple(self.history[i].shape))))
        self.iter = int(state.iter)
        self.current_step = int(state.current_step)


def write_solverstate(path, state: caffe_pb2.SolverState) -> None:
    atomic.write_bytes(path, state.SerializeToString())


def read_solverstate(path) -> caffe_pb2.SolverState:
    path = Path(path)
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(path.read_bytes())
    except FileNotFoundError:
        raise KitError(f"{path}: solverstate not found") from None
    except Exception:  # protobuf's DecodeError
        raise KitError(f"{path}: not a valid solverstate (truncated or not a Caffe SolverState)") from None
    if not state.HasField("iter"):
        raise KitError(f"{path}: not a valid solverstate (no iteration)")
    try:
        for blob in state.history:
            formats.blob_to_array(blob)
    except ValueError as exc:
        raise KitError(f"{path}: not a valid solverstate ({exc})") from None
    return state
