"""Image grids as PNG files (generated samples, reconstructions, interpolations), latent paths, and
the captioned example figures every task draws (`PretextTask.write_examples`)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
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


# Example figures (`PretextTask.write_examples`): captioned panels in a grid of equal cells.
CELL = 96  # side of a panel's cell in pixels: small images are enlarged by one integer factor to fill it
PAD = 6  # pixels around every cell
FONT_SIZE = 12  # the bundled font spaces words too tightly to read at 11
LINE_HEIGHT = FONT_SIZE + 3
CAPTION_LINES = 2  # caption rows under every cell (longer captions are cut with an ellipsis)
MOSAIC_GAP = 1  # pixels between the tiles of a `mosaic`, before enlarging


@dataclass
class Panel:
    """One captioned picture of an example: `image` is (C, h, w), C = 1 or 3, values in [0, 1]."""

    image: Tensor
    caption: str = ""


def mosaic(tiles: Tensor, columns: int, gap: int = MOSAIC_GAP, fill: float = 1.0) -> Tensor:
    """(N, C, h, w) tiles -> one (C, H, W) picture, row-major, `columns` per row, `gap` pixels of
    `fill` between them (white, like the figure's background, so the tiles read as separate pieces)."""
    count, chans, h, w = tiles.shape
    rows = math.ceil(count / columns)
    out = tiles.new_full((chans, rows * (h + gap) - gap, columns * (w + gap) - gap), fill)
    for i, tile in enumerate(tiles):
        y, x = (i // columns) * (h + gap), (i % columns) * (w + gap)
        out[:, y : y + h, x : x + w] = tile
    return out


def layout(examples: list[list[Panel]], columns: int) -> list[list[Panel]]:
    """Lines of at most `columns` panels, filled example by example; an example is never split
    across lines (one with more than `columns` panels gets a line of its own)."""
    lines: list[list[Panel]] = []
    for example in examples:
        if lines and len(lines[-1]) + len(example) <= columns:
            lines[-1].extend(example)
        else:
            lines.append(list(example))
    return lines


def caption_font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def wrap(text: str, font: ImageFont.ImageFont, width: int, max_lines: int = CAPTION_LINES) -> list[str]:
    """`text` broken at spaces (and at explicit newlines) into lines of at most `width` pixels."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += "…"
    return [fit(line, font, width) for line in lines]


def fit(line: str, font: ImageFont.ImageFont, width: int) -> str:
    """`line`, cut short with an ellipsis where it is wider than `width` pixels."""
    while len(line) > 1 and font.getlength(line) > width:
        line = line[:-2] + "…"
    return line


def panel_picture(image: Tensor, scale: int) -> Image.Image:
    """A (C, h, w) image in [0, 1] as an 8-bit PIL image, each pixel `scale` x `scale`."""
    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] not in (1, 3):  # neither gray nor RGB: show the channels' mean
        image = image.mean(0, keepdim=True)
    array = image.mul(255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if image.shape[0] == 1 else array, "L" if image.shape[0] == 1 else "RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def panel_geometry(lines: list[list[Panel]]) -> tuple[int, int, int]:
    """(scale, cell width, cell height) of a figure: every cell is CELL x CELL, or as large as its
    largest panel where one is larger (the grids of generative tasks); one enlargement for all panels
    keeps their relative sizes true (a jigsaw tile next to its image)."""
    panels = [p for line in lines for p in line]
    largest = max(max(p.image.shape[-2:]) for p in panels)
    scale = max(1, CELL // largest)
    cell_w = max(CELL, max(p.image.shape[-1] for p in panels) * scale)
    cell_h = max(CELL, max(p.image.shape[-2] for p in panels) * scale)
    return scale, cell_w, cell_h


def save_panels(examples: list[list[Panel]], path: Path, columns: int = 8) -> Path:
    """Draws examples (each a list of captioned panels) as one PNG: lines of at most `columns` cells,
    every picture centred in its cell with its caption below; written under a temporary name, then renamed."""
    lines = layout(examples, columns)
    scale, cell_w, cell_h = panel_geometry(lines)
    font = caption_font()
    row_h = cell_h + CAPTION_LINES * LINE_HEIGHT + PAD
    canvas = Image.new("RGB", (PAD + max(map(len, lines)) * (cell_w + PAD), PAD + len(lines) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        y = PAD + row * row_h
        for col, panel in enumerate(line):
            x = PAD + col * (cell_w + PAD)
            picture = panel_picture(panel.image, scale)
            canvas.paste(picture, (x + (cell_w - picture.width) // 2, y + (cell_h - picture.height) // 2))
            for i, text in enumerate(wrap(panel.caption, font, cell_w)):
                left = x + (cell_w - font.getlength(text)) / 2
                draw.text((left, y + cell_h + 1 + i * LINE_HEIGHT), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def read_png(path: Path) -> Tensor:
    """A PNG as a (C, H, W) float image in [0, 1] (C = 1 or 3)."""
    with Image.open(path) as img:
        array = np.asarray(img.convert("L" if img.mode in ("L", "I", "I;16") else "RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)
