# make repro : set up .venv from requirements.lock, then run the pipeline (dvc repro)
# make test  : set up .venv, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-lock
PLOTS_PAGE := .dvc/plots/offline.html
# The stages run as `python -m stages.<name>`: put the venv first on PATH for dvc.
RUN    := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: setup repro test lint sweep compare bench lock clean-venv predict

setup: $(STAMP) $(PLOTS_PAGE)

$(STAMP): requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	@touch $@

# DVC's plots page with Vega inlined from the pinned vl-convert-python: plots draw offline.
$(PLOTS_PAGE): $(STAMP) stages/offline_plots.py
	$(BIN)/python -m stages.offline_plots

repro: setup
	$(RUN) $(BIN)/dvc repro

test: setup
	$(RUN) $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The loss x optimizer grid on the bundled sample: queue, run one at a time, then report.
# Override either list: make sweep LOSSES=binary_crossentropy,poisson OPTIMIZERS=adam,sgd
LOSSES     ?= sparse_categorical_crossentropy,categorical_crossentropy,binary_crossentropy,categorical_focal_crossentropy,binary_focal_crossentropy,kl_divergence,poisson,categorical_hinge,squared_hinge,mean_squared_error
OPTIMIZERS ?= adam,sgd,rmsprop
sweep: setup
	$(RUN) $(BIN)/dvc exp run --queue -S "train.loss=$(LOSSES)" -S "train.optimizer.name=$(OPTIMIZERS)"
	$(RUN) $(BIN)/dvc exp run --run-all
	$(RUN) $(BIN)/python -m stages.report --readme README.md

# Refuses to shrink the README's table (a fresh clone has no experiments) unless REPLACE=1.
compare: setup
	$(RUN) $(BIN)/python -m stages.report --readme README.md $(if $(REPLACE),--replace)

# Re-pin every dependency after changing pyproject.toml's list.
lock:
	rm -rf /tmp/lock-venv && $(PYTHON) -m venv /tmp/lock-venv
	/tmp/lock-venv/bin/pip install --quiet --disable-pip-version-check '.[dev]'
	/tmp/lock-venv/bin/pip freeze --exclude keras-loss-lab > requirements.lock
	rm -rf build *.egg-info

clean-venv:
	rm -rf $(VENV)

bench: setup
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/t10k_accuracy.py
	$(BIN)/python benchmarks/rendered_digits.py

# Read your own digit images with the trained model: make predict IMG="a.png b.jpg" [SHOW=seen.png]
predict: setup
	$(BIN)/python -m stages.predict $(IMG) $(if $(SHOW),--show $(SHOW))
