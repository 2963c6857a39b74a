"""Entry points that start training: ``python -m engmoe.launch.pretrain`` (under torchrun)."""
