"""Workflows built on the trainer: the main job (``quickstart``), dense→MoE ``upcycle``, the
dense-then-SoME ``transition`` and the ablation ``sweeps``."""
