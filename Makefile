# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
# Each creates .venv/ and installs what is missing first: the pinned torch build and the package, together.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The pinned torch build, asked for in the same install as the package: the resolver cannot pick another
# torch (the package's own ranges accept this one). TORCH_SPEC=... installs another build; the spec is kept
# in .venv/torch-spec, so the reinstall that a change of pyproject.toml brings keeps it (it put the pinned
# build back, a download of gigabytes), and a TORCH_SPEC other than the kept one installs again.
TORCH_DEFAULT := torch==2.14.1 torchvision==0.29.1
SPEC_FILE = $(VENV)/torch-spec
KEPT_SPEC = $(strip $(shell cat $(SPEC_FILE) 2>/dev/null))
TORCH_SPEC ?= $(or $(KEPT_SPEC),$(TORCH_DEFAULT))
ARGS ?=
# The installer. uv (the default) fetches and unpacks in parallel: the whole install took 56 s on a fresh
# two-core machine where pip's took 126 s (2026-12-07). It reads its own settings (UV_INDEX_URL, uv.toml),
# not pip's: INSTALLER=pip installs with pip as before, e.g. where a pip.conf names a private index.
# --compile-bytecode (19 s of a 52 s install, 2026-12-07): where PYTHONDONTWRITEBYTECODE=1 is set, as on
# the machines the tests run on, nothing compiled on import is kept, and without it every interpreter would
# compile all it imports again: the commands' imports took 34 s each time against 13 s.
INSTALLER ?= uv
ifeq ($(filter $(INSTALLER),uv pip),)
$(error INSTALLER must be uv or pip, got '$(INSTALLER)')
endif

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast test-oldest lint format bench reproduce-mini reproduce-init clean

ifneq ($(filter command line environment,$(origin TORCH_SPEC)),)
ifneq ($(strip $(TORCH_SPEC)),$(KEPT_SPEC))
.PHONY: $(STAMP)  # a TORCH_SPEC given other than the one installed: install again
endif
endif

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),pip)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
else
	$(PY) -m pip install --quiet --upgrade pip uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode $(TORCH_SPEC) -e '.[dev]'
endif
	@$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	printf '%s\n' "$(strip $(TORCH_SPEC))" > $(SPEC_FILE)
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dev tools

train: $(STAMP)  ## train the quickstart on the embedded digits (CPU, minutes); ARGS="key=value ..."
	$(PY) -m act_lightning.train $(ARGS)

# --dist worksteal: a worker that runs out of tests takes some of the other's (the tests last from
# milliseconds to 20 s; in file order the last long ones left one worker idle: 17 s apart against 6 s).
# The tests marked slow run first (tests/conftest.py), so the last ones are short: 1 s apart.
SUITE := -q -n auto --maxprocesses=4 --dist worksteal tests
test: $(STAMP)  ## run the test suite (CPU, no network); one worker process per core, at most four
	WANDB_MODE=offline $(PY) -m pytest $(SUITE) $(ARGS)

test-fast: $(STAMP)  ## unit tests only
	WANDB_MODE=offline $(PY) -m pytest -q tests/unit $(ARGS)

# The suite against the oldest release pyproject.toml allows of every direct dependency (uv's lowest-direct
# resolution, in a venv of its own, beside the pinned torch; numpy and pillow, which torchvision's install
# brings at their newest, resolved again): run it when a lower bound moves or the code starts to use
# something new from a dependency. Downloads those releases (about a minute), then runs as make test.
# The compiled ones from wheels only: on a Python newer than a lower bound (numpy 1.24, scipy 1.10 have no
# wheel for 3.12) that bound would be built from source and fail; there the oldest release with a wheel for
# this Python is taken (3.12: numpy 1.26.0, scipy 1.11.2, scikit-learn 1.3.1, matplotlib 3.7.3).
OLDEST := .venv-oldest
WHEELS_ONLY := $(foreach p,numpy scipy pillow matplotlib scikit-learn pyyaml,--only-binary $(p))
test-oldest:  ## the suite with the oldest allowed dependencies, in .venv-oldest (downloads them)
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip uv
	$(OLDEST)/bin/python -m pip install --quiet $(TORCH_SPEC)
	printf '%s\n' $(TORCH_SPEC) > $(OLDEST)/torch.txt
	$(OLDEST)/bin/uv pip install --quiet --python $(OLDEST)/bin/python --resolution lowest-direct \
		--constraint $(OLDEST)/torch.txt --reinstall-package numpy --reinstall-package pillow $(WHEELS_ONLY) -e '.[dev]'
	WANDB_MODE=offline $(OLDEST)/bin/python -m pytest $(SUITE) $(ARGS)

lint: $(STAMP)  ## ruff lint and format check
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)  ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: $(STAMP)  ## benchmarks (not tests): training speed against the baseline, data loading, FID and sampling, DDP strategies
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_fid.py
	$(PY) benchmarks/bench_ddp.py

# a new folder each time (a second call found the first one's finished jobs and reported them again);
# MINI_DIR=<that folder> continues a call that was stopped
NOW := $(shell date +%Y-%m-%d_%H-%M-%S)
MINI_DIR ?= multirun/reproduce-mini/$(NOW)
REPORT ?= reports/reproduce_mini
reproduce-mini: $(STAMP)  ## ACT against plain consistency training in miniature, 3 seeds (about 17 min on 2 cores): reports/reproduce_mini.*
	$(PY) -m act_lightning.train -m ablation=ct_vs_act hydra.sweep.dir=$(MINI_DIR) $(ARGS)
	$(PY) -m act_lightning.report $(MINI_DIR) --out $(REPORT) --time-reference ct_equal_time

INIT_DIR ?= multirun/init/$(NOW)
INIT_REPORT ?= reports/init
reproduce-init: $(STAMP)  ## ACT from scratch against diffusion pretraining + ECT tuning at equal time, 3 seeds (10-25 min on 2 cores): reports/init.*
	$(PY) -m act_lightning.train -m ablation=init_pretrain hydra.sweep.dir=$(INIT_DIR)/pretrain $(ARGS)
	$(PY) -m act_lightning.train -m ablation=init init_sweep=$(INIT_DIR)/pretrain hydra.sweep.dir=$(INIT_DIR)/tune $(ARGS)
	$(PY) -m act_lightning.report $(INIT_DIR)/tune --out $(INIT_REPORT) --time-reference ect

clean:  ## remove run outputs and caches, and what `pip install .` leaves (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache build
