"""The embedded torch trainer follows Caffe's solver step for step.

From the same initial caffemodel and the same batches, `caffe train` and
`scripts/train.py --backend torch` run 20 iterations of each net under two lr policies
(step, poly and inv; all change the rate inside the 20 iterations), and GenderNet once under
Caffe's Nesterov solver, with momentum, weight
decay and the prototxts' lr_mult 2 / decay_mult 0 on biases. Compared: the loss and the
learning rate of every iteration, the test-phase outputs (centre crop of 256 images and of
the mean image) at iterations 0 and 20, and the weights after 20 iterations.

Made deterministic on both sides: dropout_ratio 0, no mirror, and train images stored at
227x227 with crop_size 0 (Caffe draws TRAIN crops from its own RNG, which torch cannot
replay). Everything else is the shipped train_val.prototxt.
"""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from caffekit import formats, graph, solver as solver_lib, training
from caffekit.backends.torch import TorchBackend
from caffekit.proto import caffe_pb2

import oracle  # tests/oracle.py: runs the real Caffe

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

BATCH = 8
ITERS = 20
TRAIN_IMAGES = 40   # 5 batches: the readers wrap around 4 times in 20 iterations
TEST_IMAGES = 8
BASE_LR = 0.001
# Large enough that decay visibly moves the weights inside 20 iterations (Caffe's usual
# 5e-4 changes them by ~1e-8 per step, far below float noise), so a trainer that decayed
# the biases, or decoupled decay from momentum, would fail the weight comparison.
WEIGHT_DECAY = 0.5
POLICIES = {
    "step": dict(lr_policy="step", gamma=0.5, stepsize=5),   # Levi & Hassner's: rate halves at 5, 10, 15
    "poly": dict(lr_policy="poly", power=1.0),               # the shipped default: linear to 0 at max_iter
    "inv": dict(lr_policy="inv", gamma=0.1, power=0.75),     # Caffe's LeNet example: falls every iteration
    "poly-nesterov": dict(lr_policy="poly", power=1.0, type="Nesterov"),  # Caffe's NesterovSolver
}
# Each net under two policies; poly, the default solver's, under both; Nesterov's update once.
CASES = [("age_net", "step"), ("age_net", "poly"), ("gender_net", "inv"), ("gender_net", "poly"),
         ("gender_net", "poly-nesterov")]
LOSS_RTOL = 1e-3        # the bar
# Weights after 20 iterations, per blob: |torch - Caffe| / |Caffe - initial| (L2 norms).
# The dynamics amplify float noise: sums in another order (OpenBLAS im2col+GEMM vs oneDNN)
# differ by ~1e-7, ReLU signs and max-pool argmaxes of near-ties then flip, and momentum
# carries it on. Measured (AgeNet, inv): torch vs Caffe <= 2.9e-2 (biases, whose change is
# small), and torch vs torch itself from initial weights perturbed by 1e-7 relative <= 3.8e-2:
# the same noise floor. Deliberate semantic errors in the trainer give >= 0.19 (momentum in
# torch's form 0.19-0.40, bias lr_mult 1 0.50, decoupled weight decay 0.85, decayed biases
# 1e4) while some of them move the loss by less than the 1e-3 bar (bias lr_mult 1: 2e-4);
# test_weight_check_fails_a_deliberately_wrong_trainer checks that each of them, and no
# momentum or no weight decay at all, stays above the bar (GenderNet, inv: 0.27 to 2e4).
WEIGHT_RTOL = 0.1
NETS = {"age_net": "age", "gender_net": "gender"}


@pytest.fixture(scope="module")
def fidelity_data(tmp_path_factory, utkface_dir):
    """Train LMDBs of 227x227 faces, test LMDBs of 256x256 faces, and a mean image for each size."""
    folder = tmp_path_factory.mktemp("fidelity_data")
    files = oracle.face_files(utkface_dir, TRAIN_IMAGES + TEST_IMAGES, seed=41)
    for task in ("age", "gender"):
        train, train_labels = oracle.load_faces(files[:TRAIN_IMAGES], 227, task)
        test, test_labels = oracle.load_faces(files[TRAIN_IMAGES:], 256, task)
        oracle.write_lmdb(folder / "lmdb" / f"{task}_train_lmdb", train, train_labels)
        oracle.write_lmdb(folder / "lmdb" / f"{task}_test_lmdb", test, test_labels)
    train256, _ = oracle.load_faces(files[:TRAIN_IMAGES], 256)
    formats.write_mean(folder / "mean227.binaryproto", train.astype(np.float64).mean(0).astype(np.float32))
    formats.write_mean(folder / "mean256.binaryproto", train256.astype(np.float64).mean(0).astype(np.float32))
    return folder


