"""Denoising autoencoder and context encoder: corruption as specified, losses as their formulas."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pretext.heads import feature_maps
from pretext.reconstruction.context_encoder import MaskRegion
from pretext.reconstruction.denoising_autoencoder import Corrupt
from tests.test_tasks import IMAGE_SIZE, fixed_batch, make_task


def test_gaussian_corruption_adds_noise_of_the_given_scale():
    clean = torch.zeros(1, 64, 64)
    noisy, target = Corrupt("gaussian", 0.5)({"image": clean})
    assert torch.equal(target, clean)
    assert abs(float(noisy.std()) - 0.5) < 0.03


def test_masking_corruption_zeroes_the_given_fraction_across_channels():
    clean = torch.ones(3, 64, 64)
    noisy, target = Corrupt("masking", 0.3)({"image": clean})
    assert torch.equal(target, clean)
    dropped = noisy == 0
    assert torch.equal(dropped[0], dropped[1]) and torch.equal(dropped[1], dropped[2])
    assert abs(float(dropped.float().mean()) - 0.3) < 0.03


def test_denoising_loss_is_mse_of_the_reconstruction():
    task = make_task("denoising_autoencoder").eval()
    inputs, target = fixed_batch(task, 8)
    reconstruction = task.decoder(feature_maps(task.encoder, inputs)[-1])
    assert reconstruction.shape == target.shape
    assert torch.allclose(task(inputs, target)["loss"], F.mse_loss(reconstruction, target))


def test_mask_region_zeroes_exactly_the_hole():
    image = torch.randn(1, 16, 16)
    for mask in ("center", "random"):
        masked, target = MaskRegion(mask, 6)({"image": image})
        clean, hole = target[:1], target[1]
        assert torch.equal(clean, image)
        assert int(hole.sum()) == 36
        assert torch.equal(masked, image * (1 - hole))
        ys, xs = hole.nonzero(as_tuple=True)
        assert int(ys.max() - ys.min()) == 5 and int(xs.max() - xs.min()) == 5
    _, target = MaskRegion("center", 6)({"image": image})
    assert target[1, 5:11, 5:11].all()


def test_context_encoder_scores_only_the_hole():
    task = make_task("context_encoder").eval()
    inputs, target = fixed_batch(task, 8)
    out = task(inputs, target)["loss"]
    reconstruction = task.decoder(feature_maps(task.encoder, inputs)[-1])
    hole = target[:, 1:].bool().expand_as(reconstruction)
    assert torch.allclose(out, F.mse_loss(reconstruction[hole], target[:, :1][hole]))
    # Changing pixels outside the hole in the target leaves the loss unchanged.
    target_changed = target.clone()
    target_changed[:, :1][~hole] += 5
    assert torch.allclose(task(inputs, target_changed)["loss"], out)
    assert inputs.shape[-1] == IMAGE_SIZE
