"""Barlow Twins (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
ICML 2021): the cross-correlation matrix of two views' embeddings, computed over the batch, is
pushed towards the identity. No negatives, no predictor, no momentum encoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel
from pretext.augment import TwoViews
from pretext.base import PretextTask
from pretext.heads import MLPHead
from pretext.losses import gather_global


def standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Each column of `z` (N, D) to zero mean and unit variance over the batch: the official code's
    `BatchNorm1d(D, affine=False)` in training mode (biased variance, eps 1e-5). The paper's
    Algorithm 1 divides by the unbiased std instead, a factor N / (N - 1) on C."""
    return F.batch_norm(z, None, None, training=True, eps=eps)


def cross_correlation(z_a: Tensor, z_b: Tensor, gather: bool = True) -> Tensor:
    """The (D, D) matrix C_ij = sum_b za_bi zb_bj / N of the standardized embeddings (N, D).

    With `gather` the N rows are the whole global batch (every worker's rows, gradients flowing back
    to their owners), so the standardization and C are those of one process on the whole batch, as
    the official code's synchronized batch norm and summed C give. Without it each worker uses its
    own rows only: other statistics, another loss.
    """
    with torch.autocast(z_a.device.type, enabled=False):  # a half-precision C loses the small off-diagonal terms
        z_a, z_b = z_a.float(), z_b.float()
        if gather:
            z_a, z_b = gather_global(z_a), gather_global(z_b)  # (M, D) each, M = global batch
        return standardize(z_a).T @ standardize(z_b) / z_a.shape[0]  # (D, D)


def barlow_twins_loss(z_a: Tensor, z_b: Tensor, lambda_offdiag: float = 5e-3,
                      gather: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The paper's loss sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2 (eq. 1) on the cross-
    correlation C of two views' embeddings; returns it with its two unweighted terms.

    Args:
        z_a, z_b: (N, D) embeddings of the first and second view of the same N images.
        lambda_offdiag: weight of the redundancy-reduction (off-diagonal) term.
        gather: compute C over the global batch of all workers (see `cross_correlation`).

    Returns:
        The loss and {"invariance": sum_i (1 - C_ii)^2, "redundancy": sum_{i != j} C_ij^2}.
    """
    c = cross_correlation(z_a, z_b, gather)
    off_diagonal = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    invariance = (c.diagonal() - 1).pow(2).sum()
    redundancy = c[off_diagonal].pow(2).sum()
    return invariance + lambda_offdiag * redundancy, {"invariance": invariance, "redundancy": redundancy}


class BarlowTwins(PretextTask):
    """Barlow Twins (Zbontar et al. 2021): a shared encoder and projector embed two views of each
    image; each view's embeddings are standardized over the global batch and their cross-correlation
    C (D x D) is pushed towards the identity: diagonal terms make the embedding invariant to the
    augmentations, off-diagonal terms decorrelate its components (H. Barlow's redundancy reduction).

    The projector is the paper's: three linear layers, batch norm and ReLU after the first two.
    Its output standardization and C are over the global batch (`gather_global`), so 2 workers with
    batch B compute exactly the loss and, after DDP's average, the gradients of 1 worker with batch
    2B. (The official code sums per-GPU C with a plain all_reduce, which leaves each GPU's gradient
    1/W of that; LARS's trust ratio hides the scale.)

    Differences from the paper: plain SGD or AdamW instead of LARS, per-worker batch norm in the
    projector's hidden layers instead of synchronized batch norm, no solarization in the second view
    (the shared `TwoViews` has none), narrower projector for CPU.

    Args:
        proj_dim: output size D of the projector (paper: 8192; the paper reports accuracy still rising
            with D, so narrow projectors cost some accuracy).
        proj_hidden: hidden widths of the projector (paper: [8192, 8192]).
        lambda_offdiag: weight lambda of the off-diagonal term (paper: 5e-3, tuned at D = 8192). The
            off-diagonal sum has D (D - 1) terms against D on the diagonal, so at another D the same
            lambda strikes another balance; a common heuristic scales lambda like 1 / D (Tsai et al.
            2021, "A Note on Connecting Barlow Twins with Negative-Sample-Free Contrastive
            Learning", use lambda = 1 / D), e.g. about 1e-3 at D = 1024.
        crop_scale: area range of the random resized crop (paper, BYOL's: [0.08, 1.0]).
        jitter: strength of colour (RGB) or intensity (grayscale) jitter.
        blur: Gaussian blur probability of the first and second view (paper, BYOL's: [1.0, 0.1]).
    """

    def __init__(self, encoder: nn.Module, proj_dim: int = 1024, proj_hidden: list[int] = (1024, 1024),
                 lambda_offdiag: float = 5e-3, crop_scale: list[float] = (0.08, 1.0), jitter: float = 0.4,
                 blur: list[float] = (1.0, 0.1), **kwargs):
        super().__init__(encoder, **kwargs)
        if len(blur) != 2 or not all(0 <= b <= 1 for b in blur):
            raise ValueError(f"blur={list(blur)}: give two probabilities in [0, 1], one per view")
        if lambda_offdiag < 0:
            raise ValueError(f"lambda_offdiag={lambda_offdiag} must be >= 0")
        self.lambda_offdiag = lambda_offdiag
        self.crop_scale, self.jitter, self.blur = tuple(crop_scale), jitter, tuple(blur)
        self.projector = MLPHead(self.embed_dim, proj_dim, tuple(proj_hidden))

    def sample_transform(self) -> TwoViews:
        return TwoViews(self.image_size, self.in_chans, self.crop_scale, self.jitter, blur=self.blur, mean=self.data_mean, std=self.data_std)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The two augmented views of each image, whose embeddings must correlate dimension by dimension."""
        return self.view_panels(samples)

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        # inputs: (B, 2, C, H, W). One pass per view, as in the official code: the projector's
        # batch-norm statistics are per view.
        z_a, z_b = (self.projector(self.encoder(inputs[:, v])) for v in (0, 1))  # (B, D) each
        loss, terms = barlow_twins_loss(z_a, z_b, self.lambda_offdiag)
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}
