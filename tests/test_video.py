"""Audio-visual data: real PyAV-made .mp4 files through `sslpipe data video`, the SYNTHETIC
generator (`data av-synth`), and the decoder's audio, record and bad-audio handling."""
from __future__ import annotations

import io
import json
import logging
import wave

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.cli import main
from pipeline.data.av_synth import write_av_synth
from pipeline.data.bad_samples import BadSamples, ShardError
from pipeline.data.decode import ImageDecoder, decoder_for
from pipeline.data.shards import encode_wav, read_manifest, split_urls
from pipeline.data.streaming import eval_loader, train_loader
from pipeline.data.video import held_out, write_video_dataset
from tests.test_data import png_bytes, write_raw_shard

RATE = 16000
BURST = (1.0, 1.5)  # seconds of the 1 kHz tone in the test clip's otherwise silent track


def write_mp4(path, seconds: float, audio: bool = True, fps: int = 25, size=(80, 64), burst=BURST):
    """H.264 at `fps`: grey level 3 x frame index with a white bar moving along the top; stereo
    48 kHz AAC, silent but for a 1 kHz tone (amplitude 0.5) during `burst`."""
    width, height = size
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        stream = container.add_stream("aac", rate=48000, layout="stereo") if audio else None  # all streams before muxing
        for i in range(round(seconds * fps)):
            pixels = np.full((height, width, 3), 3 * i, dtype=np.uint8)
            pixels[: height // 4, (2 * i) % (width - 6) :][:, :6] = 255
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio:
            t = np.arange(round(seconds * 48000)) / 48000
            tone = np.where((t >= burst[0]) & (t < burst[1]), 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0).astype(np.float32)
            for start in range(0, len(t), 1024):
                chunk = np.stack([tone[start : start + 1024]] * 2)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = 48000, start
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return path


def decoded_samples(root, split="train") -> list[dict]:
    manifest = read_manifest(root)
    decoder = decoder_for(manifest, "train", 0)
    return [decoder(raw) for raw in wds.WebDataset(split_urls(root, manifest, split), shardshuffle=False)]


def test_each_frame_gets_the_audio_window_centred_on_its_timestamp(tmp_path):
    (tmp_path / "clips").mkdir()
    write_mp4(tmp_path / "clips" / "burst.mp4", 3.0)
    write_video_dataset(tmp_path / "clips", tmp_path / "out", fps=5, image_size=32, test_fraction=0)
    samples = decoded_samples(tmp_path / "out")
    # Frames every 0.2 s; those within 0.5 s of either end have no whole 1 s window and are skipped.
    assert [s["time"] for s in samples] == pytest.approx([0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4])
    manifest = read_manifest(tmp_path / "out")
    for sample in samples:
        time, audio, key = sample["time"], sample["audio"][0].numpy(), sample["key"]
        index = round(time * 25)
        assert key == f"burst_{index:06d}" and sample["video"] == "burst"
        # The right frame: its grey level is 3 x its index (the bar is in the top quarter only).
        grey = (sample["image"][:, 16:] * torch.tensor(manifest["splits"]["train"]["std"]).view(3, 1, 1)
                + torch.tensor(manifest["splits"]["train"]["mean"]).view(3, 1, 1)) * 255
        assert abs(grey.mean().item() - 3 * index) < 4
        # 10 ms blocks: the 1 kHz bin (10 cycles per block) is loud exactly where the burst falls.
        onset, offset = ((b - (time - 0.5)) * RATE for b in BURST)
        energy = np.abs(np.fft.rfft(audio.reshape(-1, 160), axis=1)[:, 10]) / 80  # amplitude of the 1 kHz component
        for block, amplitude in enumerate(energy):
            lo, hi = block * 160, block * 160 + 160
            if lo >= onset + 48 and hi <= offset - 48:  # 3 ms margins: codec and resampler smear edges
                assert amplitude > 0.4, (key, block)
            elif hi <= onset - 48 or lo >= offset + 48:
                assert amplitude < 0.02, (key, block)
        loud = np.nonzero(np.abs(audio) > 0.25)[0]
        if 0 < onset < RATE:
            assert abs(loud[0] - onset) <= 48  # within 3 ms
        if 0 < offset < RATE:
            assert abs(loud[-1] - offset) <= 48
        if offset <= 0 or onset >= RATE:
            assert loud.size == 0


def test_videos_without_audio_unreadable_and_too_short_are_named_and_skipped(tmp_path, caplog):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_mp4(folder / "good.mp4", 3.0)
    write_mp4(folder / "silent_film.mp4", 2.0, audio=False)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    write_mp4(folder / "short.mp4", 0.6)
    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        assert main(["data", "video", str(folder), "--out", str(tmp_path / "out"), "--image-size", "16", "--test-fraction", "0"]) == 0
    keys = [s["key"] for s in decoded_samples(tmp_path / "out")]
    assert keys == [f"good_{i:06d}" for i in (13, 25, 38, 50, 63)]  # every 0.5 s (25 fps), the edges skipped
    assert read_manifest(tmp_path / "out")["audio"] == {"sample_rate": 16000, "samples": 16000}
    for name, reason in (("silent_film.mp4", "no audio stream"), ("broken.mp4", "unreadable"), ("short.mp4", "shorter than the 1 s audio window")):
        assert sum(name in r.getMessage() and reason in r.getMessage() for r in caplog.records) == 2  # its warning and the summary
    assert "skipped 3 of 4 video(s)" in caplog.text


def test_videos_not_frames_are_split_seeded_and_per_class(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "clips" / label).mkdir(parents=True)
        for i in range(5):
            write_mp4(tmp_path / "clips" / label / f"{label}{i}.mp4", 2.0, size=(32, 32))
    for workers, out in ((1, "one"), (2, "two")):
        write_video_dataset(tmp_path / "clips", tmp_path / out, image_size=16, test_fraction=0.4, seed=3, workers=workers)
    by_split = {split: decoded_samples(tmp_path / "one", split) for split in ("train", "test")}
    videos = {split: {s["video"] for s in samples} for split, samples in by_split.items()}
    assert not videos["train"] & videos["test"] and len(videos["train"] | videos["test"]) == 10
    assert sorted(v[0] for v in videos["test"]) == ["a", "a", "b", "b"]  # 2 of each class's 5 videos
    assert all(s["label"] == "ab".index(s["video"][0]) for samples in by_split.values() for s in samples)
    assert len(by_split["test"]) == 4 * 3  # 3 frames with a whole window per 2 s clip
    # Ordered decoding: shards are identical with 1 or 2 worker processes.
    shas = [[shard["sha256"] for split in ("train", "test") for shard in read_manifest(tmp_path / out)["splits"][split]["shards"]]
            for out in ("one", "two")]
    assert shas[0] == shas[1]
    assert held_out([0] * 5 + [1] * 5, 0.4, 3) == held_out([0] * 5 + [1] * 5, 0.4, 3)


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    centroids = np.stack([train_x[train_y == c].mean(0) for c in np.unique(train_y)])
    predicted = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return float((predicted == test_y).mean())


def test_synthetic_classes_are_distinguishable_in_both_modalities(tmp_path):
    manifest = json.loads(write_av_synth(tmp_path / "synth", clips=60, mp4=2).read_text())
    assert manifest["audio"] == {"sample_rate": 16000, "samples": 16000} and manifest["num_classes"] == 10
    assert manifest["splits"]["train"]["count"] == 50 * 7 and manifest["splits"]["test"]["count"] == 10 * 7  # 1 of 6 clips per class
    features = {}
    for split in ("train", "test"):
        colour, pitch, labels = [], [], []
        for s in decoded_samples(tmp_path / "synth", split):
            assert s["audio"].dtype == torch.float32 and s["audio"].shape == (1, 16000) and s["audio"].abs().max() <= 1
            assert isinstance(s["video"], str) and isinstance(s["time"], float) and s["key"].startswith(s["video"] + "_")
            pixels = s["image"] * torch.tensor(manifest["splits"]["train"]["std"]).view(3, 1, 1) + torch.tensor(manifest["splits"]["train"]["mean"]).view(3, 1, 1)
            pixels = pixels.permute(1, 2, 0).reshape(-1, 3).clamp(0, 1).numpy()
            saturated = (pixels.max(1) - pixels.min(1)) > 0.5 * pixels.max(1)  # the shape; backgrounds are pale
            colour.append(pixels[saturated].mean(0))
            pitch.append([np.log(np.argmax(np.abs(np.fft.rfft(s["audio"][0].numpy()))[20:]) + 20)])  # spectrum peak
            labels.append(s["label"])
        features[split] = np.array(colour), np.array(pitch), np.array(labels)
    (train_colour, train_pitch, train_y), (test_colour, test_pitch, test_y) = features["train"], features["test"]
    assert nearest_centroid_accuracy(train_colour, train_y, test_colour, test_y) >= 0.9  # chance: 0.1
    assert nearest_centroid_accuracy(train_pitch, train_y, test_pitch, test_y) >= 0.9

    # The clips written as .mp4 give the same samples through `data video` (after H.264 and AAC).
    write_video_dataset(tmp_path / "synth" / "mp4", tmp_path / "ingested", image_size=32, test_fraction=0)
    direct = {s["key"]: s for split in ("train", "test") for s in decoded_samples(tmp_path / "synth", split)}
    ingested = decoded_samples(tmp_path / "ingested")
    assert len(ingested) == 14 and {s["label"] for s in ingested} == {0, 1}
    for s in ingested:
        twin = direct[s["key"]]
        assert s["time"] == twin["time"] and s["label"] == twin["label"]
        assert np.corrcoef(s["audio"][0].numpy(), twin["audio"][0].numpy())[0, 1] > 0.9

    # Batches through the training loader carry both modalities.
    decoder = decoder_for(read_manifest(tmp_path / "synth"), "train", 0)
    loader = train_loader(split_urls(tmp_path / "synth", manifest, "train"), 0, 1, decoder,
                          av_pair, batch_size=8, shuffle_buffer=16, loader_workers=0, seed=0)
    (images, audio), labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and audio.shape == (8, 1, 16000) and labels.shape == (8,)


def av_pair(sample: dict) -> tuple:
    return (sample["image"], sample["audio"]), sample["label"]


def wav_bytes(samples: int = 1600, rate: int = RATE) -> bytes:
    return encode_wav((np.sin(np.arange(samples) / 5) * 8000).astype(np.int16), rate)


def pickled_npy(marker) -> bytes:
    """A .npy whose object array, if unpickled, would run `touch <marker>`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    return b"\x93NUMPY" + header.getvalue()[6:] + f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()


def av_record(key: str) -> bytes:
    return json.dumps({"video": key, "time": 1.5}).encode()


def stereo_wav() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes(bytes(4 * 1600))
    return buffer.getvalue()


BAD_AUDIO = {
    "truncated_wav": ({"wav": wav_bytes()[:-1000]}, "has 1100 samples"),
    "wrong_rate": ({"wav": wav_bytes(rate=8000)}, "8000 Hz; the manifest says 16000 Hz"),
    "stereo": ({"wav": stereo_wav()}, "2-channel"),
    "pickled_npy": ({"npy": None}, "does not decode"),
    "no_audio": ({}, "no audio"),
    "no_record": ({"wav": wav_bytes(), "json": None}, "no valid json record"),
}


def av_sample(key: str, **entries) -> dict:
    sample = {"__key__": key, "png": png_bytes("RGB"), "cls": b"1", "json": av_record(key), **entries}
    return {k: v for k, v in sample.items() if v is not None}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_audio_is_skipped_and_counted_or_raises_under_strict(tmp_path, case, caplog):
    entries, reason = BAD_AUDIO[case]
    if case == "pickled_npy":
        entries = {"npy": pickled_npy(tmp_path / "pwned")}
    good = [av_sample(f"good{i}", wav=wav_bytes()) for i in range(3)]
    good.append(av_sample("good3", npy=_npy(np.zeros(1600, dtype=np.float32))))  # .npy audio is accepted
    url = write_raw_shard(tmp_path / f"{case}.tar", good[:2] + [av_sample("bad", **entries)] + good[2:])
    decoder = ImageDecoder("RGB", 8, [0.0] * 3, [1.0] * 3, audio={"sample_rate": RATE, "samples": 1600})
    loader = eval_loader([url], 0, 1, decoder, 4, 0)
    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        keys = [k for _, _, batch in loader for k in batch]
    assert keys == [f"good{i}" for i in range(4)] and loader.bad_samples.counts()["bad_samples"] == 1
    assert f"{case}.tar, key bad" in caplog.text and reason in caplog.text
    with pytest.raises(ShardError, match=rf"{case}.tar, key bad: .*{reason}"):
        list(eval_loader([url], 0, 1, decoder, 4, 0, bad_samples=BadSamples(strict=True)))
    assert not (tmp_path / "pwned").exists()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_image_only_datasets_decode_as_before(shards):
    manifest = read_manifest(shards)
    assert "audio" not in manifest
    raw = next(iter(wds.WebDataset(split_urls(shards, manifest, "train")[:1], shardshuffle=False)))
    assert set(decoder_for(manifest, "train", 0)(raw)) == {"image", "label", "key"}


@pytest.mark.parametrize("source", ["video", "av-synth"])
def test_cli_help(source, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", source, "--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out
