"""Learning-rate schedules as LambdaLR multipliers."""
from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warm-up to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps` (or constant)."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier
