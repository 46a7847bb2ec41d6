# drifting-lightning: `make demo` trains the checkerboard toy, `make test` runs the fast test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: install demo test test-all lint bench data clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Debian's Fashion-MNIST (used by configs/fashion_mnist.yaml); best effort, the fast tests do not need it.
data:
	@test -d $(FASHION) || (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1) || echo "note: could not install dataset-fashion-mnist (needs root + apt)"

# One thread: the toy's tensors are small, and two OpenMP threads on a busy 2-core machine run many times slower.
demo: install
	OMP_NUM_THREADS=1 $(BIN)/drifting fit --config configs/toy/checkerboard.yaml
	@echo "Samples: runs/checkerboard/version_*/samples_final.png  TensorBoard: $(BIN)/tensorboard --logdir runs"

test: install
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install data
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check drifting_lightning tests benchmarks

bench: install
	$(BIN)/python benchmarks/drift_loss.py
	$(BIN)/python benchmarks/sampling.py

clean:
	rm -rf runs .pytest_cache
