"""Jigsaw and context prediction: the target always matches what the transform did."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pretext.spatial.context_prediction import NEIGHBOUR_OFFSETS, ContextTransform
from pretext.spatial.jigsaw import JigsawTransform, permutation_set
from tests.test_tasks import make_task, sample_dicts


def test_permutation_set_is_deterministic_distinct_and_far_apart():
    perms = permutation_set(100, seed=0)
    assert perms.shape == (100, 9)
    assert np.array_equal(perms, permutation_set(100, seed=0))
    assert all(sorted(p) == list(range(9)) for p in perms)
    distances = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    np.fill_diagonal(distances, 9)
    # Greedy max-min selection: 100 permutations of 9 stay at least 6 apart (Noroozi & Favaro report
    # an average distance near 8 for their maximal set); random ones typically come within 2.
    assert distances.min() >= 6
    random_perms = np.random.default_rng(0).permuted(np.tile(np.arange(9), (100, 1)), axis=1)
    random_distances = (random_perms[:, None] != random_perms[None]).sum(-1) + 9 * np.eye(100, dtype=int)
    assert random_distances.min() < distances.min()


def test_jigsaw_inverse_permutation_restores_the_image():
    transform = JigsawTransform(permutation_set(24, seed=1), grid=3, tile=8, normalize_tiles=False)
    image = torch.randn(1, 24, 24)
    for _ in range(10):
        tiles, index = transform({"image": image})
        perm = transform.permutations[int(index)]
        restored = torch.empty_like(tiles)
        restored[torch.from_numpy(perm)] = tiles  # position i holds tile perm[i]
        rows = [torch.cat(list(restored[r * 3 : r * 3 + 3]), dim=-1) for r in range(3)]
        assert torch.equal(torch.cat(rows, dim=-2), image)


def test_jigsaw_tiles_come_from_their_cells_and_are_standardized():
    task = make_task("jigsaw", normalize_tiles=False)
    transform = task.sample_transform()
    image = sample_dicts(1)[0]["image"]
    cell, tile = 16 // 3, task.tile
    tiles, index = transform({"image": image})
    perm = transform.permutations[int(index)]
    for position, original in enumerate(perm):
        row, col = divmod(int(original), 3)
        region = image[:, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
        windows = region.unfold(1, tile, 1).unfold(2, tile, 1)  # every tile-sized crop inside the cell
        assert (windows == tiles[position].unsqueeze(1).unsqueeze(1)).flatten(3).all(-1).any()
    # With normalize_tiles (the default) every tile is standardized on its own.
    normalized, _ = make_task("jigsaw").sample_transform()({"image": image})
    assert torch.allclose(normalized.mean(dim=(1, 2, 3)), torch.zeros(9), atol=1e-5)
    assert torch.allclose(normalized.std(dim=(1, 2, 3)), torch.ones(9), atol=1e-3)


def test_jigsaw_permutations_travel_with_the_checkpoint():
    task = make_task("jigsaw", num_permutations=10, seed=3)
    other = make_task("jigsaw", num_permutations=10, seed=4)
    assert not torch.equal(task.permutations, other.permutations)
    other.load_state_dict(task.state_dict())
    assert np.array_equal(other.sample_transform().permutations, task.permutations.numpy())


def test_jigsaw_grid_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="grid=5.*3px cells"):
        make_task("jigsaw", grid=5)


def locate(patch: torch.Tensor, image: torch.Tensor) -> tuple[int, int]:
    size = patch.shape[-1]
    windows = image.unfold(1, size, 1).unfold(2, size, 1)  # (C, Y, X, size, size)
    hits = (windows == patch.unsqueeze(1).unsqueeze(1)).flatten(3).all(-1).all(0).nonzero()
    assert len(hits) == 1, "the patch must occur exactly once in the image"
    return int(hits[0, 0]), int(hits[0, 1])


def test_context_neighbour_lies_in_the_direction_of_its_label():
    random.seed(0)
    transform = ContextTransform(patch=8, gap=2, jitter=1, normalize_patches=False)
    image = torch.randn(1, 48, 48)
    seen = set()
    for _ in range(60):
        (centre, neighbour), label = transform({"image": image})
        (cy, cx), (ny, nx) = locate(centre, image), locate(neighbour, image)
        dy, dx = NEIGHBOUR_OFFSETS[int(label)]
        step = 8 + 2
        # The offset is one patch plus the gap in the label's direction, give or take the jitter.
        assert abs(ny - cy - dy * step) <= 1 and abs(nx - cx - dx * step) <= 1
        # With a gap, the patches never touch, so no boundary pixels can be matched.
        assert max(abs(ny - cy), abs(nx - cx)) >= 8 + 2 - 1
        seen.add(int(label))
    assert seen == set(range(8))


def test_context_patches_are_mean_subtracted():
    task = make_task("context_prediction")
    patches, _ = task.sample_transform()(sample_dicts(1)[0])
    assert torch.allclose(patches.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)


def test_context_layout_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="patch_fraction=0.4"):
        make_task("context_prediction", patch_fraction=0.4)
