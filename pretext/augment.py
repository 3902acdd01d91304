"""Augmentations shared by the joint-embedding tasks: one view pipeline, two views, multi-crop.

Every augmentation here is plain torch on (B, C, H, W) tensors with random parameters drawn per
image, so the same object runs two ways (`data.augment_on`):
- "loader": per sample in the loader workers (`TwoViews(sample)`, a batch of one), the classic way;
- "device": once per batch in the training process, on its device (`TwoViews.on_batch(images)`),
  after the loader has only decoded. On a GPU this takes the augmentation off the CPU (the
  bottleneck of per-sample pipelines; solo-learn offers DALI for the same reason); on CPU it turns
  512 small Python-level transforms per step into a few batched kernels (bench/augment_speed.py).

Images arrive normalized with the data's mean and std; colour operations undo that first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from core.grids import Panel

# YIQ: hue is an angle in the IQ plane, so a hue shift is a rotation there (colour jitter's hue, batched).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY = torch.tensor([0.299, 0.587, 0.114])


def _uniform(low: float, high: float, batch: int, device) -> Tensor:
    return torch.empty(batch, device=device).uniform_(low, high)


def _chance(p: float, batch: int, device) -> Tensor:
    """(B,) bool: which images get an operation applied with probability `p`."""
    return torch.rand(batch, device=device) < p


class ViewAugment:
    """One random view per image: resized crop of `crop_scale` of the area (aspect 3/4 to 4/3),
    horizontal flip, then colour jitter (brightness, contrast, saturation, hue) and random
    grayscale on RGB (SimCLR's recipe) or intensity jitter on grayscale, each with probability 0.8
    / 0.2, and optional Gaussian blur (`blur` is its probability; BYOL's asymmetric views use 1.0 and 0.1).

    The crop is an affine resampling (bilinear, `torch.nn.functional.grid_sample`) of the box; a box
    that would leave the image (area near 1 with an extreme aspect) is clipped to it. No
    anti-aliasing: crops are rarely larger than `size` in pixels.
    """

    ratio = (3 / 4, 4 / 3)

    def __init__(self, size: int, channels: int, crop_scale: tuple[float, float] = (0.3, 1.0), jitter: float = 0.4,
                 blur: float = 0.0, mean: list[float] | None = None, std: list[float] | None = None, rotate: float = 0.0,
                 erase: float = 0.0, erase_scale: tuple[float, float] = (0.02, 0.33)):
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={list(crop_scale)}: need 0 < low <= high <= 1")
        if not 0 < erase_scale[0] <= erase_scale[1] <= 1:
            raise ValueError(f"erase_scale={list(erase_scale)}: need 0 < low <= high <= 1")
        if not 0 <= blur <= 1 or not 0 <= erase <= 1 or jitter < 0 or not 0 <= rotate <= 180:
            raise ValueError(f"blur={blur} and erase={erase} must be probabilities, jitter={jitter} >= 0, rotate={rotate} in [0, 180] degrees")
        self.size, self.channels = size, channels
        self.crop_scale, self.jitter, self.blur = tuple(crop_scale), jitter, blur
        self.rotate, self.erase, self.erase_scale = rotate, erase, tuple(erase_scale)
        self.mean = torch.tensor(mean if mean is not None else [0.0] * channels).view(1, -1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * channels).view(1, -1, 1, 1)
        self.blur_kernel = max(3, (size // 10) | 1)  # about a tenth of the side, odd (SimCLR)

    def __call__(self, images: Tensor) -> Tensor:
        """(C, H, W) -> (C, size, size), or (B, C, H, W) -> (B, C, size, size) with parameters per image."""
        if images.dim() == 3:
            return self(images.unsqueeze(0))[0]
        out = self.crop(images, self.crop_boxes(images.shape[0], images.device))
        out = self.colour(out)
        if self.erase > 0:
            out = self.random_erase(out)
        if self.blur > 0:
            sigma = _uniform(0.1, 2.0, out.shape[0], out.device)
            out = self.gaussian_blur(out, torch.where(_chance(self.blur, out.shape[0], out.device), sigma, torch.zeros_like(sigma)))
        return out

    def crop_boxes(self, batch: int, device) -> Tensor:
        """(B, 6): centre x, centre y, half-width, half-height (in [-1, 1] image coordinates, as
        `affine_grid` uses), the flip sign and the rotation (radians, within +-`rotate` degrees) of
        each image's crop."""
        area = _uniform(*self.crop_scale, batch, device)
        log_ratio = _uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), batch, device)
        half_w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
        half_h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
        centre_x = (torch.rand(batch, device=device) * 2 - 1) * (1 - half_w)
        centre_y = (torch.rand(batch, device=device) * 2 - 1) * (1 - half_h)
        flip = torch.where(_chance(0.5, batch, device), -1.0, 1.0)
        angle = _uniform(-self.rotate, self.rotate, batch, device) * math.pi / 180 if self.rotate else torch.zeros(batch, device=device)
        return torch.stack([centre_x, centre_y, half_w, half_h, flip, angle], dim=1)

    def crop(self, images: Tensor, boxes: Tensor) -> Tensor:
        """Resamples each image's box (rows of `crop_boxes`; 5 columns: no rotation) to size x size; a
        negative flip mirrors it, a rotation turns the box about its centre (corners that leave the
        image repeat its border)."""
        angle = boxes[:, 5] if boxes.shape[1] > 5 else torch.zeros_like(boxes[:, 0])
        cos, sin = angle.cos(), angle.sin()
        theta = torch.zeros(images.shape[0], 2, 3, device=images.device, dtype=images.dtype)
        theta[:, 0, 0] = boxes[:, 2] * boxes[:, 4] * cos
        theta[:, 0, 1] = -boxes[:, 3] * sin
        theta[:, 0, 2] = boxes[:, 0]
        theta[:, 1, 0] = boxes[:, 2] * boxes[:, 4] * sin
        theta[:, 1, 1] = boxes[:, 3] * cos
        theta[:, 1, 2] = boxes[:, 1]
        grid = F.affine_grid(theta, [images.shape[0], images.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def random_erase(self, images: Tensor) -> Tensor:
        """Random erasing (Zhong et al. 2020): with probability `erase`, a rectangle of `erase_scale`
        of the area (default 2-33%, aspect 0.3-3.3) is set to 0, the data's mean in normalized units."""
        batch, _, height, width = images.shape
        device = images.device
        area = _uniform(*self.erase_scale, batch, device) * height * width
        aspect = torch.exp(_uniform(math.log(0.3), math.log(3.3), batch, device))
        box_h = torch.sqrt(area * aspect).clamp(1, height)
        box_w = torch.sqrt(area / aspect).clamp(1, width)
        top = torch.rand(batch, device=device) * (height - box_h)
        left = torch.rand(batch, device=device) * (width - box_w)
        rows = torch.arange(height, device=device).view(1, -1, 1)
        cols = torch.arange(width, device=device).view(1, 1, -1)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
                  & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1)))
        erase = inside & _chance(self.erase, batch, device).view(-1, 1, 1)
        return images.masked_fill(erase.unsqueeze(1), 0.0)

    def colour(self, images: Tensor) -> Tensor:
        if self.jitter <= 0:
            return images
        batch, device = images.shape[0], images.device
        if self.channels != 3:
            # Grayscale stand-in for colour jitter, on the normalized values: contrast around the
            # data's mean, brightness as a shift, in (1 - s, 1 + s) and (-s, s).
            apply = _chance(0.8, batch, device).view(-1, 1, 1, 1)
            contrast = 1 + _uniform(-self.jitter, self.jitter, batch, device).view(-1, 1, 1, 1)
            brightness = _uniform(-self.jitter, self.jitter, batch, device).view(-1, 1, 1, 1)
            return torch.where(apply, images * contrast + brightness, images)
        mean, std = self.mean.to(device), self.std.to(device)
        pixels = images * std + mean
        apply = _chance(0.8, batch, device).view(-1, 1, 1, 1)
        pixels = torch.where(apply, self.colour_jitter(pixels, self.jitter_factors(batch, device)), pixels)
        gray = (pixels * _GRAY.to(device).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(pixels)
        pixels = torch.where(_chance(0.2, batch, device).view(-1, 1, 1, 1), gray, pixels)
        return (pixels - mean) / std

    def jitter_factors(self, batch: int, device) -> Tensor:
        """(B, 4): brightness, contrast and saturation factors in (1 - s, 1 + s) and a hue shift
        in (-s/4, s/4) of a turn per image (torchvision's ColorJitter(s, s, s, s/4))."""
        s = self.jitter
        factors = [_uniform(max(0.0, 1 - s), 1 + s, batch, device) for _ in range(3)]
        return torch.stack([*factors, _uniform(-s / 4, s / 4, batch, device)], dim=1)

    def colour_jitter(self, pixels: Tensor, factors: Tensor) -> Tensor:
        """Colour jitter of [0, 1] RGB images with `jitter_factors`: brightness scales, contrast and
        saturation blend with the mean gray and the gray image, hue rotates the IQ plane of YIQ;
        clipped to [0, 1] after every step, as torchvision does."""
        gray = _GRAY.to(pixels.device).view(1, 3, 1, 1)
        brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
        pixels = (pixels * brightness).clamp(0, 1)
        mean_gray = (pixels * gray).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        pixels = ((pixels - mean_gray) * contrast + mean_gray).clamp(0, 1)
        gray_image = (pixels * gray).sum(1, keepdim=True)
        pixels = ((pixels - gray_image) * saturation + gray_image).clamp(0, 1)
        to_yiq = _RGB_TO_YIQ.to(pixels.device)
        yiq = torch.einsum("ij,bjhw->bihw", to_yiq, pixels)
        angle = factors[:, 3].view(-1, 1, 1) * 2 * math.pi
        i, q = yiq[:, 1], yiq[:, 2]
        yiq = torch.stack([yiq[:, 0], i * angle.cos() - q * angle.sin(), i * angle.sin() + q * angle.cos()], dim=1)
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)

    def gaussian_blur(self, images: Tensor, sigma: Tensor) -> Tensor:
        """Separable Gaussian blur with one sigma per image (0: unchanged), reflect-padded."""
        batch, channels, height, width = images.shape
        radius = self.blur_kernel // 2
        offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
        kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.clamp(min=1e-3).view(-1, 1) ** 2))
        kernel = kernel / kernel.sum(1, keepdim=True)  # sigma 0 -> a delta (exp underflows off-centre)
        kernel = kernel.repeat_interleave(channels, 0)  # (B*C, k)
        flat = images.reshape(1, batch * channels, height, width)
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(-1, 1, 1, self.blur_kernel), groups=batch * channels)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(-1, 1, self.blur_kernel, 1), groups=batch * channels)
        return flat.view(batch, channels, height, width)


