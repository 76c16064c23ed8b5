"""Class-aware early-exit heads for causal language models (thesis chapter 5): loading the models, the corpus,
the heads and their statistics, evaluation, temperature, the accuracy-cost curve and training. transformers
is an optional extra (``eetool[lm]``), imported lazily.

Method: docs/language-models.md
"""
