"""Momentum (EMA) copies of networks: MoCo's key encoder, BYOL's target, DINO's teacher."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` that `ema_update_` keeps trailing it (no gradients, never wrapped by DDP)."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter; buffers
    (batch-norm running statistics) are copied, as in MoCo and BYOL."""
    for p_online, p_target in zip(online.parameters(), target.parameters()):
        p_target.lerp_(p_online.detach(), 1 - momentum)
    for b_online, b_target in zip(online.buffers(), target.buffers()):
        b_target.copy_(b_online)


def cosine_schedule(start: float, end: float, step: int, total_steps: int) -> float:
    """`start` at step 0 to `end` at `total_steps` along a half cosine (BYOL's momentum
    1 - (1 - base) (cos(pi k / K) + 1) / 2, DINO's teacher momentum and weight decay)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2
