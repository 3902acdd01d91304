"""Image grids as PNG files (generated samples, reconstructions, interpolations) and latent paths."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor


def save_grid(images: Tensor, path: Path, nrow: int = 8, scale: int = 2) -> Path:
    """Writes (N, C, H, W) images with values in [0, 1] as one PNG, `nrow` per row, each pixel
    `scale` x `scale`; written under a temporary name, then renamed (never a half-written file)."""
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=0.5)  # 1-channel images come back as RGB
    array = grid.mul(255).round().byte().permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def interleave_rows(originals: Tensor, reconstructions: Tensor, per_row: int = 8) -> Tensor:
    """Rows of `per_row` originals, each followed by the row of their reconstructions (whole rows only)."""
    per_row = min(per_row, len(originals), len(reconstructions))  # small batches: one row
    rows = min(len(originals), len(reconstructions)) // per_row
    pairs = [originals[: rows * per_row], reconstructions[: rows * per_row]]
    return torch.stack([p.reshape(rows, per_row, *p.shape[1:]) for p in pairs], 1).flatten(0, 2)


def lerp(a: Tensor, b: Tensor, steps: int) -> Tensor:
    """(N, steps, D): straight lines from a (N, D) to b, ends included (VAE latents)."""
    t = torch.linspace(0, 1, steps, device=a.device).view(1, steps, 1)
    return a[:, None] * (1 - t) + b[:, None] * t


def slerp(a: Tensor, b: Tensor, steps: int) -> Tensor:
    """(N, steps, D): great-circle paths from a to b (White 2016: Gaussian noise vectors concentrate
    near a sphere, and straight lines between them pass through unlikely short vectors)."""
    t = torch.linspace(0, 1, steps, device=a.device).view(1, steps, 1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1 + 1e-6, 1 - 1e-6).view(-1, 1, 1)
    omega = torch.acos(cos)
    return (torch.sin((1 - t) * omega) * a[:, None] + torch.sin(t * omega) * b[:, None]) / torch.sin(omega)
