"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018 InstDisc; DINO).

Neighbours by cosine similarity; each of the k neighbours votes for its class with weight
exp(similarity / temperature). The test set is processed in chunks so memory stays bounded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Predicted labels (N_test,) for test features (N_test, D) from a labelled bank (N_train, D)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)  # (N, D)
    predictions = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].float(), dim=1)  # (Q, D)
        similarity = queries @ bank.T  # (Q, N)
        top_sim, top_idx = similarity.topk(k, dim=1)  # (Q, k)
        # exp of the similarity above the row's best: the same votes up to a per-row factor, and no
        # overflow (exp(1 / T) is inf in float32 below T = 0.011).
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx].long(), weights)  # (Q, C)
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int, temperature: float = 0.07) -> float:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    return float((predicted == test_labels).float().mean())
