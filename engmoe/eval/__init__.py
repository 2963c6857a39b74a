"""Evaluation of checkpoints in one process: perplexity per held-out set, an lm-evaluation-harness adapter
and a passkey (needle-in-a-haystack) probe.

Modules: ``model`` (load a checkpoint for inference), ``scoring`` (log-likelihoods, greedy generation),
``datasets`` + ``perplexity``, ``harness`` (lm-eval ``engmoe`` model), ``needle``, ``cli``. Kept import-free
here so that ``engmoe --help`` does not load torch.
"""
