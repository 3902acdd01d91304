"""VICReg (Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022): two views' embeddings must agree (invariance), every
dimension must keep a standard deviation of at least 1 over the batch (variance) and different
dimensions must be uncorrelated (covariance). No negatives, no predictor, no momentum encoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel
from pretext.augment import TwoViews
from pretext.base import PretextTask
from pretext.heads import MLPHead
from pretext.losses import gather_global


def variance_term(z: Tensor, eps: float = 1e-4) -> Tensor:
    """The paper's v(Z) = mean_j max(0, 1 - sqrt(Var(z_j) + eps)) over the D columns of `z` (N, D),
    with the unbiased variance; 0 once every dimension has a std of at least 1."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: Tensor) -> Tensor:
    """The paper's c(Z) = sum_{i != j} Cov(Z)_ij^2 / D for `z` (N, D), with the unbiased covariance."""
    z = z - z.mean(dim=0)
    cov = z.T @ z / (z.shape[0] - 1)  # (D, D)
    off_diagonal = ~torch.eye(cov.shape[0], dtype=torch.bool, device=cov.device)
    return cov[off_diagonal].pow(2).sum() / cov.shape[0]


def vicreg_terms(z_a: Tensor, z_b: Tensor, eps: float = 1e-4, gather: bool = True) -> dict[str, Tensor]:
    """The three unweighted terms of VICReg for two views' embeddings (N, D).

    invariance is the mean squared difference s(Z, Z'); variance averages v(Z) and v(Z') and
    covariance sums c(Z) and c(Z'), as the official code does (so the paper's weights 25 / 25 / 1
    apply unchanged). With `gather` all three are over the global batch of every worker (gradients
    flow back to each row's owner): the loss is one process's on the whole batch. The official code
    computes the invariance on each GPU's rows, which has the same mean and, averaged by DDP, the
    same gradient. Without `gather` the variance and covariance see one worker's rows only.
    """
    with torch.autocast(z_a.device.type, enabled=False):  # half-precision covariances lose the small terms
        z_a, z_b = z_a.float(), z_b.float()
        if gather:
            z_a, z_b = gather_global(z_a), gather_global(z_b)  # (M, D) each, M = global batch
        return {
            "invariance": F.mse_loss(z_a, z_b),
            "variance": (variance_term(z_a, eps) + variance_term(z_b, eps)) / 2,
            "covariance": covariance_term(z_a) + covariance_term(z_b),
        }


def vicreg_loss(z_a: Tensor, z_b: Tensor, invariance_weight: float = 25.0, variance_weight: float = 25.0,
                covariance_weight: float = 1.0, gather: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """lambda s(Z, Z') + mu v + nu c (the paper's loss, variance averaged over the two views as in
    the official code); returns the loss and the unweighted terms of `vicreg_terms`."""
    terms = vicreg_terms(z_a, z_b, gather=gather)
    loss = (invariance_weight * terms["invariance"] + variance_weight * terms["variance"]
            + covariance_weight * terms["covariance"])
    return loss, terms


class VICReg(PretextTask):
    """VICReg (Bardes et al. 2022): a shared encoder and expander embed two views of each image;
    the loss pulls the two embeddings together (invariance, mean squared error) while the variance
    term (a hinge keeping each dimension's std over the batch at least 1) prevents collapse and the
    covariance term (squared off-diagonal covariances) spreads information over the dimensions.

    The expander is the paper's: three linear layers, batch norm and ReLU after the first two. The
    variance and covariance are over the global batch (`gather_global`, like the official code's
    FullGatherLayer), so 2 workers with batch B compute exactly the loss and, after DDP's average,
    the gradients of 1 worker with batch 2B. The three unweighted terms are logged.

    Differences from the paper: plain SGD or AdamW instead of LARS, per-worker batch norm in the
    expander's hidden layers instead of synchronized batch norm, no solarization in the second view
    (the shared `TwoViews` has none), narrower expander for CPU.

    Args:
        proj_dim: output size D of the expander (paper: 8192; the paper reports accuracy still rising
            with D, so narrow expanders cost some accuracy).
        proj_hidden: hidden widths of the expander (paper: [8192, 8192]).
        invariance_weight: lambda, weight of the invariance term (paper: 25).
        variance_weight: mu, weight of the variance term (paper: 25).
        covariance_weight: nu, weight of the covariance term (paper: 1).
        crop_scale: area range of the random resized crop (paper, BYOL's: [0.08, 1.0]).
        jitter: strength of colour (RGB) or intensity (grayscale) jitter.
        blur: Gaussian blur probability of the first and second view (paper, BYOL's: [1.0, 0.1]).
    """

    def __init__(self, encoder: nn.Module, proj_dim: int = 1024, proj_hidden: list[int] = (1024, 1024),
                 invariance_weight: float = 25.0, variance_weight: float = 25.0, covariance_weight: float = 1.0,
                 crop_scale: list[float] = (0.08, 1.0), jitter: float = 0.4, blur: list[float] = (1.0, 0.1), **kwargs):
        super().__init__(encoder, **kwargs)
        if len(blur) != 2 or not all(0 <= b <= 1 for b in blur):
            raise ValueError(f"blur={list(blur)}: give two probabilities in [0, 1], one per view")
        weights = {"invariance_weight": invariance_weight, "variance_weight": variance_weight, "covariance_weight": covariance_weight}
        if min(weights.values()) < 0:
            raise ValueError(f"loss weights must be >= 0, got {weights}")
        self.weights = weights
        self.crop_scale, self.jitter, self.blur = tuple(crop_scale), jitter, tuple(blur)
        self.expander = MLPHead(self.embed_dim, proj_dim, tuple(proj_hidden))

    def sample_transform(self) -> TwoViews:
        return TwoViews(self.image_size, self.in_chans, self.crop_scale, self.jitter, blur=self.blur, mean=self.data_mean, std=self.data_std)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The two augmented views of each image, whose embeddings must agree."""
        return self.view_panels(samples)

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        # inputs: (B, 2, C, H, W). One pass per view, as in the official code: the expander's
        # batch-norm statistics are per view.
        z_a, z_b = (self.expander(self.encoder(inputs[:, v])) for v in (0, 1))  # (B, D) each
        loss, terms = vicreg_loss(z_a, z_b, **self.weights)
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}
