"""Audio entries of audio-visual samples: a mono 16-bit .wav or a .npy array, checked against the
dataset's sample rate and window length, loaded without pickle."""
from __future__ import annotations

import io
import wave

import numpy as np

AUDIO_EXTS = ("wav", "npy")


def decode_audio(data: bytes, ext: str, sample_rate: int, samples: int) -> np.ndarray:
    """float32 (samples,) in [-1, 1] from a mono 16-bit PCM .wav of exactly `sample_rate` and `samples`,
    or from a .npy array (int16, or float in [-1, 1]) of `samples` values, loaded without pickle.
    Raises ValueError saying what is wrong."""
    if not data:
        raise ValueError("has zero bytes")
    if ext == "wav":
        try:
            with wave.open(io.BytesIO(data), "rb") as f:
                channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
                pcm = f.readframes(samples + 1)
        except (wave.Error, EOFError, OSError) as err:
            raise ValueError(f"does not decode ({err})") from err
        if (channels, width) != (1, 2):
            raise ValueError(f"is {channels}-channel {8 * width}-bit; expected mono 16-bit PCM")
        if rate != sample_rate:
            raise ValueError(f"is at {rate} Hz; the manifest says {sample_rate} Hz")
        if frames != samples or len(pcm) != 2 * samples:
            # A truncated file still carries the header's frame count: count the bytes that are there.
            raise ValueError(f"has {len(pcm) // 2} samples (header: {frames}); the manifest says {samples}")
        return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    if ext == "npy":
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)  # object arrays (pickles) raise here
        except Exception as err:
            raise ValueError(f"does not decode ({err})") from err
        if not isinstance(array, np.ndarray) or array.size != samples or array.squeeze().ndim > 1:
            raise ValueError(f"has shape {getattr(array, 'shape', '?')}; the manifest says ({samples},)")
        if array.dtype == np.int16:
            return array.reshape(-1).astype(np.float32) / 32768.0
        if array.dtype.kind != "f" or not np.all(np.abs(array) <= 1.0):  # also rejects NaN
            raise ValueError(f"of dtype {array.dtype} is not int16 or float in [-1, 1]")
        return array.reshape(-1).astype(np.float32)
    raise ValueError(f"extension {ext!r} is not one of {list(AUDIO_EXTS)}")
