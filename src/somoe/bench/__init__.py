"""``somoe bench``: speed and memory measurements, each against a reference run in the same process.

Every bench returns a list of row dicts (one per measurement) with at least
``impl``, ``dtype``, the shape fields, ``ms`` or ``tokens_per_s``, and
``ratio`` against the row named by ``reference`` (same shape, same dtype,
measured interleaved with it). Speeds also carry model FLOP/s as a fraction
of a plain matmul measured in the same run (``mfu``). ``somoe bench ... --json``
prints ``{"rows": [...]}``; docs/benchmarks.md records the figures.
"""
