"""Measurements behind ``eigendamage bench kfac|eigh|prune-step`` and ``benchmarks/``.

Kept out of the library's core: they build models by name, time and compare, and report
tables.  :mod:`.workloads` holds the protocol every benchmark follows.
"""
