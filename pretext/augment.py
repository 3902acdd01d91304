"""Augmentations shared by the joint-embedding tasks: one view pipeline, two views, multi-crop.

Every transform here is a plain picklable object that runs per sample in the loader workers, on
the decoder's normalized (C, H, W) tensors.
"""
from __future__ import annotations

import torch
import torchvision.transforms.v2 as T
from torch import Tensor


class IntensityJitter:
    """Random contrast and brightness on a normalized tensor (grayscale stand-in for colour jitter)."""

    def __init__(self, strength: float, p: float):
        self.strength, self.p = strength, p

    def __call__(self, image: Tensor) -> Tensor:
        if self.strength <= 0 or torch.rand(()) >= self.p:
            return image
        contrast = 1 + (torch.rand(()) * 2 - 1) * self.strength
        brightness = (torch.rand(()) * 2 - 1) * self.strength
        return image * contrast + brightness


class ViewAugment:
    """One random view: resized crop of `crop_scale` of the area, horizontal flip, colour jitter and
    random grayscale on RGB (SimCLR's recipe) or intensity jitter on grayscale, optional Gaussian
    blur (`blur` is its probability; BYOL's asymmetric views use 1.0 and 0.1)."""

    def __init__(self, size: int, channels: int, crop_scale: tuple[float, float] = (0.3, 1.0), jitter: float = 0.4,
                 blur: float = 0.0):
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={list(crop_scale)}: need 0 < low <= high <= 1")
        steps: list = [T.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True), T.RandomHorizontalFlip()]
        if channels == 3:
            steps += [T.RandomApply([T.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8), T.RandomGrayscale(p=0.2)]
        else:
            steps.append(IntensityJitter(jitter, p=0.8))
        if blur > 0:
            kernel = max(3, (size // 10) | 1)  # about a tenth of the side, odd (SimCLR)
            steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur))
        self.augment = T.Compose(steps)

    def __call__(self, image: Tensor) -> Tensor:
        return self.augment(image)


class TwoViews:
    """Per-sample transform: two independently augmented views, stacked (2, C, H, W). With a
    second augmentation (`second`) the views are drawn asymmetrically (BYOL)."""

    def __init__(self, size: int, channels: int, crop_scale: tuple[float, float] = (0.3, 1.0), jitter: float = 0.4,
                 blur: tuple[float, float] = (0.0, 0.0)):
        self.first = ViewAugment(size, channels, crop_scale, jitter, blur[0])
        self.second = ViewAugment(size, channels, crop_scale, jitter, blur[1])

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        image = sample["image"]
        # The target is unused: the pairing inside the batch is the supervision.
        return torch.stack([self.first(image), self.second(image)]), torch.tensor(0)


class MultiCrop:
    """Per-sample multi-crop (Caron et al. 2020): `global_crops` views at `size` from crops of
    `global_scale` of the area and `local_crops` views at `local_size` from `local_scale`, all of
    the same image. Returns `[(G, C, size, size), (L, C, local_size, local_size)]` (the local entry
    is absent with local_crops=0); the loader's collate stacks each per size, giving a batch
    `[(B, G, C, H, W), (B, L, C, h, w)]`."""

    def __init__(self, size: int, channels: int, global_crops: int = 2, local_crops: int = 4, local_size: int = 0,
                 global_scale: tuple[float, float] = (0.3, 1.0), local_scale: tuple[float, float] = (0.05, 0.3),
                 jitter: float = 0.4, blur: float = 0.0):
        if global_crops < 2 or local_crops < 0:
            raise ValueError(f"global_crops={global_crops} must be >= 2 and local_crops={local_crops} >= 0")
        self.local_size = local_size or max(4, size * 3 // 7)  # 96 of 224 px in DINO and SwAV
        if local_crops and not 0 < self.local_size <= size:
            raise ValueError(f"local crop size {self.local_size} must be in (0, {size}]")
        self.global_crops, self.local_crops = global_crops, local_crops
        self.global_view = ViewAugment(size, channels, global_scale, jitter, blur)
        self.local_view = ViewAugment(self.local_size, channels, local_scale, jitter, blur) if local_crops else None

    def __call__(self, sample: dict) -> tuple[list[Tensor], Tensor]:
        image = sample["image"]
        crops = [torch.stack([self.global_view(image) for _ in range(self.global_crops)])]
        if self.local_crops:
            crops.append(torch.stack([self.local_view(image) for _ in range(self.local_crops)]))
        return crops, torch.tensor(0)


def crops_of(inputs) -> list[Tensor]:
    """A batch of multi-crop (or two-view) inputs as a flat list of (B, C, H, W) tensors, global
    crops first: `[(B, G, C, H, W), (B, L, C, h, w)]` -> G + L tensors; a (B, V, C, H, W) tensor -> V."""
    groups = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return [group[:, v] for group in groups for v in range(group.shape[1])]
