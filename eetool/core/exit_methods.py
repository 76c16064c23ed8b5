"""The exit methods ``fit-thresholds --method`` and ``evaluate`` know, registered by name (torch-free): what each
reads, where its rule is made or its thresholds fitted, its help and how it scores. Adding a method is its
implementation and one registration here.

How: docs/development.md#adding-an-exit-method
"""

from __future__ import annotations

from collections.abc import Callable

from eetool.core.registry import CLASSIFICATION, SEGMENTATION, Registry

MEANS, HEADS = "means", "exit-heads"

# A classification method's rule factory, or a segmentation method's fitting function: callers know which.
EXIT_METHODS: Registry[Callable[..., object]] = Registry("exit method")
EXIT_METHODS.register("e2cm", "eetool.classification.rules:means_rule", reads=(MEANS,), help="e2cm")
EXIT_METHODS.register("sdn", "eetool.classification.rules:heads_rule", reads=(HEADS,),
                      help="sdn (largest probability of a head)", confidence="max-probability")
EXIT_METHODS.register("entropy", "eetool.classification.rules:heads_rule", reads=(HEADS,),
                      help="entropy (of a head's prediction)", confidence="normalised-entropy")
EXIT_METHODS.register("e2cm+sdn", "eetool.classification.rules:heads_rule", reads=(MEANS, HEADS),
                      help="e2cm+sdn", confidence="max-probability", with_means=True)
# pixel exits of segmentation networks
SEGMENTATION_FIT = "eetool.segmentation.threshold_fitting:fit_segmentation_thresholds"
EXIT_METHODS.register("cbt", SEGMENTATION_FIT, task=SEGMENTATION, help="cbt (a threshold per class)")
EXIT_METHODS.register("cbt-ns", SEGMENTATION_FIT, task=SEGMENTATION, help="cbt-ns (per exit and class)")
EXIT_METHODS.register("adp-c", SEGMENTATION_FIT, task=SEGMENTATION, help="adp-c (one)")

CLASSIFICATION_METHODS = EXIT_METHODS.names(CLASSIFICATION)
SEGMENTATION_METHODS = EXIT_METHODS.names(SEGMENTATION)


def reads(method: str, artifact: str) -> bool:
    """Whether a registered classification method reads ``artifact`` (MEANS or HEADS)."""
    return artifact in EXIT_METHODS.get(method).info.get("reads", ())


def combines_with_means(method: str) -> bool:
    """Whether a method combines a head's confidence with E²CM's (``--combine`` applies)."""
    return bool(EXIT_METHODS.get(method).info.get("with_means"))


def method_help() -> str:
    """--method's help, listing every registered method."""
    def listed(task: str) -> str:
        shown = [e.help or e.name for e in EXIT_METHODS if e.task == task]
        return ", ".join(shown[:-1]) + " or " + shown[-1]

    return f"{listed(CLASSIFICATION)}; for segmentation networks {listed(SEGMENTATION)}."
