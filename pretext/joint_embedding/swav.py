"""SwAV: swapping assignments between views (Caron et al., "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments", NeurIPS 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel
from pretext.augment import MultiCrop, crop_groups, crop_panels
from pretext.base import PretextTask
from pretext.heads import MLPHead
from pretext.joint_embedding.dino import mean_entropy, multicrop_cross_entropy
from pretext.losses import all_reduce_sum


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's codes: the soft assignment Q of samples to prototypes that maximizes
    Tr(Q^T C) + epsilon H(Q) under an equipartition constraint (every prototype gets 1/K of the
    batch), by `iterations` Sinkhorn-Knopp steps, over the GLOBAL batch: the row sums, total and
    sample count are summed over workers, as in the paper's distributed code.

    Args:
        scores: (N, K) this worker's sample-to-prototype similarities (queue rows first, if any).

    Returns:
        (N, K) codes; each row sums to 1.
    """
    q = torch.exp(scores.float() / epsilon).T  # (K, N): K-by-B as in the paper's notation
    prototypes = q.shape[0]
    samples = all_reduce_sum(q.new_tensor(float(q.shape[1])))  # B of the global batch
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)) * prototypes  # each prototype's total: 1/K
        q /= q.sum(dim=0, keepdim=True) * samples  # each sample's total: 1/B
    return (q * samples).T  # rows (samples) sum to 1: an assignment


def swav_loss(scores: Tensor, codes: Tensor, temperature: float = 0.1) -> Tensor:
    """Swapped prediction: the codes of each assigned crop are predicted from every other crop's
    scores (softmax at `temperature`), averaged over crop pairs and the batch.

    Args:
        scores: (V, B, K) prototype scores of all V crops, the assigned (global) ones first.
        codes: (G, B, K) Sinkhorn codes of the first G crops.
    """
    return multicrop_cross_entropy(codes, scores, temperature)


