"""Audio-visual tasks (avc, av_contrastive): the log-mel front end against its formulas, AVC's
in-batch negatives never from the frame's own clip, both losses against their formulas, training on
a fixed batch, global-batch negatives across 2 gloo processes, and building through the pipeline.

Until audio-visual shards exist, samples come from `av_sample_dicts`: what the loader's decoder
yields, {"image", "audio", "label", "key", "video", "time"}, with a class-specific colour and tone.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.clips import clip_code
from core.errors import ConfigError
from core.grids import CELL
from core.options import ModelConfig, OptimConfig
from models.audio import (
    LogMel,
    create_audio_encoder,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
)
from models.backbone import create_backbone
from pipeline.config import Config
from pipeline.data.decode import ImageDecoder
from pipeline.data.streaming import collate
from pipeline.train.loop import autocast_factory
from pipeline.train.tasks import build_task
from pretext import create_task
from pretext.audio_video.audio import AudioVisualPair
from pretext.audio_video.av_contrastive import AVContrastive
from pretext.audio_video.avc import AVC, correspondence_pairs
from pretext.losses import info_nce
from tests.conftest import TINY_BACKBONE

AV_SIZE = 16  # frame side, as the registry tests' IMAGE_SIZE
AV_RATE = 16000
AV_SAMPLES = 2000  # 0.125 s: the tasks take any length; short clips keep the tests fast
# A small log-mel image (32 bands x 13 frames) and a tiny audio CNN, as TINY_BACKBONE for images
# (the tasks' defaults: 64 bands, half-width resnet18).
AV_OPTIONS = {"n_mels": 32, "audio_backbone_kwargs": {"channels": [8, 16, 32, 64]}}
AV_TASKS = ("avc", "av_contrastive")

# One colour and one tone per class: the pairing is learnable from what is seen and heard.
COLOURS = [(r, g, b) for r in (0.15, 0.85) for g in (0.15, 0.85) for b in (0.15, 0.85)]
TONES = [250 * 2 ** (k / 2) for k in range(len(COLOURS))]  # 250 .. 2828 Hz, half-octave steps


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: with 2 threads on a shared 2-core machine every op waits at an OpenMP
    barrier for a descheduled thread (20 training steps: over 100 s under load, 0.5 s on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def av_sample_dicts(count: int = 16, per_clip: int = 2, channels: int = 3, size: int = AV_SIZE, samples: int = AV_SAMPLES,
                    seed: int = 0) -> list[dict]:
    """Decoded audio-visual samples: `per_clip` consecutive samples (moments) per clip, clip c of
    class c % 8; a noisy frame of the class colour and a sine at the class tone with noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        clip = i // per_clip
        label = clip % len(COLOURS)
        time = float(rng.uniform(0, 10))
        colour = torch.tensor(COLOURS[label][:channels], dtype=torch.float32).view(-1, 1, 1)
        image = colour * torch.from_numpy(rng.uniform(0.6, 1.0, (1, size, size))).float() - 0.5
        t = torch.arange(samples, dtype=torch.float64) / AV_RATE + time
        wave = 0.5 * torch.sin(2 * math.pi * TONES[label] * t) + torch.from_numpy(rng.normal(0, 0.02, samples))
        out.append({"image": image, "audio": wave.float().clamp(-1, 1).view(1, -1), "label": label, "key": f"k{i:05d}",
                    "video": f"clip{clip:03d}", "time": time})
    return out


def make_av_task(name: str, **options):
    torch.manual_seed(0)
    encoder = create_backbone(ModelConfig(**TINY_BACKBONE), in_chans=3)
    return create_task(name, encoder=encoder, in_chans=3, image_size=AV_SIZE, **{**AV_OPTIONS, **options})


def av_batch(task, count: int = 16, per_clip: int = 2, seed: int = 0):
    transform = task.sample_transform()
    return collate([transform(s) for s in av_sample_dicts(count, per_clip, seed=seed)])


# --- log-mel front end ---------------------------------------------------------------------------

