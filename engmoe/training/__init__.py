"""Training: schedules, optimizer + gradient sync, checkpoints, metrics, the trainer loop."""
