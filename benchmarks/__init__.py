"""Benchmarks and probes of hyperrec (make bench, make scale); not part of the product."""
