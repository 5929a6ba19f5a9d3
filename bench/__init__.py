"""Benchmarks of mxsync and epnalert against the simulated facility; run with `python -m bench.run`."""
