"""Data preparation: datatrove steps and the ``engmoe-data`` commands (tokenizer, tokenize, filter, blends,
chat rendering, the demo corpus). Steps live in the installed package because datatrove's SLURM executor
pickles them by module path."""
