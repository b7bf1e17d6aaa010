# Two entry points, both self-installing and idempotent:
#   make demo   the main job on the offline default (benchmark table)
#   make test   the test suite (what CI runs)
# Everything lives in .venv; stamps make a second run reuse what is there.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
EXT := $(VENV)/.extension-built
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo test install lint bench-ops data

demo: install
	$(PY) -m tokcomp bench --model deit_small_patch16_224 --batch-size 32 \
		--variant tome:r=4 --variant tome:r=8 --variant tome:r=13 --variant tome:r=16

test: install lint
	$(PY) -m pytest -q tests

install: $(EXT) data

$(PY):
	$(PYTHON) -m venv $(VENV)

# Data-only packages (their files, not their code) install without their dependencies.
DATA_PACKAGES := foolbox==3.3.4

$(DEPS): requirements.txt Makefile | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

$(EXT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	apt-get install -y -q dataset-fashion-mnist || sudo apt-get install -y -q dataset-fashion-mnist

lint: $(DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-ops: install
	$(PY) eval/bench_ops.py
