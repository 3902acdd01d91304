"""Heads shared by pretext tasks (composable parts, not superclasses)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class MLPHead(nn.Sequential):
    """Linear -> BatchNorm -> ReLU blocks, then a final Linear (hidden_dims=() gives a linear head):
    the projectors and predictors of SimCLR, BYOL, Barlow Twins and VICReg. `last_norm` adds a
    BatchNorm after the final Linear (SimSiam's projector; its bias is then redundant and dropped)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: tuple[int, ...] | list[int] = (512,), last_norm: bool = False):
        layers: list[nn.Module] = []
        dim = in_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            dim = hidden
        layers.append(nn.Linear(dim, out_dim, bias=not last_norm))
        if last_norm:
            layers.append(nn.BatchNorm1d(out_dim))
        super().__init__(*layers)


def feature_maps(encoder: nn.Module, images: Tensor, levels: int = 1) -> list[Tensor]:
    """The last `levels` feature maps of a timm backbone (coarsest last), through its
    `forward_intermediates` (timm's successor to `features_only`, which keeps the model's own
    parameter names, so the eval stage can load the weights into a plain timm model)."""
    if not hasattr(encoder, "forward_intermediates"):
        raise ValueError(f"backbone {type(encoder).__name__} has no forward_intermediates(): dense tasks need a timm model that exposes feature maps")
    # norm=True: models with a final norm (ViT, ConvNeXt) apply it, so it is trained (DDP refuses
    # parameters without gradients) and matches the pooled features the eval stage scores.
    return encoder.forward_intermediates(images, indices=levels, norm=True, intermediates_only=True)


class ConvDecoder(nn.Module):
    """Upsamples a (B, C, h, w) feature map to (B, out_chans, H, W): 2x nearest-upsampling + 3x3
    conv + BatchNorm + ReLU blocks until the map reaches the output size, then a 1x1 projection
    (the shared decoder of the reconstruction tasks)."""

    def __init__(self, in_dim: int, in_size: int, out_chans: int, out_size: int, width: int = 128, min_width: int = 32):
        super().__init__()
        self.out_size = out_size
        self.inp = nn.Sequential(nn.Conv2d(in_dim, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        blocks, size, dim = [], max(in_size, 1), width
        while size < out_size:
            narrower = max(dim // 2, min_width)
            blocks.append(nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(dim, narrower, 3, padding=1, bias=False), nn.BatchNorm2d(narrower), nn.ReLU(inplace=True),
            ))
            size, dim = size * 2, narrower
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(dim, out_chans, 1)

    @classmethod
    def to_image(cls, encoder: nn.Module, out_chans: int, image_size: int, width: int = 128) -> "ConvDecoder":
        """A decoder from a timm backbone's last feature map back to (out_chans, image_size, image_size)."""
        reduction = encoder.feature_info[-1]["reduction"] if hasattr(encoder, "feature_info") else 32
        return cls(encoder.num_features, math.ceil(image_size / reduction), out_chans, image_size, width)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.inp(x))
        if x.shape[-1] != self.out_size or x.shape[-2] != self.out_size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return self.out(x)


class ConvTransposeDecoder(nn.Module):
    """DCGAN generator (Radford et al. 2016), also the VAE's decoder: a latent vector is projected
    and reshaped to a (width * 2^(n-1), s, s) map (s >= 4), then n fractionally strided 4x4
    convolutions double its side up to `image_size`, halving the width, with batch norm and ReLU on
    all but the last; `output="tanh"` bounds the last (GAN images in [-1, 1]), "linear" leaves
    distribution parameters (VAE)."""

    def __init__(self, latent_dim: int, out_chans: int, image_size: int, width: int = 64, output: str = "tanh"):
        super().__init__()
        if output not in ("tanh", "linear"):
            raise ValueError(f"output={output!r}: choose 'tanh' or 'linear'")
        size, ups = image_size, 0
        while size % 2 == 0 and size // 2 >= 4:
            size, ups = size // 2, ups + 1
        if ups == 0:
            raise ValueError(f"image_size={image_size}: the generator doubles a map of at least 4 px, so the size must be even and >= 8")
        self.latent_dim, self.start_size = latent_dim, size
        dim = width * 2 ** (ups - 1)
        self.start_dim = dim
        self.project = nn.Sequential(nn.Linear(latent_dim, dim * size * size, bias=False), nn.BatchNorm1d(dim * size * size), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        for _ in range(ups - 1):
            blocks += [nn.ConvTranspose2d(dim, dim // 2, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(dim // 2), nn.ReLU(inplace=True)]
            dim //= 2
        blocks.append(nn.ConvTranspose2d(dim, out_chans, 4, stride=2, padding=1))
        if output == "tanh":
            blocks.append(nn.Tanh())
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: Tensor) -> Tensor:
        return self.blocks(self.project(z).view(len(z), self.start_dim, self.start_size, self.start_size))
