"""Which training runs make up the training of a net, on what data, from which weights; then its last step.

Two stages by default. Stage 1 trains from scratch on the pre-training set with --pretrain-solver
(default: solver_pretrain.prototxt) into MODELS_DIR/pretrain/<net>_net; stage 2 fine-tunes stage 1's
final snapshot on DATA_DIR with --solver (default: solver_finetune.prototxt). The pre-training set is
DATA_DIR/pretrain where `make dataset` built one (it does unless RACE=all: all races are then in
DATA_DIR already), or --pretrain-data DIR. One stage, on DATA_DIR with --solver (default:
solver.prototxt), when --no-pretrain (make PRETRAIN=0) or --weights (your starting weights) asks for
it, when DATA_DIR/pretrain holds no pre-training set, or when DATA_DIR was itself built from all races.

A finished stage 1 is not run again while its config.json records the sha256 of the same pre-training
manifest and its folder holds the same solver and net as this run would write: a set rebuilt with
another split (another SEED) held out other test faces, and another seed, schedule or net trains other
weights, so none of them may reuse the old snapshot (whose name a longer schedule's run may share).
--resume continues whichever stage its snapshot belongs to: one under
MODELS_DIR/pretrain resumes stage 1 (stage 2 follows), any other resumes the last stage.

Last, the final snapshot gets a prior-corrected copy (caffekit/prior.py) unless --no-prior; a net with
fixed layers gets at least the copy with them written in.
"""
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from caffekit import backends, distributed, formats, models, prior, training
from caffekit.errors import KitError
from caffekit.snapshots import snapshot_name

PRETRAIN_FOLDER = "pretrain"  # in DATA_DIR (make dataset) and in MODELS_DIR (stage 1's snapshots)


@dataclass
class Options:
    """What scripts/train.py takes; the field names are its options'."""
    net: str                        # registry key: age | gender | joint
    backend: str = "auto"
    data_dir: str = "data"
    models_dir: str = "models"
    solver: Optional[str] = None
    pretrain_solver: Optional[str] = None
    pretrain_data: Optional[str] = None
    no_pretrain: bool = False
    resume: Optional[str] = None
    weights: Optional[str] = None
    max_iter: Optional[int] = None
    seed: Optional[int] = None
    no_prior: bool = False
    precision: str = "auto"
    device: str = "auto"
    threads: Optional[int] = None
    no_progress: bool = False


def train(options: Options) -> Path:
    """Every stage, then the prior-corrected copy; returns the final snapshot."""
    entry = models.model(options.net)
    if options.pretrain_data and options.weights:
        raise KitError("--weights and --pretrain-data both give the starting weights: choose one")
    backend = backends.choose(options.backend, progress=not options.no_progress)
    run = StageRunner(options, entry.name, backend)
    pretrain, why_not = pretraining_set(options)
    line = backend.describe(run.config(run.solver("solver.prototxt"), options.data_dir, options.models_dir))
    if line:
        print(line)
    if pretrain is None:
        solver = run.solver("solver.prototxt")
        print(f"one stage: training on {options.data_dir} with {solver.name} ({why_not})")
        final = run.stage(solver, options.data_dir, options.models_dir, weights=options.weights,
                          resume=options.resume)
    else:
        final = run.two_stages(pretrain)
    if distributed.workers().main:  # under torchrun, the copies are rank 0's to write, as the snapshots
        finish(options, final)
    return final


def pretraining_set(options: Options) -> Tuple[Optional[Path], str]:
    """(the pre-training set, "") for two stages, or (None, why one stage)."""
    if options.no_pretrain:
        return None, "--no-pretrain"
    if options.weights:
        return None, "--weights gives the starting weights"
    if options.pretrain_data:
        return Path(options.pretrain_data), ""
    data = Path(options.data_dir)
    if dataset_race(data) == "all":
        return None, f"{data} holds all races: there is nothing to pre-train on"
    default = data / PRETRAIN_FOLDER
    if not ((default / "manifest.json").is_file() and (default / "lmdb").is_dir()):
        return None, f"no pre-training set in {default}; `make dataset` builds one unless RACE=all"
    return default, ""


