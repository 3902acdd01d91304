"""timm backbones: any model name, created headless (num_classes=0) and never with pretrained weights."""
from __future__ import annotations

import difflib

import timm
from torch import nn

from core.errors import ConfigError
from core.options import ModelConfig
from models import timm_models  # noqa: F401  (registers sslpipe's own backbones with timm)


def check_backbone(cfg: ModelConfig) -> None:
    if not timm.is_model(cfg.backbone):
        close = difflib.get_close_matches(cfg.backbone, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"model.backbone: unknown timm model {cfg.backbone!r}; close names: {close} (see timm.list_models())")
    for key in ("num_classes", "in_chans", "pretrained"):
        if key in cfg.backbone_kwargs:
            raise ConfigError(f"model.backbone_kwargs.{key} is set by the pipeline; remove it")


def create_backbone(cfg: ModelConfig, in_chans: int) -> nn.Module:
    """A timm model returning pooled features of size `model.num_features` (no classifier)."""
    check_backbone(cfg)
    try:
        return timm.create_model(cfg.backbone, pretrained=False, num_classes=0, in_chans=in_chans, **cfg.backbone_kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.backbone_kwargs {cfg.backbone_kwargs} rejected by timm model {cfg.backbone!r}: {err}") from err
