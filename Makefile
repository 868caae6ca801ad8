# The front door: every stage of the kit is a target. `make help` lists them.
# Inputs are variables, e.g. `make dataset UTKFACE_DIR=~/UTKFace RACE=all`.
# Recipes pass every path through $(call q,...), so paths may hold spaces and quotes.

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          ?= $(VENV)/bin/python

UTKFACE_DIR ?= UTKFace
# The dataset `make dataset` reads (dataset/sources.py) and its folder; FOLD=k: Adience's fold k is the test split.
SOURCE      ?= utkface
SOURCE_DIR  ?= $(UTKFACE_DIR)
FOLD        ?=
DATA_DIR    ?= data
MODELS_DIR  ?= models
RACE        ?= asian
SIZE        ?= 256
TEST_FRACTION ?= 0.2
SEED        ?= 1
JOINT_PLAN  ?=
# ENCODED=1: JPEG Datums, 0: raw; empty: raw unless raw records would exceed 20 GB (dataset/build.py).
ENCODED     ?=
WORKERS     ?=
BACKEND     ?= auto
SOLVER      ?=
# PRETRAIN_SOLVER=: stage 1's solver (default: the net's solver_pretrain.prototxt); SOLVER= is the last stage's.
PRETRAIN_SOLVER ?=
RESUME      ?=
NET         ?= all
WEIGHTS     ?=
INIT_WEIGHTS ?=
MAX_ITER    ?=
# TRAIN_SEED=N: the solvers' random_seed (faces' order, crops, dropout) for every stage; empty: the solvers' own.
TRAIN_SEED  ?=
PRECISION   ?=
DEVICE      ?=
NPROC       ?= 1
MODEL       ?= auto
IMAGE       ?=
VIDEO       ?=
DEMO_DIR    ?= demo
PRETRAIN    ?= 1
PRIOR       ?= 1
PRETRAIN_DIR ?= $(DATA_DIR)/pretrain
VAL_DIR     ?= $(DATA_DIR)/val
PRETRAIN_TEST_FRACTION ?= 0.05

# One shell word in single quotes (a ' inside becomes '\''); py: the Python that every recipe runs.
q = '$(subst ','\'',$(1))'
py = $(call q,$(PY))

