"""Temporal order verification (Misra, Zitnick & Hebert, "Shuffle and Learn: Unsupervised Learning
using Temporal Order Verification", ECCV 2016): are three frames of a clip in their true order?

From five frames a < b < c < d < e of one clip, the positive tuple is (b, c, d) and the negatives are
(b, a, d) and (b, e, d): the same ends with a middle frame from outside them, so the network must
reason about the motion between frames, not about which frames they are. A triplet siamese network
(the shared backbone on each frame) concatenates the three embeddings and classifies in order /
not in order.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from core.grids import Panel
from pretext.audio_video.temporal import clip_frames, embed_frames, random_flip
from pretext.base import PretextTask
from pretext.heads import MLPHead

FRAMES = 5  # a, b, c, d, e
POSITIVE = (1, 2, 3)  # (b, c, d)
NEGATIVES = ((1, 0, 3), (1, 4, 3))  # (b, a, d), (b, e, d)
LETTERS = "abcde"


class OrderTuple:
    """Per-sample transform: a group of 5 frames -> ((3, C, H, W) tuple, target: 1 in order, 0 not).

    A positive with probability `positive_fraction`, else one of the two negatives at random; with
    `flip`, the whole tuple is flipped horizontally half the time.
    """

    def __init__(self, positive_fraction: float = 0.5, flip: bool = True):
        if not 0 < positive_fraction < 1:
            raise ValueError(f"positive_fraction={positive_fraction} must lie strictly between 0 and 1 (both classes are needed)")
        self.positive_fraction, self.flip = positive_fraction, flip

    def order(self) -> tuple[tuple[int, int, int], int]:
        """The frame indices of one draw and its target."""
        if float(torch.rand(())) < self.positive_fraction:
            return POSITIVE, 1
        return NEGATIVES[int(torch.randint(len(NEGATIVES), ()))], 0

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        frames = clip_frames(sample, FRAMES, "temporal_order")
        order, target = self.order()
        triplet = frames[list(order)].float()  # (3, C, H, W)
        return (random_flip(triplet) if self.flip else triplet), torch.tensor(target)


class TemporalOrder(PretextTask):
    """Binary temporal order verification of frame triplets; cross-entropy on 2 logits.

    Args:
        positive_fraction: share of in-order tuples among the training tuples.
        frame_dim: per-frame embedding size before concatenation (the paper's shared fc7).
        head_hidden: hidden widths of the classifier over the concatenated triplet.
        flip: random horizontal flips of whole tuples.
    """

    frames_per_sample = FRAMES  # the training loader groups this many frames of one clip per sample

    def __init__(self, encoder: nn.Module, positive_fraction: float = 0.5, frame_dim: int = 256, head_hidden: list[int] = (512,),
                 flip: bool = True, **kwargs):
        super().__init__(encoder, **kwargs)
        self.transform = OrderTuple(positive_fraction, flip)  # built here, so bad options fail when the task is built
        self.frame_embed = nn.Sequential(nn.Linear(self.embed_dim, frame_dim), nn.ReLU(inplace=True))
        self.head = MLPHead(3 * frame_dim, 2, tuple(head_hidden))

    def sample_transform(self) -> OrderTuple:
        return self.transform

    def logits(self, triplets: Tensor) -> Tensor:
        """(B, 3, C, H, W) -> (B, 2) logits of (not in order, in order)."""
        embedded = embed_frames(self.encoder, self.frame_embed, triplets)  # (B, 3, frame_dim)
        return self.head(embedded.flatten(1))

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        logits = self.logits(inputs)
        loss = nn.functional.cross_entropy(logits.float(), target)
        return {"loss": loss, "accuracy": (logits.argmax(1) == target).float().mean().detach()}

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """Per frame group: the tuple's three frames in the order the network gets them
        (unflipped), captioned with their
        letters (a..e in time order) and the target ("1 in order" / "0 shuffled")."""
        examples = []
        for group in samples:  # frame groups, as the loader makes them
            order, target = self.transform.order()
            frames = clip_frames(group, FRAMES, "temporal_order")[list(order)]
            verdict = "1 in order" if target else "0 shuffled"
            examples.append([Panel(self.display(frame), f"{LETTERS[i]}: target {verdict}") for i, frame in zip(order, frames)])
        return examples
