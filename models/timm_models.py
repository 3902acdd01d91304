"""Backbones sslpipe adds to timm's model registry, so `create_backbone`, the eval stage and export
treat them like any timm model (`model.backbone: dcgan_discriminator` or `pixelcnn`).

- `dcgan_discriminator`: Radford et al.'s discriminator (strided 4x4 convolutions, LeakyReLU 0.2,
  batch norm on every layer but the first). `norm: layer` swaps batch norm for a per-sample norm,
  as WGAN-GP's critic needs (Gulrajani et al. 2017: the gradient penalty is per sample).
- `pixelcnn`: van den Oord et al.'s PixelCNN (masked 7x7 type-A input convolution, residual blocks
  of masked 3x3 type-B convolutions, 256-way logits per sub-pixel); its pooled features are the
  residual stack's output.
- `resnet{10,18,34}_s{1,2}_w{16,32,64}`: timm ResNets for small images (28-64 px). timm's ImageNet
  stem (7x7 stride-2 conv + max-pool) divides the side by 4 before the first block, so a 28 px image
  reaches the last stage at 1x1. These take a 3x3 stem of stride 1 (`s1`, the CIFAR ResNet of
  solo-learn and lightly's `ResNetGenerator`) or stride 2 (`s2`, a quarter of s1's cost) and no
  max-pool, with stage widths w, 2w, 4w, 8w (`w64` is ResNet's own width; the stem stays timm's 64). Every other timm ResNet
  keyword (zero_init_last, drop_path_rate, ...) passes through.

Both are created headless (num_classes=0) and never with pretrained weights, like every backbone here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
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


SMALL_RESNET_LAYERS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


class SmallImageResNet(ResNet):
    """timm's ResNet (BasicBlock) with a 3x3 stem of stride `stem_stride` and no max-pool.

    Subclassing keeps timm's forward, `forward_intermediates`, `reset_classifier` and parameter
    names, so checkpoints, dense tasks and `timm.create_model` treat it as any ResNet.
    """

    def __init__(self, depth: int = 18, stem_stride: int = 1, width: int = 64, in_chans: int = 3, **kwargs):
        if depth not in SMALL_RESNET_LAYERS or stem_stride not in (1, 2):
            raise ValueError(f"depth={depth} must be one of {sorted(SMALL_RESNET_LAYERS)} and stem_stride={stem_stride} 1 or 2")
        channels = kwargs.pop("channels", None) or [width * 2**i for i in range(4)]
        super().__init__(BasicBlock, SMALL_RESNET_LAYERS[depth], in_chans=in_chans, channels=channels, **kwargs)
        # timm's single-conv stem is 64 wide whatever the stage widths (as with `channels=` on its resnet18).
        self.conv1 = nn.Conv2d(in_chans, self.bn1.num_features, 3, stride=stem_stride, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm initializes convs
        self.maxpool = nn.Identity()
        # The stem reduces by its stride alone (timm's by 2, then 4 after the pool): every stage's
        # reduction shrinks by 4 / stem_stride.
        for info in self.feature_info:
            info["reduction"] = stem_stride if info["module"] == "act1" else info["reduction"] * stem_stride // 4


def _small_resnet(depth: int, stem_stride: int, width: int):
    def create(pretrained: bool = False, **kwargs) -> SmallImageResNet:
        return _create(SmallImageResNet, pretrained, {"depth": depth, "stem_stride": stem_stride, "width": width, **kwargs})

    create.__name__ = f"resnet{depth}_s{stem_stride}_w{width}"
    create.__doc__ = f"ResNet-{depth} for small images: 3x3 stride-{stem_stride} stem, no max-pool, widths {width}-{8 * width}."
    create.__module__ = __name__
    return create


for _depth in SMALL_RESNET_LAYERS:
    for _stride in (1, 2):
        for _width in (16, 32, 64):
            _fn = _small_resnet(_depth, _stride, _width)
            globals()[_fn.__name__] = register_model(_fn)