def write_run_files(folder, data, net_name, policy):
    """train_val and solver prototxts, and the initial caffemodel, for one comparison."""
    task = NETS[net_name]
    net = oracle.rewrite_train_val(oracle.REPO / "caffe_models" / net_name / "train_val.prototxt",
                                   folder / "train_val.prototxt", data / "lmdb" / f"{task}_train_lmdb",
                                   data / "lmdb" / f"{task}_test_lmdb", data / "mean256.binaryproto",
                                   batch_size=BATCH, mirror=False, dropout_ratio=0.0)
    train = oracle.data_layer(net, caffe_pb2.TRAIN).transform_param
    train.crop_size = 0
    train.mean_file = str(data / "mean227.binaryproto")
    assert oracle.data_layer(net, caffe_pb2.TEST).transform_param.crop_size == 227  # centre crop, shipped
    formats.write_prototxt(folder / "train_val.prototxt", net)
    oracle.write_solver(folder / "solver.prototxt", folder / "train_val.prototxt", base_lr=BASE_LR,
                        momentum=0.9, weight_decay=WEIGHT_DECAY, max_iter=ITERS, display=1, average_loss=1,
                        test_iter=[1], test_interval=ITERS, random_seed=1, snapshot_prefix=str(folder / net_name),
                        **POLICIES[policy])
    layers = graph.net_layers(net, graph.TRAIN)
    weights = oracle.filler_weights(net, (BATCH, 3, 227, 227), seed=len(net_name) + len(policy))
    formats.write_caffemodel(folder / "init.caffemodel", graph.weights_to_model(net.name, layers, weights))
    # The prototxts keep bias lr_mult 2 / decay_mult 0: the semantics under test.
    specs = {(p.lr_mult, p.decay_mult) for layer in layers for p in layer.param}
    assert specs == {(1, 1), (2, 0)}, specs
    return weights


def run_torch_trainer(folder, data, net_name, max_iter=None):
    """scripts/train.py --backend torch from init.caffemodel; its train_log.csv rows by iteration."""
    command = [sys.executable, str(oracle.REPO / "scripts" / "train.py"), "--net", NETS[net_name],
               "--backend", "torch", "--solver", str(folder / "solver.prototxt"), "--data-dir", str(data),
               "--models-dir", str(folder / "torch"), "--weights", str(folder / "init.caffemodel"),
               "--precision", "fp32", "--no-progress"] + (["--max-iter", str(max_iter)] if max_iter else [])
    proc = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    with oracle.shown_on_failure("train.py output", proc.stdout[-3000:] + proc.stderr[-5000:]):
        assert proc.returncode == 0, f"train.py exited {proc.returncode}"
    with open(folder / "torch" / net_name / "train_log.csv", newline="") as f:
        return {int(row["iter"]): row for row in csv.DictReader(f)}


def relative_weight_diffs(init, caffe, torch):
    """{layer/blob: |torch - caffe| / |caffe - init|} (L2 norms)."""
    diffs = {}
    for layer, arrays in caffe.items():
        for i, theirs in enumerate(arrays):
            ours = torch[layer][i].reshape(theirs.shape)
            start = init[layer][i].reshape(theirs.shape)
            change = np.linalg.norm(theirs.astype(np.float64) - start)
            assert change > 0, f"{layer}/{i} did not move in Caffe"
            diffs[f"{layer}/{i}"] = float(np.linalg.norm(ours.astype(np.float64) - theirs) / change)
    return diffs


@pytest.fixture(scope="module")
def caffe_runs(caffe_oracle, fidelity_data, tmp_path_factory):
    """``run(net_name, policy)``: (folder, Caffe's log, initial weights) of `caffe train` on one case, run once."""
    runs = {}

    def run(net_name, policy):
        if (net_name, policy) not in runs:
            folder = tmp_path_factory.mktemp(f"{net_name}_{policy}")
            init = write_run_files(folder, fidelity_data, net_name, policy)
            log = oracle.caffe_train_from(caffe_oracle, folder / "solver.prototxt", folder, folder / "init.caffemodel")
            runs[net_name, policy] = folder, log, init
        return runs[net_name, policy]

    return run


