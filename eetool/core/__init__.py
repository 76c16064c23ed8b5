"""The core every task builds on: errors, artifacts and provenance, checkpoints, data loading, the cost model,
options and the command decorator, distributed runs, interrupts and reporting. It imports no task package
(``classification``, ``segmentation``, ``lm``); tasks plug in through the registries in ``eetool.core.registry``."""
