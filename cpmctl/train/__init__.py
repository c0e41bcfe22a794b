"""Training: the loop, its engines, and checkpoints (ARCHITECTURE §6)."""
