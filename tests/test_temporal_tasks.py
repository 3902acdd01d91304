"""Temporal tasks (temporal_order, odd_one_out): the loader's frame grouping keeps each group inside
one clip and in time order, each task's target says what its transform did, the losses are the
cross-entropy of the logits, training on a fixed batch and through `train_worker` on video shards.

`frame_group_dicts` makes what the grouping stage yields, {"frames", "time", "video", "label",
"key"}: a square moving across the frames at a clip's own speed, so order is visible.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.options import ModelConfig, OptimConfig
from models.backbone import create_backbone
from pipeline.config import Config
from pipeline.data.bad_samples import ShardError
from pipeline.data.decode import decoder_for
from pipeline.data.frames import GroupFrames
from pipeline.data.shards import read_manifest, split_urls
from pipeline.data.streaming import collate, first_decoded, train_loader
from pipeline.train.loop import autocast_factory, train_worker
from pipeline.train.metrics import read_metrics
from pipeline.train.session import LocalSession
from pipeline.train.tasks import build_task
from pretext import create_task
from pretext.audio_video.odd_one_out import odd_orders, sum_of_differences
from pretext.audio_video.temporal_order import NEGATIVES, POSITIVE
from tests.conftest import TINY_BACKBONE

SIZE = 16
TEMPORAL_TASKS = ("temporal_order", "odd_one_out")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one thread avoids OpenMP barrier stalls (as test_av_tasks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frame_group_dicts(count: int = 16, frames: int = 5, channels: int = 3, size: int = SIZE, seed: int = 0) -> list[dict]:
    """Grouped samples: per clip, a bright square moving by 1-2 px a frame (right or down) over noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        step, axis = int(rng.integers(1, 3)), int(rng.integers(0, 2))
        start = int(rng.integers(0, size - 4 - step * (frames - 1) + 1))
        across = int(rng.integers(0, size - 4 + 1))
        clip = torch.from_numpy(rng.uniform(0, 0.3, (frames, channels, size, size))).float()
        for t in range(frames):
            y, x = (start + step * t, across) if axis else (across, start + step * t)
            clip[t, :, y : y + 4, x : x + 4] = 1.0
        out.append({"frames": clip - 0.5, "time": torch.arange(frames, dtype=torch.float64) * 0.5, "video": f"clip{i:03d}",
                    "label": i % 2, "key": f"clip{i:03d}_{0:06d}"})
    return out


def make_temporal_task(name: str, channels: int = 3, **options):
    torch.manual_seed(0)
    encoder = create_backbone(ModelConfig(**TINY_BACKBONE), in_chans=channels)
    return create_task(name, encoder=encoder, in_chans=channels, image_size=SIZE, **options)


def indexed_sample(frames: int = 5) -> dict:
    """Frame t is filled with the value t: what a transform emits tells which frames it took."""
    return {"frames": torch.arange(frames, dtype=torch.float32).view(frames, 1, 1, 1).expand(frames, 3, SIZE, SIZE).clone(),
            "video": "v", "label": 0, "key": "v_000000"}


def frame_numbers(images: torch.Tensor) -> list[int]:
    """The frame indices of (..., C, H, W) images made by `indexed_sample` (flips keep the values)."""
    return [int(v) for v in images.flatten(-3)[..., 0].flatten()]


