"""Building the configured pretext task, and rebuilding a trained one for the eval stage.

The eval stage never imports `pretext`: what it needs of a task (its features, likelihood,
samples, audio encoder) it gets from `rebuild_task`, which only this runner module can answer,
since only it knows the registry."""
from __future__ import annotations

from core.errors import ConfigError
from models.backbone import create_backbone
from pipeline.config import Config
from pipeline.data.decode import ImageDecoder
from pipeline.train.checkpoint import CheckpointError
from pretext import TASKS, PretextTask, create_task, task_class


def build_task(cfg: Config, manifest: dict, decoder):
    """The configured task on a fresh backbone; option errors raise ConfigError naming task.options."""
    channels = manifest["channels"]
    try:
        encoder = create_backbone(cfg.model, task_class(cfg.task.name).encoder_in_chans(channels))
        return create_task(cfg.task.name, encoder=encoder, in_chans=channels, image_size=decoder.image_size,
                           data_mean=decoder.mean.flatten().tolist(), data_std=decoder.std.flatten().tolist(), **cfg.task.options)
    except ConfigError:
        raise  # already names the option
    except (ValueError, TypeError) as err:
        raise ConfigError(f"task {cfg.task.name!r} with options {cfg.task.options} on {channels}-channel "
                          f"{decoder.image_size}px data: {err}") from err


def needs_task(task_name: str) -> bool:
    """Whether eval must rebuild the task (not just its backbone): it scores other features than
    the pooled backbone's, defines a likelihood or samples, or has an audio side (AV tasks)."""
    cls = TASKS.get(task_name)
    return cls is not None and (cls.feature_extractor is not PretextTask.feature_extractor or cls.likelihood_kind is not None
                                or hasattr(cls, "sample") or "audio" in getattr(cls, "modalities", ()))


def load_task(state: dict, cfg: Config) -> PretextTask:
    """The checkpoint's whole task (backbone, heads, decoder or generator) with its weights."""
    info = state["manifest"]
    decoder = ImageDecoder(info["mode"], info["image_size"], info["mean"], info["std"])
    task = build_task(cfg, {"channels": info["channels"]}, decoder)
    try:
        task.load_state_dict(state["task"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint at step {state['step']} does not fit task {cfg.task.name!r}: {err}") from err
    return task.eval()


def rebuild_task(state: dict, cfg: Config) -> PretextTask | None:
    """The checkpoint's whole task with its weights when eval must score more than the pooled
    backbone (`needs_task`), else None."""
    return load_task(state, cfg) if needs_task(cfg.task.name) else None
