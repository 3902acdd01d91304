"""Configuration: YAML + overrides, typed values, errors that name the key and the choices."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from pipeline.config import Config


def test_yaml_then_overrides_then_saved(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.2\ntrain:\n  steps: 10\n")
    cfg = Config.load(path, ["--optim.lr=3e-4", "train.global_batch_size=64", "model.backbone_kwargs={channels: [8, 16, 32, 64]}"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 10 and cfg.train.global_batch_size == 64
    assert cfg.model.backbone_kwargs == {"channels": [8, 16, 32, 64]}
    cfg.save(tmp_path / "resolved.yaml")
    assert Config.from_dict(yaml.safe_load((tmp_path / "resolved.yaml").read_text())) == cfg


def test_demo_config_is_valid():
    cfg = Config.load(Path(__file__).resolve().parents[1] / "configs" / "rotation_fmnist.yaml")
    assert cfg.task.name == "rotation" and cfg.scaling.num_workers == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", r"unknown config key 'optim.lrr'.*'lr'"),
        ("trian.steps=3", r"unknown config key 'trian'.*'train'"),
        ("optim.name=adam", r"optim.name='adam'.*\['sgd', 'adamw'\]"),
        ("train.steps=many", r"train.steps must be an integer"),
        ("train.steps=0", r"train.steps must be positive"),
        ("train.amp=1", r"train.amp must be true or false"),
        ("task.name=rotatoin", r"unknown task 'rotatoin'; choose from \[.*'rotation'.*\]"),
        ("task.options={all_rotation: true}", r"task.options.all_rotation.*\['all_rotations', 'head_hidden'\]"),
        ("train.global_batch_size=255", r"255 does not split evenly over 2 worker\(s\).*multiple of 2, e.g. 254 or 256"),
        ("eval.baselines=[pixels]", r"unknown baseline 'pixels'.*raw_pixels"),
        ("eval.linear_val_fraction=1.5", r"linear_val_fraction"),
        ("data.test_split=train", r"data.train_split and data.test_split are both 'train'"),
        ("train.global_batch_size=2", r"1 sample\(s\) per worker"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(None, [override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        Config.load(tmp_path / "nope.yaml")


def test_unknown_backbone_suggests_names():
    from core.options import ModelConfig
    from models.backbone import check_backbone

    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet181'.*resnet18"):
        check_backbone(ModelConfig(backbone="resnet181"))


def test_more_workers_than_cpus_fails_before_ray_starts(monkeypatch):
    import os

    import ray

    from pipeline.train.launch import check_local_resources

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `sslpipe pretrain` (the suite's Ray may run)

    cfg = Config.load(None, [f"scaling.num_workers={os.cpu_count() + 1}", f"train.global_batch_size={(os.cpu_count() + 1) * 8}"])
    with pytest.raises(ConfigError, match="scaling.num_workers"):
        check_local_resources(cfg)


def test_extends_merges_sections_and_replaces_task_options(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "train:\n  steps: 10\n  seed: 3\ntask:\n  name: rotation\n  options: {all_rotations: true}\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\ntrain:\n  steps: 20\ntask:\n  name: exemplar\n  options: {temperature: 0.5}\n")
    cfg = Config.load(tmp_path / "child.yaml")
    assert (cfg.train.steps, cfg.train.seed) == (20, 3)
    assert cfg.task.name == "exemplar" and cfg.task.options == {"temperature": 0.5}
    # A child naming another task without options does not inherit the base task's options.
    (tmp_path / "other.yaml").write_text("extends: base.yaml\ntask:\n  name: jigsaw\n")
    assert Config.load(tmp_path / "other.yaml").task.options == {}


def test_extends_loop_and_missing_base_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        Config.load(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        Config.load(tmp_path / "c.yaml")


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_keep_the_demo_backbone(path):
    cfg = Config.load(path)
    demo = Config.load(Path(path).parent / "rotation_fmnist.yaml")
    if Path(path).name == "demo_fmnist.yaml" or Path(path).name.endswith("_s2_fmnist.yaml"):
        # `make demo` runs the recipe that won on a small-image ResNet (bench/recipes.py), with the
        # random-init baseline's residual branches not zeroed, as in every task config; the
        # long-budget configs (*_s2_fmnist.yaml) put other methods on that backbone.
        assert cfg.model.backbone.startswith("resnet") and "_s2_" in cfg.model.backbone
        assert cfg.model.backbone_kwargs.get("zero_init_last") is False
        return
    if cfg.model.backbone != demo.model.backbone:
        # Objectives with their own network (DCGAN discriminator, PixelCNN, a ViT) get none of the
        # demo's ResNet kwargs: `extends` drops them when the backbone changes.
        # MAE and the ViT variant of DINO run on a ViT.
        assert cfg.task.name in ("gan", "pixelcnn", "mae", "dino") and "zero_init_last" not in cfg.model.backbone_kwargs
        return
    # Every other task config shares the demo's backbone, so the quality benchmark compares like with like.
    assert cfg.model.backbone_kwargs == demo.model.backbone_kwargs
