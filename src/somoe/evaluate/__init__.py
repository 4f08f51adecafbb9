"""Evaluating trained runs: load a run folder or checkpoint (``runs``) and score it (``scoring``).

The loss/ppl/bpb arithmetic itself lives one layer down in ``somoe.metrics``, which training uses too.
"""
