"""The torch training backend: a short real run of our AgeNet prototxt, snapshots that OpenCV
loads and that match torch, resume, and Caffe's solver arithmetic."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caffekit import formats, graph, hardware, solver as solver_lib, stages, torchnet, training
from caffekit.backends.torch import TorchBackend
from caffekit.estimate import TIMED, WARMUP, ScheduleEstimate, format_duration
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2
from train_fixtures import REPO, make_dataset, small_net, small_solver

UTKFACE = REPO.parent / "shared" / "data" / "utkface"
TRAIN_PY = REPO / "scripts" / "train.py"
ITERS = 30


def read_log(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A few hundred real UTKFace faces at 256x256 (synthetic images when the copy is absent)."""
    faces = UTKFACE if UTKFACE.is_dir() else None
    return make_dataset(tmp_path_factory.mktemp("data"), faces, train=240, test=40, size=256)


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """30 iterations of our AgeNet train_val (batch 10) in fp32, snapshots at 15 and 30."""
    work = tmp_path_factory.mktemp("run")
    net = small_net(work / "train_val.prototxt", REPO / "caffe_models/age_net/train_val.prototxt", batch=10)
    solver = small_solver(work / "solver.prototxt", net=str(net), base_lr=0.002, max_iter=ITERS, snapshot=15,
                          test_iter=2, test_interval=15, display=5, random_seed=7)
    config = training.RunConfig(net="age_net", solver=str(solver), data_dir=str(dataset),
                                models_dir=str(work / "models"), precision="fp32")
    result = TorchBackend(progress=False).train(config)
    return {"work": work, "solver": solver, "out": work / "models" / "age_net", "result": result,
            "data": dataset}


@pytest.mark.slow
def test_short_run_learns_and_writes_caffe_outputs(run):
    out = run["out"]
    assert run["result"] == out / f"age_net_iter_{ITERS}.caffemodel"
    for name in ("age_net_iter_15.caffemodel", "age_net_iter_15.solverstate", "age_net_iter_30.caffemodel",
                 "age_net_iter_30.solverstate", "train_log.csv", "learning_curve.png", "config.json",
                 "solver.prototxt", "train_val.prototxt"):
        assert (out / name).is_file(), name
    rows = read_log(out / "train_log.csv")
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == ITERS and all(np.isfinite(losses))
    # The held-out loss (centre crops, no dropout: not noisy like the training loss of 10 random
    # crops) falls within 30 iterations.
    tests = {int(r["iter"]): float(r["test_loss"]) for r in rows if r["test_loss"]}
    assert sorted(tests) == [0, 15, 30]
    assert tests[30] < tests[0] - 0.05, tests
    # The copies actually used point into --data-dir and the models folder.
    resolved = (out / "train_val.prototxt").read_text()
    assert str(run["data"] / "lmdb" / "age_train_lmdb") in resolved
    solver = formats.read_solver(out / "solver.prototxt")
    assert solver.snapshot_prefix == str(out / "age_net")
    state = solver_lib.read_solverstate(out / "age_net_iter_30.solverstate")
    assert state.iter == ITERS and len(state.history) == 12  # 6 layers x (weights, bias)
    assert state.learned_net == str(out / "age_net_iter_30.caffemodel")


@pytest.mark.slow
def test_opencv_loads_snapshot_and_matches_torch(run):
    import cv2

    weights = run["out"] / "age_net_iter_30.caffemodel"
    deploy = REPO / "caffe_models/age_net/deploy.prototxt"
    net = formats.read_net(deploy)
    model = torchnet.CaffeNet(net, graph.TEST, {}, "deploy")
    model.load_weights(graph.read_weights(formats.read_caffemodel(weights)), str(weights), require_all=True)
    batch = np.random.default_rng(0).normal(0, 40, (4, 3, 227, 227)).astype(np.float32)
    with torch.no_grad():
        expected = model({"data": torch.from_numpy(batch)})["prob"].numpy()
    cv_net = cv2.dnn.readNetFromCaffe(str(deploy), str(weights))
    cv_net.setInput(batch)
    got = cv_net.forward().reshape(4, -1)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(expected - expected.mean(0)).max() > 1e-5  # the inputs do give different outputs


