"""Early exits and pruning for image classifiers: E²CM class means, trained exit heads and their rules, wall-time
exit costs, dataset pruning (EEPrune and baselines) and weight and channel pruning."""
