"""The benchmark suite: `make bench` (python -m bench.run); see bench/run.py."""
