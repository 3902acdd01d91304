"""The joint-embedding augmentations (pretext/augment.py): crop geometry, flips, jitter and blur
against their definitions and torchvision, per sample and per batch, and training with
`data.augment_on=device`."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from core.errors import ConfigError
from pipeline.train.loop import train_worker
from pipeline.train.metrics import read_metrics
from pipeline.train.session import LocalSession
from pretext.augment import MultiCrop, TwoViews, ViewAugment
from tests.test_train import tiny_config


def ramp(batch: int = 2, channels: int = 1, size: int = 28) -> torch.Tensor:
    return torch.arange(size * size, dtype=torch.float).view(1, 1, size, size).repeat(batch, channels, 1, 1)


def test_crop_of_a_pixel_aligned_box_is_exactly_that_block_and_flip_mirrors_it():
    images = ramp()
    # Boxes in [-1, 1] coordinates: centre (-0.5, -0.5), half-size 0.5 is the top-left 14x14 block.
    boxes = torch.tensor([[-0.5, -0.5, 0.5, 0.5, 1.0], [0.5, 0.5, 0.5, 0.5, -1.0]])
    out = ViewAugment(14, 1, jitter=0).crop(images, boxes)
    torch.testing.assert_close(out[0, 0], images[0, 0, :14, :14], atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1, 0], images[1, 0, 14:, 14:].flip(-1), atol=1e-3, rtol=0)


def test_crop_boxes_have_the_drawn_area_stay_inside_and_differ_per_image():
    augment = ViewAugment(28, 1, crop_scale=(0.3, 0.3))
    boxes = augment.crop_boxes(4096, "cpu")
    centre_x, centre_y, half_w, half_h, flip, angle = boxes.unbind(1)
    assert (angle == 0).all()  # rotate=0
    unclipped = (half_w < 1) & (half_h < 1)
    # Area fraction of the image: (2 half_w)(2 half_h) / 2^2.
    torch.testing.assert_close((half_w * half_h)[unclipped], torch.full((int(unclipped.sum()),), 0.3))
    aspect = (half_w / half_h)[unclipped]
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    assert ((centre_x.abs() + half_w) <= 1 + 1e-6).all() and ((centre_y.abs() + half_h) <= 1 + 1e-6).all()
    assert set(flip.tolist()) == {-1.0, 1.0} and 0.45 < (flip < 0).float().mean() < 0.55
    assert centre_x.unique().numel() > 4000  # one crop per image, not one per batch


def test_grayscale_intensity_jitter_is_contrast_times_image_plus_brightness_within_strength():
    torch.manual_seed(0)
    augment = ViewAugment(8, 1, jitter=0.4)
    images = torch.randn(512, 1, 8, 8)
    out = augment.colour(images)
    x, y = images.flatten(1), out.flatten(1)
    # Per image, out = c * x + b exactly: fit c and b by least squares.
    c = ((x - x.mean(1, keepdim=True)) * (y - y.mean(1, keepdim=True))).sum(1) / (x - x.mean(1, keepdim=True)).pow(2).sum(1)
    b = y.mean(1) - c * x.mean(1)
    torch.testing.assert_close(y, c[:, None] * x + b[:, None], atol=1e-4, rtol=1e-4)
    changed = (c - 1).abs() > 1e-6
    assert 0.7 < changed.float().mean() < 0.9  # applied with probability 0.8
    assert (c - 1).abs().max() <= 0.4 + 1e-5 and b.abs().max() <= 0.4 + 1e-5


def test_rgb_colour_jitter_with_unit_factors_is_the_identity_and_grayscale_equalizes_channels():
    torch.manual_seed(0)
    pixels = torch.rand(16, 3, 8, 8)
    augment = ViewAugment(8, 3, jitter=0.4)
    unit = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(16, 1)
    torch.testing.assert_close(augment.colour_jitter(pixels, unit), pixels, atol=1e-5, rtol=0)
    factors = augment.jitter_factors(4096, "cpu")
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4 and factors[:, 3].abs().max() <= 0.1
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    normalized = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = ViewAugment(8, 3, jitter=0.4, mean=mean, std=std).colour(normalized)
    back = out * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5  # jittered in pixel space, clipped there
    gray = (back[:, 0] - back[:, 1]).abs().amax((1, 2)) < 1e-5
    assert 0 < gray.sum() < 16  # random grayscale, p = 0.2


def test_brightness_and_saturation_match_torchvision_and_hue_keeps_luma():
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 6, 6) * 0.5 + 0.25  # no clipping
    augment = ViewAugment(6, 3)
    factors = torch.tensor([[1.3, 1.0, 1.0, 0.0], [1.0, 1.0, 0.6, 0.0]])
    out = augment.colour_jitter(pixels, factors)
    torch.testing.assert_close(out[0], TF.adjust_brightness(pixels[0], 1.3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], TF.adjust_saturation(pixels[1], 0.6), atol=1e-3, rtol=0)
    shifted = augment.colour_jitter(pixels, torch.tensor([[1.0, 1.0, 1.0, 0.08]]).repeat(2, 1))
    luma = lambda x: (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)  # noqa: E731
    torch.testing.assert_close(luma(shifted), luma(pixels), atol=1e-4, rtol=0)
    assert (shifted - pixels).abs().max() > 0.01
    full_turn = augment.colour_jitter(pixels, torch.tensor([[1.0, 1.0, 1.0, 1.0]]).repeat(2, 1))
    torch.testing.assert_close(full_turn, pixels, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sigma", [0.5, 1.3])
def test_gaussian_blur_matches_torchvision_and_sigma_zero_leaves_the_image(sigma):
    torch.manual_seed(0)
    images = torch.rand(3, 2, 28, 28)
    augment = ViewAugment(28, 2, blur=1.0)  # kernel 3 at 28 px
    blurred = augment.gaussian_blur(images, torch.tensor([sigma, sigma, 0.0]))
    expected = TF.gaussian_blur(images[:2], [augment.blur_kernel] * 2, [sigma, sigma])
    torch.testing.assert_close(blurred[:2], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blurred[2], images[2])


def test_per_sample_and_per_batch_views_have_the_same_layout_and_distribution():
    images = torch.randn(512, 1, 28, 28)
    views = TwoViews(28, 1, crop_scale=(0.3, 1.0))
    batched = views.on_batch(images)
    single = torch.stack([views({"image": image})[0] for image in images])
    assert batched.shape == single.shape == (512, 2, 1, 28, 28)
    assert not torch.equal(batched[:, 0], batched[:, 1])
    # Same augmentation drawn two ways: the mean squared change of the image agrees within noise.
    change = lambda v: (v[:, 0] - images).pow(2).mean().item()  # noqa: E731
    assert math.isclose(change(batched), change(single), rel_tol=0.15)
    crops = MultiCrop(28, 1, global_crops=2, local_crops=3, local_size=12)
    per_batch, (per_sample, _) = crops.on_batch(images[:4]), crops({"image": images[0]})
    assert [c.shape for c in per_batch] == [(4, 2, 1, 28, 28), (4, 3, 1, 12, 12)]
    assert [c.shape for c in per_sample] == [(2, 1, 28, 28), (3, 1, 12, 12)]


@pytest.mark.parametrize("name", ["byol", "swav"])  # two views, multi-crop
def test_fresh_device_views_of_a_fixed_batch_are_learnable(name):
    """The loss falls over 20 steps on one batch of images whose views are drawn anew on every
    step by `on_batch`, as the training loop does with data.augment_on=device. (InfoNCE on the
    tiny backbone needs far more than 20 steps of fresh views, per sample or per batch alike.)"""
    from core.options import OptimConfig
    from pipeline.train.loop import autocast_factory
    from tests.test_tasks import make_task, sample_dicts

    task = make_task(name)
    views = task.sample_transform()
    images = torch.stack([s["image"] for s in sample_dicts(32, task.in_chans)])
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0), lr=3e-3)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    torch.manual_seed(0)
    losses = []
    for step in range(1, 21):
        task.set_progress(step, 20)
        losses.append(float(task.train_step((views.on_batch(images), torch.zeros(32)), optimizers, scaler, autocast)["loss"]))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_the_loop_feeds_device_views_to_the_task(shards, tmp_path, monkeypatch):
    from pretext.joint_embedding.exemplar import Exemplar

    seen = []
    original = Exemplar.train_step

    def recording(self, batch, *args):
        seen.append(batch[0].shape)
        return original(self, batch, *args)

    monkeypatch.setattr(Exemplar, "train_step", recording)
    cfg = tiny_config(shards, tmp_path / "run", task__name="exemplar", data__augment_on="device", train__steps=4,
                      train__log_every=2, train__checkpoint_every=4)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    assert seen == [(32, 2, 1, 16, 16)] * 4
    assert all(math.isfinite(r["loss"]) for r in read_metrics(cfg.run_dir))


def test_augmentation_on_the_device_is_refused_for_a_per_sample_task(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", data__augment_on="device")  # rotation
    with pytest.raises(ConfigError, match="data.augment_on=device: task 'rotation'"):
        train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))


def test_rotated_full_box_is_the_image_turned_a_quarter_and_erasing_blanks_one_rectangle():
    images = ramp(1, 1, 8)
    quarter = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, math.pi / 2]])
    out = ViewAugment(8, 1, jitter=0).crop(images, quarter)
    turned = [torch.rot90(images, k, dims=(-2, -1)) for k in (1, -1)]
    assert any(torch.allclose(out, t, atol=1e-3) for t in turned) and not torch.allclose(out, images, atol=1e-3)
    boxes = ViewAugment(8, 1, rotate=15).crop_boxes(2048, "cpu")
    assert boxes[:, 5].abs().max() <= math.radians(15) + 1e-6 and boxes[:, 5].abs().max() > math.radians(14)
    torch.manual_seed(0)
    ones = torch.ones(2000, 1, 20, 20)
    erased = ViewAugment(20, 1, jitter=0, erase=0.5).random_erase(ones)
    blank = (erased == 0).flatten(1).sum(1).float() / 400
    hit = blank > 0
    assert 0.45 < hit.float().mean() < 0.55 and blank[hit].min() >= 0.005 and blank[hit].max() <= 0.4
    for image in erased[hit][:20, 0]:  # one axis-aligned rectangle: its bounding box is all zeros
        rows, cols = (image == 0).nonzero(as_tuple=True)
        assert (image[rows.min():rows.max() + 1, cols.min():cols.max() + 1] == 0).all()
