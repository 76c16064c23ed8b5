# Reproductions and checks. `make help` lists the targets.
PYTHON ?= python
EETOOL ?= eetool
FMNIST ?= fashion-mnist
DEMO_CHECKPOINT := eetool/demo/demo-resnet20-fashion-mnist.safetensors

RESULTS ?= results
BUDGETS := --budget 0.25 --budget 0.5 --budget 0.75

.PHONY: help test lint bench completions docs-reference docs demo-checkpoint demo-data e2cm-demo e2cm-fashion-mnist e2cm-run fixed-budget dataset-pruning weight-pruning segmentation segmentation-atlas segmentation-torchvision \
	budgeted budgeted-family budgeted-methods budgeted-small budgeted-scratch budgeted-msdnet budgeted-bundles budgeted-page

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
	$(PYTHON) bench/batch_norm_folding.py --resnet18
	$(PYTHON) bench/predict_throughput.py

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

# Budgeted classification against a family of plain networks (issue 25) on all of Fashion-MNIST: the plain family
# trained with the shipped recipe for EPOCHS (ResNet-20 at widths 4 to 16, ResNet-8 and ResNet-32 at width 16), every
# eetool method that makes a network cheaper, exits on the width-8 network, and early-exit networks trained from
# scratch; each evaluated on the test split with --compare on the plain family (the same interleaved rounds), then
# the results page docs/results/budgeted.md with its figure. Every step is a file: an interrupted run continues
# where it stopped (trainings and prunings from their last epoch or round). The groups run on their own too:
# budgeted-family, budgeted-methods, budgeted-small, budgeted-scratch, budgeted-msdnet, budgeted-page.
EPOCHS ?= 12
BUDGETED ?= $(RESULTS)/budgeted
BUDGETED_DATA ?= $(FMNIST)
BUDGETED_RECIPE ?= eetool/configs/train-resnet20-fashion-mnist.yaml
BUDGETED_REPEATS ?= 3
# torch threads of every timed evaluation (one: the setting of the wall-time figures elsewhere in these docs)
BUDGETED_THREADS ?= 1
BUDGETED_HEAD_EPOCHS ?= 6
BUDGETED_FINETUNE ?= 10000
# budgets (MACs, of the network the exits are on) from 0.1 to 1; on the width-8 network (0.254 of the width-16
# MACs) 0.2 to 0.8 reach overall costs of 0.05 to 0.2
BUDGETED_BUDGETS ?= 0.1 0.15 0.2 0.25 0.3 0.35 0.4 0.5 0.6 0.8 1
BUDGETED_SMALL_BUDGETS ?= 0.2 0.3 0.4 0.5 0.6 0.7 0.8
BUDGETED_SCRATCH_BUDGETS ?= $(BUDGETED_BUDGETS)
# MSDNet's first exit comes after its first block, at about a third of its MACs: no budget below it can be met
BUDGETED_MSDNET_BUDGETS ?= 0.35 0.4 0.5 0.6 0.7 0.8 0.9 1
# more fit-thresholds options for every fit, e.g. --search bisect
BUDGETED_FIT_ARGS ?=
BUDGETED_SCRATCH_NETS ?= resnet20-w16 resnet20-w8
BUDGETED_MSDNET_ARGS ?=
BUDGETED_PAGE ?= docs/results/budgeted.md
BUDGETED_FIGURE ?= docs/budgeted.png

BT := $(BUDGETED)
BT_FAMILY := $(foreach w,4 6 8 12 16,$(BT)/plain-resnet20-w$(w).safetensors) $(BT)/plain-resnet8-w16.safetensors \
	$(BT)/plain-resnet32-w16.safetensors
BT_REFERENCE := $(BT)/plain-resnet20-w16.safetensors
BT_SMALL := $(BT)/plain-resnet20-w8.safetensors
BT_SPLIT = $(subst -w, ,$(1))
BT_ARCH = --arch $(word 1,$(BT_SPLIT)) --arch-args '{width: $(word 2,$(BT_SPLIT))}'
BT_RESUME = $(if $(wildcard $@.resume.pt $@.resume),--resume)
BT_COMMON := --no-progress -q
BT_TRAIN = $(EETOOL) train --config $(BUDGETED_RECIPE) --data $(BUDGETED_DATA) --epochs $(EPOCHS) $(BT_COMMON)
# thresholds from class means alone, or (BT_FIT_ON) from a pass of the checkpoint with its heads on the training split
BT_FIT = $(EETOOL) fit-thresholds $(BUDGETED_FIT_ARGS) --force $(BT_COMMON)
BT_FIT_ON = $(BT_FIT) --data $(BUDGETED_DATA) --split train
# evaluate CHECKPOINT ($(1)) with the options $(2) beside the family (less CHECKPOINT itself), the load read before
# and after
BT_EVAL = uptime >> $(BT)/load.txt && $(EETOOL) evaluate -c $(1) $(2) --data $(BUDGETED_DATA) --split test \
	--repeats $(BUDGETED_REPEATS) --threads $(BUDGETED_THREADS) $(foreach c,$(filter-out $(1),$(BT_FAMILY)),--compare $(c)) $(BT_COMMON) \
	-o $@ --force && uptime >> $(BT)/load.txt