# --- the grouping stage -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    """6 SYNTHETIC clips of 5 frames (3 s at 2 fps, 1 s audio windows) in shards of 4: clips are cut
    between shards."""
    from pipeline.data.av_synth import write_av_synth

    root = tmp_path_factory.mktemp("video-shards")
    write_av_synth(root, clips=6, classes=2, duration=3.0, fps=2, image_size=SIZE, test_fraction=0.0, samples_per_shard=4)
    return root


def decoded_frames(root) -> tuple[list[str], list[dict]]:
    manifest = read_manifest(root)
    urls = split_urls(root, manifest, "train")
    return urls, first_decoded(urls, decoder_for(manifest, "train", SIZE), 1000)


def check_group(frames: torch.Tensor, times: torch.Tensor, by_time: dict, video: str | None = None) -> str:
    """Every frame of a group is the decoded frame of one clip at the group's time, times rising;
    returns the clip."""
    assert (times[1:] > times[:-1]).all(), times
    clips = {v for v, t in by_time if any(torch.equal(by_time[v, t], f) for f in frames)}
    video = video or next(iter(clips))
    for frame, time in zip(frames, times.tolist()):
        assert torch.equal(by_time[video, time], frame), (video, time)
    return video


def test_grouping_keeps_each_group_in_one_clip_in_time_order(video_shards):
    urls, samples = decoded_frames(video_shards)
    assert len(urls) > 6 and len(samples) == 30  # clips cut by shard boundaries
    by_time = {(s["video"], s["time"]): s["image"] for s in samples}
    groups = list(GroupFrames(5)(iter(samples)))
    # In shard order every clip's 5 frames are contiguous: one group per clip, across shard cuts too.
    assert sorted(g["video"] for g in groups) == sorted({s["video"] for s in samples})
    for group in groups:
        assert group["frames"].shape == (5, 3, SIZE, SIZE) and group["key"].startswith(group["video"] + "_")
        check_group(group["frames"], group["time"], by_time, group["video"])


def group_frames_and_times(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return sample["frames"], sample["time"]


def test_train_loader_groups_only_frames_of_one_clip_in_time_order(video_shards):
    urls, samples = decoded_frames(video_shards)
    by_time = {(s["video"], s["time"]): s["image"] for s in samples}
    manifest = read_manifest(video_shards)
    loader = train_loader(urls, 0, 1, decoder_for(manifest, "train", SIZE), group_frames_and_times, batch_size=2,
                          shuffle_buffer=8, loader_workers=0, seed=0, frames_per_sample=3)
    batches = iter(loader)
    seen = set()
    for _ in range(10):  # shards come in a shuffled order each pass: groups are drawn from many joins
        frames, times = next(batches)
        assert frames.shape == (2, 3, 3, SIZE, SIZE)
        for f, t in zip(frames, times):
            seen.add(check_group(f, t, by_time))
    assert len(seen) > 1


def test_grouping_breaks_runs_where_the_clip_changes_or_time_does_not_rise():
    def frame(video: str, time: float) -> dict:
        return {"image": torch.full((1, 2, 2), time), "video": video, "time": time, "label": 0, "key": f"{video}_{int(time):06d}"}

    stream = [frame("a", t) for t in (0, 1, 2, 3)] + [frame("b", t) for t in (0, 1)] + [frame("a", t) for t in (4, 5, 0, 1, 2)]
    groups = list(GroupFrames(2)(iter(stream)))
    assert [(g["video"], g["time"].tolist()) for g in groups] == [
        ("a", [0, 1]), ("a", [2, 3]), ("b", [0, 1]), ("a", [4, 5]), ("a", [0, 1])]  # "a" 2 is left alone: dropped
    with pytest.raises(ShardError, match="video shards"):
        list(GroupFrames(2)(iter([{"image": torch.zeros(1, 2, 2), "label": 0, "key": "k"}])))
    with pytest.raises(ValueError, match="frames_per_sample"):
        GroupFrames(1)


# --- targets ------------------------------------------------------------------------------------

def test_order_target_says_whether_the_tuple_is_in_time_order():
    transform = make_temporal_task("temporal_order").sample_transform()
    seen = set()
    for _ in range(60):
        triplet, target = transform(indexed_sample())
        order = tuple(frame_numbers(triplet.unsqueeze(1)))
        assert triplet.shape == (3, 3, SIZE, SIZE) and target.dtype == torch.long
        if int(target) == 1:
            assert order == POSITIVE and list(order) == sorted(order)
        else:
            assert order in NEGATIVES and list(order) != sorted(order)
        seen.add(order)
    assert seen == {POSITIVE, *NEGATIVES}


def test_odd_one_out_target_indexes_the_shuffled_tuple():
    transform = make_temporal_task("odd_one_out", num_tuples=4).sample_transform()
    odd_seen = set()
    for _ in range(60):
        tuples, odd = transform(indexed_sample())
        assert tuples.shape == (4, 3, 3, SIZE, SIZE)
        for i, tup in enumerate(tuples):
            numbers = [frame_numbers(f.unsqueeze(0))[0] for f in tup]
            assert len(set(numbers)) == 3
            rising = numbers == sorted(numbers)
            assert rising == (i != int(odd)), (i, int(odd), numbers)
            if i == int(odd):
                assert numbers != sorted(numbers, reverse=True)  # never the mere reversal
        odd_seen.add(int(odd))
    assert odd_seen == set(range(4))
    assert odd_orders(2) == [(1, 0)] and len(odd_orders(3)) == 4


def test_sum_of_differences_is_the_sum_over_pairs():
    elements = torch.randn(2, 5, 7)
    pairs = sum(elements[:, j] - elements[:, i] for i in range(5) for j in range(i + 1, 5))
    assert torch.allclose(sum_of_differences(elements), pairs, atol=1e-5)


# --- losses and training --------------------------------------------------------------------------

@pytest.mark.parametrize("name, options", [("temporal_order", {}), ("odd_one_out", {}), ("odd_one_out", {"fusion": "concat"})])
def test_loss_is_cross_entropy_of_the_logits(name, options):
    task = make_temporal_task(name, **options).eval()
    transform = task.sample_transform()
    inputs, target = collate([transform(s) for s in frame_group_dicts(8)])
    with torch.no_grad():
        logits = task.logits(inputs)
        out = task(inputs, target)
    classes = 2 if name == "temporal_order" else task.num_tuples
    assert logits.shape == (8, classes)
    assert torch.allclose(out["loss"], F.cross_entropy(logits, target))


@pytest.mark.parametrize("name, options", [("temporal_order", {}), ("odd_one_out", {"num_tuples": 3, "fusion": "concat"})])
def test_twenty_steps_lower_the_loss_on_a_fixed_batch(name, options):
    task = make_temporal_task(name, **options)
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0), lr=3e-3)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    transform = task.sample_transform()
    batch = collate([transform(s) for s in frame_group_dicts(32)])
    losses = [float(task.train_step(batch, optimizers, scaler, autocast)["loss"].detach()) for _ in range(20)]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_bad_options_raise_config_errors_naming_them(video_shards):
    for name, options, match in (("temporal_order", {"positive_fraction": 1.0}, "positive_fraction"),
                                 ("odd_one_out", {"fusion": "mean"}, "fusion"),
                                 ("odd_one_out", {"tuple_length": 6}, "tuple_length"),
                                 ("odd_one_out", {"num_tuples": 1}, "num_tuples")):
        cfg = Config.from_dict({"data": {"root": str(video_shards)}, "model": TINY_BACKBONE, "task": {"name": name, "options": options}})
        manifest = read_manifest(video_shards)
        with pytest.raises(ConfigError, match=match):
            build_task(cfg, manifest, decoder_for(manifest, "train", SIZE))


def test_transform_refuses_ungrouped_samples():
    transform = make_temporal_task("temporal_order").sample_transform()
    with pytest.raises(ValueError, match="frames_per_sample=5"):
        transform({"image": torch.zeros(3, SIZE, SIZE), "label": 0, "key": "k"})


@pytest.mark.parametrize("name", TEMPORAL_TASKS)
def test_train_worker_trains_on_video_shards(name, video_shards, tmp_path):
    cfg = Config.from_dict({
        "run_dir": str(tmp_path / "run"),
        "data": {"root": str(video_shards), "loader_workers": 0, "shuffle_buffer": 8},
        "model": TINY_BACKBONE,
        "task": {"name": name, "options": {"num_tuples": 3} if name == "odd_one_out" else {}},
        "optim": {"name": "adamw", "lr": 0.05, "warmup_steps": 1, "weight_decay": 0.0},
        "train": {"steps": 4, "global_batch_size": 4, "log_every": 2, "checkpoint_every": 4},
        "scaling": {"num_workers": 1},
    })
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    metrics = read_metrics(cfg.run_dir)
    assert [m["step"] for m in metrics] == [2, 4]
    assert all(np.isfinite(m["loss"]) and 0 <= m["accuracy"] <= 1 for m in metrics)


@pytest.mark.parametrize("name", TEMPORAL_TASKS)
def test_examples_show_the_tuple_frames_with_the_target(name, video_shards):
    """The example figure gets decoded frames in shard order, grouped as the loader groups them
    (pipeline.train.examples); the task draws the frames it picked, the target in the captions."""
    _, samples = decoded_frames(video_shards)
    task = make_temporal_task(name, num_tuples=3) if name == "odd_one_out" else make_temporal_task(name)
    torch.manual_seed(1)
    examples = task.example_panels(list(GroupFrames(5)(iter(samples[:10]))))  # the first two clips: two groups
    assert len(examples) == 2
    group = GroupFrames(5)(iter(samples[:5])).__next__()
    if name == "temporal_order":
        assert len(examples[0]) == 3 and all("target" in p.caption for p in examples[0])
        letters = [p.caption[0] for p in examples[0]]
        for panel, letter in zip(examples[0], letters):
            assert torch.equal(panel.image, task.display(group["frames"]["abcde".index(letter)]))
        in_order = letters == ["b", "c", "d"]
        assert all(("1 in order" if in_order else "0 shuffled") in p.caption for p in examples[0])
    else:
        odd = [p for p in examples[0] if "odd" in p.caption]
        assert len(examples[0]) == 3 and len(odd) == 1
        target = int(odd[0].caption.rsplit(" ", 1)[-1])
        assert examples[0][target] is odd[0]
        numbers = [int(k) for k in odd[0].caption.split(":")[0].split(",")]
        assert numbers != sorted(numbers)
