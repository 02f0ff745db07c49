"""CPU benchmarks of the pipeline's real code paths; results in benchmarks/results/, BENCHMARKS.md.

Run everything with ``make bench`` (``python -m benchmarks``); ``BENCH_QUICK=1`` (``--quick``)
runs tiny sizes into benchmarks/results/quick/ to check the scripts, not to quote numbers.
"""
