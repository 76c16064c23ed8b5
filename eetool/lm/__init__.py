"""Class-aware early-exit heads for causal language models (thesis chapter 5).

``models`` loads a Hugging Face causal LM (a local folder, a GGUF file or the demo SmolLM2-135M),
``corpus`` cuts plain text into contexts, ``stats`` gathers per-token statistics of the hidden state
after decoder block K, ``head`` turns them into the exit head of eq. 5.4-5.8, ``evaluate`` measures
next-token accuracy and perplexity, ``temperature`` fits a temperature per head on held-out tokens, and
``curve`` gives the accuracy-cost curve of a confidence threshold on an exit head.
transformers is an optional extra (``eetool[lm]``), imported lazily.
"""
