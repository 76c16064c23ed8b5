"""The exit methods ``fit-thresholds --method`` and ``evaluate`` know, registered by name (torch-free).

Each registration says what the method reads (``reads``: the class means of ``calibrate-means``, the exit heads of
``train-exits``, or, for a segmentation network, the checkpoint and data), where its rule is made or fitted
(the target: for classification a factory ``(method, means, heads, combine, device) -> ExitRule``; for
segmentation the function that fits its thresholds), how its help reads, and, for a rule on exit heads, how it
scores (``confidence``: a head's largest softmax probability, or one minus its normalised entropy; ``with_means``:
combined with E²CM's confidence). Adding a method is its implementation and one registration here.

Every classification rule follows ``ExitRule`` (eetool.classification.rules): at exit j it gives a confidence in
[0, 1] and a prediction per sample, and its cost model prices the backbone, heads and distances it computes;
thresholds are fitted by the one budget search of ``eetool.core.budget_search``.
"""

from __future__ import annotations

from eetool.core.registry import CLASSIFICATION, SEGMENTATION, Registry

MEANS, HEADS = "means", "exit-heads"

EXIT_METHODS = Registry("exit method")
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
