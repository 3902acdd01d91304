"""CPC: the patch grid, causality of the context network, the loss against explicit logits,
gradients everywhere, learning on a fixed batch, and option validation."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from core.options import ModelConfig, OptimConfig
from models.backbone import create_backbone
from pipeline.data.streaming import collate
from pipeline.train.loop import autocast_factory
from pretext.spatial.cpc import CPC
from tests.conftest import TINY_BACKBONE, synthetic_images

IMAGE_SIZE = 16  # default patch 8, stride 4: a 3x3 grid


def make_task(image_size: int = IMAGE_SIZE, **options) -> CPC:
    torch.manual_seed(0)
    encoder = create_backbone(ModelConfig(**TINY_BACKBONE), in_chans=1)
    return CPC(encoder, in_chans=1, image_size=image_size, **options)


def sample_dicts(count: int, size: int = IMAGE_SIZE) -> list[dict]:
    images, labels = synthetic_images(count, size)
    return [
        {"image": torch.from_numpy(img).float().div(255).sub(0.3).unsqueeze(0), "label": int(lab), "key": f"k{i}"}
        for i, (img, lab) in enumerate(zip(images, labels))
    ]


def fixed_batch(task: CPC, count: int = 16):
    transform = task.sample_transform()
    return collate([transform(s) for s in sample_dicts(count, task.image_size)])


def test_grid_shape_and_each_patch_is_the_crop_at_its_position():
    task = make_task(image_size=20, patch_size=8, patch_stride=3, jitter=0, flip=False)  # 5x5 grid
    sample = sample_dicts(1, 20)[0]
    patches, target = task.sample_transform()(sample)
    assert patches.shape == (25, 1, 8, 8) and patches.dtype == torch.float32
    assert target.item() == 0
    origins = task.patch_origins()
    assert origins[:6].tolist() == [[0, 0], [0, 3], [0, 6], [0, 9], [0, 12], [3, 0]]  # row-major
    for patch, (y, x) in zip(patches, origins.tolist()):
        assert torch.equal(patch, sample["image"][:, y : y + 8, x : x + 8])
    assert len(pickle.dumps(task.sample_transform())) < 10_000


def crop(image: torch.Tensor, y: int, x: int, flip: bool, size: int = 8) -> torch.Tensor:
    patch = image[:, y : y + size, x : x + size]
    return patch.flip(-1) if flip else patch


def test_augmented_patches_are_flipped_or_shifted_crops_near_their_position():
    task = make_task(jitter=1, flip=True)
    image = sample_dicts(1)[0]["image"]
    transform, origins = task.sample_transform(), task.patch_origins().tolist()
    seen_flip = seen_shift = False
    for _ in range(10):
        patches, _ = transform({"image": image, "label": 0, "key": "k"})
        for patch, (y0, x0) in zip(patches, origins):
            matches = {
                (y, x, flip)
                for y in range(max(y0 - 1, 0), min(y0 + 1, IMAGE_SIZE - 8) + 1)
                for x in range(max(x0 - 1, 0), min(x0 + 1, IMAGE_SIZE - 8) + 1)
                for flip in (False, True)
                if torch.equal(patch, crop(image, y, x, flip))
            }
            assert matches, "patch is no crop within 1 px of its grid position"
            seen_flip |= all(flip for _, _, flip in matches)
            seen_shift |= all((y, x) != (y0, x0) for y, x, _ in matches)
    assert seen_flip and seen_shift


@pytest.mark.parametrize("row", [0, 1, 2])
def test_context_at_a_row_sees_only_that_row_and_the_rows_above(row):
    task = make_task(image_size=24, patch_size=8, patch_stride=4, jitter=0, flip=False).eval()  # 5x5 grid
    grid = task.grid
    z = torch.randn(2, task.embed_dim, grid, grid, requires_grad=True)
    task.context(z)[:, :, : row + 1].square().sum().backward()
    assert torch.all(z.grad[:, :, row + 1 :] == 0), "context at rows <= i depends on rows below"
    assert torch.all(z.grad[:, :, row].abs().sum(0).sum(0) > 0), "context at row i ignores some patch of row i"

    # The same through the backbone: changing the patches of rows below leaves c at rows <= i unchanged
    # (eval mode: BatchNorm uses running statistics, so images and patches do not interact).
    inputs, _ = fixed_batch(task, 2)
    with torch.no_grad():
        _, c = task.encode(inputs)
        below = inputs.clone().view(2, grid, grid, 1, 8, 8)
        below[:, row + 1 :] = torch.randn_like(below[:, row + 1 :])
        _, c_below = task.encode(below.view_as(inputs))
        same_row = inputs.clone().view(2, grid, grid, 1, 8, 8)
        same_row[:, row] = torch.randn_like(same_row[:, row])
        _, c_same_row = task.encode(same_row.view_as(inputs))
    assert torch.allclose(c_below[:, :, : row + 1], c[:, :, : row + 1], atol=1e-5)
    assert not torch.allclose(c_below[:, :, row + 1 :], c[:, :, row + 1 :], atol=1e-3)
    assert not torch.allclose(c_same_row[:, :, row], c[:, :, row], atol=1e-3)
    assert torch.allclose(c_same_row[:, :, :row], c[:, :, :row], atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_loss_equals_cross_entropy_on_explicit_logits(normalize):
    task = make_task(pred_steps=(1, 2), temperature=0.5, normalize=normalize, queries_per_image=100).eval()
    inputs, target = fixed_batch(task, 3)
    out = task(inputs, target)
    z, c = task.encode(inputs)
    grid, losses, accuracies = task.grid, [], []
    for k, predictor in zip(task.pred_steps, task.predictors):
        prediction = predictor(c)
        pairs = [(prediction[b, :, i, j], z[b, :, i + k, j]) for b in range(3) for i in range(grid - k) for j in range(grid)]
        queries, keys = torch.stack([q for q, _ in pairs]), torch.stack([t for _, t in pairs])
        if normalize:
            queries, keys = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
        # Every patch at rows >= k of every image is a candidate; the right one is the pair's own.
        logits = queries @ keys.T / 0.5
        assert logits.shape == (3 * (grid - k) * grid,) * 2
        losses.append(F.cross_entropy(logits, torch.arange(len(pairs))))
        accuracies.append((logits.argmax(1) == torch.arange(len(pairs))).float().mean())
    assert torch.allclose(out["loss"], torch.stack(losses).mean(), atol=1e-5)
    assert torch.allclose(out["accuracy"], torch.stack(accuracies).mean())


def test_sampled_queries_are_distinct_positions_paired_with_the_patch_k_rows_below():
    task = make_task(image_size=24, queries_per_image=5, pred_steps=(1, 3)).eval()  # 5x5 grid
    inputs, _ = fixed_batch(task, 4)
    with torch.no_grad():
        z, c = task.encode(inputs)
        for k, predictor in zip(task.pred_steps, task.predictors):
            full = predictor(c)
            query, key = task.prediction_pairs(z, c, k, predictor)
            assert query.shape == key.shape == (4 * 5, task.embed_dim)
            for b in range(4):
                found = []
                for n in range(b * 5, b * 5 + 5):  # image-major rows
                    hits = [(i, j) for i in range(task.grid - k) for j in range(task.grid) if torch.allclose(query[n], full[b, :, i, j])]
                    assert len(hits) == 1, "a prediction is no prediction of this image"
                    i, j = hits[0]
                    assert torch.equal(key[n], z[b, :, i + k, j]), "the key is not the patch k rows below"
                    found.append(hits[0])
                assert len(set(found)) == 5, "an image's sampled positions repeat"


def test_train_step_gives_every_parameter_a_gradient():
    task = make_task(pred_steps=(1, 2))
    optimizers = task.make_optimizers(OptimConfig(), lr=0.01)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    out = task.train_step(fixed_batch(task), optimizers, scaler, autocast)
    assert torch.isfinite(out["loss"]) and 0 <= out["accuracy"].item() <= 1
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert any(n.startswith("predictors.1") for n, _ in task.named_parameters())


def test_twenty_steps_lower_the_loss_on_a_fixed_batch():
    task = make_task()
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0), lr=3e-3)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    batch = fixed_batch(task, 32)
    losses = [float(task.train_step(batch, optimizers, scaler, autocast)["loss"].detach()) for _ in range(20)]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("options, image_size, match", [
    ({"patch_size": 12, "patch_stride": 5}, 16, "patch_size=12, patch_stride=5 on 16px"),  # 1 row only
    ({"patch_size": 20}, 16, "patch_size=20"),
    ({"patch_stride": 0}, 16, "patch_stride=0"),
    ({"pred_steps": (1, 3)}, 16, r"pred_steps=\(1, 3\)"),  # 3x3 grid: at most 2 rows below
    ({"pred_steps": (0,)}, 32, "pred_steps"),
    ({"pred_steps": ()}, 32, "pred_steps"),
    ({"jitter": -1}, 16, "jitter"),
    ({"queries_per_image": 0}, 16, "queries_per_image"),
])
def test_bad_options_raise_value_error_naming_them(options, image_size, match):
    with pytest.raises(ValueError, match=match):
        make_task(image_size=image_size, **options)
