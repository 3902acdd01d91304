"""Every registered task: transform shapes, finite loss, gradients everywhere, loss falls on a fixed batch."""
from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from core.options import ModelConfig, OptimConfig
from models.backbone import create_backbone
from pipeline.data.streaming import collate
from pipeline.train.loop import autocast_factory
from pretext import TASKS, check_task_options, create_task
from pretext.spatial.rotation import Rotation, rotate
from tests.conftest import TINY_BACKBONE, synthetic_images
from tests.test_av_tasks import AV_OPTIONS, AV_SAMPLES, av_sample_dicts
from tests.test_temporal_tasks import frame_group_dicts

IMAGE_SIZE = 16


def modalities(name: str) -> tuple[str, ...]:
    """What a task's decoded samples must hold: ("image",), or ("image", "audio") for audio-visual tasks."""
    return getattr(TASKS[name], "modalities", ("image",))


def data_channels(name: str) -> int:
    """Grayscale data, except for tasks that refuse it (colorization needs RGB) and audio-visual
    tasks (video frames are RGB)."""
    if "audio" in modalities(name):
        return 3
    try:
        TASKS[name].encoder_in_chans(1)
        return 1
    except ConfigError:
        return 3


# Tasks that need their own kind of backbone (PixelCNN's masked convolutions).
BACKBONES = {"pixelcnn": {"backbone": "pixelcnn", "backbone_kwargs": {"width": 4, "depth": 2}},
             "mae": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}}
# Tasks' own networks made tiny as TINY_BACKBONE (the audio-visual tasks' audio CNN).
OPTIONS = {name: AV_OPTIONS for name in TASKS if "audio" in modalities(name)}
# VICReg's covariance term cannot approach zero for a 1024-wide expander on a 32-image batch (its
# minimum over free embeddings is ~0.65 of the start): a narrow expander, as the backbone is tiny.
OPTIONS["vicreg"] = {"proj_dim": 16, "proj_hidden": [256, 256]}


def make_task(name: str, **options):
    torch.manual_seed(0)
    channels = data_channels(name)
    encoder = create_backbone(ModelConfig(**BACKBONES.get(name, TINY_BACKBONE)), in_chans=TASKS[name].encoder_in_chans(channels))
    return create_task(name, encoder=encoder, in_chans=channels, image_size=IMAGE_SIZE, **{**OPTIONS.get(name, {}), **options})


def sample_dicts(count: int = 16, channels: int = 1) -> list[dict]:
    images, labels = synthetic_images(count, IMAGE_SIZE)
    tint = torch.tensor([1.0, 0.6, 0.2][:channels]).view(-1, 1, 1)  # RGB glyphs are coloured
    return [
        {"image": (torch.from_numpy(img).float().div(255) * tint).sub(0.3), "label": int(lab), "key": f"k{i}"}
        for i, (img, lab) in enumerate(zip(images, labels))
    ]


def task_samples(task, count: int) -> list[dict]:
    """Decoded samples of the kind the task reads: images, frames with audio and clip ids (two
    samples per clip, so batches hold repeated clips), or groups of frames of one clip for the
    temporal tasks (what the loader's grouping stage yields for their `frames_per_sample`)."""
    if getattr(task, "frames_per_sample", 0):
        return frame_group_dicts(count, task.frames_per_sample, channels=task.in_chans, size=IMAGE_SIZE)
    if "audio" in getattr(task, "modalities", ("image",)):
        return av_sample_dicts(count, channels=task.in_chans, size=IMAGE_SIZE)
    return sample_dicts(count, task.in_chans)


def fixed_batch(task, count: int = 16):
    transform = task.sample_transform()
    return collate([transform(s) for s in task_samples(task, count)])


# Exact likelihoods cannot fall far: the glyphs' uniform background noise (40 levels) alone costs
# ln 40 = 3.7 of the initial ln 256 = 5.5 nats per sub-pixel.
LOSS_RATIO = {"pixelcnn": 0.93}

# Side of the inputs each task's transform emits at IMAGE_SIZE (patch tasks cut smaller pieces),
# per task or per leaf path ("dino/1": multi-crop's second entry, local crops of 3/7 the side).
INPUT_SIZES = {"jigsaw": 4, "context_prediction": 4, "cpc": 8, "dino/1": 6, "swav/1": 6}


