# depthlab: `make sweep` runs the paper's Figure-6 sweep, `make test` the tests.
# Both create .venv and install depthlab into it first (once).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/cifar.yaml
DATA ?=
DATA_FLAG := $(if $(DATA),--data $(DATA))

.PHONY: install sweep quick cpu cpu-check smoke ablation probe report plan bench test

install: $(BIN)/depthlab

$(BIN)/depthlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

sweep: install                 ## the main job: make sweep [CONFIG=configs/cifar.yaml] [DATA=path/to/cifar10]
	$(BIN)/depthlab sweep $(CONFIG) $(DATA_FLAG)

quick: install                 ## the same comparison on a short schedule
	$(BIN)/depthlab sweep configs/quick.yaml $(DATA_FLAG)

cpu: install                   ## the comparison sized for a CPU: 20 cells (README: how long it takes where)
	$(BIN)/depthlab sweep configs/cpu.yaml $(DATA_FLAG)

cpu-check: install             ## cpu.yaml's verdict again on two seed sets drawn at random, and in fp32 (3x make cpu)
	$(BIN)/depthlab sweep configs/cpu-other-seeds.yaml $(DATA_FLAG)
	$(BIN)/depthlab sweep configs/cpu-other-seeds-b.yaml $(DATA_FLAG)
	$(BIN)/depthlab sweep configs/cpu-fp32.yaml $(DATA_FLAG)

ablation: install              ## which cause? shortcut scale, init, BatchNorm, block order (ABLATION=configs/ablation-cpu.yaml on a CPU)
	$(BIN)/depthlab sweep $(or $(ABLATION),configs/ablation.yaml) $(DATA_FLAG)

probe: install                 ## gradients, logit scale and shattering per depth at initialisation (minutes on a 2-core CPU)
	$(BIN)/depthlab probe $(DATA_FLAG)

smoke: install                 ## seconds on a CPU, synthetic data
	$(BIN)/depthlab sweep configs/smoke.yaml

report: install
	$(BIN)/depthlab report $(RESULTS)

plan: install
	$(BIN)/depthlab plan $(CONFIG)

bench: install                 ## images/s: common DataLoader way vs depthlab
	$(BIN)/depthlab bench --depth 56 --jobs 4

test: install
	$(BIN)/python -m pytest -q
