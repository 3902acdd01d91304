"""The one base class every pretext task and generative objective derives from."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pipeline.config import OptimConfig


class PretextTask(nn.Module):
    """A self-supervised objective that owns its encoder, head(s) and loss.

    Subclasses implement `sample_transform` (runs per sample in loader workers) and `forward`
    (returns a dict holding "loss" plus values to log). Tasks with several models, such as GANs,
    also override `make_optimizers`, `train_step` and `prepare_distributed`.

    Every task keeps its backbone as `self.encoder`: checkpoints store the task's state dict and the
    eval stage reads the `encoder.` entries back into a bare timm model.
    """

    def __init__(self, encoder: nn.Module, in_chans: int = 1, image_size: int = 32,
                 data_mean: list[float] | None = None, data_std: list[float] | None = None):
        super().__init__()
        self.encoder = encoder
        self.in_chans = in_chans  # channels of the decoded data (the encoder may take fewer)
        self.image_size = image_size
        # Per-channel statistics the decoder normalized with; tasks that must see raw pixel values
        # (colorization converts to Lab) undo the normalization with them.
        self.data_mean = list(data_mean) if data_mean is not None else [0.0] * in_chans
        self.data_std = list(data_std) if data_std is not None else [1.0] * in_chans
        # The module whose __call__ drives forward: `self` in one process, a DDP wrapper of `self`
        # under Ray. Set with object.__setattr__ so nn.Module does not register it as a child
        # (a DDP child holding `self` would make .modules() recurse forever).
        object.__setattr__(self, "_forward_module", self)

    @property
    def embed_dim(self) -> int:
        return self.encoder.num_features

    @classmethod
    def encoder_in_chans(cls, data_channels: int) -> int:
        """Input channels of the backbone for data with `data_channels` (colorization feeds L only)."""
        return data_channels

    def encoder_input(self, decoded: dict) -> dict:
        """How the eval stage must decode images for this task's backbone: `decoded` holds the
        training decoder's mode, channels, image_size, mean and std; tasks feeding the backbone
        something else (colorization: grayscale) return that instead."""
        return decoded

    def sample_transform(self) -> Callable[[dict], tuple[Any, Any]]:
        """A picklable callable mapping a decoded sample dict to `(inputs, target)`."""
        raise NotImplementedError

    def forward(self, inputs, target) -> dict[str, Tensor]:
        raise NotImplementedError

    def prepare_distributed(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Wraps the trainable parts for data-parallel training (`wrap` is Ray's prepare_model)."""
        object.__setattr__(self, "_forward_module", wrap(self))

    def make_optimizers(self, cfg: OptimConfig, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"main": build_optimizer(self.parameters(), cfg, lr)}

    def train_step(self, batch, optimizers: dict, scaler: torch.amp.GradScaler, autocast) -> dict[str, Tensor]:
        """One forward, backward and optimizer step; `autocast` is a context manager factory."""
        inputs, target = batch
        opt = optimizers["main"]
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = self._forward_module(inputs, target)
        scaler.scale(out["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        self.after_step()
        return out

    def after_step(self) -> None:
        """Runs after every optimizer step (momentum encoders update here)."""

    def write_figures(self, directory: Path, step: int, inputs) -> list[Path]:
        """Rank 0 calls this every `train.figures_every` steps with the step's inputs; generative
        tasks write sample grids (PNG) into `directory` and return their paths."""
        return []

    def feature_extractor(self) -> nn.Module:
        """The network whose outputs the eval stage scores: the backbone's pooled features, unless a
        task offers others (the VAE's posterior mean)."""
        return self.encoder

    # Generative objectives that define a likelihood of the data also implement
    #   log_likelihood(images) -> (B,) log p(x) in nats of the 8-bit images (or a lower bound:
    #   likelihood_kind = "elbo"), and sample(n) -> n images in the decoder's normalized space.
    likelihood_kind: str | None = None

    def pixel_stats(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """The data's per-channel mean and std as (C, 1, 1) tensors, to map normalized images back to pixels."""
        mean = torch.tensor(self.data_mean, device=device).view(-1, 1, 1)
        std = torch.tensor(self.data_std, device=device).view(-1, 1, 1)
        return mean, std

    def to_unit_range(self, images: Tensor) -> Tensor:
        """Normalized images back to pixel values in [0, 1], for pictures."""
        mean, std = self.pixel_stats(images.device)
        return (images.float() * std + mean).clamp(0, 1)


class ImageOnly:
    """Per-sample transform of the generative objectives: the decoded image itself, no target."""

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        return sample["image"], torch.zeros((), dtype=torch.long)


def build_optimizer(params, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-D tensors), as in timm and DINO.
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
