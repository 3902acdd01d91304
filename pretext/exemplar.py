"""Exemplar / instance discrimination with InfoNCE: every image is its own class, recognized across
augmented views (Dosovitskiy et al., NeurIPS 2014, reformulated as metric learning as in
Wu et al. 2018 and Chen et al., SimCLR, 2020; loss: van den Oord et al. 2018)."""
from __future__ import annotations

import torch
import torchvision.transforms.v2 as T
from torch import Tensor, nn

from pretext.base import PretextTask
from pretext.heads import MLPHead
from pretext.losses import info_nce


class IntensityJitter:
    """Random contrast and brightness on a normalized tensor (grayscale stand-in for colour jitter)."""

    def __init__(self, strength: float, p: float):
        self.strength, self.p = strength, p

    def __call__(self, image: Tensor) -> Tensor:
        if torch.rand(()) >= self.p:
            return image
        contrast = 1 + (torch.rand(()) * 2 - 1) * self.strength
        brightness = (torch.rand(()) * 2 - 1) * self.strength
        return image * contrast + brightness


class TwoViews:
    """Per-sample transform: two independently augmented views, stacked (2, C, H, W)."""

    def __init__(self, size: int, channels: int, crop_scale: tuple[float, float], jitter: float):
        steps: list = [T.RandomResizedCrop(size, scale=crop_scale, antialias=True), T.RandomHorizontalFlip()]
        if channels == 3:
            steps += [T.RandomApply([T.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8), T.RandomGrayscale(p=0.2)]
        else:
            steps.append(IntensityJitter(jitter, p=0.8))
        self.augment = T.Compose(steps)

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        image = sample["image"]
        # The target is unused: the pairing inside the batch is the supervision.
        return torch.stack([self.augment(image), self.augment(image)]), torch.tensor(0)


class Exemplar(PretextTask):
    """Two augmented views of each image must find each other among all other images' views of
    the global batch (NT-Xent / InfoNCE on an MLP projection).

    Args:
        temperature: InfoNCE temperature.
        proj_dim: output size of the projection head.
        proj_hidden: hidden widths of the projection head.
        crop_scale: area range of the random resized crop.
        jitter: strength of colour (RGB) or intensity (grayscale) jitter.
        gather: use the other workers' samples as negatives (gradients flow through the gather).
    """

    def __init__(self, encoder: nn.Module, temperature: float = 0.2, proj_dim: int = 128, proj_hidden: list[int] = (512,),
                 crop_scale: list[float] = (0.3, 1.0), jitter: float = 0.4, gather: bool = True, **kwargs):
        super().__init__(encoder, **kwargs)
        self.temperature, self.gather = temperature, gather
        self.crop_scale, self.jitter = tuple(crop_scale), jitter
        self.head = MLPHead(self.embed_dim, proj_dim, tuple(proj_hidden))

    def sample_transform(self) -> TwoViews:
        return TwoViews(self.image_size, self.in_chans, self.crop_scale, self.jitter)

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        batch = inputs.shape[0]  # inputs: (B, 2, C, H, W)
        z = self.head(self.encoder(inputs.flatten(0, 1))).view(batch, 2, -1)  # (B, 2, D)
        loss, accuracy = info_nce(z[:, 0], z[:, 1], self.temperature, gather=self.gather)
        return {"loss": loss, "accuracy": accuracy.detach()}
