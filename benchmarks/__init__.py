"""The benchmarks: scripts that measure softprompt against its peers, and `common/`, what they share.

Each script runs either way from the repository root: `python benchmarks/train_speed.py` or
`python -m benchmarks.train_speed`. Scripts import only `benchmarks.common`, `benchmarks.flops` and the scaling
halves, never each other's entry points."""
