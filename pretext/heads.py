"""Heads shared by pretext tasks (composable parts, not superclasses)."""
from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """Linear -> BatchNorm -> ReLU blocks, then a final Linear (hidden_dims=() gives a linear head)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: tuple[int, ...] | list[int] = (512,)):
        layers: list[nn.Module] = []
        dim = in_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            dim = hidden
        layers.append(nn.Linear(dim, out_dim))
        super().__init__(*layers)
