"""Context encoder (Pathak, Krähenbühl, Donahue, Darrell & Efros, "Context Encoders: Feature
Learning by Inpainting", CVPR 2016): fill in a masked region from its surroundings. Only the
reconstruction (L2) loss is used; the paper's adversarial term arrives with the GAN objectives."""
from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from core.grids import Panel
from pretext.base import PretextTask
from pretext.heads import ConvDecoder, feature_maps

MASKS = ("center", "random")


class MaskRegion:
    """Per-sample transform: (image with a square hole set to 0, target).

    The target stacks the clean image and the hole's mask on the channel axis, (C + 1, H, W), so the
    loss knows which pixels to score. "center" is the paper's central region; "random" places the
    square anywhere, which stops the encoder from specializing on the image centre.
    """

    def __init__(self, mask: str, side: int):
        self.mask, self.side = mask, side

    def hole(self, size: int) -> tuple[int, int]:
        if self.mask == "center":
            corner = (size - self.side) // 2
            return corner, corner
        return random.randint(0, size - self.side), random.randint(0, size - self.side)

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        clean = sample["image"]
        y, x = self.hole(clean.shape[-1])
        mask = torch.zeros(1, *clean.shape[1:])
        mask[:, y : y + self.side, x : x + self.side] = 1
        return clean * (1 - mask), torch.cat([clean, mask])


class ContextEncoder(PretextTask):
    """Backbone feature map of the masked image -> ConvDecoder -> image; L2 loss inside the hole.

    Args:
        mask: "center" or "random" placement of the square hole.
        mask_fraction: side of the hole as a fraction of the image side (0.5: a quarter of the area, as in the paper).
        decoder_width: channels of the decoder's first block.
    """

    def __init__(self, encoder: nn.Module, mask: str = "random", mask_fraction: float = 0.5, decoder_width: int = 128, **kwargs):
        super().__init__(encoder, **kwargs)
        if mask not in MASKS:
            raise ValueError(f"mask={mask!r}: choose from {list(MASKS)}")
        self.side = int(self.image_size * mask_fraction)
        if not 1 <= self.side < self.image_size:
            raise ValueError(f"mask_fraction={mask_fraction} gives a {self.side}px hole in {self.image_size}px images; it must be between 1 px and the image")
        self.mask = mask
        self.decoder = ConvDecoder.to_image(self.encoder, self.in_chans, self.image_size, decoder_width)

    def sample_transform(self) -> MaskRegion:
        return MaskRegion(self.mask, self.side)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The masked input, then the clean image with everything outside the hole dimmed: the
        loss scores the hole only."""
        transform = self.sample_transform()
        examples = []
        for sample in samples:
            masked, target = transform(sample)
            clean, mask = target[:-1], target[-1:]
            examples.append([Panel(self.to_unit_range(masked), "input"),
                             Panel(self.to_unit_range(clean) * (0.25 + 0.75 * mask), "target (hole)")])
        return examples

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        clean, mask = target[:, :-1], target[:, -1:]
        reconstruction = self.decoder(feature_maps(self.encoder, inputs)[-1]).float()
        # Mean squared error over the hole's pixels (and channels) only.
        squared = ((reconstruction - clean) ** 2 * mask).sum()
        loss = squared / (mask.sum() * clean.shape[1]).clamp(min=1)
        return {"loss": loss}
