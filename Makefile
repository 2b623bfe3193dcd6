# make repro : set up .venv from requirements.lock, then run the pipeline (dvc repro)
# make test  : set up .venv, then run the test suite
# make test-fast : the unit tests only (no dvc, no stage subprocess, a few training steps at most)
# make test-pipeline, make test-system : the other two tiers (docs/testing.md)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-lock
PLOTS_PAGE := .dvc/plots/offline.html
# The stages run as `python -m stages.<name>`: put the venv first on PATH for dvc.
RUN    := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: setup repro test test-fast test-pipeline test-system lint sweep study compare bench lock clean-venv predict probe

setup: $(STAMP) $(PLOTS_PAGE)

$(STAMP): requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	@touch $@

# DVC's plots page with Vega inlined from the pinned vl-convert-python: plots draw offline.
$(PLOTS_PAGE): $(STAMP) commands/offline_plots.py
	$(BIN)/python -m commands.offline_plots

# dvc repro exits 0 even when an output could not be copied into a full cache: cache_check says so.
repro: setup
	$(RUN) $(BIN)/dvc repro
	$(RUN) $(BIN)/python -m commands.cache_check

# One xdist worker more than there are cores: a worker waits on its dvc and stage subprocesses part of the
# time (docs/testing.md measures it). Each worker takes the longest test (or module sharing a fixture) left,
# in conftest's order (--no-loadscope-reorder keeps it). TEST_WORKERS=N for another count.
PYTEST = $(RUN) $(BIN)/python -m pytest -n $(or $(TEST_WORKERS),$(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))) \
	--dist loadgroup --no-loadscope-reorder
test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not pipeline and not system"

test-pipeline: setup
	$(PYTEST) -m pipeline

test-system: setup
	$(PYTEST) -m system

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The loss x optimizer grid on the bundled sample: queue, run with JOBS of DVC's queue workers
# (each experiment in its own copy, on train.speed.threads threads: 1 by default, one core each),
# then report. Override the lists: make sweep LOSSES=binary_crossentropy,poisson OPTIMIZERS=adam,sgd
LOSSES     ?= sparse_categorical_crossentropy,categorical_crossentropy,binary_crossentropy,categorical_focal_crossentropy,binary_focal_crossentropy,kl_divergence,poisson,categorical_hinge,squared_hinge,mean_squared_error
OPTIMIZERS ?= adam,sgd,rmsprop
JOBS       ?= $(shell nproc 2>/dev/null || echo 1)
# Failed experiments are named and the target fails (after writing the report of those that finished).
# The default grid's report is the published one (reports/compare.*, docs/sweep.md); a grid of your
# own gets its own, reports/sweeps/<the grid>/compare.md. Either way: the experiments it ran, and no others.
SWEEP_REPORT = $(if $(filter command line environment,$(origin LOSSES) $(origin OPTIMIZERS)),,--out reports --readme docs/sweep.md)
sweep: setup
	$(RUN) $(BIN)/python -m commands.sweep -S "train.loss=$(LOSSES)" -S "train.optimizer.name=$(OPTIMIZERS)" \
		--jobs $(JOBS) $(SWEEP_REPORT)

# The study (docs/study.md): each (loss, optimizer) at its own tuned learning rate (validation accuracy),
# SEEDS seeds at the best one, test accuracy with 95% CIs, as DVC experiments run by Optuna's workers.
# make study [LOSSES=a,b] [OPTIMIZERS=adam,sgd] LRS=... SEEDS=5 EPOCHS=10 WORKERS=2 [SOURCE=mnist]
#            [STORAGE=postgresql://user:pw@host/db] [PUSH=origin] [STUDY=name] [GRID=1] [DIAGNOSTICS=none]
# LOSSES and OPTIMIZERS go to the study only when given (the sweep's defaults above are not the study's).
# DIAGNOSTICS (none, or loss:optimizer:lr,...): the gradient-logging runs; by default the tutorial's cases whose
# loss and optimizer the study runs (all four in the default study).
LRS     ?= 0.0001,0.001,0.01,0.1,1
SEEDS   ?= 5
EPOCHS  ?= 10
WORKERS ?= $(JOBS)
# Settings of your own need a study name of your own (the command refuses them under the published study's name).
study: setup
	$(RUN) $(BIN)/python -m commands.study --lrs $(LRS) --seeds $(SEEDS) --epochs $(EPOCHS) --workers $(WORKERS) \
		$(if $(filter command line environment,$(origin LOSSES)),--losses $(LOSSES)) \
		$(if $(filter command line environment,$(origin OPTIMIZERS)),--optimizers $(OPTIMIZERS)) \
		$(if $(SOURCE),--source $(SOURCE)) $(if $(STORAGE),--storage $(STORAGE)) \
		$(if $(PUSH),--push $(PUSH)) $(if $(STUDY),--study-name $(STUDY)) $(if $(GRID),--grid) \
		$(if $(DIAGNOSTICS),--diagnostics $(DIAGNOSTICS))

# Refuses to shrink docs/sweep.md's table (a fresh clone has no experiments) unless REPLACE=1.
compare: setup
	$(RUN) $(BIN)/python -m commands.report --readme docs/sweep.md $(if $(REPLACE),--replace)

# Re-pin after changing pyproject.toml's dependency list: every package with the sha256 of each
# of its files on PyPI (setup installs with --require-hashes). Versions already in the lock are
# kept unless the new list needs others; `make lock UPGRADE=1` takes the newest allowed.
UV_VERSION := 0.13.9
lock:
	rm -rf /tmp/lock-venv && $(PYTHON) -m venv /tmp/lock-venv
	/tmp/lock-venv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	/tmp/lock-venv/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
		$(if $(UPGRADE),--upgrade) -o requirements.lock

clean-venv:
	rm -rf $(VENV)

# Every benchmark (about 30 minutes on 2 cores), offline; each prints its own medians and ratios.
bench: setup
	$(BIN)/python benchmarks/training.py
	$(RUN) $(BIN)/python benchmarks/sweep.py --jobs $(JOBS)
	$(RUN) $(BIN)/python benchmarks/run_cache.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/t10k_accuracy.py
	$(BIN)/python benchmarks/rendered_digits.py
	$(BIN)/python benchmarks/gradient_stats.py
	$(RUN) $(BIN)/python benchmarks/study_cost.py
	$(RUN) $(BIN)/python benchmarks/experiment_loop.py

# 128 bad inputs and faults through dvc exp run / dvc repro, counted (about 10 minutes)
probe: setup
	$(RUN) $(BIN)/python benchmarks/probe_bad_inputs.py

# Read your own digit images with the trained model: make predict IMG="a.png b.jpg" [SHOW=seen.png]
predict: setup
	$(BIN)/python -m commands.predict $(IMG) $(if $(SHOW),--show $(SHOW))
