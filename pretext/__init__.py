"""Pretext-task registry. Adding a task: one new file in its family's folder (joint_embedding/,
spatial/, reconstruction/, generative/, audio_video/) and one line in TASKS; shared parts (the
task base, heads, losses, likelihoods, view augmentation, momentum encoders) sit in this folder."""
from __future__ import annotations

import inspect

from pretext.audio_video.av_contrastive import AVContrastive
from pretext.audio_video.avc import AVC
from pretext.audio_video.odd_one_out import OddOneOut
from pretext.audio_video.temporal_order import TemporalOrder
from pretext.base import PretextTask
from pretext.generative.bigan import BiGAN
from pretext.generative.gan import GAN
from pretext.generative.pixelcnn import PixelCNN
from pretext.generative.vae import VAE
from pretext.joint_embedding.barlow_twins import BarlowTwins
from pretext.joint_embedding.byol import BYOL
from pretext.joint_embedding.dino import DINO
from pretext.joint_embedding.exemplar import Exemplar
from pretext.joint_embedding.simsiam import SimSiam
from pretext.joint_embedding.swav import SwAV
from pretext.joint_embedding.vicreg import VICReg
from pretext.multitask import MultiTask
from pretext.reconstruction.colorization import Colorization
from pretext.reconstruction.context_encoder import ContextEncoder
from pretext.reconstruction.denoising_autoencoder import DenoisingAutoencoder
from pretext.reconstruction.mae import MAE
from pretext.spatial.context_prediction import ContextPrediction
from pretext.spatial.cpc import CPC
from pretext.spatial.jigsaw import Jigsaw
from pretext.spatial.rotation import Rotation

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
