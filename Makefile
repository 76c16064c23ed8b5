# Reproductions and checks. `make help` lists the targets.
PYTHON ?= python
EETOOL ?= eetool
FMNIST ?= fashion-mnist
DEMO_CHECKPOINT := eetool/demo/demo-resnet20-fashion-mnist.safetensors

.PHONY: help test lint bench completions demo-checkpoint demo-data

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

test: ## run the test suite (as CI does)
	$(PYTHON) -m pytest -q

lint: ## ruff and mypy
	ruff check eetool tests bench
	mypy eetool

bench: ## benchmarks (ratios within one run)
	$(PYTHON) bench/startup.py

completions: ## regenerate completions/ from the app
	$(PYTHON) -m eetool.completion_scripts completions

demo-checkpoint: ## re-make the shipped checkpoint from Debian's Fashion-MNIST (about 30 min on 2 CPU cores)
	$(EETOOL) train --data $(FMNIST) --split train --eval-split test --arch resnet20 --epochs 12 \
	  --batch-size 128 --lr 0.1 --weight-decay 5e-4 --schedule cosine --seed 0 --no-progress \
	  -o $(DEMO_CHECKPOINT) --force

demo-data: ## re-make the embedded demo images from Debian's Fashion-MNIST
	$(PYTHON) -m eetool.demo_data $(FMNIST) eetool/demo/demo-data.safetensors
