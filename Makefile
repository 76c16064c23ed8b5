# Reproductions and checks. `make help` lists the targets.
PYTHON ?= python
EETOOL ?= eetool
FMNIST ?= fashion-mnist
DEMO_CHECKPOINT := eetool/demo/demo-resnet20-fashion-mnist.safetensors

RESULTS ?= results
BUDGETS := --budget 0.25 --budget 0.5 --budget 0.75

.PHONY: help test lint bench completions docs-reference docs demo-checkpoint demo-data e2cm-demo e2cm-fashion-mnist e2cm-run fixed-budget dataset-pruning weight-pruning segmentation segmentation-atlas segmentation-torchvision

help:
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

test: ## run the test suite (as CI does)
	$(PYTHON) -m pytest -q

lint: ## ruff and mypy
	ruff check eetool tests bench
	mypy eetool

bench: ## benchmarks (ratios within one run)
	$(PYTHON) bench/startup.py
	$(PYTHON) bench/e2cm.py
	$(PYTHON) bench/train_exits.py
	$(PYTHON) bench/dataset_pruning.py
	$(PYTHON) bench/channel_pruning.py
	$(PYTHON) bench/exit_speed.py --threads 1
	$(PYTHON) bench/bundle_speed.py --install-size

completions: ## regenerate completions/ from the app
	$(PYTHON) -m eetool.completion_scripts completions

docs-reference: ## regenerate docs/cli.md from every command's --help
	$(PYTHON) -m eetool.cli_reference docs/cli.md

docs: docs-reference ## build the documentation site into site/ (pip install -e '.[docs]')
	$(PYTHON) -m mkdocs build --strict

demo-checkpoint: ## re-make the shipped checkpoint from Debian's Fashion-MNIST (about 30 min on 2 idle CPU cores, an hour shared)
	$(EETOOL) train --config eetool/configs/train-resnet20-fashion-mnist.yaml --data $(FMNIST) --no-progress \
	  -o $(DEMO_CHECKPOINT) --force

demo-data: ## re-make the embedded demo images from Debian's Fashion-MNIST (about 15 s)
	$(PYTHON) -m eetool.core.demo_data $(FMNIST) eetool/demo/demo-data.safetensors

# E²CM on the shipped checkpoint: class means on the training split, thresholds for budgets 0.25,
# 0.5 and 0.75 (and a full sweep with its convex hull), then the test split with exits that stop.
e2cm-demo: ## E²CM results on the embedded demo set (1–2 min on 2 idle CPU cores, about 4 under heavy load)
	$(MAKE) e2cm-run NAME=demo DATA=demo

e2cm-fashion-mnist: ## E²CM results on the full Fashion-MNIST (60,000 calibration, 10,000 test images; a few minutes)
	$(MAKE) e2cm-run NAME=fashion-mnist DATA=$(FMNIST)

e2cm-run:
	@mkdir -p $(RESULTS)
	$(EETOOL) calibrate-means --checkpoint demo --data $(DATA) --split train --no-progress \
	  -o $(RESULTS)/$(NAME)-means.safetensors --force > $(RESULTS)/$(NAME)-means.txt
	$(EETOOL) fit-thresholds --means $(RESULTS)/$(NAME)-means.safetensors $(BUDGETS) \
	  -o $(RESULTS)/$(NAME)-budgets.yaml --force
	$(EETOOL) fit-thresholds --means $(RESULTS)/$(NAME)-means.safetensors --sweep \
	  -o $(RESULTS)/$(NAME)-sweep.yaml --force > $(RESULTS)/$(NAME)-sweep.txt
	$(EETOOL) evaluate --checkpoint demo --data $(DATA) --split test --no-progress \
	  --means $(RESULTS)/$(NAME)-means.safetensors --thresholds $(RESULTS)/$(NAME)-budgets.yaml \
	  -o $(RESULTS)/$(NAME)-evaluation.yaml --force | tee $(RESULTS)/$(NAME)-evaluation.txt

# The thesis's fixed-training-budget comparison (Table I's setting) on Fashion-MNIST with the
# shipped checkpoint: SDN heads trained for 1 and 6 epochs (backbone frozen) against E²CM alone
# (no training) and E²CM+SDN, at budgets 0.15 to 0.30 on the test split.
FB := $(RESULTS)/fixed-budget
FB_BUDGETS := --budget 0.15 --budget 0.2 --budget 0.25 --budget 0.3
FB_FIT = $(EETOOL) fit-thresholds --checkpoint demo --data $(FMNIST) --split train $(FB_BUDGETS) --force -q --no-progress
FB_EVAL = $(EETOOL) evaluate --checkpoint demo --data $(FMNIST) --split test --force -q --no-progress

fixed-budget: ## the thesis's fixed-training-budget comparison on Fashion-MNIST (20–25 min on 2 CPU cores)
	@mkdir -p $(FB)
	$(EETOOL) calibrate-means --checkpoint demo --data $(FMNIST) --split train -o $(FB)/means.safetensors --force -q --no-progress
	$(EETOOL) fit-thresholds --means $(FB)/means.safetensors $(FB_BUDGETS) -o $(FB)/e2cm.yaml --force -q
	$(FB_EVAL) --means $(FB)/means.safetensors --thresholds $(FB)/e2cm.yaml -o $(FB)/e2cm-evaluation.yaml
	for epochs in 1 6; do \
	  $(EETOOL) train-exits --checkpoint demo --data $(FMNIST) --split train --epochs $$epochs --no-progress -q \
	    -o $(FB)/heads-$$epochs.safetensors --force && \
	  $(FB_FIT) --method sdn --exit-heads $(FB)/heads-$$epochs.safetensors -o $(FB)/sdn-$$epochs.yaml && \
	  $(FB_EVAL) --exit-heads $(FB)/heads-$$epochs.safetensors --thresholds $(FB)/sdn-$$epochs.yaml \
	    -o $(FB)/sdn-$$epochs-evaluation.yaml && \
	  for combine in and or; do \
	    $(FB_FIT) --method e2cm+sdn --combine $$combine --exit-heads $(FB)/heads-$$epochs.safetensors \
	      --means $(FB)/means.safetensors -o $(FB)/e2cm-sdn-$$combine-$$epochs.yaml && \
	    $(FB_EVAL) --exit-heads $(FB)/heads-$$epochs.safetensors --means $(FB)/means.safetensors \
	      --thresholds $(FB)/e2cm-sdn-$$combine-$$epochs.yaml -o $(FB)/e2cm-sdn-$$combine-$$epochs-evaluation.yaml \
	      || exit 1; \
	  done || exit 1; \
	done
	$(PYTHON) reproduce/fixed_budget_table.py $(FB)