class SwAV(PretextTask):
    """Online clustering: the L2-normalized projections of all crops are scored against learnable
    prototypes; the Sinkhorn-Knopp codes of each global crop, balanced over the global batch,
    must be predicted from the scores of every other crop of the image.

    `forward` logs SwAV's loss as "cross_entropy" and steps on "loss", its KL part (the codes
    carry no gradient, so the gradients are the same), next to "code_entropy".

    Args:
        num_prototypes: K (paper: 3000 on ImageNet).
        proj_dim: size of the normalized projection (paper: 128).
        proj_hidden: hidden widths of the projector (paper: [2048]).
        temperature: softmax temperature of the swapped prediction (paper: 0.1).
        epsilon: entropy weight of the Sinkhorn codes (paper: 0.05).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (paper: 3).
        freeze_prototypes_fraction: fraction of the steps during which the prototypes are not updated
            (paper: the first epoch, 313 iterations).
        queue_size: 0 for none; else this worker keeps the projections of its last `queue_size`
            global crops per assigned crop, and Sinkhorn also assigns them (once the queue is full), to
            balance codes over more samples than a small batch holds (paper: 3840 over all workers,
            i.e. queue_length / world_size each, for batches of 256, filled from epoch 15 on). A
            checkpoint holds rank 0's queue, which every worker resumes with.
        global_crops, local_crops: crops per image (paper: 2 and 6).
        local_size: side of the local crops; 0 gives 3/7 of the image side (96 of 224 px).
        global_scale, local_scale: area ranges of the crops (paper: [0.14, 1] and [0.05, 0.14]).
        jitter: colour (RGB) or intensity (grayscale) jitter strength.
        blur: Gaussian blur probability of every crop (paper: 0.5).
    """

    def __init__(self, encoder: nn.Module, num_prototypes: int = 3000, proj_dim: int = 128, proj_hidden: list[int] = (2048,),
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 freeze_prototypes_fraction: float = 0.01, queue_size: int = 0, global_crops: int = 2,
                 local_crops: int = 6, local_size: int = 0, global_scale: list[float] = (0.14, 1.0),
                 local_scale: list[float] = (0.05, 0.14), jitter: float = 0.4, blur: float = 0.5, **kwargs):
        super().__init__(encoder, **kwargs)
        if num_prototypes < 1 or queue_size < 0 or sinkhorn_iterations < 1 or min(temperature, epsilon) <= 0:
            raise ValueError(f"need num_prototypes={num_prototypes} >= 1, queue_size={queue_size} >= 0, "
                             f"sinkhorn_iterations={sinkhorn_iterations} >= 1, temperature and epsilon > 0")
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.freeze_prototypes_fraction, self.queue_size = freeze_prototypes_fraction, queue_size
        self.multicrop = MultiCrop(self.image_size, self.in_chans, global_crops, local_crops, local_size,
                                   tuple(global_scale), tuple(local_scale), jitter, blur, self.data_mean, self.data_std)
        self.global_crops = global_crops
        self.projector = MLPHead(self.embed_dim, proj_dim, tuple(proj_hidden))
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self.normalize_prototypes()
        if queue_size:
            self.register_buffer("queue", torch.zeros(global_crops, queue_size, proj_dim))  # newest rows first
            self.register_buffer("queue_rows", torch.zeros((), dtype=torch.long))  # rows filled so far

    def sample_transform(self) -> MultiCrop:
        return self.multicrop

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Puts every prototype back on the unit sphere (the paper does so before every step)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    @property
    def prototypes_frozen(self) -> bool:
        """Whether this step leaves the prototypes as they are (steps 1 .. fraction * total)."""
        return 0 < self.current_step <= self.freeze_prototypes_fraction * self.total_steps

    def forward(self, inputs: list[Tensor], target: Tensor) -> dict[str, Tensor]:
        groups = crop_groups(inputs)  # per crop size: (V_i * B, C, H_i, W_i), crop-major
        batch = groups[0].shape[0] // self.global_crops
        features = torch.cat([self.encoder(group) for group in groups])  # (V * B, D), one pass per crop size
        z = F.normalize(self.projector(features).float(), dim=1)  # (V * B, P)
        # In float32 even under autocast: Sinkhorn exponentiates scores / epsilon (x20), which would
        # turn bfloat16's rounding of the scores into errors of about 8% in the codes.
        with torch.autocast(z.device.type, enabled=False):
            scores = self.prototypes(z).view(-1, batch, self.prototypes.out_features)  # (V, B, K)
            assigned = z[: self.global_crops * batch].detach().view(self.global_crops, batch, -1)  # (G, B, P)
            codes = self.assign(scores[: self.global_crops].detach(), assigned)  # (G, B, K)
        cross_entropy = swav_loss(scores, codes, self.temperature)
        code_entropy = mean_entropy(codes)
        # As in DINO: the codes carry no gradient, so stepping on cross-entropy minus their entropy,
        # KL(codes || prediction), is stepping on SwAV's loss; the KL is what the network can lower.
        return {"loss": cross_entropy - code_entropy, "cross_entropy": cross_entropy.detach(), "code_entropy": code_entropy}

    @torch.no_grad()
    def assign(self, scores: Tensor, embeddings: Tensor) -> Tensor:
        """(G, B, K) codes of the global crops from their scores (G, B, K), with the queued
        projections scored by the current prototypes in front once the queue is full; then this
        batch's projections (G, B, P) enter the queue (training only)."""
        use_queue = self.queue_size and int(self.queue_rows) >= self.queue_size
        codes = []
        for crop, crop_scores in enumerate(scores):
            if use_queue:
                crop_scores = torch.cat([self.prototypes(self.queue[crop]).float(), crop_scores])  # (Q + B, K)
            codes.append(sinkhorn_knopp(crop_scores, self.epsilon, self.sinkhorn_iterations)[-scores.shape[1]:])
        if self.queue_size and self.training:
            self.enqueue(embeddings)
        return torch.stack(codes)  # (G, B, K)

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor) -> None:
        new = embeddings[:, : self.queue_size].to(self.queue.dtype)  # (G, n, P)
        n = new.shape[1]
        self.queue[:, n:] = self.queue[:, :-n].clone()  # shift the older rows back, the oldest fall off
        self.queue[:, :n] = new
        self.queue_rows.copy_((self.queue_rows + n).clamp(max=self.queue_size))

    def train_step(self, batch, optimizers: dict, scaler: torch.amp.GradScaler, autocast) -> dict[str, Tensor]:
        """SwAV's iteration: normalize the prototypes, forward and backward, then the optimizer step,
        which skips the prototypes while they are frozen."""
        inputs, target = batch
        opt = optimizers["main"]
        self.normalize_prototypes()
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = self._forward_module(inputs, target)
        scaler.scale(out["loss"]).backward()
        if self.prototypes_frozen:
            self.prototypes.weight.grad = None  # the optimizer skips it: no step, no weight decay
        scaler.step(opt)
        scaler.update()
        self.after_step()
        return out

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The global and local crops of each image (codes come from the global ones)."""
        return crop_panels(self, self.multicrop, samples)
