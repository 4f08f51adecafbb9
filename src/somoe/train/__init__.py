"""Training: the Trainer, its callbacks, checkpoints, optimizer and distributed plumbing."""
