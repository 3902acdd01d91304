"""Cross-modal contrastive learning of frames and sounds: each frame must pick out its own audio
among every audio of the global batch, and each audio its own frame (Arandjelović & Zisserman,
"Objects that Sound", ECCV 2018, with the correspondence score replaced by InfoNCE, van den Oord
et al. 2018, symmetric over the two directions as in Radford et al., CLIP, 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel
from models.audio import create_audio_encoder
from pretext.audio_video.audio import (
    AudioVisualPair,
    AudioVisualTask,
    spectrogram_picture,
)
from pretext.heads import MLPHead
from pretext.losses import info_nce


class AVContrastive(AudioVisualTask):
    """Image and audio embeddings (backbone + projection head each) trained with cross-modal
    InfoNCE, image -> audio and audio -> image, averaged. With `gather`, the candidates are the
    audio (or frames) of every worker's batch, with gradients flowing back through the gather.

    Samples of one clip are not told apart: a second moment of a frame's own clip in the global
    batch counts as a negative (rare once shards are shuffled across many clips).

    The eval stage scores the vision backbone; the audio network is `audio_feature_extractor()`.

    Args:
        temperature: InfoNCE temperature.
        proj_dim: output size of both projection heads.
        proj_hidden: hidden widths of both projection heads.
        gather: use the other workers' samples as negatives.
        sample_rate: the waveforms' sample rate in Hz (the dataset manifest's audio.sample_rate).
        n_mels: mel bands of the log-mel spectrogram.
        window_ms: STFT window length in milliseconds (Hann).
        hop_ms: STFT hop in milliseconds.
        audio_backbone: timm model for the log-mel image (in_chans=1).
        audio_backbone_kwargs: its timm keyword arguments; None: half width for resnet18, timm's
            defaults for other models.
        flip: random horizontal flips of the frames.
        gain_db: random attenuation of the audio, up to this many dB (0: none).
    """

    def __init__(self, encoder: nn.Module, temperature: float = 0.1, proj_dim: int = 128, proj_hidden: list[int] = (512,),
                 gather: bool = True, sample_rate: int = 16000, n_mels: int = 64, window_ms: float = 25.0, hop_ms: float = 10.0,
                 audio_backbone: str = "resnet18", audio_backbone_kwargs: dict | None = None, flip: bool = True,
                 gain_db: float = 6.0, **kwargs):
        super().__init__(encoder, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        self.temperature, self.gather = temperature, gather
        self.audio_encoder = create_audio_encoder(audio_backbone, sample_rate, n_mels, window_ms, hop_ms, **(audio_backbone_kwargs or {}))
        self.image_head = MLPHead(self.embed_dim, proj_dim, tuple(proj_hidden))
        self.audio_head = MLPHead(self.audio_encoder.num_features, proj_dim, tuple(proj_hidden))
        self.transform = AudioVisualPair(flip, gain_db)  # checked here, so bad options fail when the task is built

    @torch.no_grad()
    def cross_modal_scores(self, image_features: Tensor, audio_features: Tensor) -> Tensor:
        """(Ni, Na) cosine similarities of the projected embeddings of pooled backbone features
        (what the loss ranks, without its temperature); the eval stage calls this in eval mode."""
        image = F.normalize(self.image_head(image_features).float(), dim=1)
        audio = F.normalize(self.audio_head(audio_features).float(), dim=1)
        return image @ audio.T

    def embeddings(self, inputs: dict) -> tuple[Tensor, Tensor]:
        """Projected (B, proj_dim) image and audio embeddings, row i of each from sample i."""
        return self.image_head(self.encoder(inputs["image"])), self.audio_head(self.audio_encoder(inputs["audio"]))

    def forward(self, inputs: dict, target: Tensor) -> dict[str, Tensor]:
        # The target (clip codes) is unused: row i of both modalities is the positive pair.
        image, audio = self.embeddings(inputs)
        # query_negatives=False: the candidates are the other modality's embeddings only (cross-modal).
        image_to_audio = info_nce(image, audio, self.temperature, gather=self.gather, query_negatives=False)
        audio_to_image = info_nce(audio, image, self.temperature, gather=self.gather, query_negatives=False)
        return {"loss": (image_to_audio[0] + audio_to_image[0]) / 2,
                "accuracy": ((image_to_audio[1] + audio_to_image[1]) / 2).detach()}

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """Per sample: the frame and its own audio's spectrogram, the positive it must find among
        the batch's other audio."""
        transform = self.sample_transform()
        examples = []
        for sample in samples:
            inputs, _ = transform(sample)
            image = inputs["image"]
            examples.append([Panel(self.display(image), f"frame {sample.get('video', '')}"),
                             Panel(spectrogram_picture(self.audio_encoder.frontend, inputs["audio"], image.shape[-2]),
                                   "match: its audio")])
        return examples
