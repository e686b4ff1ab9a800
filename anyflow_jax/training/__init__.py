"""Training: train state, per-stage steps, the loop, optimiser, EMA."""
