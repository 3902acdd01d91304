"""Jigsaw puzzles (Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles", ECCV 2016): shuffle 3x3 tiles by one of a fixed set of permutations and classify
which permutation was applied, each tile going through the shared backbone ("context-free network")."""
from __future__ import annotations

import itertools
import random

import numpy as np
import torch
from torch import Tensor, nn

from core.grids import Panel, mosaic
from pretext.base import PretextTask
from pretext.heads import MLPHead


def permutation_set(count: int, grid: int = 3, seed: int = 0) -> np.ndarray:
    """`count` permutations of grid*grid tiles chosen greedily for a large Hamming distance: like
    Noroozi & Favaro's algorithm 1, repeatedly add the permutation farthest from the chosen set,
    measured here by the minimum distance to it (their criterion sums the distances; the minimum
    guarantees no two classes are near-duplicates).

    Deterministic for a given seed; the set is also stored in the task's state dict, so a checkpoint
    keeps the transform and the head in agreement even if this function changes.
    """
    tiles = grid * grid
    if tiles > 9:
        raise ValueError(f"grid {grid}x{grid}: enumerating {tiles}! permutations is too large; use grid <= 3")
    every = np.array(list(itertools.permutations(range(tiles))), dtype=np.int8)
    if not 1 <= count <= len(every):
        raise ValueError(f"num_permutations={count} must be between 1 and {len(every)} for a {grid}x{grid} grid")
    chosen = [np.random.default_rng(seed).integers(len(every))]
    min_distance = (every != every[chosen[0]]).sum(1)
    for _ in range(count - 1):
        best = int(min_distance.argmax())  # first of the farthest: ties break deterministically
        chosen.append(best)
        min_distance = np.minimum(min_distance, (every != every[best]).sum(1))
    return every[chosen].astype(np.int64)


def standardize(tiles: Tensor) -> Tensor:
    """Each tile to zero mean and unit variance, so low-level statistics (edges continuing across
    tiles, chromatic aberration, brightness) cannot be matched instead of learning object parts."""
    mean = tiles.mean(dim=(-3, -2, -1), keepdim=True)
    std = tiles.std(dim=(-3, -2, -1), keepdim=True)
    return (tiles - mean) / (std + 1e-5)


class JigsawTransform:
    """Per-sample transform: (grid*grid, C, tile, tile) shuffled tiles and the permutation's index.

    Position i of the output holds tile `permutation[i]` of the image (row-major), cut at a random
    offset inside its cell so neighbouring tiles never share a boundary (a gap of cell - tile pixels).
    """

    def __init__(self, permutations: np.ndarray, grid: int, tile: int, normalize_tiles: bool):
        self.permutations = permutations
        self.grid, self.tile, self.normalize_tiles = grid, tile, normalize_tiles

    def cut(self, image: Tensor) -> Tensor:
        """The grid*grid tiles of `image` in row-major order, each randomly placed in its cell."""
        cell = image.shape[-1] // self.grid
        tiles = []
        for row in range(self.grid):
            for col in range(self.grid):
                dy, dx = random.randint(0, cell - self.tile), random.randint(0, cell - self.tile)
                y, x = row * cell + dy, col * cell + dx
                tiles.append(image[:, y : y + self.tile, x : x + self.tile])
        return torch.stack(tiles)

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        tiles = self.cut(sample["image"])
        index = random.randrange(len(self.permutations))
        shuffled = tiles[torch.from_numpy(self.permutations[index])]
        return (standardize(shuffled) if self.normalize_tiles else shuffled), torch.tensor(index)


class Jigsaw(PretextTask):
    """Permutation classification over tiles encoded independently by the shared backbone; their
    embeddings are concatenated in shuffled order and an MLP predicts the permutation index.

    Args:
        num_permutations: size of the permutation set (Noroozi & Favaro: 100 is the best trade-off
            between task difficulty and ambiguity).
        grid: tiles per side (3 in the paper).
        tile_fraction: tile side as a fraction of the cell side; the rest is the random jitter/gap.
        normalize_tiles: standardize each tile on its own.
        tile_dim: per-tile embedding size before concatenation (the paper's shared fc6).
        head_hidden: hidden widths of the classifier over the concatenated tiles.
        seed: seed of the permutation set.
    """

    def __init__(self, encoder: nn.Module, num_permutations: int = 100, grid: int = 3, tile_fraction: float = 0.85,
                 normalize_tiles: bool = True, tile_dim: int = 256, head_hidden: list[int] = (1024,), seed: int = 0, **kwargs):
        super().__init__(encoder, **kwargs)
        cell = self.image_size // grid
        self.tile = max(1, int(cell * tile_fraction))
        if grid < 2 or cell < 4 or not 0 < tile_fraction <= 1 or self.tile < 2:
            raise ValueError(
                f"jigsaw grid={grid}, tile_fraction={tile_fraction} on {self.image_size}px images gives {cell}px cells: "
                f"needs grid >= 2, cells of at least 4 px, tiles of at least 2 px and 0 < tile_fraction <= 1; "
                f"raise data.image_size or lower grid"
            )
        self.grid, self.normalize_tiles = grid, normalize_tiles
        self.register_buffer("permutations", torch.from_numpy(permutation_set(num_permutations, grid, seed)))
        self.tile_embed = nn.Sequential(nn.Linear(self.embed_dim, tile_dim), nn.ReLU(inplace=True))
        self.head = MLPHead(tile_dim * grid * grid, num_permutations, tuple(head_hidden))

    def sample_transform(self) -> JigsawTransform:
        # Built from the buffer, which a resumed checkpoint has already overwritten.
        return JigsawTransform(self.permutations.cpu().numpy(), self.grid, self.tile, self.normalize_tiles)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The image, then its tiles laid out in the order the network receives them (position i
        holds tile permutations[index][i]), captioned with the permutation index it must predict."""
        transform = self.sample_transform()
        examples = []
        for sample in samples:
            tiles, index = transform(sample)
            examples.append([Panel(self.to_unit_range(sample["image"]), "image"),
                             Panel(mosaic(self.to_unit_range(tiles), self.grid), f"perm {int(index)}")])
        return examples

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        batch, tiles = inputs.shape[:2]  # inputs: (B, grid*grid, C, tile, tile)
        embedded = self.tile_embed(self.encoder(inputs.flatten(0, 1))).view(batch, -1)
        logits = self.head(embedded)
        loss = nn.functional.cross_entropy(logits.float(), target)
        return {"loss": loss, "accuracy": (logits.argmax(1) == target).float().mean().detach()}
