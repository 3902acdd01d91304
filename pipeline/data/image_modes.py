"""Converting any PIL image to the dataset's colour mode the way a user expects."""
from __future__ import annotations

import numpy as np
from PIL import Image


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """Any PIL image to `mode` ("L" or "RGB") the way a user expects, not PIL's bare convert():
    16-bit and 32-bit integer grayscale are scaled to 8 bits (convert() would clip at 255),
    transparency is composited over black (convert() would expose whatever colour hides under
    alpha 0), palettes are expanded through their colours, CMYK goes through PIL's CMYK->RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.int64)
        img = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")  # 16-bit range to 8-bit
    elif img.mode == "F":
        img = Image.fromarray((np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert(mode)
