"""Rotation prediction (Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by
Predicting Image Rotations", ICLR 2018)."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel
from pretext.base import PretextTask
from pretext.heads import MLPHead

NUM_ROTATIONS = 4  # 0, 90, 180 and 270 degrees


def rotate(image: Tensor, k: int) -> Tensor:
    """Rotates a (..., H, W) tensor by k * 90 degrees counter-clockwise."""
    return torch.rot90(image, k, dims=(-2, -1))


class RotationTransform:
    """Per-sample transform: returns (rotated image, k), or all four rotations with targets 0..3.

    A plain class, not a bound method of the task, so loader workers receive no model weights.
    """

    def __init__(self, all_rotations: bool):
        self.all_rotations = all_rotations

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        image = sample["image"]  # (C, H, W)
        if self.all_rotations:
            # (4, C, H, W), targets (4,): Gidaris et al. found all four rotations per image train best.
            return torch.stack([rotate(image, k) for k in range(NUM_ROTATIONS)]), torch.arange(NUM_ROTATIONS)
        k = random.randrange(NUM_ROTATIONS)
        return rotate(image, k), torch.tensor(k)


class Rotation(PretextTask):
    """Predicts which of four rotations was applied: a 4-way head on pooled backbone features,
    trained with cross-entropy.

    Args:
        all_rotations: feed all four rotations of every image (4x the compute per image) instead of
            one random rotation.
        head_hidden: hidden widths of the MLP head ([] gives a linear head).
    """

    def __init__(self, encoder: nn.Module, all_rotations: bool = False, head_hidden: list[int] = (512,), **kwargs):
        super().__init__(encoder, **kwargs)
        if self.image_size and self.image_size < 2:
            raise ValueError("rotation needs images of at least 2x2 pixels")
        self.all_rotations = all_rotations
        self.head = MLPHead(self.embed_dim, NUM_ROTATIONS, tuple(head_hidden))

    def sample_transform(self) -> RotationTransform:
        return RotationTransform(self.all_rotations)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """Each rotated input captioned with its target angle (all four per sample with all_rotations)."""
        transform = self.sample_transform()
        examples = []
        for sample in samples:
            views, targets = transform(sample)
            views, targets = views.reshape(-1, *views.shape[-3:]), targets.flatten()
            examples.append([Panel(self.to_unit_range(v), f"{90 * int(k)}°") for v, k in zip(views, targets)])
        return examples

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        # inputs: (B, C, H, W) or (B, 4, C, H, W) with all_rotations; target: (B,) or (B, 4)
        inputs = inputs.flatten(0, inputs.ndim - 4)
        target = target.flatten()
        logits = self.head(self.encoder(inputs))
        loss = F.cross_entropy(logits.float(), target)
        accuracy = (logits.argmax(1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}
