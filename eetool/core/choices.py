"""The fixed choices of options, free of torch: the CLI completes them (without importing torch) and the
modules that implement them import their names from here, so the two lists cannot drift apart."""

from __future__ import annotations

SPLITS = ("train", "test")
EXIT_SELECTIONS = ("every", "half", "quartiles")  # or module names
COMBINES = ("and", "or")
SEARCHES = ("greedy", "bisect")
DECIDE_AT = ("pixel", "feature")  # segmentation exits: decide per image pixel (the thesis) or per head position
SEARCH_OVER = ("alpha", "beta", "both")  # fit-thresholds --method cbt|cbt-ns --budget: what the search varies
OVERHEADS = ("analytic", "measured")  # fit-thresholds: exit costs in MACs, or in measured wall time
HEAD_KINDS = ("sdn", "branchy")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
EEPRUNE_FAMILY = ("eeprune", "eeprune-loss", "eeprune-soft")
PRUNING_BASELINES = ("random", "el2n", "forgetting", "svp")
EXIT_LOCATIONS = ("before", "mid", "after")  # or a module name
PRUNING_APPROACHES = ("joint", "ordered")
FINAL_LAYER_PHASES = ("both", "backbone")  # ordered weight pruning: the phases the final layer takes part in
WEIGHT_STRUCTURES = ("unstructured", "channel")
