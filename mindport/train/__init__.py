"""Training: configuration, optimiser, mixed precision, data, checkpoints and the loop."""