@pytest.mark.slow
def test_resume_continues_and_equals_uninterrupted_run(run, tmp_path):
    config = training.RunConfig(net="age_net", solver=str(run["solver"]), data_dir=str(run["data"]),
                                models_dir=str(tmp_path), precision="fp32",
                                resume=str(run["out"] / "age_net_iter_15.solverstate"))
    result = TorchBackend(progress=False).train(config)
    assert result == tmp_path / "age_net" / f"age_net_iter_{ITERS}.caffemodel"
    assert not (tmp_path / "age_net" / "age_net_iter_15.caffemodel").exists()  # started at 15
    resumed = graph.read_weights(formats.read_caffemodel(tmp_path / "age_net" / "age_net_iter_30.caffemodel"))
    straight = graph.read_weights(formats.read_caffemodel(run["out"] / "age_net_iter_30.caffemodel"))
    for name in straight:
        for a, b in zip(resumed[name], straight[name]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
    rows = read_log(tmp_path / "age_net" / "train_log.csv")
    assert int(rows[0]["iter"]) == 15


def test_v1_syntax_parses_to_the_same_layers(tmp_path):
    """Our train_val rewritten in the V1 syntax of the Levi & Hassner files (`layers`, enum types,
    blobs_lr/weight_decay) gives the same layer graph in both phases."""
    v2 = formats.read_net(REPO / "caffe_models/age_net/train_val.prototxt")
    v1 = caffe_pb2.NetParameter(name=v2.name)
    enum = caffe_pb2.V1LayerParameter.LayerType
    names = {"Accuracy": "ACCURACY", "Convolution": "CONVOLUTION", "Data": "DATA", "Dropout": "DROPOUT",
             "InnerProduct": "INNER_PRODUCT", "LRN": "LRN", "Pooling": "POOLING", "ReLU": "RELU",
             "Softmax": "SOFTMAX", "SoftmaxWithLoss": "SOFTMAX_LOSS"}
    for layer in v2.layer:
        old = v1.layers.add(name=layer.name, type=enum.Value(names[layer.type]))
        old.bottom.extend(layer.bottom)
        old.top.extend(layer.top)
        old.include.extend(layer.include)
        old.blobs_lr.extend(p.lr_mult for p in layer.param)
        old.weight_decay.extend(p.decay_mult for p in layer.param)
        for field in ("convolution_param", "pooling_param", "lrn_param", "inner_product_param", "dropout_param",
                      "data_param", "transform_param", "relu_param"):
            if layer.HasField(field):
                getattr(old, field).CopyFrom(getattr(layer, field))
    path = tmp_path / "train_val_v1.prototxt"
    formats.write_prototxt(path, v1)
    text = path.read_text()
    assert "layers {" in text and "type: CONVOLUTION" in text and "blobs_lr: 2" in text
    parsed = formats.read_net(path)
    for phase in (graph.TRAIN, graph.TEST):
        assert graph.net_layers(parsed, phase) == graph.net_layers(v2, phase)


# ---------------------------------------------------------------- Caffe's arithmetic
def test_lr_policies_follow_caffe_formulas():
    p = caffe_pb2.SolverParameter(base_lr=0.01, gamma=0.1, power=0.75, stepsize=100, max_iter=1000)
    rate = lambda policy, it, step=0: solver_lib.learning_rate(  # noqa: E731
        caffe_pb2.SolverParameter(**{**dict(base_lr=0.01, gamma=0.1, power=0.75, stepsize=100, max_iter=1000),
                                     "lr_policy": policy}), it, step)[0]
    assert rate("fixed", 500) == pytest.approx(0.01)
    assert rate("step", 250) == pytest.approx(0.01 * 0.1 ** 2)
    assert rate("exp", 3) == pytest.approx(0.01 * 0.1 ** 3)
    assert rate("inv", 10) == pytest.approx(0.01 * (1 + 0.1 * 10) ** -0.75)
    assert rate("poly", 250) == pytest.approx(0.01 * (1 - 0.25) ** 0.75)
    assert rate("sigmoid", 110) == pytest.approx(0.01 / (1 + np.exp(-0.1 * 10)))
    p.lr_policy = "multistep"
    p.stepvalue.extend([10, 20])
    step, rates = 0, []
    for it in range(25):
        r, step = solver_lib.learning_rate(p, it, step)
        rates.append(r)
    assert rates[9] == pytest.approx(0.01) and rates[10] == pytest.approx(0.001) and rates[24] == pytest.approx(1e-4)


def test_sgd_update_is_caffes():
    """history = momentum * history + lr * lr_mult * (grad + decay * decay_mult * w); w -= history."""
    param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", momentum=0.9, weight_decay=0.01)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    b = torch.nn.Parameter(torch.tensor([0.5]))
    sgd = solver_lib.SgdSolver(param, [w, b], lr_mults=[1, 2], decay_mults=[1, 0])
    w_np, b_np, hw, hb = np.array([1.0, -2.0]), np.array([0.5]), np.zeros(2), np.zeros(1)
    for step in range(3):
        gw, gb = np.array([0.3, -0.1]) * (step + 1), np.array([0.2])
        w.grad, b.grad = torch.tensor(gw, dtype=torch.float32), torch.tensor(gb, dtype=torch.float32)
        sgd.apply_update()
        hw = 0.9 * hw + 0.1 * 1 * (gw + 0.01 * w_np)
        hb = 0.9 * hb + 0.1 * 2 * gb
        w_np, b_np = w_np - hw, b_np - hb
    np.testing.assert_allclose(w.detach().numpy(), w_np, rtol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), b_np, rtol=1e-6)
    state = sgd.state("x.caffemodel")
    np.testing.assert_allclose(formats.blob_to_array(state.history[0]), hw, rtol=1e-6)


