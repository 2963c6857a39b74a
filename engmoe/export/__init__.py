"""Hugging Face export/import: engmoe checkpoints (any parallel layout) ↔ safetensors + config + tokenizer.

Modules: ``architectures`` (which HF class, config.json), ``convert`` (tensor mapping), ``safetensors_io``,
``tokenizer_files``, ``hf_export`` / ``hf_import`` (the two commands), ``cli``. Checkpoints are read and
written as full tensors by ``engmoe.checkpoint.full``; the chat template is ``engmoe.data.chat_template``.
Kept import-free here so that ``engmoe --help`` does not load torch.
"""
