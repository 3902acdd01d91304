"""Losses shared by pretext tasks, as pure functions."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All workers' rows of `x` (W*N, D), gradients flowing back to each owner; and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x), 0), dist.get_rank() * x.shape[0]


def world_size() -> int:
    """Processes in the data-parallel group (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """`x` summed over all workers, without gradient (DINO's centre, SwAV's Sinkhorn sums); `x`
    itself outside torch.distributed."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def gather_global(x: Tensor) -> Tensor:
    """The global batch (W*N, D) on every worker, gradients flowing back to each row's owner:
    losses over batch statistics (Barlow Twins, VICReg) computed on it equal one process's loss on
    the whole batch, and DDP's gradient average gives that process's gradient."""
    return gather_with_grad(x)[0]


def info_nce(query: Tensor, key: Tensor, temperature: float = 0.1, gather: bool = False,
             query_negatives: bool = True, normalize: bool = True, extra_negatives: Tensor | None = None,
             decoupled: bool = False) -> tuple[Tensor, Tensor]:
    """InfoNCE (van den Oord et al. 2018) for paired embeddings; returns (loss, top-1 accuracy).

    Row i of `query` (N, D) is positive with row i of `key` (N, D). With `query_negatives` (NT-Xent,
    SimCLR) the loss is symmetric and every other embedding of both views is a negative: 2M - 1
    candidates per row for a global batch of M. Without it (CPC, cross-modal), the candidates are the
    M keys and the loss runs query -> key only. `gather` uses the batches of all Ray/DDP workers as
    negatives, with gradients flowing back through the gather. `extra_negatives` (K, D), e.g. a MoCo
    queue of earlier keys, are appended as candidates for every row (query -> key direction only).
    `decoupled` (DCL, Yeh et al. 2022; NT-Xent only) leaves the positive out of the softmax's
    denominator, which removes the small-batch damping of the gradient: -s_pos / T + log sum_neg exp(s / T).
    """
    if normalize:
        query, key = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
        if extra_negatives is not None:
            extra_negatives = F.normalize(extra_negatives.float(), dim=1)
    all_keys, offset = gather_with_grad(key) if gather else (key, 0)
    targets = torch.arange(query.shape[0], device=query.device) + offset
    if decoupled and (not query_negatives or extra_negatives is not None):
        raise ValueError("decoupled InfoNCE is implemented for NT-Xent (query_negatives, no extra negatives) only")
    if not query_negatives or extra_negatives is not None:
        candidates = all_keys if extra_negatives is None else torch.cat([all_keys, extra_negatives.to(all_keys.dtype)])
        logits = query @ candidates.T / temperature  # (N, M [+ K])
        return F.cross_entropy(logits, targets), (logits.argmax(1) == targets).float().mean()
    all_queries, _ = gather_with_grad(query) if gather else (query, 0)
    total = all_keys.shape[0]
    self_mask = F.one_hot(targets, total).bool()  # each row's own column in the same-view block
    losses, correct = [], []
    for anchors, same_view, other_view in ((query, all_queries, all_keys), (key, all_keys, all_queries)):
        positives_block = anchors @ other_view.T / temperature  # (N, M): positive on the "diagonal"
        same_block = (anchors @ same_view.T / temperature).masked_fill(self_mask, float("-inf"))  # (N, M)
        logits = torch.cat([positives_block, same_block], 1)  # (N, 2M)
        if decoupled:
            positive = logits.gather(1, targets[:, None]).squeeze(1)
            negatives = logits.scatter(1, targets[:, None], float("-inf"))
            losses.append((negatives.logsumexp(1) - positive).mean())
        else:
            losses.append(F.cross_entropy(logits, targets))
        correct.append((logits.argmax(1) == targets).float().mean())
    return (losses[0] + losses[1]) / 2, (correct[0] + correct[1]) / 2


def multi_view_nt_xent(views: Tensor, temperature: float = 0.1, gather: bool = False, decoupled: bool = False) -> tuple[Tensor, Tensor]:
    """NT-Xent over V >= 2 embedded views of each image (V, N, D): every other view of the same
    image is a positive, every view of every other image a negative (the multi-positive form of
    Khosla et al. 2020 with the image as its own class, as solo-learn scores SimCLR's multi-crop).
    Each anchor's loss is the mean over its V - 1 positives of -log softmax over all V*M - 1 other
    embeddings of the global batch (M images); with V = 2 it equals `info_nce` (NT-Xent).
    `decoupled` (DCL) leaves every positive out of the denominators. Returns
    (loss, top-1 accuracy: the anchor's most similar embedding is one of its positives)."""
    count, batch = views.shape[0], views.shape[1]
    if count < 2:
        raise ValueError(f"multi_view_nt_xent needs at least 2 views, got {count}")
    views = F.normalize(views.float(), dim=2)
    anchors = views.flatten(0, 1)  # (V*N, D), view-major
    # Gather image-major rows (N, V*D) so that every worker's images keep their V views together.
    everyone, offset = gather_with_grad(views.transpose(0, 1).flatten(1)) if gather else (views.transpose(0, 1).flatten(1), 0)
    total = everyone.shape[0]
    candidates = everyone.view(total, count, -1).transpose(0, 1).flatten(0, 1)  # (V*M, D), view-major
    logits = anchors @ candidates.T / temperature  # (V*N, V*M)
    image = (torch.arange(batch, device=views.device) + offset).repeat(count)  # each anchor's image id
    anchor_column = image + torch.arange(count, device=views.device).repeat_interleave(batch) * total
    candidate_image = torch.arange(total, device=views.device).repeat(count)
    itself = F.one_hot(anchor_column, count * total).bool()
    logits = logits.masked_fill(itself, float("-inf"))
    positive = (candidate_image[None, :] == image[:, None]) & ~itself
    denominator = (logits.masked_fill(positive, float("-inf")) if decoupled else logits).logsumexp(1, keepdim=True)
    log_prob = logits - denominator
    loss = -(log_prob.masked_fill(~positive, 0.0).sum(1) / (count - 1)).mean()
    accuracy = positive.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    return loss, accuracy


GAN_LOSSES = ("non_saturating", "minimax", "wgan_gp")


def discriminator_loss(real_scores: Tensor, fake_scores: Tensor, kind: str) -> Tensor:
    """Goodfellow et al.'s discriminator loss -log D(x) - log(1 - D(G(z))) with D = sigmoid(score);
    for WGAN the critic's E[D(G(z))] - E[D(x)] (its gradient penalty is added by the caller)."""
    if kind == "wgan_gp":
        return fake_scores.float().mean() - real_scores.float().mean()
    return F.softplus(-real_scores.float()).mean() + F.softplus(fake_scores.float()).mean()


def generator_loss(fake_scores: Tensor, kind: str) -> Tensor:
    """non_saturating: -log D(G(z)) (Goodfellow et al.'s practical choice: strong gradients early);
    minimax: log(1 - D(G(z))), the game's own objective; wgan_gp: -E[D(G(z))]."""
    scores = fake_scores.float()
    if kind == "non_saturating":
        return F.softplus(-scores).mean()
    if kind == "minimax":
        return -F.softplus(scores).mean()
    return -scores.mean()


def gradient_penalty(critic, real: Tensor, fake: Tensor, eps: Tensor | None = None) -> Tensor:
    """Gulrajani et al.'s E[(||grad_x critic(x_hat)||_2 - 1)^2] at x_hat = eps * real + (1 - eps) * fake,
    eps ~ U[0, 1] per sample; differentiable (create_graph) so it trains the critic."""
    if eps is None:
        eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device)
    x_hat = (eps * real.detach().float() + (1 - eps) * fake.detach().float()).requires_grad_(True)
    with torch.autocast(real.device.type, enabled=False):
        scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
