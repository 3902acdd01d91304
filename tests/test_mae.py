"""MAE: exact per-sample masking, an encoder that sees only visible patches, a loss on the masked
patches' normalized pixels (checked by hand), and encoder weights that load into a plain timm ViT."""
from __future__ import annotations

import pytest
import timm
import torch

from core.options import ModelConfig, OptimConfig
from models.backbone import create_backbone
from pipeline.train.checkpoint import encoder_state
from pipeline.train.loop import autocast_factory
from pretext.reconstruction.mae import (
    MAE,
    MASK_COLOUR,
    kept_count,
    mae_loss,
    patchify,
    random_masking,
    unpatchify,
)
from tests.conftest import TINY_BACKBONE
from tests.test_tasks import BACKBONES, IMAGE_SIZE, fixed_batch, make_task

PATCH = BACKBONES["mae"]["backbone_kwargs"]["patch_size"]
GRID = IMAGE_SIZE // PATCH  # 4 x 4 = 16 patches, 4 visible at mask_ratio 0.75


def images_and_noise(count: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen), torch.rand(count, GRID * GRID, generator=gen)


def patch_slice(n: int) -> tuple[slice, slice]:
    """Rows and columns of patch `n` (raster order)."""
    row, col = divmod(n, GRID)
    return slice(row * PATCH, (row + 1) * PATCH), slice(col * PATCH, (col + 1) * PATCH)


def test_masking_hides_exactly_the_ratio_in_every_sample():
    noise = torch.rand(8, 49)  # 28 px images, 4 px patches
    keep = kept_count(49, 0.75)
    keep_ids, mask, restore = random_masking(noise, keep)
    assert keep == 12 and mask.sum(1).tolist() == [37.0] * 8  # MAE's int(49 * 0.25) visible
    assert (torch.gather(mask, 1, keep_ids) == 0).all()  # the kept ones are the visible ones
    assert torch.equal(keep_ids.sort(1).values, noise.argsort(1)[:, :keep].sort(1).values)  # lowest noise stays
    assert len({tuple(m.tolist()) for m in mask}) == 8  # a mask per sample
    assert torch.equal(torch.gather(noise.sort(1).values, 1, restore), noise)  # restore undoes the sort
    assert kept_count(10, 0.9) == 1  # no float error: 10 * (1 - 0.9) = 0.99999...
    task = make_task("mae")
    _, mask, _ = task.encode_visible(images_and_noise()[0])
    assert mask.sum(1).tolist() == [0.75 * GRID * GRID] * 4


def test_encoder_blocks_see_only_the_visible_patches_and_the_class_token():
    task = make_task("mae").eval()
    seen = []
    task.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    images, noise = images_and_noise()
    latent, mask, _ = task.encode_visible(images, noise)
    assert seen == [(4, 4 + 1, 32)] and latent.shape == (4, 5, 32)
    # New pixels in a masked patch leave every encoder output alone; in a visible one they do not.
    masked, visible = int(mask[0].argmax()), int(mask[0].argmin())
    for n, changes in ((masked, False), (visible, True)):
        edited = images.clone()
        edited[0, :, patch_slice(n)[0], patch_slice(n)[1]] += 3
        assert torch.allclose(task.encode_visible(edited, noise)[0], latent) != changes


def test_patch_order_is_the_encoders_token_order():
    task = make_task("mae")
    images, _ = images_and_noise()
    proj = task.encoder.patch_embed.proj  # Conv2d (D, C, p, p) -> (D, p * p * C), channels last as patchify
    weight = proj.weight.permute(0, 2, 3, 1).flatten(1)
    assert torch.allclose(task.encoder.patch_embed(images), patchify(images, (PATCH, PATCH)) @ weight.T + proj.bias, atol=1e-5)
    assert torch.equal(unpatchify(patchify(images, (PATCH, PATCH)), (PATCH, PATCH), (GRID, GRID), 1), images)


