"""BYOL, Bootstrap Your Own Latent (Grill et al., "Bootstrap your own latent: A new approach to
self-supervised learning", NeurIPS 2020): an online network predicts a slowly moving target
network's projection of another view of the same image; no negatives."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel
from pretext.augment import TwoViews
from pretext.base import PretextTask
from pretext.heads import MLPHead
from pretext.momentum import cosine_schedule, ema_update_, momentum_copy


def normalized_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's loss for one view order: ||p/||p|| - z'/||z'|| ||^2 = 2 - 2 cos(p, z'), averaged over
    the batch; in [0, 4]. `prediction` and `target` are (N, D); the caller stops the target's gradient."""
    # Through the cosine rather than the squared difference: the same value, one fewer (N, D) temporary.
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()


def byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """The symmetrized BYOL loss L + L~ of the paper (eq. 2 and the sum below it): each view's
    prediction against the target projection of the other view, the two batch means summed (not
    averaged), so the loss lies in [0, 8] and a perfect predictor reaches 0.

    Args:
        p1, p2: (N, D) online predictions of views 1 and 2.
        z1, z2: (N, D) target projections of views 1 and 2 (treated as constants).
    """
    return normalized_mse(p1, z2.detach()) + normalized_mse(p2, z1.detach())


class BYOL(PretextTask):
    """BYOL (Grill et al. 2020). The online network (encoder, projector, predictor) is trained to
    predict the target network's projection of the other view; the target network (encoder and
    projector) is an exponential moving average of the online one and gets no gradient. Its
    momentum rises from `base_momentum` to 1 along a half cosine over training (the paper's
    tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2), so the last update leaves it unchanged.

    Differences from the paper: plain SGD or AdamW instead of LARS, per-worker batch norm instead of
    synchronized batch norm, and no solarization in the second view (the shared `TwoViews` has none).

    Args:
        base_momentum: the target's EMA momentum at step 0 (paper: 0.996 over 300-1000 epochs;
            shorter runs need a faster target, hence 0.99).
        proj_dim: output size of the projector and the predictor (paper: 256).
        proj_hidden: hidden widths of the projector (paper: [4096]; narrower for CPU).
        pred_hidden: hidden widths of the predictor (paper: [4096]).
        crop_scale: area range of the random resized crop (paper: [0.08, 1.0]).
        jitter: strength of colour (RGB) or intensity (grayscale) jitter.
        blur: Gaussian blur probability of the first and second view (paper: [1.0, 0.1]).
    """

    def __init__(self, encoder: nn.Module, base_momentum: float = 0.99, proj_dim: int = 256,
                 proj_hidden: list[int] = (1024,), pred_hidden: list[int] = (1024,),
                 crop_scale: list[float] = (0.08, 1.0), jitter: float = 0.4, blur: list[float] = (1.0, 0.1), **kwargs):
        super().__init__(encoder, **kwargs)
        if not 0 <= base_momentum <= 1:
            raise ValueError(f"base_momentum={base_momentum} must lie in [0, 1]")
        if len(blur) != 2 or not all(0 <= b <= 1 for b in blur):
            raise ValueError(f"blur={list(blur)}: give two probabilities in [0, 1], one per view")
        self.base_momentum = base_momentum
        self.crop_scale, self.jitter, self.blur = tuple(crop_scale), jitter, tuple(blur)
        self.projector = MLPHead(self.embed_dim, proj_dim, tuple(proj_hidden))
        self.predictor = MLPHead(proj_dim, proj_dim, tuple(pred_hidden))
        # Copies of the freshly initialized online network: both start equal, as in the paper.
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)

    def sample_transform(self) -> TwoViews:
        return TwoViews(self.image_size, self.in_chans, self.crop_scale, self.jitter, blur=self.blur, mean=self.data_mean, std=self.data_std)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The two (asymmetrically) augmented views of each image; each predicts the other's target."""
        transform = self.sample_transform()
        return [[Panel(self.to_unit_range(view), f"view {i + 1} (blur p={self.blur[i]:g})") for i, view in enumerate(transform(s)[0])]
                for s in samples]

    def target_momentum(self) -> float:
        """The EMA momentum of the update after the current step: `base_momentum` at step 0, 1 at the last."""
        return cosine_schedule(self.base_momentum, 1.0, self.current_step, self.total_steps)

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        views = (inputs[:, 0], inputs[:, 1])  # inputs: (B, 2, C, H, W) -> two (B, C, H, W)
        # Each view is its own forward pass, as in the paper's code: batch-norm statistics per view.
        predictions = [self.predictor(self.projector(self.encoder(v))) for v in views]  # 2 x (B, D)
        with torch.no_grad():
            targets = [self.target_projector(self.target_encoder(v)) for v in views]  # 2 x (B, D)
        loss = byol_loss(predictions[0], predictions[1], targets[0], targets[1])
        return {"loss": loss, "momentum": torch.tensor(self.target_momentum(), device=loss.device)}

    @torch.no_grad()
    def after_step(self) -> None:
        momentum = self.target_momentum()
        ema_update_(self.target_encoder, self.encoder, momentum)
        ema_update_(self.target_projector, self.projector, momentum)
