"""Speed and memory benchmarks, each against a reference measured in the same run.

Run them all with ``python -m benchmarks.run`` (see docs/performance.md).
"""