class TwoViews:
    """Two independently augmented views of each image, stacked: per sample (loader) `(2, C, H, W)`,
    per batch (`on_batch`, device) `(B, 2, C, H, W)`. With different blur probabilities the views
    are drawn asymmetrically (BYOL)."""

    def __init__(self, size: int, channels: int, crop_scale: tuple[float, float] = (0.3, 1.0), jitter: float = 0.4,
                 blur: tuple[float, float] = (0.0, 0.0), mean: list[float] | None = None, std: list[float] | None = None,
                 rotate: float = 0.0, erase: float = 0.0, erase_scale: tuple[float, float] = (0.02, 0.33)):
        self.first = ViewAugment(size, channels, crop_scale, jitter, blur[0], mean, std, rotate, erase, erase_scale)
        self.second = ViewAugment(size, channels, crop_scale, jitter, blur[1], mean, std, rotate, erase, erase_scale)

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        image = sample["image"]
        # The target is unused: the pairing inside the batch is the supervision.
        return torch.stack([self.first(image), self.second(image)]), torch.tensor(0)

    def on_batch(self, images: Tensor) -> Tensor:
        return torch.stack([self.first(images), self.second(images)], dim=1)


class MultiCrop:
    """Multi-crop (Caron et al. 2020): `global_crops` views at `size` from crops of `global_scale`
    of the area and `local_crops` views at `local_size` from `local_scale`, all of the same image.
    Per sample it returns `[(G, C, size, size), (L, C, local_size, local_size)]` (the local entry
    is absent with local_crops=0), which the loader's collate stacks per size; per batch
    (`on_batch`) the same layout with a leading batch dimension, `[(B, G, C, H, W), (B, L, C, h, w)]`."""

    def __init__(self, size: int, channels: int, global_crops: int = 2, local_crops: int = 4, local_size: int = 0,
                 global_scale: tuple[float, float] = (0.3, 1.0), local_scale: tuple[float, float] = (0.05, 0.3),
                 jitter: float = 0.4, blur: float = 0.0, mean: list[float] | None = None, std: list[float] | None = None,
                 rotate: float = 0.0, erase: float = 0.0, erase_scale: tuple[float, float] = (0.02, 0.33)):
        if global_crops < 2 or local_crops < 0:
            raise ValueError(f"global_crops={global_crops} must be >= 2 and local_crops={local_crops} >= 0")
        self.local_size = local_size or max(4, size * 3 // 7)  # 96 of 224 px in DINO and SwAV
        if local_crops and not 0 < self.local_size <= size:
            raise ValueError(f"local crop size {self.local_size} must be in (0, {size}]")
        self.global_crops, self.local_crops = global_crops, local_crops
        # Rotation and erasing on the global crops only: a local crop is already a small part.
        self.global_view = ViewAugment(size, channels, global_scale, jitter, blur, mean, std, rotate, erase, erase_scale)
        self.local_view = ViewAugment(self.local_size, channels, local_scale, jitter, blur, mean, std) if local_crops else None

    def __call__(self, sample: dict) -> tuple[list[Tensor], Tensor]:
        return [group[0] for group in self.on_batch(sample["image"].unsqueeze(0))], torch.tensor(0)

    def on_batch(self, images: Tensor) -> list[Tensor]:
        crops = [torch.stack([self.global_view(images) for _ in range(self.global_crops)], dim=1)]
        if self.local_crops:
            crops.append(torch.stack([self.local_view(images) for _ in range(self.local_crops)], dim=1))
        return crops


def crops_of(inputs) -> list[Tensor]:
    """A batch of multi-crop (or two-view) inputs as a flat list of (B, C, H, W) tensors, global
    crops first: `[(B, G, C, H, W), (B, L, C, h, w)]` -> G + L tensors; a (B, V, C, H, W) tensor -> V."""
    groups = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return [group[:, v] for group in groups for v in range(group.shape[1])]


def crop_panels(task, multicrop: MultiCrop, samples: list[dict]) -> list[list[Panel]]:
    """Per sample, every crop `multicrop` draws from it, captioned "global 1", ..., "local 1", ..."""
    panels = []
    for sample in samples:
        crops, _ = multicrop(sample)  # [(G, C, H, W), (L, C, h, w)]
        panels.append([Panel(task.to_unit_range(crop), f"{kind} {j + 1}")
                       for kind, group in zip(("global", "local"), crops) for j, crop in enumerate(group)])
    return panels


def crop_groups(inputs) -> list[Tensor]:
    """Multi-crop batches `[(B, G, C, H, W), (B, L, C, h, w)]` (or one (B, V, C, H, W) tensor) as one
    crop-major (V_i * B, C, H_i, W_i) tensor per crop size: rows [v * B, (v + 1) * B) hold crop v."""
    groups = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return [group.transpose(0, 1).flatten(0, 1) for group in groups]