def test_fillers_follow_caffe_fan_in():
    g = torch.Generator().manual_seed(0)
    shape = (64, 32, 3, 3)  # fan_in = 32*9 = 288
    xavier = torchnet.fill(shape, caffe_pb2.FillerParameter(type="xavier"), g, "t")
    assert xavier.abs().max() <= np.sqrt(3 / 288) + 1e-6
    assert xavier.std().item() == pytest.approx(np.sqrt(3 / 288) / np.sqrt(3), rel=0.05)
    msra = torchnet.fill(shape, caffe_pb2.FillerParameter(type="msra"), g, "t")
    assert msra.std().item() == pytest.approx(np.sqrt(2 / 288), rel=0.05)
    constant = torchnet.fill((3,), caffe_pb2.FillerParameter(type="constant", value=1), g, "t")
    assert constant.tolist() == [1, 1, 1]
    with pytest.raises(KitError, match="bilinear"):
        torchnet.fill(shape, caffe_pb2.FillerParameter(type="bilinear"), g, "t")


def test_lrn_and_pooling_match_caffes_definitions():
    """LRN ACROSS_CHANNELS: x / (k + alpha/n * sum of squares in a centred window)^beta; pooling rounds up."""
    x = torch.randn(2, 7, 9, 9, generator=torch.Generator().manual_seed(1)) * 3
    p = caffe_pb2.LRNParameter(local_size=5, alpha=1e-2, beta=0.75, k=2)
    got = torchnet.caffe_lrn(x, p).numpy()
    a = x.numpy()
    padded = np.pad(a ** 2, ((0, 0), (2, 2), (0, 0), (0, 0)))
    scale = 2 + 1e-2 / 5 * sum(padded[:, i:i + 7] for i in range(5))
    np.testing.assert_allclose(got, a * scale ** -0.75, rtol=1e-5)
    net = formats.read_net(REPO / "caffe_models/age_net/deploy.prototxt")
    model = torchnet.CaffeNet(net, graph.TEST, {}, "deploy")
    with torch.no_grad():
        blobs = model({"data": torch.zeros(1, 3, 227, 227)})
    assert [blobs[b].shape[2] for b in ("pool1", "pool2", "pool5")] == [28, 14, 7]