def leaves(value) -> dict:
    """{path: tensor} of a transform output (multitask nests one output per sub-task; multi-crop
    emits a list of crop groups, one per crop size, keyed by position)."""
    if isinstance(value, dict):
        return {f"{name}/{path}": leaf for name, sub in value.items() for path, leaf in leaves(sub).items()}
    if isinstance(value, (list, tuple)):
        return {f"{i}/{path}": leaf for i, sub in enumerate(value) for path, leaf in leaves(sub).items()}
    return {"": value}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_transform_outputs_tensors(name):
    task = make_task(name)
    inputs, target = task.sample_transform()(task_samples(task, 1)[0])
    for path, tensor in leaves(inputs).items():
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32, path
        if path == "audio/" and "audio" in modalities(name):
            assert tensor.shape == (1, AV_SAMPLES), (path, tensor.shape)  # the waveform, as decoded
            continue
        side = INPUT_SIZES.get(f"{name}/{path}".rstrip("/"), INPUT_SIZES.get(path.split("/")[0] or name, IMAGE_SIZE))
        assert tensor.shape[-2:] == (side, side), (path, tensor.shape)
    assert all(isinstance(t, torch.Tensor) for t in leaves(target).values())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_transform_is_picklable(name):
    import pickle

    transform = make_task(name).sample_transform()
    blob = pickle.dumps(transform)
    assert len(blob) < 10_000, "the transform must not carry model weights into loader workers"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_step_finite_loss_and_every_parameter_gets_gradient(name):
    task = make_task(name)
    optimizers = task.make_optimizers(OptimConfig(), lr=0.01)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    out = task.train_step(fixed_batch(task), optimizers, scaler, autocast)
    assert torch.isfinite(out["loss"])
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    # A gradient must exist for every parameter; it may be zero on the first step where timm
    # zero-initializes the last norm of each residual branch.
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable and not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_twenty_steps_lower_the_loss_on_a_fixed_batch(name):
    from core.options import OptimConfig

    if getattr(TASKS[name], "adversarial", False):
        pytest.skip("adversarial: each player's step is tested in test_generative.py, no joint loss falls")
    task = make_task(name)
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0), lr=3e-3)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    batch = fixed_batch(task, 32)
    torch.manual_seed(0)
    losses = [float(task.train_step(batch, optimizers, scaler, autocast)["loss"].detach()) for _ in range(20)]
    assert sum(losses[-3:]) / 3 < LOSS_RATIO.get(name, 0.7) * sum(losses[:3]) / 3, losses


def test_rotation_target_matches_the_rotation_applied():
    transform = make_task("rotation").sample_transform()
    sample = sample_dicts(1)[0]
    seen = set()
    for _ in range(40):
        rotated, k = transform(sample)
        seen.add(int(k))
        # Undoing k quarter turns gives the original image back, and no other k does.
        assert torch.equal(torch.rot90(rotated, -int(k), dims=(-2, -1)), sample["image"])
        for other in set(range(4)) - {int(k)}:
            assert not torch.equal(torch.rot90(rotated, -other, dims=(-2, -1)), sample["image"])
    assert seen == {0, 1, 2, 3}


def test_rotation_all_rotations_emits_four_views_in_order():
    transform = make_task("rotation", all_rotations=True).sample_transform()
    sample = sample_dicts(1)[0]
    views, targets = transform(sample)
    assert views.shape == (4, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert targets.tolist() == [0, 1, 2, 3]
    for k in range(4):
        assert torch.equal(views[k], rotate(sample["image"], k))


def test_rotate_is_counter_clockwise():
    image = torch.tensor([[1, 2], [3, 4]])
    assert rotate(image, 1).tolist() == [[2, 4], [1, 3]]


def test_rotation_loss_is_cross_entropy_of_head_output():
    task = make_task("rotation").eval()
    inputs, target = fixed_batch(task, 8)
    out = task(inputs, target)
    expected = torch.nn.functional.cross_entropy(task.head(task.encoder(inputs)), target)
    assert torch.allclose(out["loss"], expected)


def test_unknown_task_lists_the_choices():
    with pytest.raises(KeyError, match="rotation"):
        create_task("rotatoin", encoder=None)


def test_unknown_task_option_names_the_option():
    with pytest.raises(ConfigError, match="all_rotations"):
        check_task_options("rotation", {"all_rotation": True})


def test_registry_keys_match_module_and_class_names():
    for name, cls in TASKS.items():
        package, *family, module = cls.__module__.split(".")  # one file per task, named after it, in pretext/ or a family folder
        assert package == "pretext" and module == name and len(family) <= 1, cls.__module__
        assert cls.__name__.lower() == name.replace("_", "")
    assert TASKS["rotation"] is Rotation


def test_exemplar_views_at_view_size_and_multi_crop_loss_is_multi_view_nt_xent():
    from pretext.augment import crop_groups
    from pretext.losses import multi_view_nt_xent

    small = make_task("exemplar", view_size=IMAGE_SIZE // 2)
    views, _ = small.sample_transform()(sample_dicts(1)[0])
    assert views.shape[-2:] == (IMAGE_SIZE // 2, IMAGE_SIZE // 2)

    task = make_task("exemplar", local_crops=3, local_size=6, erase=0.5).eval()
    inputs, target = fixed_batch(task, 8)
    assert [group.shape[1:] for group in inputs] == [(2, 1, IMAGE_SIZE, IMAGE_SIZE), (3, 1, 6, 6)]
    z = task.head(torch.cat([task.encoder(group) for group in crop_groups(inputs)])).view(5, 8, -1)
    expected, _ = multi_view_nt_xent(z, task.temperature)
    assert torch.allclose(task(inputs, target)["loss"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="queue_size cannot be combined"):
        make_task("exemplar", local_crops=2, queue_size=64)
