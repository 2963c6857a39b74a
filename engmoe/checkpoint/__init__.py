"""Checkpoints: everything that reads or writes engmoe's on-disk weights.

* ``sharded`` — save / load / find a run's sharded checkpoints (megatron-core ``dist_checkpointing``);
* ``full`` — the same checkpoints as full tensors in one process (HF export/import, evaluation);
* ``gather`` — full, unsharded parameters (or gradients) by global name from any layout (tests, inspection);
* ``train_state`` — the trainer's progress saved beside the weights; ``tokenizer`` — a checkpoint's tokenizer.

Global parameter names (layers by global number) are ``engmoe.names``.

Kept import-free here so that ``engmoe --help`` does not load torch.
"""