def caffe_weights(folder, net_name):
    """The weights of <folder>/<net_name>_iter_20.caffemodel."""
    return graph.read_weights(formats.read_caffemodel(folder / f"{net_name}_iter_{ITERS}.caffemodel"))


@pytest.mark.parametrize("net_name, policy", CASES)
def test_torch_trainer_follows_caffe(caffe_runs, fidelity_data, net_name, policy):
    folder, log, init = caffe_runs(net_name, policy)
    rows = run_torch_trainer(folder, fidelity_data, net_name)

    with oracle.shown_on_failure("caffe train log", log):
        caffe_losses = {i: out["loss"] for i, out in oracle.parse_train_outputs(log).items() if "loss" in out}
        caffe_lrs = oracle.parse_lrs(log)
        assert sorted(caffe_losses) == list(range(ITERS)) and sorted(caffe_lrs) == list(range(ITERS))
        print("iter  caffe loss   torch loss   rel diff   caffe lr     torch lr")
        worst = 0.0
        for i in range(ITERS):
            ours = float(rows[i]["loss"])
            rel = abs(ours - caffe_losses[i]) / abs(caffe_losses[i])
            worst = max(worst, rel)
            print(f"{i:4d}  {caffe_losses[i]:.6f}  {ours:.6f}  {rel:.2e}  {caffe_lrs[i]:.6g}  {rows[i]['lr']}")
            assert float(rows[i]["lr"]) == pytest.approx(caffe_lrs[i], rel=1e-5), f"lr at iteration {i}"
        print(f"max loss rel diff over {ITERS} iterations: {worst:.2e}")
        assert len({round(v, 12) for v in caffe_lrs.values()}) > 2, "the lr should change inside the run"
        assert worst < LOSS_RTOL

        # Test phase (centre crop of image and mean) before and after training.
        caffe_tests = oracle.parse_test_outputs(log)
        for i in (0, ITERS):
            ours = float(rows[i]["test_loss"])
            print(f"test loss at {i}: caffe {caffe_tests[i]['loss']:.6f} torch {ours:.6f}")
            assert ours == pytest.approx(caffe_tests[i]["loss"], rel=LOSS_RTOL)
            assert float(rows[i]["test_accuracy"]) == pytest.approx(caffe_tests[i]["accuracy"], abs=1e-6)

        torch_weights = caffe_weights(folder / "torch" / net_name, net_name)
        diffs = relative_weight_diffs(init, caffe_weights(folder, net_name), torch_weights)
        print("weights after 20 iterations, |torch - caffe| / |caffe - init|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        assert max(diffs.values()) < WEIGHT_RTOL, diffs


def test_train_py_caffe_backend_matches_torch_backend(caffe_oracle, fidelity_data, tmp_path):
    """`scripts/train.py --backend caffe` runs real `caffe train` (found on PATH) and leaves the
    outputs the torch backend leaves; both backends give the same losses from the same weights."""
    iters = 3
    write_run_files(tmp_path, fidelity_data, "gender_net", "step")
    command = [sys.executable, str(oracle.REPO / "scripts" / "train.py"), "--net", "gender",
               "--solver", str(tmp_path / "solver.prototxt"), "--data-dir", str(fidelity_data),
               "--max-iter", str(iters), "--weights", str(tmp_path / "init.caffemodel"),
               "--backend", "caffe", "--models-dir", str(tmp_path / "caffe")]
    env = dict(os.environ, PATH=f"{caffe_oracle['bin']}{os.pathsep}{os.environ['PATH']}")
    caffe = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    with oracle.shown_on_failure("train.py --backend caffe output", caffe.stdout[-3000:] + caffe.stderr[-8000:]):
        assert caffe.returncode == 0, f"train.py --backend caffe exited {caffe.returncode}"
    out = tmp_path / "caffe" / "gender_net"
    log = (out / "caffe_train.log").read_text()
    assert "Optimization Done" in log
    model = formats.read_caffemodel(out / f"gender_net_iter_{iters}.caffemodel")
    assert graph.read_weights(model).keys() == {"conv1", "conv2", "conv3", "fc6", "fc7", "fc8"}
    with open(out / "train_log.csv", newline="") as f:
        caffe_rows = {int(row["iter"]): row for row in csv.DictReader(f)}
    caffe_losses = {i: out["loss"] for i, out in oracle.parse_train_outputs(log).items() if "loss" in out}
    torch_rows = run_torch_trainer(tmp_path, fidelity_data, "gender_net", max_iter=iters)
    # Equal losses from iteration 0 also show that Caffe started from --weights, not its fillers.
    for i in range(iters):
        assert float(caffe_rows[i]["smoothed_loss"]) == pytest.approx(caffe_losses[i], rel=1e-5)
        assert float(torch_rows[i]["loss"]) == pytest.approx(caffe_losses[i], rel=LOSS_RTOL)


# ---------------------------------------------------------------- the check catches wrong trainers
class TorchMomentum(solver_lib.SgdSolver):
    """torch.optim.SGD's momentum: history = momentum * history + grad; w -= rate * lr_mult * history
    (the same as Caffe's while the rate is constant, not when it changes)."""

    @torch.no_grad()
    def apply_update(self):
        rate, self.current_step = solver_lib.learning_rate(self.param, self.iter, self.current_step)
        for i, p in enumerate(self.params):
            grad = p.grad.float() + self.param.weight_decay * self.decay_mults[i] * p.float()
            self.history[i].mul_(self.param.momentum).add_(grad)
            p.sub_(rate * self.lr_mults[i] * self.history[i])
            p.grad = None
        return rate


class DecoupledDecay(solver_lib.SgdSolver):
    """Weight decay applied to the weights directly (as AdamW), outside the momentum history."""

    def __init__(self, param, params, lr_mults, decay_mults):
        self.decay = param.weight_decay
        super().__init__(without(param, weight_decay=0), params, lr_mults, decay_mults)

    @torch.no_grad()
    def apply_update(self):
        rate = self.rate()
        shrink = [rate * lr * self.decay * decay * p.detach().clone()
                  for p, lr, decay in zip(self.params, self.lr_mults, self.decay_mults)]
        super().apply_update()
        for p, step in zip(self.params, shrink):
            p.sub_(step)
        return rate


def without(param, **fields):
    changed = caffe_pb2.SolverParameter()
    changed.CopyFrom(param)
    for name, value in fields.items():
        setattr(changed, name, value)
    return changed


def variant(**changes):
    """The real solver with its solver fields or per-blob multipliers replaced."""
    class Variant(solver_lib.SgdSolver):
        def __init__(self, param, params, lr_mults, decay_mults):
            lr_mults = [changes.get("lr_mult", m) for m in lr_mults]
            decay_mults = [changes.get("decay_mult", m) for m in decay_mults]
            fields = {k: v for k, v in changes.items() if k in ("momentum", "weight_decay")}
            super().__init__(without(param, **fields), params, lr_mults, decay_mults)
    return Variant


WRONG_SOLVERS = {
    "momentum in torch's form": TorchMomentum,
    "decoupled weight decay": DecoupledDecay,
    "lr_mult ignored (bias lr_mult 1)": variant(lr_mult=1),
    "decay_mult ignored (biases decayed)": variant(decay_mult=1),
    "no momentum": variant(momentum=0),
    "no weight decay": variant(weight_decay=0),
}
WRONG_CASE = ("gender_net", "inv")  # the rate changes every iteration, which torch's momentum form gets wrong


@pytest.mark.parametrize("wrong", WRONG_SOLVERS)
def test_weight_check_fails_a_deliberately_wrong_trainer(caffe_runs, fidelity_data, tmp_path, monkeypatch, wrong):
    """The 0.1 bar on the weights after 20 iterations tells a wrong update rule apart (some keep the loss within
    its bar): each wrong rule, swapped into the torch trainer, fails it on a case where the real one passes
    (test_torch_trainer_follows_caffe, same files)."""
    net_name, policy = WRONG_CASE
    assert WRONG_CASE in CASES
    folder, _, init = caffe_runs(net_name, policy)
    monkeypatch.setattr(solver_lib, "SgdSolver", WRONG_SOLVERS[wrong])
    config = training.RunConfig(net=net_name, solver=str(folder / "solver.prototxt"), data_dir=str(fidelity_data),
                                models_dir=str(tmp_path), weights=str(folder / "init.caffemodel"), precision="fp32")
    TorchBackend(progress=False).train(config)
    diffs = relative_weight_diffs(init, caffe_weights(folder, net_name), caffe_weights(tmp_path / net_name, net_name))
    worst = max(diffs.values())
    print(f"{wrong}: max |torch - caffe| / |caffe - init| = {worst:.2g}")
    assert worst > WEIGHT_RTOL