def test_mel_scale_is_htk():
    hz = torch.tensor([0.0, 700.0, 1000.0, 4000.0], dtype=torch.float64)
    expected = torch.tensor([2595 * math.log10(1 + f / 700) for f in hz.tolist()], dtype=torch.float64)
    assert torch.allclose(hz_to_mel(hz), expected)
    assert hz_to_mel(torch.tensor(1000.0)).item() == pytest.approx(1000.0, abs=0.05)  # the scale's anchor (2595 is rounded)
    assert torch.allclose(mel_to_hz(hz_to_mel(hz)), hz)


def test_filterbank_matches_the_triangle_formula():
    sample_rate, n_freqs, n_mels, f_min, f_max = 8000, 129, 12, 100.0, 3800.0
    bank = mel_filterbank(n_freqs, sample_rate, n_mels, f_min, f_max)
    mel_lo, mel_hi = 2595 * math.log10(1 + f_min / 700), 2595 * math.log10(1 + f_max / 700)
    edges = [700 * (10 ** ((mel_lo + (mel_hi - mel_lo) * k / (n_mels + 1)) / 2595) - 1) for k in range(n_mels + 2)]
    expected = torch.zeros(n_mels, n_freqs)
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_freqs):
            f = k * sample_rate / 2 / (n_freqs - 1)
            if lo <= f <= mid:
                expected[m, k] = (f - lo) / (mid - lo)
            elif mid < f <= hi:
                expected[m, k] = (hi - f) / (hi - mid)
    assert bank.shape == (n_mels, n_freqs) and bank.dtype == torch.float32
    assert torch.allclose(bank, expected, atol=1e-6)
    assert (bank.max(1).values > 0.5).all()  # every band has a bin near its peak


def test_filterbank_refuses_bands_between_bins_and_bad_edges():
    with pytest.raises(ValueError, match="n_mels=256"):
        mel_filterbank(257, 16000, 256)
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(257, 16000, 64, f_max=9000.0)


