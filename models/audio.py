"""The audio encoder of the audio-visual tasks: a log-mel spectrogram front end in plain torch
and a timm 2-D CNN on the log-mel image (`create_audio_encoder`). The spectrogram is computed in
the forward pass, on the training device, so loaders ship raw waveforms and the GPU does the STFTs."""
from __future__ import annotations

import difflib
import math

import timm
import torch
from torch import Tensor, nn

# The front end's defaults follow VGGish / AudioSet practice: 64 mel bands, 25 ms Hann windows every 10 ms.
N_MELS, WINDOW_MS, HOP_MS = 64, 25.0, 10.0
# With no backbone kwargs, a resnet18 is built at half width (32-64-128-256 channels), as the demo's
# image backbone (configs/rotation_fmnist.yaml): a 1 s log-mel image (64 x 101) costs about as much
# as an 80 px image, which a 2-core CPU can still train on.
HALF_WIDTH = {"resnet18": {"channels": [32, 64, 128, 256]}}


def hz_to_mel(hz: Tensor) -> Tensor:
    """HTK mel scale (O'Shaughnessy 1987): 2595 log10(1 + f / 700); 1000 Hz is 1000 mel."""
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, sample_rate: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """(n_mels, n_freqs) triangular filters on the STFT bins 0 .. sample_rate / 2 (HTK mel scale,
    peak 1, no area normalization; torchaudio's `melscale_fbanks(norm=None, mel_scale="htk")`).

    Band m rises linearly from edge m to 1 at edge m + 1 and falls to 0 at edge m + 2, where the
    n_mels + 2 edges are equally spaced in mel from f_min to f_max.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"mel band edges f_min={f_min}, f_max={f_max} must satisfy 0 <= f_min < f_max <= sample_rate / 2 = {sample_rate / 2}")
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)  # (F,) bin centres in Hz
    mels = torch.linspace(float(hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
                          float(hz_to_mel(torch.tensor(f_max, dtype=torch.float64))), n_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels)  # (M + 2,)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each
    rising = (freqs - lower) / (centre - lower)  # (M, F)
    falling = (upper - freqs) / (upper - centre)
    bank = torch.minimum(rising, falling).clamp(min=0)
    empty = (bank.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        # Narrow low bands can fall between two STFT bins; an all-zero band is a dead input row.
        raise ValueError(f"n_mels={n_mels}: bands {empty} hold no STFT bin ({n_freqs} bins up to {sample_rate / 2:.0f} Hz); "
                         "use fewer mel bands or a longer window (window_ms)")
    return bank.float()


class LogMel(nn.Module):
    """Waveforms (B, 1, S) or (B, S) -> log-mel spectrograms (B, 1, n_mels, T), T = 1 + S // hop.

    Power spectrum of a Hann-windowed STFT (window `window_ms`, hop `hop_ms`, FFT size the next
    power of two), scaled so a full-scale sine peaks near 0.25 whatever the window length, summed
    into mel bands, then log(max(mel, log_floor)): silence gives log(log_floor) (-18.4 at 1e-8, i.e.
    -80 dB) instead of -inf. No learned parameters; the window and filterbank are non-persistent
    buffers, rebuilt from the arguments, so checkpoints do not carry them.
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = N_MELS, window_ms: float = WINDOW_MS, hop_ms: float = HOP_MS,
                 f_min: float = 0.0, f_max: float | None = None, log_floor: float = 1e-8):
        super().__init__()
        if sample_rate <= 0 or n_mels <= 0 or window_ms <= 0 or hop_ms <= 0 or log_floor <= 0:
            raise ValueError(f"sample_rate={sample_rate}, n_mels={n_mels}, window_ms={window_ms}, hop_ms={hop_ms} and "
                             f"log_floor={log_floor} must all be positive")
        self.sample_rate, self.n_mels, self.window_ms, self.hop_ms = sample_rate, n_mels, window_ms, hop_ms
        self.win_length = max(2, round(sample_rate * window_ms / 1000))
        self.hop_length = max(1, round(sample_rate * hop_ms / 1000))
        self.n_fft = 2 ** math.ceil(math.log2(self.win_length))
        self.log_floor = log_floor
        self.register_buffer("window", torch.hann_window(self.win_length, periodic=True), persistent=False)
        self.register_buffer("filterbank", mel_filterbank(self.n_fft // 2 + 1, sample_rate, n_mels, f_min, f_max), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:
        batch_shape = wave.shape[:-1]
        # STFTs in float32 whatever autocast says: half-precision FFTs lose the quiet bands.
        with torch.autocast(wave.device.type, enabled=False):
            spec = torch.stft(wave.float().reshape(-1, wave.shape[-1]), self.n_fft, self.hop_length, self.win_length, self.window,
                              center=True, pad_mode="constant", return_complex=True)  # (N, F, T)
            power = spec.abs().square() / self.window.sum().square()
            mel = torch.einsum("mf,nft->nmt", self.filterbank, power)  # m: mel band, f: STFT bin, t: frame
            logmel = mel.clamp(min=self.log_floor).log()
        if len(batch_shape) == 1:  # (B, S): add the channel axis a 2-D CNN wants
            return logmel.unsqueeze(1)
        return logmel.reshape(*batch_shape, self.n_mels, -1)  # (B, 1, M, T)

    def describe(self) -> dict:
        return {"sample_rate": self.sample_rate, "n_mels": self.n_mels, "window_ms": self.window_ms, "hop_ms": self.hop_ms,
                "log_floor": self.log_floor}


class AudioEncoder(nn.Module):
    """Waveform (B, 1, S) -> log-mel (B, 1, n_mels, T) -> timm CNN -> pooled features (B, num_features)."""

    def __init__(self, frontend: LogMel, backbone: nn.Module, name: str, backbone_kwargs: dict):
        super().__init__()
        self.frontend, self.backbone = frontend, backbone
        self.name, self.backbone_kwargs = name, backbone_kwargs

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward(self, wave: Tensor) -> Tensor:
        return self.backbone(self.frontend(wave))

    def options(self) -> dict:
        """Keyword arguments of `create_audio_encoder` that build this network again (fresh weights:
        the eval stage's random-init audio baseline)."""
        f = self.frontend
        return {"name": self.name, "sample_rate": f.sample_rate, "n_mels": f.n_mels, "window_ms": f.window_ms, "hop_ms": f.hop_ms,
                **self.backbone_kwargs}

    def describe(self, prefix: str) -> dict:
        """What an eval or export stage needs to rebuild this network from a checkpoint: the
        front end's settings, the timm model and the state-dict prefix of its weights."""
        return {**self.frontend.describe(), "backbone": self.name, "backbone_kwargs": self.backbone_kwargs,
                "weights_prefix": f"{prefix}backbone."}


def create_audio_encoder(name: str = "resnet18", sample_rate: int = 16000, n_mels: int = N_MELS, window_ms: float = WINDOW_MS,
                         hop_ms: float = HOP_MS, **kwargs) -> AudioEncoder:
    """A log-mel front end and a timm 2-D CNN on its one-channel image (in_chans=1, num_classes=0,
    never pretrained). `kwargs` go to `timm.create_model`; with none, resnet18 is half width (HALF_WIDTH).

    Errors name the tasks' options (`audio_backbone`, `audio_backbone_kwargs`), where these come from.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"audio_backbone: unknown timm model {name!r}; close names: {close} (see timm.list_models())")
    for key in ("num_classes", "in_chans", "pretrained"):
        if key in kwargs:
            raise ValueError(f"audio_backbone_kwargs.{key} is set by the audio encoder; remove it")
    kwargs = dict(kwargs) if kwargs else {k: list(v) for k, v in HALF_WIDTH.get(name, {}).items()}
    frontend = LogMel(sample_rate, n_mels, window_ms, hop_ms)
    try:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, in_chans=1, **kwargs)
    except TypeError as err:
        raise ValueError(f"audio_backbone_kwargs {kwargs} rejected by timm model {name!r}: {err}") from err
    return AudioEncoder(frontend, backbone, name, kwargs)
