"""Example figures (examples.png): every registered task draws one through the pipeline, the drawing
helper puts each panel's pixels and caption where its layout says, and what a task draws is what its
transform feeds the network, captioned with the target it must predict."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.grids import (
    CAPTION_LINES,
    CELL,
    LINE_HEIGHT,
    MOSAIC_GAP,
    PAD,
    Panel,
    layout,
    panel_geometry,
    save_panels,
)
from pipeline.config import Config
from pipeline.data.decode import decoder_for
from pipeline.data.shards import (
    Sample,
    encode_png,
    read_manifest,
    write_manifest,
    write_split,
)
from pipeline.data.streaming import collate
from pipeline.train.examples import (
    EXAMPLES,
    as_loaded,
    first_samples,
    seeded,
    write_examples,
)
from pipeline.train.tasks import build_task
from pretext import TASKS
from pretext.reconstruction.colorization import lab_to_rgb, rgb_to_lab
from tests import test_colorization
from tests.conftest import TINY_BACKBONE
from tests.test_av_tasks import AV_OPTIONS
from tests.test_tasks import (
    BACKBONES,
    IMAGE_SIZE,
    data_channels,
    make_task,
    sample_dicts,
)

COUNT = 8
# (columns, lines) of each task's figure of 8 samples, 8 cells a line: how many panels it draws per example.
GRID = {
    "rotation": (8, 1), "cpc": (8, 1), "pixelcnn": (8, 1),  # one panel per sample
    "exemplar": (8, 2), "context_prediction": (8, 2), "jigsaw": (8, 2), "colorization": (8, 2),
    "denoising_autoencoder": (8, 2), "context_encoder": (8, 2),  # two per sample, four samples a line
    "multitask": (8, 3),  # rotation's line, then exemplar's two
    "vae": (3, 1), "gan": (2, 1), "bigan": (3, 1),  # their write_figures grids, one cell each
    "avc": (6, 4), "av_contrastive": (8, 2),  # frame + matching (+ mismatching) spectrogram
    # 8 samples hold one group of 5 frames of a clip: its 3 tuple frames, or its 6 tuples.
    "temporal_order": (3, 1), "odd_one_out": (6, 1),
}

# Fewer jigsaw permutations: choosing 100 from all 9! takes seconds.
FAST = {"jigsaw": {"num_permutations": 10}}


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory):
    """24 RGB 16x16 images (colorization refuses grayscale), 8 per shard."""
    root = tmp_path_factory.mktemp("rgb-shards")
    images = test_colorization.rgb_images(24, IMAGE_SIZE)
    split = write_split((Sample(f"train_{i:05d}", encode_png(img), "png", 0) for i, img in enumerate(images)),
                        root, "train", len(images), "RGB", 8)
    write_manifest(root, "synthetic-rgb", ["x"], "RGB", {"train": split})
    return root


@pytest.fixture(scope="module")
def av_shards(tmp_path_factory):
    """Procedural audio-visual clips (16 px frames, 1 s of 16 kHz audio each) for the AV tasks."""
    from pipeline.data.av_synth import write_av_synth

    root = tmp_path_factory.mktemp("av-shards")
    write_av_synth(root, clips=8, classes=2, duration=2.0, image_size=IMAGE_SIZE, test_fraction=0.25, samples_per_shard=4)
    return root


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    """Procedural clips of 5 frames (3 s at 2 fps) for the temporal tasks, which group 5 frames of a clip."""
    from pipeline.data.av_synth import write_av_synth

    root = tmp_path_factory.mktemp("video-shards")
    write_av_synth(root, clips=4, classes=2, duration=3.0, image_size=IMAGE_SIZE, test_fraction=0.25, samples_per_shard=4)
    return root


def is_audio_visual(name: str) -> bool:
    return "audio" in getattr(TASKS[name], "modalities", ())


def task_config(root, name: str, run_dir) -> Config:
    options = {**FAST.get(name, {}), **(AV_OPTIONS if is_audio_visual(name) else {})}
    return Config.from_dict({"run_dir": str(run_dir), "data": {"root": str(root)}, "model": BACKBONES.get(name, TINY_BACKBONE),
                             "task": {"name": name, "options": options}, "scaling": {"num_workers": 1}})


def read(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def cell_origin(row: int, col: int, cell_w: int, cell_h: int) -> tuple[int, int]:
    """Top-left pixel (y, x) of a cell, from the documented geometry."""
    return PAD + row * (cell_h + CAPTION_LINES * LINE_HEIGHT + PAD), PAD + col * (cell_w + PAD)


def drawn(panel: Panel, scale: int) -> np.ndarray:
    """The 8-bit RGB pixels a panel must show: its image enlarged `scale` times (nearest)."""
    image = panel.image.clamp(0, 1).mul(255).round().byte().expand(3, -1, -1)
    return image.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_writes_an_examples_png_of_its_panels(name, shards, rgb_shards, av_shards, video_shards, tmp_path):
    if getattr(TASKS[name], "frames_per_sample", 0):
        root = video_shards
    else:
        root = av_shards if is_audio_visual(name) else rgb_shards if data_channels(name) == 3 else shards
    cfg = task_config(root, name, tmp_path / "run")
    path = write_examples(cfg, tmp_path / EXAMPLES, COUNT)
    assert path == tmp_path / EXAMPLES and path.is_file()
    pixels = read(path)
    # The same panels again (same samples, initial weights and random draws, in write_examples'
    # order under its seed), to know where everything lies.
    with seeded(cfg.train.seed):
        samples = first_samples(cfg, COUNT)
        manifest = read_manifest(cfg.data.root)
        task = build_task(cfg, manifest, decoder_for(manifest, cfg.data.train_split, cfg.data.image_size))
        lines = layout(task.example_panels(as_loaded(samples, task)), 8)
    scale, cell_w, cell_h = panel_geometry(lines)
    columns = max(map(len, lines))
    if name in GRID:
        assert (columns, len(lines)) == GRID[name]
    if name not in ("vae", "gan", "bigan"):
        assert (cell_w, cell_h) == (CELL, CELL)  # pictures no larger than a cell: equal cells
    height, width = pixels.shape[:2]
    assert (width, height) == (PAD + columns * (cell_w + PAD), PAD + len(lines) * (cell_h + CAPTION_LINES * LINE_HEIGHT + PAD))
    # Not blank: the pictures cover much of the figure, with many grey levels.
    assert (pixels < 240).any(-1).mean() > 0.15 and len(np.unique(pixels)) > 16
    # The first panel's pixels are where the layout puts them (centred in its cell).
    first = drawn(lines[0][0], scale)
    y, x = cell_origin(0, 0, cell_w, cell_h)
    y, x = y + (cell_h - first.shape[0]) // 2, x + (cell_w - first.shape[1]) // 2
    assert np.array_equal(pixels[y : y + first.shape[0], x : x + first.shape[1]], first)


def test_save_panels_places_pictures_and_captions_by_the_layout(tmp_path):
    torch.manual_seed(0)
    examples = [[Panel(torch.rand(1, 8, 8), "a"), Panel(torch.rand(3, 8, 8), "")] for _ in range(5)]
    examples.append([Panel(torch.rand(1, 4, 8), f"wide {i}") for i in range(3)])  # does not fit beside the last pair
    lines = layout(examples, columns=4)
    assert [len(line) for line in lines] == [4, 4, 2, 3]  # an example is never split across lines
    pixels = read(save_panels(examples, tmp_path / "grid.png", columns=4))
    scale = CELL // 8
    assert pixels.shape == (PAD + 4 * (CELL + CAPTION_LINES * LINE_HEIGHT + PAD), PAD + 4 * (CELL + PAD), 3)
    for row, line in enumerate(lines):
        for col, panel in enumerate(line):
            y, x = cell_origin(row, col, CELL, CELL)
            expected = drawn(panel, scale)
            top, left = y + (CELL - expected.shape[0]) // 2, x + (CELL - expected.shape[1]) // 2
            assert np.array_equal(pixels[top : top + expected.shape[0], left : left + expected.shape[1]], expected), (row, col)
            caption = pixels[y + CELL : y + CELL + CAPTION_LINES * LINE_HEIGHT, x : x + CELL]
            assert (caption < 128).any() == bool(panel.caption), (row, col, panel.caption)


def test_rotation_draws_each_rotated_input_with_its_angle():
    task = make_task("rotation", data_mean=[0.3])  # the statistics sample_dicts normalized with
    samples = sample_dicts(16)
    angles = set()
    with seeded(0):
        examples = task.example_panels(samples) + task.example_panels(samples)
    for sample, (panel,) in zip(samples + samples, examples):
        assert panel.caption in ("0°", "90°", "180°", "270°")
        k = int(panel.caption[:-1]) // 90
        angles.add(k)
        assert torch.equal(panel.image, task.to_unit_range(torch.rot90(sample["image"], k, dims=(-2, -1))))
        assert not torch.equal(panel.image, task.to_unit_range(torch.rot90(sample["image"], k + 1, dims=(-2, -1))))
    assert angles == {0, 1, 2, 3}

    every = make_task("rotation", all_rotations=True, data_mean=[0.3]).example_panels(samples[:2])
    for sample, panels in zip(samples, every):
        assert [p.caption for p in panels] == ["0°", "90°", "180°", "270°"]
        for k, panel in enumerate(panels):
            assert torch.equal(panel.image, task.to_unit_range(torch.rot90(sample["image"], k, dims=(-2, -1))))


def test_jigsaw_tiles_put_back_by_the_captioned_permutation_give_the_image():
    # Tiles filling their cells and not standardized, so the puzzle reassembles exactly.
    task = make_task("jigsaw", tile_fraction=1.0, normalize_tiles=False, data_mean=[0.3], **FAST["jigsaw"])
    tile, grid = task.tile, task.grid
    samples = sample_dicts(8)
    with seeded(0):
        examples = task.example_panels(samples)
    indices = set()
    for sample, (image, puzzle) in zip(samples, examples):
        unit = task.to_unit_range(sample["image"])
        assert image.caption == "image" and torch.equal(image.image, unit)
        assert puzzle.caption.startswith("perm ")
        index = int(puzzle.caption.split()[1])
        indices.add(index)
        permutation = task.permutations[index].tolist()
        step = tile + MOSAIC_GAP
        assert puzzle.image.shape == (1, grid * step - MOSAIC_GAP, grid * step - MOSAIC_GAP)
        shown = [puzzle.image[:, (i // grid) * step : (i // grid) * step + tile, (i % grid) * step : (i % grid) * step + tile]
                 for i in range(grid * grid)]
        restored = [None] * (grid * grid)
        for position, source in enumerate(permutation):  # position i shows tile permutation[i]
            restored[source] = shown[position]
        for j, piece in enumerate(restored):
            row, col = divmod(j, grid)
            assert torch.equal(piece, unit[:, row * tile : (row + 1) * tile, col * tile : (col + 1) * tile]), (index, j)
    assert len(indices) > 1  # different puzzles, not one fixed layout


def test_context_prediction_neighbour_lies_in_the_captioned_direction():
    directions = {"up-left": (-1, -1), "up": (-1, 0), "up-right": (-1, 1), "right": (0, 1),
                  "down-right": (1, 1), "down": (1, 0), "down-left": (1, -1), "left": (0, -1)}
    task = make_task("context_prediction", normalize_patches=False, jitter_fraction=0.0, data_mean=[0.3])
    transform = task.sample_transform()
    samples = sample_dicts(16)
    with seeded(0):
        examples = task.example_panels(samples)
    seen = set()
    for sample, (centre, neighbour) in zip(samples, examples):
        assert centre.caption == "centre" and neighbour.caption.startswith("neighbour ")
        dy, dx = directions[neighbour.caption.split(" ", 1)[1]]
        seen.add((dy, dx))
        unit, p, step = task.to_unit_range(sample["image"]), transform.patch, transform.patch + transform.gap
        # The centre patch's place in the image (the glyphs lie on noise: the match is unique).
        places = [(y, x) for y in range(IMAGE_SIZE - p + 1) for x in range(IMAGE_SIZE - p + 1)
                  if torch.equal(unit[:, y : y + p, x : x + p], centre.image)]
        assert len(places) == 1
        y, x = places[0][0] + dy * step, places[0][1] + dx * step
        assert torch.equal(neighbour.image, unit[:, y : y + p, x : x + p])
    assert len(seen) > 3


def test_colorization_draws_gray_input_colour_target_and_once_trained_its_prediction():
    task = test_colorization.make_task(mode="regression")
    samples = test_colorization.samples(3)
    examples = task.example_panels(samples)
    assert [[p.caption for p in e] for e in examples] == [["L input", "ab target"]] * 3  # untrained: no prediction
    for sample_image, (gray, target) in zip(test_colorization.rgb_images(3), examples):
        luma = np.asarray(Image.fromarray(sample_image).convert("L"), dtype=np.float32) / 255  # what PIL's grayscale is
        assert torch.allclose(gray.image[0], torch.from_numpy(luma), atol=1e-5)
        # L and the target ab together give the colour image back.
        assert torch.allclose(target.image, torch.from_numpy(sample_image).permute(2, 0, 1).float() / 255, atol=2 / 255)

    task.train()
    task(*collate([task.sample_transform()(s) for s in samples]))  # a training forward counts the batch's colours
    torch.nn.init.zeros_(task.decoder.out.weight)
    torch.nn.init.zeros_(task.decoder.out.bias)  # predicts ab = 0: the image's own lightness, no colour
    examples = task.example_panels(samples)
    for sample, example in zip(samples, examples):
        assert [p.caption for p in example] == ["L input", "ab target", "ab predicted"]
        predicted = example[2].image
        lightness = rgb_to_lab(task.to_unit_range(sample["image"]))[:1]
        assert torch.allclose(predicted, lab_to_rgb(torch.cat([lightness, torch.zeros(2, *lightness.shape[1:])])))
        assert torch.allclose(predicted[0], predicted[1], atol=1e-4) and torch.allclose(predicted[1], predicted[2], atol=1e-4)


def test_lab_to_rgb_inverts_rgb_to_lab():
    rgb = torch.rand(3, 8, 8, dtype=torch.float64)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-6)


def test_multitask_draws_each_subtask_with_its_name():
    task = make_task("multitask")
    examples = task.example_panels(sample_dicts(2))
    assert [[p.caption.split(":")[0] for p in e] for e in examples] == [["rotation"], ["rotation"], ["exemplar"] * 2, ["exemplar"] * 2]


def test_pretrain_start_writes_examples_once(shards, tmp_path):
    from pipeline.train.launch import start_run

    cfg = task_config(shards, "rotation", tmp_path / "run")
    run_dir, _ = start_run(cfg, None)
    path = run_dir / EXAMPLES
    assert read(path).shape[1] == PAD + 8 * (CELL + PAD)
    path.write_bytes(b"kept")
    start_run(task_config(shards, "rotation", run_dir), None)  # a resumed run keeps the examples it started with
    assert path.read_bytes() == b"kept"


def test_examples_command(shards, tmp_path, capsys):
    from pipeline.cli import main

    config = tmp_path / "config.yaml"
    task_config(shards, "jigsaw", tmp_path / "run").save(config)
    out = tmp_path / "out" / "jigsaw.png"
    assert main(["examples", "--config", str(config), "--out", str(out), "--count", "4", "--task.options.grid=2"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert read(out).shape[1] == PAD + 8 * (CELL + PAD)  # four samples, image and puzzle each
    assert main(["examples", "--config", str(config), "--out", str(out), "--count", "0"]) == 2
    assert "count=0" in capsys.readouterr().err


def test_a_trained_checkpoint_adds_colorization_predictions(rgb_shards, tmp_path):
    cfg = task_config(rgb_shards, "colorization", tmp_path / "run")
    manifest = read_manifest(cfg.data.root)
    task = build_task(cfg, manifest, decoder_for(manifest, cfg.data.train_split, cfg.data.image_size))
    task.train()
    task(*collate([task.sample_transform()(s) for s in first_samples(cfg, 4)]))  # training counts colours
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"task": task.state_dict(), "step": 1, "config": cfg.to_dict(), "manifest": manifest}, checkpoint)
    fresh = read(write_examples(cfg, tmp_path / "fresh.png", 4))
    trained = read(write_examples(cfg, tmp_path / "trained.png", 4, checkpoint=checkpoint))
    assert fresh.shape[1] == PAD + 8 * (CELL + PAD)  # (L input, ab target) x 4 on one line
    assert trained.shape[1] == PAD + 6 * (CELL + PAD)  # (L input, ab target, ab predicted) x 2 a line


def test_drawing_examples_leaves_the_random_generators_as_they_were(shards, tmp_path):
    import random

    cfg = task_config(shards, "rotation", tmp_path / "run")
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    write_examples(cfg, tmp_path / EXAMPLES, 4)
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