def dataset_race(data_dir: Path) -> Optional[str]:
    try:
        return json.loads((data_dir / "manifest.json").read_text())["config"]["race"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_inside(path, folder: Path) -> bool:
    return Path(folder).resolve() in Path(path).resolve().parents


class StageRunner:
    """Runs the stages of one training with one backend."""

    def __init__(self, options: Options, net: str, backend: backends.Backend):
        self.options, self.net, self.backend = options, net, backend

    def solver(self, default: str) -> Path:
        """--solver for the last stage, else the shipped ``default`` of this net."""
        return Path(self.options.solver) if self.options.solver else shipped_solver(self.net, default)

    def config(self, solver: Path, data_dir, models_dir, weights=None, resume=None, extra=None) -> training.RunConfig:
        o = self.options
        return training.RunConfig(net=self.net, solver=str(solver), data_dir=str(data_dir),
                                  models_dir=str(models_dir), backend=self.backend.name, weights=weights,
                                  resume=resume, max_iter=o.max_iter, seed=o.seed, precision=o.precision,
                                  device=o.device, threads=o.threads, extra=dict(extra or {}))

    def stage(self, solver: Path, data_dir, models_dir, later_iterations: int = 0, **config) -> Path:
        return self.backend.train(self.config(solver, data_dir, models_dir, **config), later_iterations)

    def two_stages(self, pretrain: Path) -> Path:
        o = self.options
        solver = self.solver("solver_finetune.prototxt")
        stage1_models = Path(o.models_dir) / PRETRAIN_FOLDER
        if o.resume and not is_inside(o.resume, stage1_models):
            # A stage-2 snapshot carries its own weights: stage 1 is not needed.
            return self.stage(solver, o.data_dir, o.models_dir, resume=o.resume)
        weights = self.pretrained_weights(pretrain, stage1_models, later_iterations=self.iterations(solver))
        print(f"stage 2: fine-tuning on {o.data_dir} with {solver.name}", file=sys.stderr)
        return self.stage(solver, o.data_dir, o.models_dir, weights=str(weights))

    def pretrained_weights(self, data: Path, stage1_models: Path, later_iterations: int) -> Path:
        """Stage 1: its final snapshot, trained now unless an earlier run finished it on this set."""
        o = self.options
        solver = Path(o.pretrain_solver) if o.pretrain_solver else shipped_solver(self.net, "solver_pretrain.prototxt")
        if not (data / "lmdb").is_dir():
            raise KitError(f"{data}: no pre-training set there (run `make dataset`, which builds it, "
                           f"or train on DATA_DIR alone with PRETRAIN=0)")
        manifest = data / "manifest.json"
        data_id = {"pretrain_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()
                   if manifest.is_file() else None}
        resume = o.resume if o.resume and is_inside(o.resume, stage1_models) else None
        config = self.config(solver, data, stage1_models)
        param, net = training.prepare_run(config)
        final = snapshot_name(config.snapshot_prefix, param.max_iter)
        earlier = training.read_config(config.out_dir).get("extra", {})
        if final.is_file() and not resume and \
                earlier.get("pretrain_manifest_sha256") == data_id["pretrain_manifest_sha256"] and \
                training.same_run_files(config, param, net):
            print(f"stage 1 done earlier on this pre-training set: fine-tuning {final}", file=sys.stderr)
            return final
        print(f"stage 1: pre-training on {data} with {solver.name}", file=sys.stderr)
        return self.stage(solver, data, stage1_models, later_iterations, resume=resume, extra=data_id)

    def iterations(self, solver: Path) -> int:
        """The iterations a stage with ``solver`` will run (for the estimate of the whole schedule)."""
        if self.options.max_iter is not None:
            return int(self.options.max_iter)
        return int(formats.read_solver(solver).max_iter)


def shipped_solver(net: str, name: str) -> Path:
    return training.REPO / "caffe_models" / net / name


def finish(options: Options, final: Path) -> None:
    """The prior-corrected copy of the final snapshot (or, with --no-prior, the copy with the fixed layers)."""
    if options.no_prior:
        if models.model(options.net).fixed_layers:
            out = prior.corrected_name(final, "deploy")
            prior.finished_copy(final, out, options.net)
            print(f"with its fixed layers: {out}")
        return
    manifest = Path(options.data_dir) / "manifest.json"
    if not manifest.is_file():
        print(f"no {manifest} (not built by `make dataset`): no prior-corrected copy written", file=sys.stderr)
        return
    out = prior.corrected_name(final)
    shifts = prior.correct(final, manifest, options.net, out)
    for layer, shift in shifts.items():
        values = " ".join(f"{v:.2f}" for v in shift[:12]) + (" ..." if len(shift) > 12 else "")
        print(f"prior-corrected copy: {out} ({layer} bias + [{values}])")
