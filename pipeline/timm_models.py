"""Backbones sslpipe adds to timm's model registry, so `create_backbone`, the eval stage and export
treat them like any timm model (`model.backbone: dcgan_discriminator` or `pixelcnn`).

- `dcgan_discriminator`: Radford et al.'s discriminator (strided 4x4 convolutions, LeakyReLU 0.2,
  batch norm on every layer but the first). `norm: layer` swaps batch norm for a per-sample norm,
  as WGAN-GP's critic needs (Gulrajani et al. 2017: the gradient penalty is per sample).
- `pixelcnn`: van den Oord et al.'s PixelCNN (masked 7x7 type-A input convolution, residual blocks
  of masked 3x3 type-B convolutions, 256-way logits per sub-pixel); its pooled features are the
  residual stack's output.

Both are created headless (num_classes=0) and never with pretrained weights, like every backbone here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor, nn

NORMS = ("batch", "layer", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # LayerNorm over (C, H, W) of each sample, per-channel affine
    return nn.Identity()


class DCGANDiscriminator(nn.Module):
    """`depth` stride-2 4x4 convolutions doubling the width from `width`; pooled features are the
    global average of the last map, like any timm CNN."""

    def __init__(self, in_chans: int = 3, num_classes: int = 0, width: int = 64, depth: int = 3, norm: str = "batch",
                 global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: choose from {list(NORMS)}")
        if depth < 1:
            raise ValueError(f"depth={depth}: must be >= 1")
        stages, dim, self.feature_info = [], in_chans, []
        for i in range(depth):
            out = width * 2**i
            stages.append(nn.Sequential(
                nn.Conv2d(dim, out, 4, stride=2, padding=1, bias=i == 0 or norm == "none"),
                _norm("none" if i == 0 else norm, out),  # Radford et al.: no norm on the input layer
                nn.LeakyReLU(0.2, inplace=True),
            ))
            self.feature_info.append({"num_chs": out, "reduction": 2 ** (i + 1), "module": f"stages.{i}"})
            dim = out
        self.stages = nn.Sequential(*stages)
        self.num_features = dim
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_classes = num_classes
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)  # Radford et al.'s initialisation

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3)) if self.global_pool == "avg" else x.amax((2, 3))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature-map interface: the last `indices` stage outputs (or those listed)."""
        count = len(self.stages)
        wanted = range(count - (indices or count), count) if not isinstance(indices, (list, tuple)) else [i % count for i in indices]
        wanted = set(wanted)
        intermediates = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in wanted:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)


def _channel_groups(channels: int, data_channels: int) -> Tensor:
    """Which colour channel (0..data_channels-1) each of `channels` feature channels belongs to."""
    return torch.arange(channels) * data_channels // channels


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only pixels above, and left on the same row (van den Oord et al.
    2016). At the centre tap, feature channels are split into colour groups (R, G, B): type A
    lets a group see only earlier colours of the centre pixel, type B also its own group."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str, data_channels: int):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        mask = torch.zeros_like(self.weight)
        mask[:, :, :centre, :] = 1
        mask[:, :, centre, :centre] = 1
        out_group = _channel_groups(out_channels, data_channels)[:, None]
        in_group = _channel_groups(in_channels, data_channels)[None, :]
        mask[:, :, centre, centre] = (out_group > in_group if mask_type == "A" else out_group >= in_group).float()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class PixelCNNBlock(nn.Module):
    """PixelCNN residual block: 1x1 (2h -> h), masked 3x3 type B, 1x1 (h -> 2h), ReLU before each."""

    def __init__(self, channels: int, data_channels: int):
        super().__init__()
        half = channels // 2
        self.body = nn.Sequential(
            nn.ReLU(), MaskedConv2d(channels, half, 1, "B", data_channels),
            nn.ReLU(), MaskedConv2d(half, half, 3, "B", data_channels),
            nn.ReLU(), MaskedConv2d(half, channels, 1, "B", data_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class PixelCNNNet(nn.Module):
    """Autoregressive density model over 8-bit sub-pixels: `logits(x)` gives (B, C, 256, H, W),
    where the logits of pixel (c, i, j) depend only on pixels before it in raster order (rows,
    then columns, then colour channels). Pooled features: the residual stack's output, averaged."""

    def __init__(self, in_chans: int = 1, num_classes: int = 0, width: int = 64, depth: int = 6, drop_rate: float = 0.0,
                 global_pool: str = "avg"):
        super().__init__()
        channels = 2 * width * in_chans  # divisible into colour groups
        self.in_chans = in_chans
        self.stem = MaskedConv2d(in_chans, channels, 7, "A", in_chans)
        self.blocks = nn.Sequential(*[PixelCNNBlock(channels, in_chans) for _ in range(depth)])
        self.output = nn.Sequential(
            nn.ReLU(), MaskedConv2d(channels, channels, 1, "B", in_chans),
            nn.ReLU(), MaskedConv2d(channels, 256 * in_chans, 1, "B", in_chans),
        )
        self.num_features = channels
        self.num_classes = num_classes
        self.feature_info = [{"num_chs": channels, "reduction": 1, "module": "blocks"}]
        self.head = nn.Linear(channels, num_classes) if num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def logits(self, x: Tensor) -> Tensor:
        """(B, C, 256, H, W) logits of every sub-pixel's 8-bit value given the pixels before it."""
        out = self.output(self.forward_features(x))
        b, _, h, w = out.shape
        return out.view(b, self.in_chans, 256, h, w)


def _create(cls, pretrained: bool, kwargs: dict) -> nn.Module:
    """timm's entry point. `pretrained=True` loads only a local file given as
    `pretrained_cfg_overlay=dict(file=...)` (what `sslpipe export` writes and documents in
    backbone.json); these models have no published weights and nothing is ever downloaded."""
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    for key in ("pretrained_cfg", "cache_dir"):
        kwargs.pop(key, None)
    model = cls(**kwargs)
    if pretrained:
        if not overlay.get("file"):
            raise ValueError(f"{cls.__name__} has no published weights: pass pretrained_cfg_overlay=dict(file=PATH) "
                             "with a file written by `sslpipe export`")
        from safetensors.torch import load_file

        model.load_state_dict(load_file(overlay["file"]), strict=True)
    return model


@register_model
def dcgan_discriminator(pretrained: bool = False, **kwargs) -> DCGANDiscriminator:
    return _create(DCGANDiscriminator, pretrained, kwargs)


@register_model
def pixelcnn(pretrained: bool = False, **kwargs) -> PixelCNNNet:
    return _create(PixelCNNNet, pretrained, kwargs)