BT_METHODS := e2cm-softmax e2cm-nearest sdn entropy e2cm-sdn-and e2cm-sdn-or channel-50 channel-25
BT_SCRATCH := $(foreach n,$(BUDGETED_SCRATCH_NETS),joint-$(n) distill-$(n))
# every step's output is kept (make would delete the pattern rules' intermediate files)
.SECONDARY:

budgeted: budgeted-family budgeted-methods budgeted-small budgeted-scratch budgeted-msdnet budgeted-bundles ## every method against plain ResNets on Fashion-MNIST, and the results page (hours on 2 CPU cores: EPOCHS=12 trains seven plain and five early-exit networks)
	$(MAKE) budgeted-page

budgeted-family: $(BT_FAMILY) $(BT)/eval-family.yaml ## the plain family (ResNet-20 widths 4-16, ResNet-8 and -32), timed together
budgeted-methods: $(foreach m,$(BT_METHODS),$(BT)/eval-$(m).yaml) ## E²CM (both rules), SDN heads, entropy, E²CM+SDN, channel pruning on the width-16 ResNet-20
budgeted-small: $(BT)/eval-w8-e2cm.yaml $(BT)/eval-w8-sdn.yaml ## E²CM and SDN heads on the width-8 ResNet-20
budgeted-scratch: $(foreach n,$(BT_SCRATCH),$(BT)/eval-$(n).yaml) ## early-exit networks trained from scratch (joint, + self-distillation)
budgeted-msdnet: $(BT)/eval-msdnet.yaml ## the MSDNet-style network trained from scratch
budgeted-bundles: budgeted-family budgeted-methods budgeted-scratch ## the plain family and the SDN-headed networks exported (float, int8) and timed in onnxruntime
	$(PYTHON) reproduce/budgeted_bundles.py $(BT) --data $(BUDGETED_DATA) --rounds $(BUDGETED_REPEATS) \
	  --threads $(BUDGETED_THREADS)
budgeted-page: ## the results page and figure from the evaluations made so far
	$(PYTHON) reproduce/budgeted.py $(BT) --epochs $(EPOCHS) --data $(BUDGETED_DATA) --config $(BUDGETED_RECIPE) \
	  --threads $(BUDGETED_THREADS) --page $(BUDGETED_PAGE) --figure $(BUDGETED_FIGURE)

$(BT)/plain-%.safetensors:
	@mkdir -p $(@D)
	$(BT_TRAIN) $(call BT_ARCH,$*) -o $@ $(BT_RESUME) > $(@:.safetensors=.txt)

$(BT)/eval-family.yaml: $(BT_FAMILY)
	$(call BT_EVAL,$(BT_REFERENCE))

# E²CM with each prediction rule, SDN heads, entropy and E²CM+SDN on the width-16 ResNet-20 of the family
$(BT)/means-%.safetensors: $(BT_REFERENCE)
	$(EETOOL) calibrate-means -c $< --data $(BUDGETED_DATA) --split train --predict $* -o $@ --force $(BT_COMMON)
$(BT)/heads.safetensors: $(BT_REFERENCE)
	$(EETOOL) train-exits -c $< --data $(BUDGETED_DATA) --split train --epochs $(BUDGETED_HEAD_EPOCHS) \
	  -o $@ --force $(BT_COMMON)
$(BT)/thresholds-e2cm-%.yaml: $(BT)/means-%.safetensors
	$(BT_FIT) --means $< $(foreach b,$(BUDGETED_BUDGETS),--budget $(b)) -o $@
$(BT)/eval-e2cm-%.yaml: $(BT)/thresholds-e2cm-%.yaml $(BT_FAMILY)
	$(call BT_EVAL,$(BT_REFERENCE),--means $(BT)/means-$*.safetensors --thresholds $<)
$(BT)/thresholds-sdn.yaml $(BT)/thresholds-entropy.yaml: $(BT)/thresholds-%.yaml: $(BT)/heads.safetensors
	$(BT_FIT_ON) --method $* -c $(BT_REFERENCE) --exit-heads $< $(foreach b,$(BUDGETED_BUDGETS),--budget $(b)) -o $@
$(BT)/thresholds-e2cm-sdn-%.yaml: $(BT)/heads.safetensors $(BT)/means-nearest.safetensors
	$(BT_FIT_ON) --method e2cm+sdn --combine $* -c $(BT_REFERENCE) --exit-heads $< --means $(BT)/means-nearest.safetensors \
	  $(foreach b,$(BUDGETED_BUDGETS),--budget $(b)) -o $@
$(BT)/eval-sdn.yaml $(BT)/eval-entropy.yaml: $(BT)/eval-%.yaml: $(BT)/thresholds-%.yaml $(BT_FAMILY)
	$(call BT_EVAL,$(BT_REFERENCE),--exit-heads $(BT)/heads.safetensors --thresholds $<)
