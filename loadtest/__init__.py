"""Load tester for latency SLOs (open-loop load, HDR percentiles, SLO verdicts).

Not built yet: tracked by its own issue. `scripts/latency_probe.py` is the
interim sequential latency probe.
"""
