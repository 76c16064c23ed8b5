"""Early-exit semantic segmentation (thesis chapter 3): pixel-level exits (ADP-C) and class-based thresholds (CBT).

``data`` holds the segmentation sources (Fashion-MNIST scenes, a safetensors file of images and masks;
``atlas`` the brain-atlas slices, read by ``nifti``; ``folder`` folders of PNG pairs), ``model`` the early-exit
network and its masked inference, ``tv`` torchvision's segmentation networks with exit heads (trained by
``exit_training``), ``thresholds`` CBT, CBT-ns and ADP-C, ``metrics``
mIoU and pixel accuracy, ``commands`` what `fit-thresholds` and `evaluate` do for a segmentation checkpoint.
Shared modules only dispatch here.
"""

from __future__ import annotations

IGNORE = -1  # the ignore label in memory: masks are int16, -1 where a pixel has no ground truth
