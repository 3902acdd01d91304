"""Pretext-task registry. Adding a task: one new file in this folder and one line in TASKS."""
from __future__ import annotations

import inspect

from pretext.av_contrastive import AVContrastive
from pretext.avc import AVC
from pretext.barlow_twins import BarlowTwins
from pretext.base import PretextTask
from pretext.bigan import BiGAN
from pretext.byol import BYOL
from pretext.colorization import Colorization
from pretext.context_encoder import ContextEncoder
from pretext.context_prediction import ContextPrediction
from pretext.cpc import CPC
from pretext.denoising_autoencoder import DenoisingAutoencoder
from pretext.dino import DINO
from pretext.exemplar import Exemplar
from pretext.gan import GAN
from pretext.jigsaw import Jigsaw
from pretext.mae import MAE
from pretext.multitask import MultiTask
from pretext.odd_one_out import OddOneOut
from pretext.pixelcnn import PixelCNN
from pretext.rotation import Rotation
from pretext.simsiam import SimSiam
from pretext.swav import SwAV
from pretext.temporal_order import TemporalOrder
from pretext.vae import VAE
from pretext.vicreg import VICReg

TASKS: dict[str, type[PretextTask]] = {
    "rotation": Rotation,
    "exemplar": Exemplar,
    "byol": BYOL,
    "simsiam": SimSiam,
    "dino": DINO,
    "swav": SwAV,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "context_prediction": ContextPrediction,
    "jigsaw": Jigsaw,
    "cpc": CPC,
    "colorization": Colorization,
    "denoising_autoencoder": DenoisingAutoencoder,
    "context_encoder": ContextEncoder,
    "mae": MAE,
    "multitask": MultiTask,
    "avc": AVC,
    "av_contrastive": AVContrastive,
    # Temporal tasks: several frames of one clip per sample (their frames_per_sample).
    "temporal_order": TemporalOrder,
    "odd_one_out": OddOneOut,
    # Generative objectives: same registry, same pretrain and eval commands.
    "vae": VAE,
    "gan": GAN,
    "bigan": BiGAN,
    "pixelcnn": PixelCNN,
}

# Keyword arguments the pipeline passes itself; never set them under task.options.
PIPELINE_ARGS = ("encoder", "in_chans", "image_size", "data_mean", "data_std")


def task_class(name: str) -> type[PretextTask]:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def create_task(name: str, **kwargs) -> PretextTask:
    return task_class(name)(**kwargs)


def task_options(name: str) -> dict[str, object]:
    """The options a task accepts (keyword arguments beyond the pipeline's) with their defaults."""
    params = inspect.signature(TASKS[name].__init__).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.name not in ("self", *PIPELINE_ARGS) and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def check_task_options(name: str, options: dict) -> None:
    """Raises ConfigError for options the task does not accept, listing the ones it does."""
    from core.errors import ConfigError

    valid = task_options(name)
    for key in options:
        if key not in valid:
            raise ConfigError(f"task.options.{key}: task {name!r} has no option {key!r}; valid options: {sorted(valid)}")


__all__ = ["TASKS", "PretextTask", "create_task", "task_class", "task_options", "check_task_options"]
