"""Colorization: Lab conversion, PIL-identical luma input, in-gamut bins, soft-encoding, class
rebalancing, the dense decoder's training and the grayscale eval contract."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import ConfigError
from core.options import ModelConfig, OptimConfig
from models.backbone import create_backbone
from pipeline.data.streaming import collate
from pipeline.train.loop import autocast_factory
from pretext.heads import feature_maps
from pretext.reconstruction.colorization import (
    LUMA,
    Colorization,
    in_gamut_bins,
    rebalance_weights,
    rgb_to_lab,
    soft_encode,
)
from tests.conftest import TINY_BACKBONE

SIZE = 32
MEAN, STD = [0.48, 0.46, 0.41], [0.23, 0.22, 0.24]  # not the identity, so un-normalizing is exercised


def rgb_images(count: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8: two rectangles of random colours on dim, slightly tinted noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (count, size, size, 1)) + rng.integers(0, 20, (count, size, size, 3))
    for image in images:
        for _ in range(2):
            y, x = rng.integers(0, size // 2, 2)
            h, w = rng.integers(size // 4, size // 2 + 1, 2)
            image[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return images.astype(np.uint8)


def normalize(image: np.ndarray) -> torch.Tensor:
    """What the pipeline's decoder yields for an 8-bit RGB image."""
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    return (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def samples(count: int) -> list[dict]:
    return [{"image": normalize(img), "label": 0, "key": f"k{i}"} for i, img in enumerate(rgb_images(count))]


def make_task(**options) -> Colorization:
    torch.manual_seed(0)
    encoder = create_backbone(ModelConfig(**TINY_BACKBONE), in_chans=Colorization.encoder_in_chans(3))
    return Colorization(encoder, in_chans=3, image_size=SIZE, data_mean=MEAN, data_std=STD, **options)


def fixed_batch(task: Colorization, count: int = 16):
    transform = task.sample_transform()
    return collate([transform(s) for s in samples(count)])


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of the Lab conversion, written independently (channels last, no clipping)."""
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = torch.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * torch.tensor([0.95047, 1.0, 1.08883], dtype=lab.dtype)
    xyz_to_rgb = torch.tensor([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                               [0.0556434, -0.2040259, 1.0572252]], dtype=lab.dtype)
    linear = xyz @ xyz_to_rgb.T
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp_min(0) ** (1 / 2.4) - 0.055)


@pytest.mark.parametrize("rgb, lab", [
    ((1, 0, 0), (53.24, 80.09, 67.20)),
    ((0, 1, 0), (87.73, -86.18, 83.18)),
    ((0, 0, 1), (32.30, 79.19, -107.86)),
    ((1, 1, 1), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0)),
])
def test_rgb_to_lab_known_values(rgb, lab):
    image = torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 2, 2)  # batched (B, 3, H, W)
    out = rgb_to_lab(image)
    assert out.shape == (2, 3, 2, 2)
    assert torch.allclose(out[..., 0, 0], torch.tensor(lab, dtype=torch.float64), atol=0.01)


def test_transform_input_is_pil_luma_and_target_is_lab_of_the_image():
    task = make_task()
    stats = task.encoder_input({"channels": 3, "mode": "RGB", "image_size": SIZE, "mean": MEAN, "std": STD})
    transform = task.sample_transform()
    for image in rgb_images(4, seed=1):
        gray, ab = transform({"image": normalize(image), "label": 0, "key": "k"})
        assert gray.shape == (1, SIZE, SIZE) and gray.dtype == torch.float32
        assert ab.shape == (2, SIZE, SIZE) and ab.dtype == torch.float32
        # What the eval stage feeds the backbone: PIL's grayscale, normalized with encoder_input's stats.
        pil = torch.from_numpy(np.array(Image.fromarray(image).convert("L"))).float() / 255
        assert torch.allclose(gray[0], (pil - stats["mean"][0]) / stats["std"][0], atol=1e-3)
        expected = rgb_to_lab(torch.from_numpy(image).permute(2, 0, 1).double() / 255)[1:]
        assert torch.allclose(ab.double(), expected, atol=1e-3)
        assert ab.abs().max() > 20, "the test images must be coloured"


def test_transform_is_picklable_and_small():
    transform = make_task().sample_transform()
    blob = pickle.dumps(transform)
    assert len(blob) < 10_000
    sample = samples(1)[0]
    for a, b in zip(pickle.loads(blob)(sample), transform(sample)):
        assert torch.equal(a, b)


def test_encoder_input_is_grayscale_with_luma_weighted_stats():
    decoded = {"channels": 3, "mode": "RGB", "image_size": 48, "mean": MEAN, "std": STD}
    out = make_task().encoder_input(decoded)
    assert out["channels"] == 1 and out["mode"] == "L" and out["image_size"] == 48
    assert out["mean"] == [pytest.approx(sum(w * m for w, m in zip(LUMA, MEAN)))]
    assert out["std"] == [pytest.approx(sum(w * s for w, s in zip(LUMA, STD)))]
    assert decoded["mode"] == "RGB", "the caller's dict is left alone"


def test_grayscale_data_is_refused_with_a_config_error():
    with pytest.raises(ConfigError, match=r"colorization needs RGB.*1 channel\(s\) \(grayscale\)"):
        Colorization.encoder_in_chans(1)
    assert Colorization.encoder_in_chans(3) == 1
    encoder = create_backbone(ModelConfig(**TINY_BACKBONE), in_chans=1)
    with pytest.raises(ConfigError, match="colorization"):
        Colorization(encoder, in_chans=1, image_size=SIZE)


def test_backbone_without_feature_maps_at_this_size_is_a_value_error():
    # A ViT built for 32px images cannot take 16px ones.
    encoder = create_backbone(ModelConfig(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "depth": 1}), in_chans=1)
    with pytest.raises(ValueError, match="16x16"):
        Colorization(encoder, in_chans=3, image_size=16)


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="mode"):
        make_task(mode="regresion")
    with pytest.raises(ValueError, match="rebalance_lambda"):
        make_task(rebalance_lambda=1.5)


def test_bins_are_the_in_gamut_cells_of_the_ab_grid():
    bins = in_gamut_bins(10).double()
    assert 250 <= len(bins) <= 330
    assert torch.equal(bins, torch.round(bins / 10) * 10) and len(torch.unique(bins, dim=0)) == len(bins)
    # Every colour an 8-bit image can hold lies in the cell of a bin (its nearest grid point is a bin).
    colours = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 20_000, 1))).double() / 255
    ab = rgb_to_lab(colours)[1:, :, 0].T
    cells = {tuple(c) for c in (torch.round(ab / 10) * 10).tolist()}
    assert cells <= {tuple(b) for b in bins.tolist()}
    # Every bin's cell holds displayable colours: some (L, a, b) in it converts back to RGB in [0, 1].
    offsets = torch.linspace(-5, 5, 11, dtype=torch.float64)
    grid = torch.cartesian_prod(torch.linspace(0, 100, 101, dtype=torch.float64), offsets, offsets)  # (L, da, db)
    lab = grid.unsqueeze(0).repeat(len(bins), 1, 1)
    lab[..., 1:] += bins.unsqueeze(1)
    rgb = lab_to_rgb(lab)
    in_gamut = ((rgb >= -1e-6) & (rgb <= 1 + 1e-6)).all(-1).any(-1)
    assert in_gamut.all(), bins[~in_gamut].tolist()


def test_soft_encoding_weights_the_nearest_bins_by_a_gaussian():
    bins = in_gamut_bins(10)
    ab = torch.rand(2000, 2) * 160 - 80
    index, weights = soft_encode(ab, bins)
    assert index.shape == weights.shape == (2000, 5)
    assert torch.allclose(weights.sum(1), torch.ones(2000))
    assert torch.equal(weights.argmax(1), torch.zeros(2000, dtype=torch.long))
    assert torch.equal(index[:, 0], torch.cdist(ab, bins).argmin(1))
    # A point on a bin centre: the centre, then its 4 grid neighbours at distance 10 (σ = 5).
    index, weights = soft_encode(torch.tensor([[0.0, 0.0]]), bins)
    assert bins[index[0, 0]].tolist() == [0.0, 0.0]
    assert sorted(bins[index[0, 1:]].abs().sum(1).tolist()) == [10.0] * 4
    near = math.exp(-100 / 50)
    assert torch.allclose(weights[0], torch.tensor([1, near, near, near, near]) / (1 + 4 * near))


def test_rebalancing_weights_have_unit_expectation_and_favour_rare_bins():
    prior = torch.softmax(torch.randn(300) * 3, 0)
    weights = rebalance_weights(prior, 0.5)
    assert torch.allclose((prior * weights).sum(), torch.tensor(1.0))
    order = prior.argsort()
    assert (weights[order].diff() < 0).all(), "a rarer bin must weigh more"
    assert torch.allclose(rebalance_weights(prior, 1.0), torch.ones(300))


def test_bin_counts_are_estimated_online_and_saved():
    task = make_task()
    inputs, target = fixed_batch(task, 8)
    before = task.bin_counts.clone()
    out = task.decoder(feature_maps(task.encoder, inputs, 3))
    task(inputs, target)
    added = task.bin_counts - before
    assert added.sum() == 8 * out.shape[-2] * out.shape[-1], "one count per output pixel"
    # Mostly near-gray pixels: the bin at (0, 0) is the most frequent, so it weighs least.
    centre = (task.bin_centres == 0).all(1).nonzero().item()
    assert added.argmax() == centre
    weights = task.class_weights()
    assert weights.argmin() == centre
    prior = task.smoothing @ (task.bin_counts / task.bin_counts.sum()).float()
    assert torch.allclose(prior.sum(), torch.tensor(1.0)) and torch.allclose((prior * weights).sum(), torch.tensor(1.0))
    # Eval forwards leave the estimate alone; checkpoints carry it, not the derived bins.
    task.eval()(inputs, target)
    assert torch.equal(task.bin_counts, before + added)
    state = task.state_dict()
    assert "bin_counts" in state and "bin_centres" not in state and "smoothing" not in state
    fresh = make_task()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bin_counts, task.bin_counts)


def test_encoder_weights_load_into_a_plain_grayscale_timm_model():
    task = make_task()
    encoder_state = {k.removeprefix("encoder."): v for k, v in task.state_dict().items() if k.startswith("encoder.")}
    plain = timm.create_model("resnet18", num_classes=0, in_chans=1, **TINY_BACKBONE["backbone_kwargs"])
    plain.load_state_dict(encoder_state, strict=True)


@pytest.mark.parametrize("mode", ["classification", "regression"])
def test_train_step_gives_every_parameter_a_gradient(mode):
    task = make_task(mode=mode)
    optimizers = task.make_optimizers(OptimConfig(), lr=0.01)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    out = task.train_step(fixed_batch(task), optimizers, scaler, autocast)
    assert torch.isfinite(out["loss"])
    assert ("accuracy" in out) == (mode == "classification")
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("mode", ["classification", "regression"])
def test_twenty_steps_lower_the_loss_on_a_fixed_batch(mode):
    task = make_task(mode=mode)
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0), lr=3e-3)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    batch = fixed_batch(task, 32)
    losses = [float(task.train_step(batch, optimizers, scaler, autocast)["loss"].detach()) for _ in range(20)]
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


def test_classification_loss_is_the_rebalanced_soft_cross_entropy():
    task = make_task()
    inputs, target = fixed_batch(task, 8)
    task(inputs, target)  # a training forward, so the bin distribution is not uniform
    task.eval()
    out = task(inputs, target)
    logits = task.decoder(feature_maps(task.encoder, inputs, 3))  # (B, Q, h, w)
    factor = SIZE // logits.shape[-1]
    ab = F.avg_pool2d(target, factor).permute(0, 2, 3, 1).reshape(-1, 2)
    log_probs = F.log_softmax(logits, 1).permute(0, 2, 3, 1).reshape(len(ab), -1)
    bins, counts = task.bin_centres, task.bin_counts.float()
    dist2 = ((ab[:, None, :] - bins[None]) ** 2).sum(-1)
    near = dist2.argsort(1)[:, :5]
    soft = torch.exp(-dist2.gather(1, near) / 50)
    soft = soft / soft.sum(1, keepdim=True)
    # p̃: the bin frequencies smoothed by a Gaussian (σ = 5) that keeps each bin's mass.
    kernel = torch.exp(-((bins[:, None] - bins[None]) ** 2).sum(-1) / 50)
    prior = (kernel / kernel.sum(0)) @ (counts / counts.sum())
    weights = 1 / (0.5 * prior + 0.5 / len(bins))
    weights = weights / (prior * weights).sum()
    expected = (weights[near[:, 0]] * -(soft * log_probs.gather(1, near)).sum(1)).mean()
    assert torch.allclose(out["loss"], expected, rtol=1e-4)
    accuracy = (log_probs.argmax(1) == near[:, 0]).float().mean()
    assert torch.allclose(out["accuracy"], accuracy)


def test_regression_loss_is_squared_error_on_scaled_ab():
    task = make_task(mode="regression", rebalance=False).eval()
    inputs, target = fixed_batch(task, 8)
    pred = task.decoder(feature_maps(task.encoder, inputs, 3))  # (B, 2, h, w)
    ab = F.avg_pool2d(target, SIZE // pred.shape[-1])
    expected = ((pred - ab / 110) ** 2).sum(1).mean()
    assert torch.allclose(task(inputs, target)["loss"], expected, rtol=1e-5)
