"""A run's summary: ``summary.txt`` and ``metrics.png`` from its ``metrics.jsonl``, and comparison tables."""