@pytest.mark.parametrize("freq", [250.0, 1000.0, 3000.0, 6500.0])
def test_log_mel_of_a_pure_tone_peaks_in_the_band_holding_its_frequency(freq):
    frontend = LogMel(AV_RATE)
    t = torch.arange(AV_RATE) / AV_RATE
    logmel = frontend((0.8 * torch.sin(2 * math.pi * freq * t)).view(1, 1, -1))
    assert logmel.shape == (1, 1, 64, 1 + AV_RATE // frontend.hop_length) and logmel.dtype == torch.float32
    # The band whose triangle weighs the tone's STFT bin most.
    tone_bin = round(freq / (AV_RATE / frontend.n_fft))
    band = int(frontend.filterbank[:, tone_bin].argmax())
    assert int(logmel[0, 0].mean(1).argmax()) == band
    assert frontend.filterbank[band, tone_bin] > 0.5


def test_log_mel_floors_silence_and_ignores_autocast():
    frontend = LogMel(AV_RATE, n_mels=32, window_ms=32.0, hop_ms=16.0)
    assert (frontend.win_length, frontend.hop_length, frontend.n_fft) == (512, 256, 512)
    silence = frontend(torch.zeros(2, 1, 2048))
    assert silence.shape == (2, 1, 32, 9) and torch.allclose(silence, torch.full_like(silence, math.log(1e-8)))
    wave = torch.randn(2, 1, 2048).clamp(-1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = frontend(wave)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, frontend(wave))
    assert not list(frontend.parameters()) and not frontend.state_dict()  # nothing learned, nothing checkpointed


# --- the sample transform ------------------------------------------------------------------------

def test_clip_code_is_stable_across_processes_and_runs():
    # blake2b, not Python's per-process salted hash(): loader workers must agree on codes.
    assert clip_code("clip-a") == 3230280644173285402
    assert clip_code("clip-a") != clip_code("clip-b") and 0 <= clip_code("clip-b") < 2**63


def test_transform_emits_frame_waveform_and_clip_code():
    sample = av_sample_dicts(1)[0]
    transform = AudioVisualPair(flip=True, gain_db=6.0)
    flips = set()
    for _ in range(20):
        inputs, code = transform(sample)
        assert inputs["image"].shape == (3, AV_SIZE, AV_SIZE) and inputs["audio"].shape == (1, AV_SAMPLES)
        assert inputs["image"].dtype == inputs["audio"].dtype == torch.float32
        assert code.dtype == torch.long and int(code) == clip_code(sample["video"])
        flips.add(torch.equal(inputs["image"], sample["image"].flip(-1)))
        assert torch.equal(inputs["image"], sample["image"]) or torch.equal(inputs["image"], sample["image"].flip(-1))
        gain = inputs["audio"].norm() / sample["audio"].norm()  # attenuation only, by at most 6 dB
        assert 10 ** (-6 / 20) - 1e-6 <= gain <= 1 + 1e-6
        assert torch.allclose(inputs["audio"], sample["audio"] * gain, atol=1e-6)
    assert flips == {True, False}


def test_transform_refuses_image_only_samples():
    sample = {k: v for k, v in av_sample_dicts(1)[0].items() if k != "audio"}
    with pytest.raises(ValueError, match="audio"):
        AudioVisualPair()(sample)


# --- AVC -----------------------------------------------------------------------------------------

def test_avc_negatives_never_come_from_the_same_clip():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = int(torch.randint(2, 33, (), generator=generator))
        clips = torch.randint(0, int(torch.randint(2, batch + 1, (), generator=generator)), (batch,), generator=generator)
        if clips.unique().numel() < 2:
            continue
        image_index, audio_index, labels = correspondence_pairs(clips, generator)
        own = torch.arange(batch)
        assert torch.equal(image_index, torch.cat([own, own]))  # every frame twice
        assert torch.equal(labels, torch.cat([torch.ones(batch), torch.zeros(batch)]).long())  # half positives, half negatives
        assert torch.equal(audio_index[:batch], own)  # the positives are the true pairs
        assert (clips[audio_index[batch:]] != clips).all()  # a negative's audio is never from the frame's clip


def test_avc_negatives_reach_every_other_clip():
    clips = torch.tensor([0, 0, 0, 1, 2, 3])
    partners = set()
    for _ in range(200):
        _, audio_index, _ = correspondence_pairs(clips)
        partners.update(audio_index[6:9].tolist())  # frames 0-2 (clip 0)
    assert partners == {3, 4, 5}


def test_avc_refuses_a_batch_of_one_clip():
    with pytest.raises(ValueError, match="one clip"):
        correspondence_pairs(torch.full((8,), 7))


def test_avc_fuses_each_frame_with_the_audio_it_was_paired_with():
    task = make_av_task("avc").eval()  # eval: batch norm per sample, so features do not depend on the batch
    inputs, clips = av_batch(task, 16, per_clip=4)
    seen = {}
    task.fusion.register_forward_hook(lambda module, args, out: seen.update(fused=args[0]))
    with torch.no_grad():
        logits, labels, image_index, audio_index = task.pair_logits(inputs, clips)
        image_features, audio_features = task.encoder(inputs["image"]), task.audio_encoder(inputs["audio"])
    dim = image_features.shape[1]
    assert torch.allclose(seen["fused"][:, :dim], image_features[image_index], atol=1e-5)
    assert torch.allclose(seen["fused"][:, dim:], audio_features[audio_index], atol=1e-5)
    # The target says what was paired: 1 exactly where a frame met its own audio.
    assert torch.equal(labels == 1, audio_index == image_index) and logits.shape == (32, 2)
    assert (clips[audio_index[labels == 0]] != clips[image_index[labels == 0]]).all()


def test_avc_loss_is_binary_cross_entropy_on_its_logits():
    task = make_av_task("avc").eval()
    inputs, clips = av_batch(task)
    torch.manual_seed(5)
    out = task(inputs, clips)
    torch.manual_seed(5)  # the same pairs again
    logits, labels, _, _ = task.pair_logits(inputs, clips)
    p = torch.sigmoid(logits[:, 1] - logits[:, 0])  # P(corresponds) of the 2-way softmax
    y = labels.float()
    bce = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert torch.allclose(out["loss"], bce, atol=1e-5)
    assert out["accuracy"] == pytest.approx(float(((p > 0.5).long() == labels).float().mean()))


def test_avc_scores_every_frame_audio_pair_for_eval():
    task = make_av_task("avc").eval()
    inputs, clips = av_batch(task, 12, per_clip=3)
    with torch.no_grad():
        image, audio = task.encoder(inputs["image"]), task.audio_encoder(inputs["audio"])
        scores = task.cross_modal_scores(image, audio, max_pairs=40)  # blocks of 3 frames
        log_odds = [[float(task.fuse(image[i : i + 1], audio[j : j + 1]).diff(dim=1)) for j in range(12)] for i in range(12)]
        accuracy = task.correspondence_accuracy(image, audio, clips, seed=3)
        image_index, audio_index, labels = correspondence_pairs(clips, torch.Generator().manual_seed(3))
        expected = (task.fuse(image[image_index], audio[audio_index]).argmax(1) == labels).float().mean()
    assert scores.shape == (12, 12) and torch.allclose(scores, torch.tensor(log_odds), atol=1e-5)
    assert accuracy == pytest.approx(float(expected))


# --- av_contrastive ------------------------------------------------------------------------------

def test_av_contrastive_loss_is_info_nce_both_ways():
    task = make_av_task("av_contrastive", temperature=0.2).eval()
    inputs, clips = av_batch(task)
    out = task(inputs, clips)
    image, audio = task.embeddings(inputs)
    expected = (info_nce(image, audio, 0.2, query_negatives=False)[0] + info_nce(audio, image, 0.2, query_negatives=False)[0]) / 2
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    # The same from the cosine-similarity matrix: rows pick audio for frames, columns frames for audio.
    logits = F.normalize(image, dim=1) @ F.normalize(audio, dim=1).T / 0.2
    targets = torch.arange(len(logits))
    assert torch.allclose(out["loss"], (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2, atol=1e-5)
    # Eval's retrieval scores are these cosine similarities, from the pooled backbone features.
    with torch.no_grad():
        scores = task.cross_modal_scores(task.encoder(inputs["image"]), task.audio_encoder(inputs["audio"]))
    assert torch.allclose(scores, logits * 0.2, atol=1e-5)


# --- both tasks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", AV_TASKS)
def test_twenty_steps_lower_the_loss_and_raise_accuracy(name):
    task = make_av_task(name)
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0), lr=3e-3)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    batch = av_batch(task, 32)
    torch.manual_seed(0)
    outs = [task.train_step(batch, optimizers, scaler, autocast) for _ in range(20)]
    losses, accuracy = [float(o["loss"].detach()) for o in outs], [float(o["accuracy"]) for o in outs]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert sum(accuracy[-3:]) / 3 > sum(accuracy[:3]) / 3 + 0.1, accuracy


