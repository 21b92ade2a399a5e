"""The SLO load tester behind `hyperrec loadtest` (see docs/loadtest.md).

results.py holds what a run measured (HDR histograms, statuses, timeline); runner.py sends open- or closed-loop
load from worker processes; scenario.py draws users, contexts and exclusions; slo.py judges a result; report.py
writes the HTML page and plots; capacity.py searches the highest rate meeting an SLO. Channels, request messages
and calls come from hyperrec.client (aio.py, admin.py): this package imports no gRPC.
"""
