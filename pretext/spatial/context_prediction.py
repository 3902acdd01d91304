"""Context prediction (Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by
Context Prediction", ICCV 2015): given a patch and one of its eight neighbours, predict where the
neighbour lies. Both patches go through the shared backbone; their features are concatenated."""
from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from core.grids import Panel
from pretext.base import PretextTask
from pretext.heads import MLPHead

# (row, column) direction of each class, clockwise from the top-left neighbour, as in the paper's figure.
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
DIRECTIONS = ("up-left", "up", "up-right", "right", "down-right", "down", "down-left", "left")  # of each class, for captions


class ContextTransform:
    """Per-sample transform: (2, C, patch, patch) = (centre patch, neighbour patch) and the class.

    The neighbour sits one patch + `gap` away in the class's direction, moved by up to `jitter`
    pixels on each axis: the gap and jitter stop the network from matching low-level boundary
    patterns or lines continuing straight across patches (the paper's "trivial shortcuts").
    """

    def __init__(self, patch: int, gap: int, jitter: int, normalize_patches: bool):
        self.patch, self.gap, self.jitter, self.normalize_patches = patch, gap, jitter, normalize_patches

    def positions(self, image_size: int, label: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Top-left corners of the centre patch and of its neighbour in direction `label`."""
        step = self.patch + self.gap
        margin = step + self.jitter  # room for any neighbour on every side
        cy = random.randint(margin, image_size - self.patch - margin)
        cx = random.randint(margin, image_size - self.patch - margin)
        dy, dx = NEIGHBOUR_OFFSETS[label]
        ny = cy + dy * step + random.randint(-self.jitter, self.jitter)
        nx = cx + dx * step + random.randint(-self.jitter, self.jitter)
        return (cy, cx), (ny, nx)

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        image = sample["image"]
        label = random.randrange(len(NEIGHBOUR_OFFSETS))
        patches = torch.stack([image[:, y : y + self.patch, x : x + self.patch] for y, x in self.positions(image.shape[-1], label)])
        if self.normalize_patches:
            # Per-patch mean subtraction, as in the paper: absolute brightness says nothing about position.
            patches = patches - patches.mean(dim=(-3, -2, -1), keepdim=True)
        return patches, torch.tensor(label)


class ContextPrediction(PretextTask):
    """8-way classification of a neighbour's position from the concatenated features of two patches.

    Args:
        patch_fraction: patch side as a fraction of the image side (0.25: 16 px patches at 64 px).
        gap_fraction: gap between patches as a fraction of the patch side (the paper: 48 px gap / 96 px patches).
        jitter_fraction: maximum displacement of the neighbour, as a fraction of the patch side.
        normalize_patches: subtract each patch's mean.
        pair_dim: per-patch embedding size before concatenation (the paper's fc6 stage).
        head_hidden: hidden widths of the classifier over the concatenated pair.
    """

    def __init__(self, encoder: nn.Module, patch_fraction: float = 0.25, gap_fraction: float = 0.25, jitter_fraction: float = 0.125,
                 normalize_patches: bool = True, pair_dim: int = 256, head_hidden: list[int] = (512,), **kwargs):
        super().__init__(encoder, **kwargs)
        if min(patch_fraction, gap_fraction, jitter_fraction) < 0:
            raise ValueError(f"patch_fraction={patch_fraction}, gap_fraction={gap_fraction}, jitter_fraction={jitter_fraction}: must be >= 0")
        self.patch = int(self.image_size * patch_fraction)
        self.gap = int(self.patch * gap_fraction)
        self.jitter = int(self.patch * jitter_fraction)
        span = 3 * self.patch + 2 * self.gap + 2 * self.jitter
        if self.patch < 4 or span > self.image_size:
            raise ValueError(
                f"context prediction on {self.image_size}px images: patch {self.patch}px (patch_fraction={patch_fraction}), "
                f"gap {self.gap}px, jitter {self.jitter}px need patches of at least 4 px and a 3x3 layout of "
                f"{span}px to fit; lower the fractions or raise data.image_size"
            )
        self.normalize_patches = normalize_patches
        self.patch_embed = nn.Sequential(nn.Linear(self.embed_dim, pair_dim), nn.ReLU(inplace=True))
        self.head = MLPHead(2 * pair_dim, len(NEIGHBOUR_OFFSETS), tuple(head_hidden))

    def sample_transform(self) -> ContextTransform:
        return ContextTransform(self.patch, self.gap, self.jitter, self.normalize_patches)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The centre patch and the neighbour patch, captioned with the direction to predict."""
        transform = self.sample_transform()
        examples = []
        for sample in samples:
            patches, label = transform(sample)
            centre, neighbour = self.to_unit_range(patches)
            examples.append([Panel(centre, "centre"), Panel(neighbour, f"neighbour {DIRECTIONS[int(label)]}")])
        return examples

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        batch = inputs.shape[0]  # inputs: (B, 2, C, patch, patch)
        pair = self.patch_embed(self.encoder(inputs.flatten(0, 1))).view(batch, -1)
        logits = self.head(pair)
        loss = nn.functional.cross_entropy(logits.float(), target)
        return {"loss": loss, "accuracy": (logits.argmax(1) == target).float().mean().detach()}
