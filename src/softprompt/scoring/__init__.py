"""The scoring wing: the one scorer (scorer.py: target and label-word log-probabilities, which picks its one-token
fast path itself), a data set's label scores and task metrics (evaluate.py, metrics.py), decoding (generate.py),
batches in which each row has its own prompt (mixed.py), ensembles and the confusion-matrix plot."""