# Dataset pruning (thesis chapter 4) on Fashion-MNIST, scaled to 2 CPU cores: a class-balanced
# 20,000-image training subset, ResNet-20 of width 8 retrained for 8 epochs on what each method
# keeps at 10% to 60% pruning; EEPrune (E = 3, exits before/mid/after), its two variants,
# random, EL2N (5 models x 3 epochs), forgetting (the 8-epoch run) and SVP (ResNet-8, 3 epochs);
# the Table IX check at 50%; --balanced at 60%; a second retraining seed at 30%. Steps whose
# outputs exist are skipped, and an interrupted step resumes: rerun to continue.
dataset-pruning: ## EEPrune against the baselines on Fashion-MNIST (about 100 min on 2 CPU cores)
	$(PYTHON) reproduce/dataset_pruning.py $(RESULTS)/dataset-pruning --data $(FMNIST)

# Pruning early-exit networks (thesis section 2.5) on Fashion-MNIST with the shipped ResNet-20 (the thesis:
# ResNet-56 on CIFAR-10): SDN heads at the ten exits (one epoch, backbone frozen), then 20 rounds of 10%
# global L1 pruning, joint and ordered, each round fine-tuned on WP_FINETUNE samples (the thesis: 10 epochs);
# accuracy-cost curves from fit-thresholds --sweep on the test split (effective cost for the pruned networks).
# Steps whose outputs exist are skipped and an interrupted pruning resumes: rerun to continue.
WP_FINETUNE ?= 3000
weight-pruning: ## joint against ordered weight pruning, and channel pruning at the same cost, on Fashion-MNIST (about 75 min on 2 shared CPU cores)
	$(PYTHON) reproduce/weight_pruning.py $(RESULTS)/weight-pruning --data $(FMNIST) --finetune-samples $(WP_FINETUNE)

# Class-based thresholds for early-exit segmentation (thesis chapter 3, Tables III and IV) on the Fashion-MNIST
# scenes: eeseg (width 16) trained on the 6,000 training scenes for SEG_EPOCHS epochs, then ADP-C at 0.998 and 0.9,
# CBT [0.99|0.95|0.9, 0.998] and CBT-ns [0.99|0.9, 0.998] calibrated on every training scene, ADP-C at 0.95 to
# 0.999 besides (a curve for the equal-mIoU comparison), each scored on the 1,000 test scenes: anytime mIoU and
# GFLOPs per exit beside the thesis's rows, the class thresholds and their spread, the claims point by point.
# Steps whose outputs exist are skipped: rerun to continue.
SEG_EPOCHS ?= 4
segmentation: ## CBT against ADP-C on Fashion-MNIST scenes (about 9 min on 2 quiet CPU cores, training 2 of it)
	$(PYTHON) reproduce/segmentation.py $(RESULTS)/segmentation --epochs $(SEG_EPOCHS)

# The same rows on the brain atlas slices (Debian mricron-data: 76 training and 28 test slices of 112 x 112, 117
# classes, many like ADE20K's 150): 76 slices make a short epoch, so eeseg (width 32) trains for SEG_ATLAS_EPOCHS.
SEG_ATLAS_EPOCHS ?= 60
segmentation-atlas: ## CBT against ADP-C on the brain atlas slices (Debian mricron-data; about 22 min on 2 quiet CPU cores, 41 shared)
	$(PYTHON) reproduce/segmentation.py $(RESULTS)/segmentation-atlas --data brain-atlas --epochs $(SEG_ATLAS_EPOCHS) \
		--width 32 --head-width 64 --batch-size 4 --eval-batch-size 8

# The same rows on a torchvision network (SEG_TV_ARCH: lraspp_mobilenet_v3_large, deeplabv3_mobilenet_v3_large,
# deeplabv3_resnet50 or fcn_resnet50; random initialisation, nothing downloaded) on the Fashion-MNIST scenes: the
# plain network trained for SEG_TV_EPOCHS, then its three per-pixel exit heads by train-exits on the frozen
# backbone for SEG_TV_EXIT_EPOCHS, then the same calibration, fits and evaluations as for eeseg.
SEG_TV_ARCH ?= lraspp_mobilenet_v3_large
SEG_TV_EPOCHS ?= 6
SEG_TV_EXIT_EPOCHS ?= 3
segmentation-torchvision: ## CBT against ADP-C on a torchvision network (SEG_TV_ARCH) on Fashion-MNIST scenes (about 23 min for LR-ASPP on 2 CPU cores)
	$(PYTHON) reproduce/segmentation.py $(RESULTS)/segmentation-$(SEG_TV_ARCH) --arch $(SEG_TV_ARCH) \
		--epochs $(SEG_TV_EPOCHS) --exit-epochs $(SEG_TV_EXIT_EPOCHS)
