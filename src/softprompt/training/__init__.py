"""The training wing: the loop (loop.py) and its setup steps, checkpoints and the run's files, search, distillation,
trackers and signals."""
