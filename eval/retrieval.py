"""Cross-modal retrieval: recall@K of paired embeddings (image -> audio and audio -> image).

Row i of `queries` belongs with row i of `items`. A query is answered correctly at K when one of
its positives is among the K items most similar to it (cosine similarity). By default the only
positive is the paired row; with `groups` (e.g. the source clip of each frame) every item of the
query's group counts, since another second of the same clip is just as right.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def retrieval_ranks(queries: Tensor, items: Tensor, groups: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """For every query, how many non-positive items score strictly higher than its best positive
    (0: a positive is the top hit). Ties count in the query's favour."""
    if queries.shape != items.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and items {tuple(items.shape)} must be paired row by row")
    queries, items = F.normalize(queries.float(), dim=1), F.normalize(items.float(), dim=1)
    ids = torch.arange(len(items)) if groups is None else torch.as_tensor(groups)
    return torch.cat([ranks_from_scores(queries[start : start + chunk] @ items.T, ids, start) for start in range(0, len(queries), chunk)])


def ranks_from_scores(scores: Tensor, groups: Tensor, offset: int = 0) -> Tensor:
    """Ranks from a score matrix (q, N) whose row i is query `offset + i` and column j item j
    (higher: more alike; any score, e.g. a correspondence network's, not only cosine)."""
    ids = torch.as_tensor(groups)
    positive = ids[offset : offset + len(scores), None] == ids[None, :]
    best_positive = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores > best_positive) & ~positive).sum(dim=1)


def recall_at_k(queries: Tensor, items: Tensor, ks: tuple[int, ...] = (1, 5, 10), groups: Tensor | None = None) -> dict[str, float]:
    ranks = retrieval_ranks(queries, items, groups)
    return {f"R@{k}": float((ranks < k).float().mean()) for k in ks}


def cross_modal_retrieval(image: Tensor, audio: Tensor, ks: tuple[int, ...] = (1, 5, 10), groups: Tensor | None = None) -> dict:
    """Recall@K both ways, plus chance level (K / number of candidate groups) for reading them."""
    candidates = len(image) if groups is None else len(torch.unique(torch.as_tensor(groups)))
    return {
        "image_to_audio": recall_at_k(image, audio, ks, groups),
        "audio_to_image": recall_at_k(audio, image, ks, groups),
        "chance": {f"R@{k}": min(1.0, k / candidates) for k in ks},
        "queries": len(image),
    }
