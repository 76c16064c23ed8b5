"""Early-exit semantic segmentation (thesis chapter 3): the sources, the eeseg network and torchvision networks
with exit heads and their masked inference, CBT, CBT-ns and ADP-C thresholds, metrics, and what
`calibrate-means`, `fit-thresholds`, `train-exits` and `evaluate` do for a segmentation checkpoint.

Method: docs/segmentation.md, docs/methods/segmentation-inference.md
"""

from __future__ import annotations

IGNORE = -1  # the ignore label in memory: masks are int16, -1 where a pixel has no ground truth
