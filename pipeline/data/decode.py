"""Decoding a raw shard sample into tensors: `ImageDecoder` accepts image files and integer labels
only (plus, for audio-visual datasets, PCM audio and a JSON record), so nothing in a shard can run
code (WebDataset's default decoders unpickle `.pyd` entries); `decoder_for` builds one from a manifest."""
from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image
from torchvision.io import decode_png

from pipeline.data.audio import AUDIO_EXTS, decode_audio
from pipeline.data.bad_samples import ShardError
from pipeline.data.image_modes import convert_image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "tiff")


LABEL_EXTS = ("cls", "label")




UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageDecoder:
    """Decodes a raw sample into {"image": float (C, H, W) normalized, "label": int (-1: none), "key"}.

    Only image bytes (through libpng or PIL) and integer labels are read; a sample holding pickled data is
    rejected, never unpickled. With `audio` (the manifest's {"sample_rate", "samples"}) each sample also
    gives "audio": float32 (1, samples) in [-1, 1] from its `.wav` (mono 16-bit PCM) or `.npy` entry,
    and "video": str and "time": float (seconds) from its `.json`; a missing, short or wrong-rate audio
    entry makes it a bad sample.
    """

    def __init__(self, mode: str, image_size: int, mean: list[float], std: list[float], require_label: bool = False,
                 num_classes: int = 0, audio: dict | None = None):
        self.mode, self.image_size, self.require_label, self.num_classes = mode, image_size, require_label, num_classes
        self.audio = audio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        # uint8 -> normalized float in one fused op: (x / 255 - mean) / std = x * scale + shift.
        self.scale, self.shift = 1.0 / (255.0 * self.std), -self.mean / self.std
        self.png_colour_type = {"L": 0, "RGB": 2}.get(mode)

    def __call__(self, sample: dict) -> dict:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        unsafe = [ext for ext in sample if ext.split(".")[-1] in UNSAFE_EXTS]
        if unsafe:
            raise ShardError(f"shard {url}, key {key}: refusing pickled entry {unsafe[0]!r}; shards may hold images, labels, "
                             f"audio (wav, npy without objects) and json only")
        image_ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
        if image_ext is None:
            raise ShardError(f"shard {url}, key {key}: no image (expected one of {list(IMAGE_EXTS)}, found {sorted(k for k in sample if not k.startswith('__'))})")
        try:
            data = sample[image_ext]
            if not data:
                raise ValueError("zero bytes")
            pixels = self.decode_plain_png(data) if image_ext == "png" else None
            if pixels is None:
                pixels = self.decode_pil(data)
        except Exception as err:
            raise ShardError(f"shard {url}, key {key}: {image_ext} image does not decode ({err})") from err
        label_ext = next((ext for ext in LABEL_EXTS if ext in sample), None)
        if label_ext is None:
            if self.require_label:
                raise ShardError(f"shard {url}, key {key}: sample has no label (.cls) but labels are required here")
            label = -1
        else:
            try:
                label = int(sample[label_ext].decode().strip())
            except ValueError as err:
                raise ShardError(f"shard {url}, key {key}: label {sample[label_ext][:20]!r} is not an integer") from err
            if self.num_classes and not 0 <= label < self.num_classes:
                raise ShardError(f"shard {url}, key {key}: label {label} is outside the {self.num_classes} classes of the manifest (0..{self.num_classes - 1})")
        decoded = {"image": torch.addcmul(self.shift, pixels.float(), self.scale), "label": label, "key": key}
        if self.audio:
            decoded.update(self.decode_av(sample, url, key))
        return decoded

    def decode_av(self, sample: dict, url: str, key: str) -> dict:
        """{"audio": float32 (1, samples), "video": str, "time": float} of an audio-visual sample."""
        audio_ext = next((ext for ext in AUDIO_EXTS if ext in sample), None)
        if audio_ext is None:
            raise ShardError(f"shard {url}, key {key}: no audio (expected one of {list(AUDIO_EXTS)}, "
                             f"found {sorted(k for k in sample if not k.startswith('__'))})")
        try:
            waveform = decode_audio(sample[audio_ext], audio_ext, self.audio["sample_rate"], self.audio["samples"])
        except ValueError as err:
            raise ShardError(f"shard {url}, key {key}: {audio_ext} audio {err}") from err
        try:
            record = json.loads(sample["json"])
            video, time = record["video"], record["time"]
            if not isinstance(video, str) or isinstance(time, bool) or not isinstance(time, (int, float)):
                raise ValueError(f"wrong types ({type(video).__name__}, {type(time).__name__})")
        except (KeyError, TypeError, ValueError) as err:
            raise ShardError(f"shard {url}, key {key}: no valid json record {{\"video\": str, \"time\": seconds}} ({err!r})") from err
        return {"audio": torch.from_numpy(waveform).view(1, -1), "video": video, "time": float(time)}

    def decode_plain_png(self, data: bytes) -> torch.Tensor | None:
        """(C, H, W) uint8 through libpng (torchvision) for the common case, an 8-bit PNG already in
        the target mode and size: 2.2x faster than PIL on 28 px images (bench/loader_speed.py), and
        per-sample decode is most of a light task's loader time. None: take the general PIL path."""
        if (self.png_colour_type is None or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR"
                or data[24] != 8 or data[25] != self.png_colour_type):
            return None
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if self.image_size and (width, height) != (self.image_size, self.image_size):
            return None
        return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def decode_pil(self, data: bytes) -> torch.Tensor:
        """(C, H, W) uint8 from any image PIL reads, converted to the mode and resized."""
        with Image.open(io.BytesIO(data)) as img:
            img = convert_image(img, self.mode)
            if self.image_size and img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
            pixels = np.array(img, dtype=np.uint8)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        return torch.from_numpy(pixels).permute(2, 0, 1)


def decoder_for(manifest: dict, split: str, image_size: int, require_label: bool = False) -> ImageDecoder:
    """Decoder with the manifest's colour mode and the channel statistics of `split` (the training split),
    and its audio spec when the dataset is audio-visual (manifest "audio")."""
    if split not in manifest["splits"]:
        raise ShardError(f"split {split!r} is not in the manifest of {manifest.get('name', '?')!r}; available: {sorted(manifest['splits'])}")
    stats = manifest["splits"][split]
    size = image_size or (stats["image_size"] or [0])[0]
    if not size:
        raise ShardError(f"images of split {split!r} in {manifest.get('name', '?')!r} differ in size: set data.image_size to resize them to one size")
    audio = manifest.get("audio")
    if audio is not None and not (isinstance(audio, dict) and all(isinstance(audio.get(k), int) and audio[k] > 0 for k in ("sample_rate", "samples"))):
        raise ShardError(f"manifest of {manifest.get('name', '?')!r}: \"audio\" must be {{\"sample_rate\": int, \"samples\": int}}, not {audio!r}")
    return ImageDecoder(manifest["mode"], size, stats["mean"], stats["std"], require_label, len(manifest.get("classes") or []), audio)
