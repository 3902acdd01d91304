"""Exemplar / instance discrimination with InfoNCE: every image is its own class, recognized across
augmented views (Dosovitskiy et al., NeurIPS 2014, reformulated as metric learning as in
Wu et al. 2018 and Chen et al., SimCLR, 2020; loss: van den Oord et al. 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel
from pretext.augment import MultiCrop, TwoViews, crop_groups, crop_panels
from pretext.base import PretextTask
from pretext.heads import MLPHead
from pretext.losses import gather_with_grad, info_nce, multi_view_nt_xent
from pretext.momentum import ema_update_, momentum_copy


class Exemplar(PretextTask):
    """Two augmented views of each image must find each other among all other images' views of
    the global batch (NT-Xent / InfoNCE on an MLP projection).

    Args:
        temperature: InfoNCE temperature.
        proj_dim: output size of the projection head.
        proj_hidden: hidden widths of the projection head.
        crop_scale: area range of the random resized crop.
        jitter: strength of colour (RGB) or intensity (grayscale) jitter.
        gather: use the other workers' samples as negatives (gradients flow through the gather).
        queue_size: 0 for SimCLR-style in-batch negatives; > 0 adds a MoCo queue (He et al. 2020):
            keys come from a momentum copy of encoder and head, and the last `queue_size` keys of the
            global batch serve as extra negatives.
        key_momentum: EMA factor of the momentum key encoder (MoCo: 0.999 over 800 epochs; shorter
            runs need a faster key encoder).
        rotate: views are turned by up to this many degrees either way (0: none).
        erase: probability of random erasing in each view (0: none).
        erase_scale: area range of the erased rectangle.
        view_size: side of the views in pixels (0: the data's image size). Smaller views cost less
            per step; the eval stage still sees whole images at the data's size.
        local_crops: extra small crops per image (multi-crop, Caron et al. 2020), each a positive of
            every other view of its image in a multi-positive NT-Xent (0: two views, plain NT-Xent).
        local_size: side of the local crops (0: 3/7 of view_size, as 96 of 224 px).
        local_scale: area range of the local crops.
        decoupled: decoupled contrastive loss (DCL, Yeh et al. 2022): the positive pair is left out
            of InfoNCE's denominator (in-batch negatives only, no queue).
    """

    def __init__(self, encoder: nn.Module, temperature: float = 0.2, proj_dim: int = 128, proj_hidden: list[int] = (512,),
                 crop_scale: list[float] = (0.3, 1.0), jitter: float = 0.4, gather: bool = True,
                 queue_size: int = 0, key_momentum: float = 0.99, rotate: float = 0.0, erase: float = 0.0,
                 erase_scale: list[float] = (0.02, 0.33), view_size: int = 0, local_crops: int = 0, local_size: int = 0,
                 local_scale: list[float] = (0.05, 0.3), decoupled: bool = False, **kwargs):
        super().__init__(encoder, **kwargs)
        if queue_size < 0 or not 0 <= key_momentum < 1:
            raise ValueError(f"queue_size={queue_size} must be >= 0 and key_momentum={key_momentum} in [0, 1)")
        if view_size < 0 or local_crops < 0:
            raise ValueError(f"view_size={view_size} and local_crops={local_crops} must be >= 0")
        if queue_size and (decoupled or local_crops):
            raise ValueError("queue_size cannot be combined with decoupled or local_crops: the MoCo queue holds keys of two views, "
                             "scored by plain InfoNCE")
        self.decoupled = decoupled
        self.view_size = view_size or self.image_size
        self.local_crops, self.local_size, self.local_scale = local_crops, local_size, tuple(local_scale)
        self.temperature, self.gather = temperature, gather
        self.crop_scale, self.jitter = tuple(crop_scale), jitter
        self.rotate, self.erase, self.erase_scale = rotate, erase, tuple(erase_scale)
        self.sample_transform()  # bad augmentation options fail here, not in a loader worker
        self.head = MLPHead(self.embed_dim, proj_dim, tuple(proj_hidden))
        self.queue_size, self.key_momentum = queue_size, key_momentum
        if queue_size:
            self.key_encoder = momentum_copy(self.encoder)
            self.key_head = momentum_copy(self.head)
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
            self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))

    def sample_transform(self) -> TwoViews | MultiCrop:
        if self.local_crops:
            return MultiCrop(self.view_size, self.in_chans, 2, self.local_crops, self.local_size, self.crop_scale, self.local_scale,
                             self.jitter, mean=self.data_mean, std=self.data_std, rotate=self.rotate,
                             erase=self.erase, erase_scale=self.erase_scale)
        return TwoViews(self.view_size, self.in_chans, self.crop_scale, self.jitter, mean=self.data_mean, std=self.data_std,
                        rotate=self.rotate, erase=self.erase, erase_scale=self.erase_scale)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The augmented views of each image (two, plus the local crops), which must find each other in the batch."""
        if self.local_crops:
            return crop_panels(self, self.sample_transform(), samples)
        return self.view_panels(samples)

    def forward(self, inputs: Tensor | list[Tensor], target: Tensor) -> dict[str, Tensor]:
        if self.local_crops:  # inputs: [(B, 2, C, H, W), (B, L, C, h, w)]
            # One backbone pass per crop size (batch norm statistics per size), one head pass.
            z = self.head(torch.cat([self.encoder(group) for group in crop_groups(inputs)]))
            loss, accuracy = multi_view_nt_xent(z.view(2 + self.local_crops, inputs[0].shape[0], -1), self.temperature, self.gather,
                                                decoupled=self.decoupled)
            return {"loss": loss, "accuracy": accuracy.detach()}
        batch = inputs.shape[0]  # inputs: (B, 2, C, H, W)
        z = self.head(self.encoder(inputs.flatten(0, 1))).view(batch, 2, -1)  # (B, 2, D)
        if not self.queue_size:
            loss, accuracy = info_nce(z[:, 0], z[:, 1], self.temperature, gather=self.gather, decoupled=self.decoupled)
            return {"loss": loss, "accuracy": accuracy.detach()}
        with torch.no_grad():
            # Unlike MoCo, no shuffle-BN: the key encoder's batch statistics come from the same
            # images as the queries'. In-batch negatives (as in SimCLR) keep that leak small.
            keys = self.key_head(self.key_encoder(inputs.flatten(0, 1))).view(batch, 2, -1)
        queue = self.queue.clone()  # the loss must see the queue as it was before this batch's keys
        # Symmetrized MoCo: each view's query against the other view's key, the batch's keys and the queue.
        losses = [info_nce(z[:, a], keys[:, 1 - a], self.temperature, gather=self.gather, extra_negatives=queue) for a in (0, 1)]
        if self.training:
            self.enqueue(keys[:, 1])
        return {"loss": (losses[0][0] + losses[1][0]) / 2, "accuracy": ((losses[0][1] + losses[1][1]) / 2).detach()}

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        keys = F.normalize(gather_with_grad(keys.float())[0], dim=1)[-self.queue_size:]  # every worker appends the same global batch
        positions = (self.queue_next + torch.arange(keys.shape[0], device=keys.device)) % self.queue_size
        self.queue[positions] = keys
        self.queue_next.copy_((self.queue_next + keys.shape[0]) % self.queue_size)

    @torch.no_grad()
    def after_step(self) -> None:
        if not self.queue_size:
            return
        # The key encoder trails the online one: an exponential moving average of its weights.
        ema_update_(self.key_encoder, self.encoder, self.key_momentum)
        ema_update_(self.key_head, self.head, self.key_momentum)