# ---------------------------------------------------------------- bad input through the CLI
def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(TRAIN_PY), "--backend", "torch", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def digest(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*_iter_*"))}


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 64x64 dataset and a small net (fast) with an earlier run's snapshots."""
    work = tmp_path_factory.mktemp("tiny")
    data = make_dataset(work / "data", None, train=40, test=10, size=64)
    net = work / "tiny.prototxt"
    net.write_text(TINY_NET)
    solver = small_solver(work / "solver.prototxt", net=str(net), max_iter=6, snapshot=3, display=0)
    models = work / "models"
    proc = run_cli("--net", "age", "--data-dir", data, "--models-dir", models, "--solver", solver)
    assert proc.returncode == 0, proc.stderr
    return {"work": work, "data": data, "net": net, "solver": solver, "models": models,
            "out": models / "age_net"}


TINY_NET = """
name: "Tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true crop_size: 56 mean_file: "data/mean.binaryproto" }
  data_param { source: "data/lmdb/age_train_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 5 stride: 4 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 9 weight_filler { type: "msra" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_cli_unknown_layer_type(tiny, tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(TINY_NET.replace('type: "ReLU"', 'type: "Swish"'))
    solver = small_solver(tmp_path / "solver.prototxt", net=str(net))
    proc = run_cli("--net", "age", "--data-dir", tiny["data"], "--models-dir", tmp_path / "m", "--solver", solver)
    assert_one_line_error(proc, net, "relu1", "Swish")


def test_cli_missing_lmdb(tiny, tmp_path):
    proc = run_cli("--net", "age", "--data-dir", tmp_path / "nothing", "--models-dir", tmp_path / "m",
                   "--solver", tiny["solver"])
    assert_one_line_error(proc, tmp_path / "nothing" / "lmdb" / "age_train_lmdb", "not found")


def test_cli_mean_file_of_wrong_shape(tiny, tmp_path):
    data = tmp_path / "data"
    (data / "lmdb").mkdir(parents=True)
    for name in ("age_train_lmdb", "age_test_lmdb"):
        (data / "lmdb" / name).symlink_to(tiny["data"] / "lmdb" / name)
    formats.write_mean(data / "mean.binaryproto", np.zeros((3, 32, 32), np.float32))
    proc = run_cli("--net", "age", "--data-dir", data, "--models-dir", tmp_path / "m", "--solver", tiny["solver"])
    assert_one_line_error(proc, data / "mean.binaryproto", "(3, 32, 32)", "(3, 64, 64)")


def test_cli_solver_without_net(tiny, tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text('base_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 5\n')
    proc = run_cli("--net", "age", "--data-dir", tiny["data"], "--models-dir", tmp_path / "m", "--solver", solver)
    assert_one_line_error(proc, solver, "no network")


@pytest.mark.parametrize("flag", ["--weights", "--resume"])
def test_cli_truncated_caffemodel_leaves_snapshots_alone(tiny, flag):
    before = digest(tiny["out"])
    assert "age_net_iter_6.caffemodel" in before
    broken = tiny["work"] / f"broken{flag.strip('-')}_iter_3.caffemodel"
    good = tiny["out"] / "age_net_iter_3.caffemodel"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    if flag == "--resume":  # the solverstate is fine, the weights it names are not
        state = solver_lib.read_solverstate(tiny["out"] / "age_net_iter_3.solverstate")
        state.learned_net = str(broken)
        target = tiny["work"] / "broken_iter_3.solverstate"
        solver_lib.write_solverstate(target, state)
    else:
        target = broken
    proc = run_cli("--net", "age", "--data-dir", tiny["data"], "--models-dir", tiny["models"],
                   "--solver", tiny["solver"], flag, target)
    assert_one_line_error(proc, broken, "truncated")
    assert digest(tiny["out"]) == before


def test_cli_truncated_solverstate(tiny):
    good = tiny["out"] / "age_net_iter_3.solverstate"
    broken = tiny["work"] / "cut_iter_3.solverstate"
    broken.write_bytes(good.read_bytes()[:-9])
    before = digest(tiny["out"])
    proc = run_cli("--net", "age", "--data-dir", tiny["data"], "--models-dir", tiny["models"],
                   "--solver", tiny["solver"], "--resume", broken)
    assert_one_line_error(proc, broken)
    assert digest(tiny["out"]) == before


@pytest.mark.slow
def test_pretrain_then_finetune_the_default_two_stages(dataset, tmp_path):
    """`make train-gender`'s default, with no option asking for it: stage 1 (solver_pretrain) on the
    pre-training set in DATA_DIR/pretrain, stage 2 (solver_finetune) from stage 1's final snapshot;
    a second run skips the finished stage 1."""
    data = tmp_path / "data"
    (data / "pretrain").mkdir(parents=True)
    for folder in (data, data / "pretrain"):  # both sets the same faces: the stages are what is tested
        for name in ("lmdb", "mean.binaryproto"):
            (folder / name).symlink_to(dataset / name)
    (data / "pretrain" / "manifest.json").write_text(json.dumps({"config": {"race": "all"}}))
    models = tmp_path / "models"
    args = ["--net", "gender", "--data-dir", data, "--models-dir", models, "--max-iter", "2"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    stage1, stage2 = models / "pretrain" / "gender_net", models / "gender_net"
    pretrained = stage1 / "gender_net_iter_2.caffemodel"
    assert pretrained.is_file() and (stage2 / "gender_net_iter_2.caffemodel").is_file()
    config1 = json.loads((stage1 / "config.json").read_text())
    config2 = json.loads((stage2 / "config.json").read_text())
    assert config1["solver"].endswith("gender_net/solver_pretrain.prototxt") and config1["weights"] is None
    assert config2["solver"].endswith("gender_net/solver_finetune.prototxt")
    assert Path(config2["weights"]) == pretrained and config2["extra"]["weights_copied"]
    solver2 = formats.read_solver(stage2 / "solver.prototxt")
    assert solver2.base_lr == pytest.approx(0.001)

    assert "no prior-corrected copy written" in first.stderr  # this DATA_DIR has no manifest.json

    before = digest(stage1)
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "stage 1 done earlier" in second.stderr and digest(stage1) == before


@pytest.mark.slow
def test_a_finished_stage_1_is_trained_again_for_another_seed_or_pretrain_solver(dataset, tmp_path):
    """Stage 1's snapshot is reused only by a run that would train the same weights: another --seed or another
    --pretrain-solver (here a base_lr of its own) trains stage 1 again, which the reuse check used to skip."""
    data = tmp_path / "data"
    (data / "pretrain").mkdir(parents=True)
    for folder in (data, data / "pretrain"):
        for name in ("lmdb", "mean.binaryproto"):
            (folder / name).symlink_to(dataset / name)
    (data / "pretrain" / "manifest.json").write_text(json.dumps({"config": {"race": "all"}}))
    models = tmp_path / "models"
    args = ["--net", "gender", "--data-dir", data, "--models-dir", models, "--max-iter", "2"]
    assert run_cli(*args).returncode == 0
    stage1 = models / "pretrain" / "gender_net"

    reseeded = run_cli(*args, "--seed", "7")
    assert reseeded.returncode == 0, reseeded.stderr
    assert "stage 1 done earlier" not in reseeded.stderr
    assert formats.read_solver(stage1 / "solver.prototxt").random_seed == 7

    solver = formats.read_solver(training.REPO / "caffe_models" / "gender_net" / "solver_pretrain.prototxt")
    solver.base_lr = 0.0005
    own = tmp_path / "solver_pretrain_mine.prototxt"
    formats.write_prototxt(own, solver)
    mine = run_cli(*args, "--seed", "7", "--pretrain-solver", own)
    assert mine.returncode == 0, mine.stderr
    assert "stage 1 done earlier" not in mine.stderr and "solver_pretrain_mine.prototxt" in mine.stderr
    assert formats.read_solver(stage1 / "solver.prototxt").base_lr == pytest.approx(0.0005)
    again = run_cli(*args, "--seed", "7", "--pretrain-solver", own)
    assert again.returncode == 0 and "stage 1 done earlier" in again.stderr


def test_pretraining_is_the_default_where_make_dataset_built_its_set(tmp_path):
    data = tmp_path / "data"

    def choice(**options):
        return stages.pretraining_set(stages.Options(net="age", data_dir=str(data), **options))

    pretrain, why_not = choice()
    assert pretrain is None and f"no pre-training set in {data / 'pretrain'}" in why_not
    (data / "pretrain" / "lmdb").mkdir(parents=True)
    assert choice()[0] is None  # LMDBs without a manifest: a build that did not finish
    (data / "pretrain" / "manifest.json").write_text(json.dumps({"config": {"race": "all"}}))
    assert choice() == (data / "pretrain", "")
    assert choice(no_pretrain=True) == (None, "--no-pretrain")
    assert choice(weights="mine.caffemodel") == (None, "--weights gives the starting weights")
    assert choice(pretrain_data="elsewhere") == (Path("elsewhere"), "")
    (data / "manifest.json").write_text(json.dumps({"config": {"race": "all"}}))
    pretrain, why_not = choice()  # RACE=all: the pre-training set there is an older build's
    assert pretrain is None and "all races" in why_not


def test_final_snapshot_gets_a_prior_corrected_copy_that_is_the_newest(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("lmdb", "mean.binaryproto"):
        (data / name).symlink_to(tiny["data"] / name)
    counts = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    (data / "manifest.json").write_text(json.dumps({"classes": {"age": {"train": counts,
                                                                         "train_oversampled": [11] * 9}}}))
    models = tmp_path / "models"
    proc = run_cli("--net", "age", "--data-dir", data, "--models-dir", models, "--solver", tiny["solver"])
    assert proc.returncode == 0, proc.stderr
    corrected = models / "age_net" / "age_net_prior_iter_6.caffemodel"
    assert f"prior-corrected copy: {corrected}" in proc.stdout
    assert training.newest_snapshot(models / "age_net") == corrected
    shift = (graph.read_weights(formats.read_caffemodel(corrected))["fc"][1]
             - graph.read_weights(formats.read_caffemodel(models / "age_net" / "age_net_iter_6.caffemodel"))["fc"][1])
    np.testing.assert_allclose(shift, np.log(np.array(counts) / 11), atol=1e-6)

    again = run_cli("--net", "age", "--data-dir", data, "--models-dir", tmp_path / "m2", "--solver", tiny["solver"],
                    "--no-prior")
    assert again.returncode == 0 and not list((tmp_path / "m2" / "age_net").glob("*prior*"))


def test_cli_pretrain_data_missing_or_with_weights(tiny, tmp_path):
    proc = run_cli("--net", "age", "--pretrain-data", tmp_path / "none", "--data-dir", tiny["data"],
                   "--models-dir", tmp_path / "m")
    assert_one_line_error(proc, tmp_path / "none", "make dataset", "PRETRAIN=0")
    proc = run_cli("--net", "age", "--pretrain-data", tiny["data"], "--data-dir", tiny["data"],
                   "--models-dir", tmp_path / "m", "--weights", tiny["out"] / "age_net_iter_6.caffemodel")
    assert_one_line_error(proc, "--weights", "--pretrain-data")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_ctrl_c_snapshots_then_resume_continues(tiny, tmp_path):
    import signal
    import threading

    solver = small_solver(tmp_path / "solver.prototxt", net=str(tiny["net"]), max_iter=100000, snapshot=0,
                          display=1)
    models = tmp_path / "models"
    command = [sys.executable, str(TRAIN_PY), "--backend", "torch", "--no-progress", "--net", "age",
               "--data-dir", str(tiny["data"]), "--models-dir", str(models), "--solver", str(solver)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    watchdog = threading.Timer(600, proc.kill)  # a hang fails the test instead of the suite
    watchdog.start()
    seen = []
    for line in proc.stdout:  # Ctrl-C once iteration 5 is logged, however long that takes
        seen.append(line)
        if line.startswith("Iteration 5,"):
            break
    watchdog.cancel()
    assert seen and seen[-1].startswith("Iteration 5,"), "".join(seen)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + out
    snapshots = sorted((models / "age_net").glob("*_iter_*.solverstate"))
    assert len(snapshots) == 1, "".join(seen) + out
    stopped_at = solver_lib.read_solverstate(snapshots[0]).iter
    assert stopped_at >= 5
    proc = run_cli("--net", "age", "--data-dir", tiny["data"], "--models-dir", models, "--solver", solver,
                   "--resume", snapshots[0], "--max-iter", stopped_at + 3)
    assert proc.returncode == 0, proc.stderr
    assert (models / "age_net" / f"age_net_iter_{stopped_at + 3}.caffemodel").is_file()


def test_schedule_estimate_arithmetic():
    estimate = ScheduleEstimate(1000, later_iterations=200, later_name="stage 2", warmup=3, timed=4)
    # Three slow warm-up iterations (not timed), then four of 1 s each.
    lines = [estimate.iteration_done(now) for now in (0.0, 5.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0)]
    assert lines[:6] == [None] * 6 and lines[7] is None
    assert estimate.seconds_per_iteration == 1.0
    assert estimate.total_seconds() == 1200.0  # 1,000 + 200 iterations at 1 s
    assert estimate.remaining_seconds() == 1192.0  # 8 done now; the line was given after 7 (1,193 s left)
    assert lines[6] == ("estimate from 4 timed iterations (after 3 warm-up): 1 s/iteration; the whole schedule, "
                        "1,200 iterations (1,000 of this stage + 200 of stage 2), takes about 20 min 00 s "
                        "(19 min 53 s left)")
    assert [format_duration(s) for s in (44.6, 200, 7500)] == ["45 s", "3 min 20 s", "2 h 05 min"]


def test_precision_choice_says_why(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\n"
                       "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    cpu = hardware.read_cpu(cpuinfo)
    assert cpu.summary() == "Test CPU 9000 (AVX2, AVX-512, VNNI; no AVX512-BF16, AMX)"
    device = torch.device("cpu")
    assert hardware.choose_precision("auto", device, cpu) == \
        ("fp32", "fp32: no AVX512-BF16/AMX, bf16 would be emulated (auto)")
    assert hardware.choose_precision("fp32", device, cpu) == ("fp32", "fp32 (--precision)")
    assert hardware.choose_precision("bf16", device, cpu)[1] == \
        "bf16 autocast (--precision; no AVX512-BF16/AMX: emulated, slower than fp32)"


def test_the_run_line_says_when_the_vector_isa_is_capped(monkeypatch, tmp_path):
    """Timing a wide CPU as an AVX2-only one (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA) shows in the first line."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    cpu, device = hardware.read_cpu(cpuinfo), torch.device("cpu")
    for name in hardware.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert "limited" not in hardware.describe(cpu, device, 2, "fp32 (--precision)")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.describe(cpu, device, 2, "fp32 (--precision)") == \
        "cpu: Test CPU 9000 (AVX2, AVX-512, AVX512-BF16; no AMX, VNNI) limited by ONEDNN_MAX_CPU_ISA=AVX2; " \
        "2 threads; fp32 (--precision)"


FREED_BLOCK = """
import ctypes, sys
sys.path.insert(0, sys.argv[2])
from caffekit import hardware
if sys.argv[1] == "keep":
    assert hardware.keep_freed_tensors()
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
size = 20 << 20  # one activation of a training step
block = libc.malloc(size)
mapped = libc.mallinfo2().hblkhd >= size  # a mapping of its own, unmapped again when freed
libc.free(block)
print(mapped, libc.mallinfo2().fordblks >= size)  # kept as free heap memory for the next step
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: the trainer leaves other allocators alone")
def test_the_trainer_keeps_freed_tensors_for_reuse_instead_of_returning_them_to_the_kernel():
    """hardware.keep_freed_tensors (called by the trainer): by glibc's default a freed 20 MB block was a mapping of
    its own, given back to the kernel (the next step faults its pages in afresh: 92 M faults in a JointNet run);
    with it the block comes from the heap and stays there, free for reuse."""
    answers = {mode: subprocess.run([sys.executable, "-c", FREED_BLOCK, mode, str(REPO)], capture_output=True,
                                    text=True, check=True).stdout.split() for mode in ("default", "keep")}
    assert answers == {"default": ["True", "False"], "keep": ["False", "True"]}


def test_cli_says_what_it_runs_on_and_how_long_the_schedule_takes(tiny, tmp_path):
    iterations = WARMUP + TIMED + 2
    solver = small_solver(tmp_path / "solver.prototxt", net=str(tiny["net"]), max_iter=iterations, display=0)
    proc = run_cli("--net", "age", "--data-dir", tiny["data"], "--models-dir", tmp_path / "m", "--solver", solver,
                   "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"cpu: {hardware.read_cpu().summary()}; {torch.get_num_threads()} threads; fp32 (--precision)"
    estimate = [line for line in lines if line.startswith(f"estimate from {TIMED} timed iterations")]
    assert len(estimate) == 1 and f"the whole schedule, {iterations} iterations (this stage), takes about" in \
        estimate[0], proc.stdout


@pytest.mark.oracle
def test_caffe_backend_runs_real_caffe(tiny, tmp_path, caffe_oracle):
    import os

    env = dict(os.environ, PATH=f"{caffe_oracle['bin']}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--backend", "auto", "--net", "age",
                           "--data-dir", str(tiny["data"]), "--models-dir", str(tmp_path), "--solver",
                           str(tiny["solver"])], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "age_net"
    assert (out / "age_net_iter_6.caffemodel").is_file() and (out / "caffe_train.log").is_file()
    # Caffe's snapshot reads back through caffekit with the shapes of our net.
    weights = graph.read_weights(formats.read_caffemodel(out / "age_net_iter_6.caffemodel"))
    assert weights["fc"][0].shape == (9, 8 * 6 * 6)  # 56 -> conv 13 -> pool (rounding up) 6
    # --weights goes through an iteration-0 solverstate naming the caffemodel (what -weights does).
    start = tiny["out"] / "age_net_iter_3.caffemodel"
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--backend", "caffe", "--net", "age", "--data-dir",
                           str(tiny["data"]), "--models-dir", str(tmp_path / "ft"), "--solver", str(tiny["solver"]),
                           "--weights", str(start)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "ft" / "age_net" / "caffe_train.log").read_text()
    assert "init_from_weights.solverstate" in log and "age_net_iter_6.caffemodel" in log
