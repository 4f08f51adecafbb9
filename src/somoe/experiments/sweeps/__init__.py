"""Shipped sweeps (seed 001's ablations A, B, D as CPU and GPU variants) and the sweep runner.

A sweep file is YAML::

    name: ablation_a_cpu
    description: one line
    preset: cpu_some            # the base preset (or `config: FILE`)
    overrides: [train.max_steps=200]     # applied to every run
    runs:                       # named runs, each a list of overrides ...
      e32_k4: [model.some.num_experts=32, model.some.top_k=4]
    grid:                       # ... and/or a cartesian product of values
      model.some.top_k: [4, 8]

``somoe sweep NAME_OR_FILE`` trains the runs one after another into
``OUT/<run>`` (resumable), then writes the comparison report into ``OUT/compare``.
"""

from __future__ import annotations

from .runner import Sweep, SweepRun, list_sweeps, load_sweep, run_status, run_sweep

__all__ = ["Sweep", "SweepRun", "list_sweeps", "load_sweep", "run_status", "run_sweep"]