def _config(name: str, **options) -> Config:
    return Config.from_dict({"model": TINY_BACKBONE, "task": {"name": name, "options": {**AV_OPTIONS, **options}},
                             "scaling": {"num_workers": 1}})


@pytest.mark.parametrize("name", AV_TASKS)
def test_tasks_build_through_the_pipeline_and_record_the_audio_network(name):
    from pipeline.train.checkpoint import encoder_state

    decoder = ImageDecoder("RGB", AV_SIZE, [0.5] * 3, [0.25] * 3)
    task = build_task(_config(name, sample_rate=8000, n_mels=40), {"channels": 3}, decoder)
    assert isinstance(task, {"avc": AVC, "av_contrastive": AVContrastive}[name]) and task.modalities == ("image", "audio")
    assert task.feature_extractor() is task.encoder and task.audio_feature_extractor() is task.audio_encoder
    info = task.encoder_input({"channels": 3, "mode": "RGB", "image_size": AV_SIZE, "mean": [0.5] * 3, "std": [0.25] * 3,
                               "audio": {"samples": 8000}})
    assert info["mode"] == "RGB" and info["modalities"] == ["image", "audio"] and info["audio"] == {"samples": 8000}
    recorded = info["audio_encoder"]
    assert {k: recorded[k] for k in ("sample_rate", "n_mels", "window_ms", "hop_ms", "backbone")} == {
        "sample_rate": 8000, "n_mels": 40, "window_ms": 25.0, "hop_ms": 10.0, "backbone": "resnet18"}
    # Eval's backbone reads the `encoder.` weights only; the audio CNN is rebuilt from what was recorded.
    state = {"task": task.state_dict(), "step": 0, "config": {"task": {"name": name}}}
    create_backbone(ModelConfig(**TINY_BACKBONE), 3).load_state_dict(encoder_state(state), strict=True)
    audio = create_backbone(ModelConfig(recorded["backbone"], recorded["backbone_kwargs"]), 1)
    prefix = recorded["weights_prefix"]
    audio.load_state_dict({k[len(prefix):]: v for k, v in state["task"].items() if k.startswith(prefix)}, strict=True)
    fresh = create_audio_encoder(**task.audio_encoder_options)  # eval's random-init audio baseline: same network
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in task.audio_encoder.state_dict().items()}
    wave = torch.randn(2, 1, 8000).clamp(-1, 1)
    task.eval(), audio.eval()
    assert torch.allclose(audio(LogMel(**{k: recorded[k] for k in ("sample_rate", "n_mels", "window_ms", "hop_ms", "log_floor")})(wave)),
                          task.audio_feature_extractor()(wave), atol=1e-5)


