"""Denoising autoencoder (Vincent, Larochelle, Bengio & Manzagol, "Extracting and Composing Robust
Features with Denoising Autoencoders", ICML 2008): reconstruct the clean image from a corrupted one,
so the encoder must capture the structure of the data rather than copy pixels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.base import PretextTask
from pretext.heads import ConvDecoder, feature_maps

CORRUPTIONS = ("gaussian", "masking")


class Corrupt:
    """Per-sample transform: (corrupted image, clean image).

    "gaussian" adds N(0, noise^2) in normalized units; "masking" sets a random `noise` fraction of
    pixels (all channels together) to 0, the data mean after normalization (Vincent et al.'s
    masking noise).
    """

    def __init__(self, corruption: str, noise: float):
        self.corruption, self.noise = corruption, noise

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        clean = sample["image"]
        if self.corruption == "gaussian":
            return clean + torch.randn_like(clean) * self.noise, clean
        keep = (torch.rand(1, *clean.shape[1:]) >= self.noise).to(clean.dtype)
        return clean * keep, clean


class DenoisingAutoencoder(PretextTask):
    """Backbone feature map -> ConvDecoder -> image; mean squared error against the clean image.

    Args:
        corruption: "gaussian" (additive noise) or "masking" (drop pixels).
        noise: noise standard deviation (gaussian, in units of the data's std) or dropped fraction (masking).
        decoder_width: channels of the decoder's first block.
    """

    def __init__(self, encoder: nn.Module, corruption: str = "masking", noise: float = 0.5, decoder_width: int = 128, **kwargs):
        super().__init__(encoder, **kwargs)
        if corruption not in CORRUPTIONS:
            raise ValueError(f"corruption={corruption!r}: choose from {list(CORRUPTIONS)}")
        if noise <= 0 or (corruption == "masking" and noise >= 1):
            raise ValueError(f"noise={noise}: must be > 0 (and < 1 for masking)")
        self.corruption, self.noise = corruption, noise
        self.decoder = ConvDecoder.to_image(self.encoder, self.in_chans, self.image_size, decoder_width)

    def sample_transform(self) -> Corrupt:
        return Corrupt(self.corruption, self.noise)

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        reconstruction = self.decoder(feature_maps(self.encoder, inputs)[-1])
        return {"loss": F.mse_loss(reconstruction.float(), target)}
