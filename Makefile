# Two-command setup: `make test` and `make demo` build .venv from requirements/constraints.txt when it is
# missing (or when the pins/settings change), then run. Both are idempotent and fast once .venv exists.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rs_lab_installed
DEMO_ROOT ?= $(if $(wildcard ../shared/data),../shared/data,)
HERMETIC := $(CURDIR)/.hermetic
# No model hub, ever: set before any Python starts (STACK.md). Jupyter/matplotlib state stays in the repo.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export MPLBACKEND := Agg
export MPLCONFIGDIR := $(HERMETIC)/mpl
export IPYTHONDIR := $(HERMETIC)/ipython
export JUPYTER_CONFIG_DIR := $(HERMETIC)/jupyter_config
export JUPYTER_DATA_DIR := $(HERMETIC)/jupyter_data
export JUPYTER_RUNTIME_DIR := $(HERMETIC)/jupyter_runtime

.PHONY: install test nbtest pytest test-dashboards demo inventory export clean-nbs check-clean bench

install: $(STAMP)

$(STAMP): requirements/constraints.txt settings.ini setup.py
	@mkdir -p $(HERMETIC)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	$(BIN)/python -c "import torch, torchvision, open_clip, rs_prompt_lab; print('install ok: torch', torch.__version__, 'open_clip', open_clip.__version__)"
	@touch $@

test: install nbtest pytest

nbtest: install
	@mkdir -p $(HERMETIC)
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --timing

pytest: install
	@mkdir -p $(HERMETIC)
	$(BIN)/python -m pytest -q

# The dashboards alone (they are part of `make test` too): the six tutorials through papermill (~5.5 min on 2 cores) and
# JupyterLab in headless chromium. The inspector's old papermill stall was a lost zmq wakeup in the client, bounded to
# 1 s by reproduce.polled_kernel_manager. The browser tests need Debian's chromium (`apt-get install -y chromium`) and
# the playwright package from the dev install (never `playwright install`).
test-dashboards: install
	@mkdir -p $(HERMETIC)
	$(BIN)/python -m pytest -q -m "tutorial or browser" tests/test_viz.py

# The main job: every family on the embedded default (nbs/experiments/grids/quick.yaml), 2 cells side by side; resumable
# (a second `make demo` only runs what is missing). Ends with the report's path and a short table. `make inventory`:
# the built-in manifests and the data found under ../shared/data (the old `rs-lab demo`).
demo: install
	@mkdir -p $(HERMETIC)
	$(BIN)/rs-lab reproduce nbs/experiments/grids/quick.yaml --workers 2 --resume --out runs/demo

inventory: install
	$(BIN)/rs-lab demo $(if $(DEMO_ROOT),--root $(DEMO_ROOT),)

export: install
	$(BIN)/nbdev_export

clean-nbs: install
	$(BIN)/nbdev_clean

# Speed/memory figures (printed, not asserted by tests); see benchmarks/.
bench: install
	$(BIN)/python benchmarks/bench_patches.py
	$(BIN)/python benchmarks/bench_backbones.py
	@test ! -f benchmarks/bench_synth.py || $(BIN)/python benchmarks/bench_synth.py

# Fails when nbdev_export or nbdev_clean would change a tracked file (CI runs this).
check-clean: install
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	@git status --porcelain --untracked-files=no | grep . && { echo "nbdev_export/nbdev_clean changed tracked files: run 'make export clean-nbs' and commit"; git --no-pager diff --stat; exit 1; } || echo "export/clean: no diff"
