"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021): two views
through one shared encoder and projector; a predictor on each side matches the other side's
projection, whose gradient is stopped. No negatives, no momentum encoder."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel
from pretext.augment import TwoViews
from pretext.base import PretextTask
from pretext.heads import MLPHead


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """The paper's symmetric loss L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with
    D(p, z) = -cos(p, z) averaged over the batch; in [-1, 1]. The stop-gradient is part of the
    loss, as in the paper's pseudocode (`z.detach()` inside D).

    Args:
        p1, p2: (N, D) predictions of views 1 and 2.
        z1, z2: (N, D) projections of views 1 and 2.
    """
    def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()

    return (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2


def output_std(z: Tensor) -> Tensor:
    """The collapse monitor of the paper's Fig. 2: the per-channel std over the batch of the
    l2-normalized outputs z/||z||, averaged over channels. Near 0 when every image maps to one
    point; near 1/sqrt(D) for outputs spread like an isotropic Gaussian."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


class SimSiam(PretextTask):
    """SimSiam (Chen & He 2021): a shared encoder and projector f embed two views, a predictor h
    maps each embedding towards the other's; the stop-gradient on the target side alone prevents
    collapse (the paper's Fig. 2 shows the std of the normalized outputs falling to 0 without it,
    logged here as `output_std`).

    The projector is the paper's 3-layer MLP with batch norm on every layer, its output included
    (without the affine part, as in the official code); the predictor is a 2-layer bottleneck MLP
    with batch norm on its hidden layer only.

    Differences from the paper: per-worker batch norm instead of synchronized batch norm; the
    predictor's learning rate follows the run's schedule (the paper keeps it fixed, 0.4 points
    better on ImageNet, Table 1c; the pipeline applies one schedule to every parameter group).

    Args:
        proj_dim: output size of the projector, input and output of the predictor (paper: 2048).
        proj_hidden: hidden widths of the projector (paper: [2048, 2048]; narrower for CPU).
        pred_hidden: hidden width of the predictor's bottleneck (paper: 512 = proj_dim / 4).
        crop_scale: area range of the random resized crop (paper, MoCo v2's: [0.2, 1.0]).
        jitter: strength of colour (RGB) or intensity (grayscale) jitter.
        blur: Gaussian blur probability of each view (paper, MoCo v2's: 0.5 on both).
    """

    def __init__(self, encoder: nn.Module, proj_dim: int = 1024, proj_hidden: list[int] = (1024, 1024),
                 pred_hidden: int = 256, crop_scale: list[float] = (0.2, 1.0), jitter: float = 0.4,
                 blur: list[float] = (0.5, 0.5), **kwargs):
        super().__init__(encoder, **kwargs)
        if len(blur) != 2 or not all(0 <= b <= 1 for b in blur):
            raise ValueError(f"blur={list(blur)}: give two probabilities in [0, 1], one per view")
        self.crop_scale, self.jitter, self.blur = tuple(crop_scale), jitter, tuple(blur)
        self.projector = MLPHead(self.embed_dim, proj_dim, tuple(proj_hidden), last_norm=True)
        # The official code's output norm has no scale and shift (BatchNorm1d(dim, affine=False));
        # MLPHead's last_norm is affine, so swap it for the faithful one.
        self.projector[-1] = nn.BatchNorm1d(proj_dim, affine=False)
        self.predictor = MLPHead(proj_dim, proj_dim, (pred_hidden,))

    def sample_transform(self) -> TwoViews:
        return TwoViews(self.image_size, self.in_chans, self.crop_scale, self.jitter, blur=self.blur, mean=self.data_mean, std=self.data_std)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The two augmented views of each image; each predicts the other's projection."""
        return self.view_panels(samples)

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        # inputs: (B, 2, C, H, W). One pass per view, as in the paper's pseudocode: batch-norm
        # statistics per view.
        z1, z2 = (self.projector(self.encoder(inputs[:, v])) for v in (0, 1))  # (B, D) each
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (B, D) each
        loss = simsiam_loss(p1, p2, z1, z2)
        return {"loss": loss, "output_std": (output_std(z1) + output_std(z2)) / 2}
