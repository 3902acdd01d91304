"""The audio-visual tasks' shared parts (`avc`, `av_contrastive`): the per-sample transform that
turns a decoded audio-visual sample into the tasks' inputs, the spectrogram pictures of the
examples figure, and `AudioVisualTask`, their base. The audio encoder is `models.audio`.

The loader's audio-visual decoder yields {"image": float (C, H, W) normalized, "audio": float32
(1, S) waveform in [-1, 1] at the dataset's sample rate, "label", "key", "video": source clip id,
"time": seconds}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.clips import clip_code
from core.grids import CELL
from models.audio import AudioEncoder, LogMel
from pretext.base import PretextTask


class AudioVisualPair:
    """Per-sample transform of the audio-visual tasks: a decoded sample ->
    ({"image": (C, H, W) float32, "audio": (1, S) float32}, clip code: int64 scalar).

    The clip code (`clip_code` of "video") travels as the target: the tasks pair frames with audio
    inside the batch and must know which samples share a clip. Augmentation: a random horizontal
    flip of the frame (`flip`) and a random attenuation of the waveform by up to `gain_db` dB
    (attenuation only: amplifying would clip the [-1, 1] waveform).
    """

    def __init__(self, flip: bool = True, gain_db: float = 6.0):
        if gain_db < 0:
            raise ValueError(f"gain_db={gain_db} must be >= 0")
        self.flip, self.gain_db = flip, gain_db

    def __call__(self, sample: dict) -> tuple[dict, Tensor]:
        missing = [k for k in ("image", "audio", "video") if k not in sample]
        if missing:
            raise ValueError(f"sample {sample.get('key', '?')!r} has no {missing}: audio-visual tasks need shards with audio "
                             f"and the source clip id (found {sorted(sample)})")
        image, audio = sample["image"], sample["audio"]
        if not (isinstance(audio, Tensor) and audio.ndim == 2 and audio.shape[0] == 1 and audio.is_floating_point()):
            raise ValueError(f"sample {sample.get('key', '?')!r}: audio must be a float (1, S) waveform, got "
                             f"{getattr(audio, 'shape', type(audio))}")
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        if self.gain_db:
            audio = audio * 10 ** (-float(torch.rand(())) * self.gain_db / 20)
        return {"image": image.float(), "audio": audio.float()}, torch.tensor(clip_code(str(sample["video"])), dtype=torch.long)


def spectrogram_picture(frontend: LogMel, wave: Tensor, side: int) -> Tensor:
    """A (1, s, s) picture in [0, 1] of a waveform's log-mel spectrogram for example figures, low
    frequencies at the bottom. Square, as large as the frame beside it (`side`) within [32, CELL]
    pixels: figures enlarge every panel by one factor, and a wide spectrogram would shrink the frames."""
    with torch.no_grad():
        logmel = frontend(wave.reshape(1, 1, -1).to(frontend.window.device))[0].float().cpu().flip(-2)  # (1, M, T)
    low, high = logmel.min(), logmel.max()
    picture = (logmel - low) / (high - low).clamp(min=1e-8)
    side = min(max(side, 32), CELL)
    return F.interpolate(picture[None], size=(side, side), mode="bilinear", align_corners=False)[0].clamp(0, 1)


class AudioVisualTask(PretextTask):
    """What the audio-visual tasks share: samples with frames and audio (`modalities`), the pair
    transform, the audio network (`self.audio_encoder`, set by the subclass) and how eval rebuilds it."""

    modalities = ("image", "audio")  # what the decoded samples must hold (tests and pipeline read this)
    transform: AudioVisualPair
    audio_encoder: AudioEncoder

    def sample_transform(self) -> AudioVisualPair:
        return AudioVisualPair(self.transform.flip, self.transform.gain_db)

    def audio_feature_extractor(self) -> nn.Module:
        """Waveforms (B, 1, S) -> pooled audio features (B, D): log-mel front end and audio CNN."""
        return self.audio_encoder

    def encoder_input(self, decoded: dict) -> dict:
        # Eval decodes frames as for any image backbone. The audio network's settings go alongside,
        # apart from the data's "audio" entry, so a front end built for another rate shows.
        return {**decoded, "modalities": list(self.modalities), "audio_encoder": self.audio_encoder.describe("audio_encoder.")}

    @property
    def audio_encoder_options(self) -> dict:
        """`create_audio_encoder` keyword arguments of this task's audio network (eval's random-init baseline)."""
        return self.audio_encoder.options()
