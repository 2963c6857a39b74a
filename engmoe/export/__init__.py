"""Hugging Face export/import: engmoe checkpoints (any parallel layout) ↔ safetensors + config + tokenizer.

Modules: ``architectures`` (which HF class, config.json), ``convert`` (tensor mapping), ``checkpoint_io``
(engmoe checkpoints as full tensors in one process), ``safetensors_io``, ``tokenizer_files`` and
``chat_template``, ``hf_export`` / ``hf_import`` (the two commands), ``cli``. Kept import-free here so that
``engmoe --help`` does not load torch.
"""