RACES := asian white black indian others all
SOURCES := utkface adience imdb-wiki
ADIENCE_FOLDS := 0 1 2 3 4
BACKENDS := auto torch caffe docker
NETS := age gender joint all
# `make dataset` builds the all-races pre-training set in PRETRAIN_DIR unless PRETRAIN=0 or RACE=all (nothing
# to add). Training decides for itself (scripts/train.py): it pre-trains where DATA_DIR/pretrain holds that
# set; PRETRAIN=0 asks for one stage, INIT_WEIGHTS= starts from weights of your own instead of stage 1.
USE_PRETRAIN = $(and $(filter 1,$(PRETRAIN)),$(filter-out all,$(RACE)),$(filter utkface,$(SOURCE)))
$(if $(filter $(RACE),$(RACES)),,$(error RACE=$(RACE): expected one of $(RACES)))
$(if $(filter $(SOURCE),$(SOURCES)),,$(error SOURCE=$(SOURCE): expected one of $(SOURCES)))
$(if $(FOLD),$(if $(filter $(FOLD),$(ADIENCE_FOLDS)),,$(error FOLD=$(FOLD): expected one of $(ADIENCE_FOLDS))))
$(if $(JOINT_PLAN),$(if $(filter $(JOINT_PLAN),age natural wild),,$(error JOINT_PLAN=$(JOINT_PLAN): expected age, natural or wild (empty: dataset.build's default, natural))))
$(if $(ENCODED),$(if $(filter 0 1,$(ENCODED)),,$(error ENCODED=$(ENCODED): expected 1 (JPEG), 0 (raw) or empty (by size))))
$(if $(filter $(BACKEND),$(BACKENDS)),,$(error BACKEND=$(BACKEND): expected one of $(BACKENDS)))
$(if $(filter $(NET),$(NETS)),,$(error NET=$(NET): expected one of $(NETS)))
$(if $(filter $(MODEL),auto pair joint),,$(error MODEL=$(MODEL): expected one of auto pair joint))

DIR_ARGS   = --data-dir $(call q,$(DATA_DIR)) --models-dir $(call q,$(MODELS_DIR))
TRAIN_ARGS = --backend $(BACKEND) $(DIR_ARGS) \
             $(if $(SOLVER),--solver $(call q,$(SOLVER))) $(if $(RESUME),--resume $(call q,$(RESUME))) \
             $(if $(PRETRAIN_SOLVER),--pretrain-solver $(call q,$(PRETRAIN_SOLVER))) \
             $(if $(INIT_WEIGHTS),--weights $(call q,$(INIT_WEIGHTS))) $(if $(MAX_ITER),--max-iter $(MAX_ITER)) \
             $(if $(TRAIN_SEED),--seed $(TRAIN_SEED)) \
             $(if $(PRECISION),--precision $(PRECISION)) \
             $(if $(filter 0,$(PRETRAIN)),--no-pretrain) \
             $(if $(filter-out file default,$(origin PRETRAIN_DIR)),--pretrain-data $(call q,$(PRETRAIN_DIR))) \
             $(if $(filter 0,$(PRIOR)),--no-prior)
# NPROC=N: N data-parallel workers on this machine (torchrun; README, training), each reading its own batch.
TRAIN      = $(if $(filter-out 1,$(NPROC)),$(py) -m torch.distributed.run --standalone --nproc-per-node=$(NPROC),$(py)) \
             scripts/train.py
EVAL_ARGS  = $(DIR_ARGS) $(if $(WEIGHTS),--weights $(call q,$(WEIGHTS)))
IR_ARGS    = --net $(NET) $(EVAL_ARGS)

.PHONY: help setup edge-legacy demo download dataset dataset-val train-age train-gender train-joint test-age test-gender \
        test-joint evaluate evaluate-folds \
        compile-ncs compile-int8 detector run bench bench-robustness bench-dataset bench-train test test-oracle oracle clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup:  ## create .venv with everything the host stages and the tests need
	$(PYTHON_BOOT) -m venv $(call q,$(VENV))
	$(call q,$(VENV)/bin/python) -m pip install -q --upgrade pip
	$(call q,$(VENV)/bin/python) -m pip install -q torch==2.13.0
	$(call q,$(VENV)/bin/python) -m pip install -q -e '.[host,train,dev]'

edge-legacy:  ## .venv-edge-legacy: the runner's Raspberry Pi + NCS2 stack (Python 3.7, OpenVINO 2022.3) for its tests
	$(py) scripts/edge_legacy_env.py --venv .venv-edge-legacy

demo:  ## every stage end to end on a small generated set (or on UTKFACE_DIR=... when given)
	$(py) scripts/demo.py --out $(call q,$(DEMO_DIR)) $(if $(filter-out file default,$(origin UTKFACE_DIR)),--utkface $(call q,$(UTKFACE_DIR)))

download:  ## fetch and verify the official UTKFace archive into UTKFACE_DIR
	$(py) -m dataset.download --dest $(call q,$(UTKFACE_DIR))

# The builder with the options every set shares; each target adds --out, --race, --test-fraction, --hold-out.
# RACE is UTKFace's; the other sources have no race labels.
BUILD_SET = $(py) -m dataset.build --source $(SOURCE) --input $(call q,$(SOURCE_DIR)) $(if $(FOLD),--fold $(FOLD)) \
            --size $(SIZE) --seed $(SEED) $(if $(JOINT_PLAN),--joint-plan $(JOINT_PLAN)) \
            $(if $(filter 1,$(ENCODED)),--encoded)$(if $(filter 0,$(ENCODED)),--raw) $(if $(WORKERS),--workers $(WORKERS))
RACE_ARG = $(if $(filter utkface,$(SOURCE)),--race $(RACE))

dataset:  ## UTKFace (SOURCE=adience|imdb-wiki SOURCE_DIR=..., FOLD=k) -> balanced LMDBs + mean.binaryproto in DATA_DIR, and the all-races set in DATA_DIR/pretrain
	$(BUILD_SET) --out $(call q,$(DATA_DIR)) $(RACE_ARG) --test-fraction $(TEST_FRACTION)
	$(if $(USE_PRETRAIN),$(BUILD_SET) --out $(call q,$(PRETRAIN_DIR)) --race all \
	  --test-fraction $(PRETRAIN_TEST_FRACTION) --hold-out $(call q,$(DATA_DIR)/splits/test.txt))

dataset-val:  ## a validation set to choose schedules on, the test split untouched: DATA_DIR's train faces split again into VAL_DIR
	$(BUILD_SET) --out $(call q,$(VAL_DIR)) $(RACE_ARG) --test-fraction $(TEST_FRACTION) \
	  --hold-out $(call q,$(DATA_DIR)/splits/test.txt)
	$(if $(USE_PRETRAIN),$(BUILD_SET) --out $(call q,$(VAL_DIR)/pretrain) --race all \
	  --test-fraction $(PRETRAIN_TEST_FRACTION) \
	  --hold-out $(call q,$(DATA_DIR)/splits/test.txt) $(call q,$(VAL_DIR)/splits/test.txt))

train-age:  ## train AgeNet: pre-train on all races, fine-tune on RACE (PRETRAIN=0: RACE only; BACKEND=, SOLVER=, RESUME=)
	$(TRAIN) --net age $(TRAIN_ARGS)

train-gender:  ## train GenderNet
	$(TRAIN) --net gender $(TRAIN_ARGS)

train-joint:  ## train the joint net (both tasks, one pass): pre-train on all races, fine-tune on RACE
	$(TRAIN) --net joint $(TRAIN_ARGS)

test-age:  ## evaluate AgeNet on the test LMDB through OpenCV's Caffe importer
	$(py) scripts/evaluate.py --net age $(EVAL_ARGS)

test-gender:  ## evaluate GenderNet
	$(py) scripts/evaluate.py --net gender $(EVAL_ARGS)

test-joint:  ## evaluate the joint net (age bins, age in years, gender), beside the pair's figures on the same faces
	$(py) scripts/evaluate.py --net joint $(EVAL_ARGS)

evaluate: test-age test-gender  ## both evaluations of the pair

# Levi & Hassner's protocol: fold k's data in DATA_DIR/adience_fold_k, its nets in MODELS_DIR/adience_fold_k.
evaluate-folds:  ## Adience (SOURCE_DIR=...): for k in 0..4 build FOLD=k, train and test the pair; then mean +- std over the folds
	$(foreach k,$(ADIENCE_FOLDS),$(MAKE) --no-print-directory dataset train-age train-gender test-age test-gender \
	  SOURCE=adience FOLD=$(k) PRETRAIN=0 SOURCE_DIR=$(call q,$(SOURCE_DIR)) \
	  DATA_DIR=$(call q,$(DATA_DIR)/adience_fold_$(k)) MODELS_DIR=$(call q,$(MODELS_DIR)/adience_fold_$(k)) &&) true
	$(py) scripts/evaluate_folds.py $(foreach k,$(ADIENCE_FOLDS),$(call q,$(MODELS_DIR)/adience_fold_$(k))) \
	  --out $(call q,$(MODELS_DIR)/adience_folds.json)

compile-ncs:  ## caffemodel -> OpenVINO IR, FP16 (NCS2) and FP32, in MODELS_DIR/ir (NET=age|gender|joint|all)
	$(py) scripts/compile_ir.py $(IR_ARGS) --precision FP16 FP32
	$(py) scripts/build_detector.py --models-dir $(call q,$(MODELS_DIR))

detector:  ## MediaPipe's BlazeFace face detector -> checked IRs in MODELS_DIR/ir/face_detector (compile-ncs runs it too)
	$(py) scripts/build_detector.py --models-dir $(call q,$(MODELS_DIR))

compile-int8:  ## add INT8 IRs for CPUs (NNCF post-training quantization)
	$(py) scripts/compile_ir.py $(IR_ARGS) --precision INT8

run:  ## the edge runner on IMAGE=... or VIDEO=... (DEVICE=, default MYRIAD when plugged in, else CPU)
	$(if $(IMAGE)$(VIDEO),,$(error give IMAGE=photo.jpg or VIDEO=clip.mp4))
	$(py) edge/run_inference.py --models $(call q,$(MODELS_DIR)/ir) --model $(MODEL) $(if $(DEVICE),--device $(DEVICE)) \
	  $(if $(IMAGE),--image $(call q,$(IMAGE))) $(if $(VIDEO),--video $(call q,$(VIDEO)))

bench:  ## latency and throughput of every engine, both nets, each detector, the end-to-end runner; then bench-robustness
	$(py) scripts/bench.py $(DIR_ARGS) --utkface $(call q,$(UTKFACE_DIR))
	$(py) scripts/robustness.py $(DIR_ARGS) --utkface $(call q,$(UTKFACE_DIR))

bench-robustness:  ## faces found and accuracy per detector on the test faces tilted, scaled and pasted into frames
	$(py) scripts/robustness.py $(DIR_ARGS) --utkface $(call q,$(UTKFACE_DIR))

bench-train:  ## torch training throughput, AgeNet batch 50 and the joint net batch 64, fp32 and bf16
	$(py) scripts/bench_train.py --net age --batch 50 --threads 2 --json bench/train_speed.json
	$(py) scripts/bench_train.py --net joint --batch 64 --threads 2 --json bench/train_speed_joint.json

bench-dataset:  ## time the dataset build (images/s, output size)
	$(py) -m dataset.bench --utkface $(call q,$(UTKFACE_DIR)) --race $(RACE)

test:  ## the test suite (the same command CI runs)
	$(py) -m pytest -q

test-oracle:  ## only the proofs against real Caffe (needs `make oracle`)
	$(py) -m pytest -m oracle -rA

oracle:  ## build the real Caffe used as a test oracle (about 6 minutes)
	test -x "$${CAFFE_ORACLE_HOME:-$$HOME/.cache/caffe-oracle}/caffe/bin/caffe" || bash ../shared/tools/caffe-oracle/build.sh

clean:  ## remove generated data, models and the demo (only folders the kit wrote: it refuses others)
	$(py) -m caffekit.clean $(call q,$(DATA_DIR)) $(call q,$(MODELS_DIR)) $(call q,$(DEMO_DIR))
