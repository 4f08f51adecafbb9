"""Settings of ``somoe transition`` (seed 004): dense phase 1, upcycling, MoE phase 2.

Phase 1 is the run config itself with ``model.ffn=dense`` (``train.*`` as
given); phase 2 trains the upcycled MoE (``model.moe.*``) with the overrides
below and a fresh AdamW. Ordinary ``somoe train`` ignores this section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .loading import ConfigError


@dataclass
class TransitionConfig:
    moe_steps: int = 0  # phase-2 optimizer steps; 0 = the same as phase 1 (train.max_steps)
    moe_lr: float = 0.0  # phase-2 peak learning rate; 0 = train.lr (seed 004: 1e-4 after 3e-4)
    moe_warmup_steps: int = 0  # phase-2 warmup steps (the boundary step itself is never warmed up from 0)
    moe_schedule: Literal["same", "cosine", "onecycle", "constant", "linear"] = "same"  # same = train.schedule
    probe_sequences: int = 8  # validation windows of the frozen equivalence probe
    tolerance: float = 1e-4  # max |logit_dense - logit_moe| (fp32) the upcycled model may show
    sample_prompts: list[str] = field(default_factory=lambda: [
        "Once upon a time there was", "The little dog", "Lily and Ben went to the park"])
    sample_tokens: int = 40  # greedy tokens per prompt after each phase

    def validate(self) -> None:
        if self.moe_steps < 0 or self.moe_lr < 0 or self.moe_warmup_steps < 0:
            raise ConfigError("transition.moe_steps, moe_lr and moe_warmup_steps must be >= 0")
        if self.probe_sequences <= 0 or self.tolerance <= 0:
            raise ConfigError("transition.probe_sequences and transition.tolerance must be positive")
        if self.sample_tokens < 0:
            raise ConfigError(f"transition.sample_tokens={self.sample_tokens} must be >= 0")