@pytest.mark.parametrize("name", AV_TASKS)
def test_bad_options_raise_config_errors_naming_them(name):
    decoder = ImageDecoder("RGB", AV_SIZE, [0.5] * 3, [0.25] * 3)
    with pytest.raises(ConfigError, match="audio_backbone"):
        build_task(_config(name, audio_backbone="resnet81"), {"channels": 3}, decoder)
    with pytest.raises(ConfigError, match="in_chans"):
        build_task(_config(name, audio_backbone_kwargs={"in_chans": 3}), {"channels": 3}, decoder)
    with pytest.raises(ConfigError, match="sample_rat"):
        _config(name, sample_rat=8000)


@pytest.mark.parametrize("name", AV_TASKS)
def test_example_panels_show_the_frame_and_spectrograms(name, tmp_path):
    task = make_av_task(name)
    samples = av_sample_dicts(4, per_clip=2)
    examples = task.example_panels(samples)
    captions = [[p.caption for p in example] for example in examples]
    assert all(c[0].startswith("frame") and c[1] == "match: its audio" for c in captions)
    if name == "avc":
        assert all(c[2].startswith("mismatch: audio of clip") for c in captions)
        # The mismatch comes from another clip: sample 0 (clip000) shows clip001's audio.
        assert captions[0][2] == "mismatch: audio of clip001" and captions[2][2] == "mismatch: audio of clip000"
    for example in examples:
        assert example[0].image.shape == (3, AV_SIZE, AV_SIZE)
        for panel in example[1:]:  # spectrograms: one channel in [0, 1], square, no larger than a figure cell
            assert panel.image.shape == (1, 32, 32) and 32 <= CELL
            assert 0 <= panel.image.min() and panel.image.max() <= 1 and panel.image.std() > 0.05
    assert task.write_examples(samples, tmp_path / "examples.png").is_file()


# --- global-batch negatives across workers -------------------------------------------------------

def _gather_worker(rank: int, world_size: int, init_file: str, out_dir: str, inputs: dict, clips: torch.Tensor) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    task = make_av_task("av_contrastive").eval()  # same seed: every rank starts from the same weights
    rows = slice(rank * len(clips) // world_size, (rank + 1) * len(clips) // world_size)
    out = task({k: v[rows] for k, v in inputs.items()}, clips[rows])
    out["loss"].backward()
    grads = {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
    torch.save({"loss": out["loss"].detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_av_contrastive_gathers_negatives_from_every_worker(tmp_path):
    """2 workers x batch B give the loss and (DDP-averaged) gradients of 1 worker x batch 2B: each
    frame's candidates are the audio of the global batch, not only its worker's."""
    import torch.multiprocessing as mp

    task = make_av_task("av_contrastive").eval()
    inputs, clips = av_batch(task, 8, per_clip=1)
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path), inputs, clips), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    out = task(inputs, clips)
    out["loss"].backward()
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), out["loss"], atol=1e-5)
    # Without the gather each rank would score 4 candidates, not 8: its loss would differ.
    local = [task({k: v[s] for k, v in inputs.items()}, clips[s])["loss"] for s in (slice(0, 4), slice(4, 8))]
    assert not torch.allclose(torch.stack(local).mean(), out["loss"], atol=1e-3)
    checked = 0
    for name, param in task.named_parameters():
        if param.grad is None:
            continue
        averaged = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2  # what DDP's all-reduce gives
        assert torch.allclose(averaged, param.grad, atol=1e-5, rtol=1e-4), name
        checked += 1
    assert checked == len(list(task.parameters()))
