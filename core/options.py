"""The option types that pretext tasks and the backbone factory read (sections `model` and `optim`
of a run's configuration; `pipeline.config.Config` holds them with the runner's own sections)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name; created with num_classes=0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # for a global batch of 256; scaled linearly with global_batch_size
    momentum: float = 0.9  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw; DCGAN uses [0.5, 0.999], WGAN-GP [0.0, 0.9]
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 50
