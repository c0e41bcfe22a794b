"""Training: the loop, its engines, and checkpoints (docs/design.md §6)."""
