"""Training: the loop, checkpoints with exact resume, EMA, differentiable augmentation, DDP helpers."""
