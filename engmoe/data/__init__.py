"""What training reads: the tokenizer, megatron indexed datasets and blends, packed chat sequences."""
