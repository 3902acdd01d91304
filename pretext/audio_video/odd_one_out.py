"""Odd-one-out networks (Fernando, Bilen, Gavves & Gould, "Self-Supervised Video Representation
Learning With Odd-One-Out Networks", CVPR 2017): among N frame tuples of one clip, N - 1 in time
order and one shuffled, which is the odd one?

Simplified from the paper's O3N: the elements are tuples of `tuple_length` frames drawn in time
order from a group of consecutive frames, the odd one's frames put in a random order that is
neither the true one nor its reverse (a reversed clip still moves smoothly, so it would often not
look odd). Each frame goes through the shared backbone, each tuple's concatenated frame embeddings
through a linear layer, and the N tuple embeddings are fused by the paper's sum of differences or by
concatenation before an N-way classifier.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from core.grids import Panel, mosaic
from pretext.audio_video.temporal import clip_frames, embed_frames, random_flip
from pretext.base import PretextTask
from pretext.heads import MLPHead

FRAMES = 5  # consecutive frames of one clip each training sample holds
FUSIONS = ("sum_of_differences", "concat")


def odd_orders(length: int) -> list[tuple[int, ...]]:
    """Orders of a tuple's frames that make it the odd one: every permutation but the identity and,
    for 3 or more frames, the reversal (with 2 frames the reversal is the only one left)."""
    identity = tuple(range(length))
    return [p for p in itertools.permutations(identity) if p != identity and (length < 3 or p != identity[::-1])]


def sum_of_differences(elements: Tensor) -> Tensor:
    """(B, N, D) -> (B, D): the sum over pairs i < j of (e_j - e_i), computed as sum_k (2k - N + 1) e_k."""
    n = elements.shape[1]
    weights = torch.arange(n, device=elements.device, dtype=elements.dtype) * 2 - (n - 1)  # (N,)
    return torch.einsum("n,bnd->bd", weights, elements)  # b: batch, n: element, d: feature


class OddOneOutSet:
    """Per-sample transform: a group of FRAMES frames -> ((N, L, C, H, W) tuples, index of the odd one).

    Each tuple takes L distinct frames in time order; the odd one's are then reordered by one of
    `odd_orders(L)`. With `flip`, the whole set is flipped horizontally half the time.
    """

    def __init__(self, num_tuples: int, tuple_length: int, flip: bool = True):
        if num_tuples < 2:
            raise ValueError(f"num_tuples={num_tuples}: an odd one out needs at least 2 tuples")
        if not 2 <= tuple_length <= FRAMES:
            raise ValueError(f"tuple_length={tuple_length} must be between 2 and the {FRAMES} frames of a sample")
        self.num_tuples, self.tuple_length, self.flip = num_tuples, tuple_length, flip
        self.orders = odd_orders(tuple_length)

    def indices(self) -> tuple[Tensor, int]:
        """(N, L) frame indices of one draw and the odd tuple's index."""
        picks = torch.stack([torch.randperm(FRAMES)[: self.tuple_length].sort().values for _ in range(self.num_tuples)])
        odd = int(torch.randint(self.num_tuples, ()))
        picks[odd] = picks[odd][list(self.orders[int(torch.randint(len(self.orders), ()))])]
        return picks, odd

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        frames = clip_frames(sample, FRAMES, "odd_one_out")
        picks, odd = self.indices()
        tuples = frames[picks].float()  # (N, L, C, H, W)
        return (random_flip(tuples) if self.flip else tuples), torch.tensor(odd)


class OddOneOut(PretextTask):
    """N-way classification of which frame tuple is out of time order; cross-entropy on N logits.

    Args:
        num_tuples: tuples per question, N (the paper's best: 6).
        tuple_length: frames per tuple, L, at most the 5 frames of a sample.
        fusion: "sum_of_differences" (the paper's better fusion) or "concat" of the tuple embeddings.
        frame_dim: per-frame embedding size.
        tuple_dim: per-tuple embedding size, after the linear layer over its concatenated frames.
        head_hidden: hidden widths of the N-way classifier.
        flip: random horizontal flips of whole sets.
    """

    frames_per_sample = FRAMES  # the training loader groups this many frames of one clip per sample

    def __init__(self, encoder: nn.Module, num_tuples: int = 6, tuple_length: int = 3, fusion: str = "sum_of_differences",
                 frame_dim: int = 128, tuple_dim: int = 256, head_hidden: list[int] = (256,), flip: bool = True, **kwargs):
        super().__init__(encoder, **kwargs)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion!r}: choose from {list(FUSIONS)}")
        self.transform = OddOneOutSet(num_tuples, tuple_length, flip)  # built here, so bad options fail when the task is built
        self.num_tuples, self.fusion = num_tuples, fusion
        self.frame_embed = nn.Sequential(nn.Linear(self.embed_dim, frame_dim), nn.ReLU(inplace=True))
        self.tuple_embed = nn.Sequential(nn.Linear(tuple_length * frame_dim, tuple_dim), nn.ReLU(inplace=True))
        fused = tuple_dim if fusion == "sum_of_differences" else num_tuples * tuple_dim
        self.head = MLPHead(fused, num_tuples, tuple(head_hidden))

    def sample_transform(self) -> OddOneOutSet:
        return self.transform

    def logits(self, tuples: Tensor) -> Tensor:
        """(B, N, L, C, H, W) -> (B, N) logits of which tuple is the odd one."""
        frames = embed_frames(self.encoder, self.frame_embed, tuples)  # (B, N, L, frame_dim)
        elements = self.tuple_embed(frames.flatten(2))  # (B, N, tuple_dim)
        fused = sum_of_differences(elements) if self.fusion == "sum_of_differences" else elements.flatten(1)
        return self.head(fused)

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        logits = self.logits(inputs)
        loss = nn.functional.cross_entropy(logits.float(), target)
        return {"loss": loss, "accuracy": (logits.argmax(1) == target).float().mean().detach()}

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """Per frame group: each tuple as a square mosaic of its frames, row by row in the order the
        network gets them (unflipped; square, so a tuple's panel stays as large as a frame), captioned with its frame numbers (0..4 in time order); the odd one's caption
        says it is the target."""
        examples = []
        for group in samples:  # frame groups, as the loader makes them
            picks, odd = self.transform.indices()
            frames = clip_frames(group, FRAMES, "odd_one_out")
            panels = []
            for i, pick in enumerate(picks):
                numbers = ",".join(str(int(k)) for k in pick)
                caption = f"{numbers}: odd, target {odd}" if i == odd else f"{numbers}: in order"
                columns = math.ceil(math.sqrt(len(pick)))
                panels.append(Panel(mosaic(self.display(frames[pick]), columns), caption))
            examples.append(panels)
        return examples