$(BT)/eval-e2cm-sdn-%.yaml: $(BT)/thresholds-e2cm-sdn-%.yaml $(BT_FAMILY)
	$(call BT_EVAL,$(BT_REFERENCE),--exit-heads $(BT)/heads.safetensors \
	  --means $(BT)/means-nearest.safetensors --thresholds $<)

# channel pruning to 50% (2 rounds) and 25% (4 rounds) of the MACs, each round removing 29.29% of what remains
$(BT)/channel-50.safetensors $(BT)/channel-25.safetensors: $(BT)/channel-%.safetensors: $(BT_REFERENCE)
	$(EETOOL) prune-weights -c $< --data $(BUDGETED_DATA) --split train --structure channel --amount 0.2929 \
	  --rounds $(if $(filter 50,$*),2,4) --finetune-samples $(BUDGETED_FINETUNE) -o $@ $(BT_RESUME) $(BT_COMMON)
$(BT)/eval-channel-%.yaml: $(BT)/channel-%.safetensors $(BT_FAMILY)
	$(call BT_EVAL,$<)

# exits on the width-8 ResNet-20 (E²CM with the rule calibrate-means picks per exit, and SDN heads)
$(BT)/w8-means.safetensors: $(BT_SMALL)
	$(EETOOL) calibrate-means -c $< --data $(BUDGETED_DATA) --split train -o $@ --force $(BT_COMMON)
$(BT)/w8-heads.safetensors: $(BT_SMALL)
	$(EETOOL) train-exits -c $< --data $(BUDGETED_DATA) --split train --epochs $(BUDGETED_HEAD_EPOCHS) \
	  -o $@ --force $(BT_COMMON)
$(BT)/w8-thresholds-e2cm.yaml: $(BT)/w8-means.safetensors
	$(BT_FIT) --means $< $(foreach b,$(BUDGETED_SMALL_BUDGETS),--budget $(b)) -o $@
$(BT)/w8-thresholds-sdn.yaml: $(BT)/w8-heads.safetensors
	$(BT_FIT_ON) --method sdn -c $(BT_SMALL) --exit-heads $< $(foreach b,$(BUDGETED_SMALL_BUDGETS),--budget $(b)) -o $@
$(BT)/eval-w8-e2cm.yaml: $(BT)/w8-thresholds-e2cm.yaml $(BT_FAMILY)
	$(call BT_EVAL,$(BT_SMALL),--means $(BT)/w8-means.safetensors --thresholds $<)
$(BT)/eval-w8-sdn.yaml: $(BT)/w8-thresholds-sdn.yaml $(BT_FAMILY)
	$(call BT_EVAL,$(BT_SMALL),--exit-heads $(BT)/w8-heads.safetensors --thresholds $<)

# early-exit networks trained from scratch with every exit in the loss (SDN's weights), and with the final exit
# teaching the early ones (self-distillation); the recipe's optimiser and schedule, EPOCHS epochs
BT_SCRATCH_TRAIN = $(EETOOL) train-exits --joint --from-scratch --config $(BUDGETED_RECIPE) --data $(BUDGETED_DATA) \
	--epochs $(EPOCHS) --exit-weights sdn $(BT_COMMON) --force
$(BT)/joint-%-heads.safetensors:
	@mkdir -p $(@D)
	$(BT_SCRATCH_TRAIN) $(call BT_ARCH,$*) --backbone-output $(BT)/joint-$*.safetensors -o $@
$(BT)/distill-%-heads.safetensors:
	@mkdir -p $(@D)
	$(BT_SCRATCH_TRAIN) $(call BT_ARCH,$*) --distill 0.5 --distill-temperature 3 \
	  --backbone-output $(BT)/distill-$*.safetensors -o $@
$(BT)/msdnet-heads.safetensors:
	@mkdir -p $(@D)
	$(BT_SCRATCH_TRAIN) --arch msdnet $(if $(BUDGETED_MSDNET_ARGS),--arch-args '$(BUDGETED_MSDNET_ARGS)') \
	  --backbone-output $(BT)/msdnet.safetensors -o $@
# (the scratch networks' names: joint-resnet20-w16, distill-resnet20-w16, ..., msdnet)
$(BT)/%-thresholds.yaml: $(BT)/%-heads.safetensors
	$(BT_FIT_ON) --method sdn -c $(BT)/$*.safetensors --exit-heads $< \
	  $(foreach b,$(if $(filter msdnet,$*),$(BUDGETED_MSDNET_BUDGETS),$(BUDGETED_SCRATCH_BUDGETS)),--budget $(b)) -o $@
$(BT)/eval-%.yaml: $(BT)/%-thresholds.yaml $(BT_FAMILY)
	$(call BT_EVAL,$(BT)/$*.safetensors,--exit-heads $(BT)/$*-heads.safetensors --thresholds $<)