def test_loss_scores_only_the_masked_patches():
    task = make_task("mae").eval()
    images, noise = images_and_noise()
    pred, mask = task.predict(images, noise)
    target = patchify(images, (PATCH, PATCH))
    loss = mae_loss(pred, target, mask)
    masked, visible = int(mask[0].argmax()), int(mask[0].argmin())
    for n, changes in ((visible, False), (masked, True)):
        edited = target.clone()
        edited[0, n] = torch.linspace(-2, 5, edited.shape[-1])
        assert torch.allclose(mae_loss(pred, edited, mask), loss) != changes
    # Through the task: a masked patch's pixels change the target (and the loss), not what the encoder saw.
    edited = images.clone()
    edited[0, :, patch_slice(masked)[0], patch_slice(masked)[1]] = torch.linspace(-2, 5, PATCH * PATCH).view(1, PATCH, PATCH)
    assert torch.allclose(task.predict(edited, noise)[0], pred)
    assert not torch.allclose(task(edited, None, noise=noise)["loss"], task(images, None, noise=noise)["loss"])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_the_mse_of_masked_patches_by_hand(norm_pix):
    task = make_task("mae", norm_pix_loss=norm_pix).eval()
    images, noise = images_and_noise()
    pred, _ = task.predict(images, noise)
    errors = []
    for b in range(len(images)):
        for n in noise[b].argsort()[4:].tolist():  # the 12 highest-noise patches are hidden
            rows, cols = patch_slice(n)
            pixels = images[b, :, rows, cols].permute(1, 2, 0).flatten()  # row-major, channels last
            if norm_pix:
                pixels = (pixels - pixels.mean()) / (pixels.var(unbiased=True) + 1e-6).sqrt()
            errors.append(((pred[b, n] - pixels) ** 2).mean())
    assert len(errors) == 4 * 12
    assert torch.allclose(task(images, None, noise=noise)["loss"], torch.stack(errors).mean(), atol=1e-6)


def test_trained_encoder_loads_into_a_fresh_timm_vit():
    task = make_task("mae")
    initial = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    optimizers = task.make_optimizers(OptimConfig(name="adamw", betas=[0.9, 0.95], weight_decay=0.05), lr=1e-3)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    batch = fixed_batch(task, 8)
    for _ in range(3):
        task.train_step(batch, optimizers, scaler, autocast)
    weights = encoder_state({"task": task.state_dict()})  # what the eval stage reads from a checkpoint
    assert not torch.equal(weights["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    assert not torch.equal(weights["norm.weight"], initial["norm.weight"])  # the final norm is trained too
    assert torch.equal(weights["pos_embed"], initial["pos_embed"]) and weights["pos_embed"][0, 0].abs().sum() == 0  # fixed sin-cos
    spec = BACKBONES["mae"]
    fresh = timm.create_model(spec["backbone"], pretrained=False, num_classes=0, in_chans=1, **spec["backbone_kwargs"])
    fresh.load_state_dict(weights, strict=True)
    images = batch[0]
    assert torch.allclose(fresh.eval()(images), task.feature_extractor().eval()(images), atol=1e-5)


def test_non_vit_and_mismatched_backbones_are_refused():
    resnet = create_backbone(ModelConfig(**TINY_BACKBONE), in_chans=1)
    with pytest.raises(ValueError, match="model.backbone: MAE .* VisionTransformer"):
        MAE(resnet, in_chans=1, image_size=IMAGE_SIZE)
    vit = create_backbone(ModelConfig(**BACKBONES["mae"]), in_chans=1)
    with pytest.raises(ValueError, match="img_size: 28"):
        MAE(vit, in_chans=1, image_size=28)
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(vit, in_chans=1, image_size=IMAGE_SIZE, mask_ratio=0.99)


def test_figures_show_input_masked_input_and_pasted_reconstruction(tmp_path):
    task = make_task("mae")
    images, _ = images_and_noise(3)
    examples = task.reconstruction_panels(images, torch.Generator().manual_seed(0))
    assert [[p.caption for p in panels] for panels in examples] == [["input", "masked 75%", "reconstruction"]] * 3
    for (shown, masked, recon), image in zip(examples, images):
        assert torch.allclose(shown.image, task.to_unit_range(image))
        hidden = (masked.image == torch.tensor(MASK_COLOUR).view(3, 1, 1)).all(0, keepdim=True)  # (1, H, W)
        assert float(hidden.float().mean()) == 0.75  # 12 of 16 patches
        hidden, visible = hidden.expand_as(shown.image), ~hidden.expand_as(shown.image)
        assert torch.equal(masked.image[:, visible[0]], shown.image[:, visible[0]].expand(3, -1))  # seen patches as they are
        assert torch.allclose(recon.image[visible], shown.image[visible])  # visible patches pasted as they were
        assert not torch.allclose(recon.image[hidden], shown.image[hidden])  # hidden ones predicted
    files = task.write_figures(tmp_path, 7, images)
    assert [f.name for f in files] == ["step_00000007_reconstructions.png"] and files[0].is_file()
