"""The one base class every pretext task and generative objective derives from."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from core.grids import Panel, read_png, save_panels
from core.options import OptimConfig


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
        # Where training stands (set by the loop before every step): the schedules of momentum
        # encoders, temperatures and frozen prototypes read it.
        self.current_step, self.total_steps = 0, 1

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

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the training loop before step `step` (1-based) of `total_steps`."""
        self.current_step, self.total_steps = step, total_steps

    @property
    def progress(self) -> float:
        """The fraction of training done before this step, 0 at the first step."""
        return (self.current_step - 1) / max(self.total_steps, 1) if self.current_step else 0.0

    def after_step(self) -> None:
        """Runs after every optimizer step (momentum encoders update here)."""

    def write_figures(self, directory: Path, step: int, inputs) -> list[Path]:
        """Rank 0 calls this every `train.figures_every` steps with the step's inputs; generative
        tasks write sample grids (PNG) into `directory` and return their paths."""
        return []

    def write_examples(self, samples: list[dict], path: Path) -> Path | None:
        """Draws, for each of `samples` (decoded sample dicts, as the loader's decoder yields them),
        what the task feeds the network and what it must predict, as one captioned PNG at `path`;
        None when there is nothing to draw. Tasks change what is drawn through `example_panels`."""
        examples = self.example_panels(samples) if samples else []
        return save_panels(examples, path) if examples else None

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """One list of captioned panels per example. The default: the grids of `write_figures` when
        the task writes any (generative objectives), else, per sample, every image the sample
        transform emits, captioned with the target where it is a class index, then the target where
        it is an image. Override where a task's labels or layout need more."""
        figures = self.figure_panels(samples)
        if figures:
            return figures
        transform = self.sample_transform()
        examples = []
        for sample in samples:
            inputs, target = transform(sample)
            images, targets = transform_images(inputs), transform_images(target)
            if isinstance(target, Tensor) and not targets and target.numel() in (1, len(images)):
                captions = [f"target {int(t)}" for t in target.flatten().expand(len(images))]
            else:
                captions = ["input"] * len(images)
            examples.append([Panel(self.display(im), c) for im, c in zip(images, captions)]
                            + [Panel(self.display(im), "target") for im in targets])
        return examples

    def view_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """Per sample, the stacked augmented views its transform emits, captioned "view 1", "view 2"
        (the joint-embedding tasks' examples: the views must agree or find each other)."""
        transform = self.sample_transform()
        return [[Panel(self.to_unit_range(view), f"view {i + 1}") for i, view in enumerate(transform(s)[0])] for s in samples]

    def figure_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The PNG grids `write_figures` draws from `samples` (step 0), one panel each, captioned
        with their names ("reconstructions"); none for tasks that draw no figures."""
        device = next(self.parameters(), torch.empty(0)).device
        images = torch.stack([s["image"] for s in samples]).to(device)
        with tempfile.TemporaryDirectory() as tmp:
            files = self.write_figures(Path(tmp), 0, images)
            # "step_00000000_fixed_noise_samples.png" -> "fixed noise samples"
            return [[Panel(read_png(f), f.stem.split("_", 2)[-1].replace("_", " "))] for f in files]

    def display(self, images: Tensor) -> Tensor:
        """Normalized images with the data's channels to [0, 1] (`to_unit_range`); others (a
        different channel count) stretched from their own minimum to maximum."""
        if images.shape[-3] == len(self.data_mean):
            return self.to_unit_range(images)
        low, high = images.min(), images.max()
        return (images - low) / (high - low).clamp(min=1e-8)

    # The backbone the eval stage, online kNN and export read: `encoder`, or the name of another
    # copy (DINO scores its EMA teacher, as the paper does). Checkpoints record it as "eval_encoder".
    eval_encoder: str = "encoder"

    def feature_extractor(self) -> nn.Module:
        """The network whose outputs the eval stage scores: the backbone's pooled features (the
        `eval_encoder` copy), unless a task offers others (the VAE's posterior mean)."""
        return getattr(self, self.eval_encoder)

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


def transform_images(value) -> list[Tensor]:
    """The (C, H, W) images in a transform's output: tensors of 3 or more dimensions (leading ones
    flattened: (N, C, H, W) gives N images), also inside dicts, lists and tuples."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [image for item in value for image in transform_images(item)]
    if isinstance(value, Tensor) and value.ndim >= 3:
        return list(value.reshape(-1, *value.shape[-3:]))
    return []


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
