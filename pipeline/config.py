"""Typed run configuration: one dataclass tree, loaded from YAML, then command-line overrides.

Every value a run uses is declared here with its default; unknown keys and values of the wrong type
or outside their choices raise `ConfigError` naming the key, before any Ray worker starts.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.errors import ConfigError
from core.options import (  # sections `model` and `optim`, shared with pretext and models
    ModelConfig,
    OptimConfig,
)


@dataclass
class DataConfig:
    root: str = "data/fashion-mnist"  # folder written by `sslpipe data ...` (holds manifest.json)
    train_split: str = "train"
    test_split: str = "test"
    image_size: int = 0  # 0: the images' own size from the manifest; else resize to this square size
    loader_workers: int = 1  # DataLoader processes per Ray worker; per-sample transforms run there
    # Where the joint-embedding tasks' view augmentation runs: "loader" (per sample, in the loader
    # workers), "device" (per batch, in the training process on its device; pretext/augment.py) or
    # "auto": device for tasks whose views have a batched form, loader for the others. Measured
    # 1.71x the training throughput of "loader" on 2 cores (bench/augment_speed.py).
    augment_on: Literal["auto", "loader", "device"] = "auto"
    shuffle_buffer: int = 2000
    allow_shell_urls: bool = False  # `pipe:` shard URLs run a shell command: opt in explicitly
    strict: bool = False  # raise on the first bad sample or shard instead of skipping and counting it
    max_bad_fraction: float = 0.01  # abort when more than this fraction of the samples read were bad


@dataclass
class TaskConfig:
    name: str = "rotation"  # a key of pretext.TASKS
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the task's class


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in total (all workers step together)
    global_batch_size: int = 256  # split evenly over workers
    log_every: int = 20
    checkpoint_every: int = 250  # also at the last step
    keep_checkpoints: int = 2
    figures_every: int = 0  # sample grids of generative tasks (PNG in <run_dir>/samples); 0: at every checkpoint
    amp: bool = True  # autocast + GradScaler, on CUDA only
    # NHWC weights and batches: tensor cores want it on CUDA, and oneDNN's CPU convolutions skip their
    # layout reorders (bench/cpu_kernels.py: 1.19x the demo's training step, 1.42x rotation's on 2 cores).
    channels_last: bool = True
    compile: bool = False  # torch.compile the backbone (in place: checkpoint keys stay the same)
    sync_batchnorm: bool = False  # batch-norm statistics over the global batch with >1 worker (pipeline/train/sync_batchnorm.py)
    seed: int = 0
    resume_from: str = ""  # checkpoint (file or directory) to start from; set by `sslpipe pretrain --resume`
    # On resume with more train.steps than the run had (extending it): "continue" keeps the run's
    # learning-rate curve (past its end the last value holds), "restart" runs a new warm-up and
    # cosine over the added steps from optim.lr (a new --optim.lr applies only with "restart").
    resume_schedule: Literal["continue", "restart"] = "continue"
    # Steps between asks whether Ray is draining one of the run's nodes (a preemption notice with a
    # deadline: one checkpoint then); 0: never. SIGTERM is seen at every step (pipeline/train/preemption.py).
    preemption_poll_every: int = 10


@dataclass
class ScalingConfig:
    # An int, or [min, max] for elastic training: Ray Train starts with as many workers as the
    # cluster holds (at least min), restarts smaller when a node is lost and grows when one joins,
    # every time from the newest checkpoint, with the same global batch and schedule.
    num_workers: int | list[int] = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    address: str = ""  # "" : embedded local Ray (or $RAY_ADDRESS); "auto" or host:port joins a cluster
    max_failures: int = 0  # worker-group restarts after errors (a lost node is one); -1: no limit
    resize_interval_s: float = 60.0  # elastic runs: how often Ray Train looks for room to grow

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if self.elastic else self.num_workers

    def describe(self) -> str:
        """"2 Ray workers" or "2-8 Ray workers (elastic)"."""
        if self.elastic:
            return f"{self.min_workers}-{self.max_workers} Ray workers (elastic)"
        return f"{self.num_workers} Ray worker{'s' if self.num_workers != 1 else ''}"


EVAL_PROTOCOLS = ("low_shot", "clustering", "per_layer")


@dataclass
class EvalConfig:
    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    linear_C: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # inverse L2 strengths tried
    linear_val_fraction: float = 0.1  # held out of train to choose C; test is never used for choosing
    batch_size: int = 512
    loader_workers: int = 1
    baselines: list[str] = field(default_factory=lambda: ["raw_pixels", "random_init"])
    # Protocols beyond kNN and the linear probe (which always run), on every row (eval/low_shot.py,
    # eval/clustering.py): "low_shot" (probe on low_shot_fractions of the train labels, linear SVM on
    # low_shot_shots labels per class, low_shot_seeds subsets each), "clustering" (k-means on test),
    # "per_layer" (every backbone stage pooled, kNN and probe each: eval/per_layer.py; a second
    # pass over the data per backbone, so not on by default).
    protocols: list[str] = field(default_factory=lambda: ["low_shot", "clustering"])
    low_shot_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    low_shot_shots: list[int] = field(default_factory=lambda: [1, 5, 10, 50])
    low_shot_seeds: int = 3
    image_size: int = 0  # 0: the size pretraining fed the backbone; else evaluate whole images at this size
    # Reuse the baselines' scores from an earlier eval on the same shards, backbone, seed and eval
    # settings (eval/baseline_cache.py; $SSLPIPE_CACHE/baselines, default ~/.cache/sslpipe/baselines).
    cache_baselines: bool = True
    # > 0: before extracting features, every backbone's batch-norm statistics are recomputed on this
    # many unaugmented train images (precise BN, eval/precise_bn.py): the running averages of
    # pretraining describe augmented views, not the whole images eval scores. 0: as trained.
    precise_bn: int = 0
    # Online kNN during pretraining (rank 0, pipeline/train/online_eval.py): every online_every steps
    # (0: off), kNN k=knn_k[0] with the first online_bank train samples as the bank and the first
    # online_queries test samples as queries; logged as online_knn in every metrics sink.
    online_every: int = 0
    online_bank: int = 10000
    online_queries: int = 2000


@dataclass
class TrackingConfig:
    tensorboard: bool = True  # rank 0 writes every metrics row as scalars to <run_dir>/tensorboard/
    mlflow_uri: str = ""  # "": no MLflow; else a tracking URI or local folder (file:./mlruns); needs the [mlflow] extra
    mlflow_experiment: str = "sslpipe"  # where a new MLflow run is created; a resumed run stays in its own

    def __post_init__(self):
        # A relative local store is made absolute here, on the driver: Ray workers and a later
        # `sslpipe eval` run in other working directories and must write to the same store.
        self.mlflow_uri = absolute_store_uri(self.mlflow_uri)


def absolute_store_uri(uri: str) -> str:
    """A local MLflow store with its path made absolute (`file:./mlruns` and `./mlruns` ->
    `file:///abs/mlruns`, `sqlite:///x.db` -> `sqlite:////abs/x.db`); servers and absolute URIs unchanged."""
    parts = urllib.parse.urlparse(uri)
    if parts.scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    is_path = parts.scheme == "" and not uri.startswith("databricks")  # MLflow's "databricks" has no scheme
    if uri and (is_path or (parts.scheme == "file" and not parts.netloc)):
        return Path(urllib.parse.unquote(parts.path) if parts.scheme else uri).expanduser().resolve().as_uri()
    return uri


@dataclass
class Config:
    run_dir: str = ""  # "" : runs/<task>-<timestamp>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @classmethod
    def from_dict(cls, values: dict, check_task: bool = True) -> "Config":
        """Builds and validates; check_task=False skips the registry check (eval of old checkpoints)."""
        cfg = _build(cls, values, prefix="")
        validate(cfg, check_task)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "Config":
        """Reads a YAML file (or starts from defaults), applies `key.sub=value` overrides, validates."""
        values = read_yaml(Path(path)) if path is not None else {}
        for item in overrides:
            apply_override(values, item)
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping; `extends: other.yaml` (relative to the file) is read first and this
    file's keys are merged over it, section by section."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    base = values.pop("extends", None)
    if base is None:
        return values
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"config file {str(path)!r}: `extends` loops back to {str(base_path)!r}")
    base_values = read_yaml(base_path, (*seen, path.resolve()))
    base_task, task = base_values.get("task") or {}, values.get("task") or {}
    if "name" in task and task["name"] != base_task.get("name"):
        base_task.pop("options", None)  # another task's options mean nothing to this one
    base_model, model = base_values.get("model") or {}, values.get("model") or {}
    if "backbone" in model and model["backbone"] != base_model.get("backbone"):
        base_model.pop("backbone_kwargs", None)  # keyword arguments of another architecture
    return deep_merge(base_values, values)


def deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        # Task options and backbone kwargs replace rather than merge: one task's options (one
        # architecture's kwargs) mean nothing to another.
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("options", "backbone_kwargs"):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(values: dict, item: str) -> None:
    """Applies one `--a.b=value` override in place; the value is parsed as YAML (`3e-4`, `[1,2]`, `true`)."""
    item = item[2:] if item.startswith("--") else item
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def _build(cls, values: Any, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {names}"
        )
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _coerce(hints[name], values[name], prefix + name)
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not a valid choice; choose from {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}={value!r} has the wrong type: {'; '.join(errors)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key} must be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads `3e-4` (no dot) as a string, a YAML 1.1 quirk; accept it as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def require_mlflow() -> None:
    """MLflow is an extra: a run that logs to it must find it installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("tracking.mlflow_uri is set but MLflow is not installed; "
                          "pip install 'sslpipe[mlflow]' (or pip install mlflow-skinny), or set tracking.mlflow_uri=''")


def validate(cfg: Config, check_task: bool = True) -> None:
    """Checks values that types alone cannot, so bad runs fail before Ray starts."""
    positive = {
        "train.steps": cfg.train.steps,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.log_every": cfg.train.log_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "scaling.cpus_per_worker": cfg.scaling.cpus_per_worker,
        "eval.batch_size": cfg.eval.batch_size,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {
        "data.image_size": cfg.data.image_size,
        "data.loader_workers": cfg.data.loader_workers,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "scaling.resize_interval_s": cfg.scaling.resize_interval_s,
        "eval.loader_workers": cfg.eval.loader_workers,
        "eval.precise_bn": cfg.eval.precise_bn,
        "eval.image_size": cfg.eval.image_size,
        "train.figures_every": cfg.train.figures_every,
        "eval.online_every": cfg.eval.online_every,
        "train.preemption_poll_every": cfg.train.preemption_poll_every,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.scaling.max_failures < -1:
        raise ConfigError(f"scaling.max_failures must be >= 0, or -1 for no limit, got {cfg.scaling.max_failures}")
    check_worker_range(cfg)
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    if not 0 < cfg.eval.linear_val_fraction < 1:
        raise ConfigError(f"eval.linear_val_fraction must be in (0, 1), got {cfg.eval.linear_val_fraction}")
    if cfg.eval.online_every and min(cfg.eval.online_bank, cfg.eval.online_queries) <= 0:
        raise ConfigError(f"eval.online_bank and eval.online_queries must be positive with eval.online_every set, "
                          f"got {cfg.eval.online_bank} and {cfg.eval.online_queries}")
    unknown = sorted(set(cfg.eval.protocols) - set(EVAL_PROTOCOLS))
    if unknown:
        raise ConfigError(f"eval.protocols: unknown {unknown}; choose from {list(EVAL_PROTOCOLS)}")
    if cfg.eval.low_shot_seeds < 1 or not all(0 < f <= 1 for f in cfg.eval.low_shot_fractions) or min(cfg.eval.low_shot_shots, default=1) < 1:
        raise ConfigError(f"eval.low_shot_*: fractions in (0, 1], shots >= 1 and seeds >= 1, got {cfg.eval.low_shot_fractions}, "
                          f"{cfg.eval.low_shot_shots}, {cfg.eval.low_shot_seeds}")
    if not cfg.eval.knn_k or min(cfg.eval.knn_k) <= 0:
        raise ConfigError(f"eval.knn_k must list positive integers, got {cfg.eval.knn_k}")
    if not cfg.eval.linear_C or min(cfg.eval.linear_C) <= 0:
        raise ConfigError(f"eval.linear_C must list positive numbers, got {cfg.eval.linear_C}")
    allowed = ["raw_pixels", "random_init"]
    for name in cfg.eval.baselines:
        if name not in allowed:
            raise ConfigError(f"eval.baselines: unknown baseline {name!r}; choose from {allowed}")
    if cfg.eval.knn_temperature <= 0:
        raise ConfigError(f"eval.knn_temperature must be positive, got {cfg.eval.knn_temperature}")
    if cfg.data.train_split == cfg.data.test_split:
        raise ConfigError(f"data.train_split and data.test_split are both {cfg.data.train_split!r}; evaluation needs two different splits")
    if cfg.tracking.mlflow_uri:
        if not cfg.tracking.mlflow_experiment:
            raise ConfigError("tracking.mlflow_experiment must name an experiment when tracking.mlflow_uri is set")
        require_mlflow()  # on the driver, before Ray starts, not in the rank-0 worker after minutes
    if not check_task:
        return

    # Imported here: the registry imports torch and timm, which config parsing alone does not need.
    from pretext import TASKS, check_task_options

    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name: unknown task {cfg.task.name!r}; choose from {sorted(TASKS)}")
    check_task_options(cfg.task.name, cfg.task.options)


def check_worker_range(cfg: Config) -> None:
    """scaling.num_workers is a positive int or [min, max] with 1 <= min <= max, and the global
    batch splits evenly into at least 2 samples per worker at every size the run may take.

    No gradient accumulation for sizes that do not divide: with micro-batches a contrastive loss
    would see fewer negatives and batch norm smaller batches after a resize, so the objective
    itself would change with the cluster. An even split keeps the loss, the learning rate and
    the schedule the same at every size."""
    s, batch = cfg.scaling, cfg.train.global_batch_size
    if s.elastic:
        if len(s.num_workers) != 2:
            raise ConfigError(f"scaling.num_workers={s.num_workers}: give one number, or [min, max] for elastic training")
        if not 1 <= s.min_workers <= s.max_workers:
            raise ConfigError(f"scaling.num_workers={s.num_workers}: elastic training needs 1 <= min <= max")
    elif s.num_workers <= 0:
        raise ConfigError(f"scaling.num_workers must be positive, got {s.num_workers}")
    sizes = range(s.min_workers, s.max_workers + 1)
    uneven = [n for n in sizes if batch % n]
    if uneven:
        fits = functools.reduce(math.lcm, sizes)
        nearest = sorted({max(fits, batch // fits * fits), (batch // fits + 1) * fits})
        raise ConfigError(
            f"train.global_batch_size={batch} does not split evenly over {', '.join(map(str, uneven))} worker(s), "
            f"sizes scaling.num_workers={s.num_workers} allows; the global batch (and so the loss and the schedule) "
            f"stays the same at every size, so choose a multiple of {fits}, e.g. {' or '.join(map(str, nearest))}"
            + (", or narrow the range" if s.elastic else ""))
    if batch // s.max_workers < 2:
        raise ConfigError(
            f"train.global_batch_size={batch} gives {batch // s.max_workers} sample(s) per worker with "
            f"{s.max_workers} workers (scaling.num_workers={s.num_workers}); batch norm needs at least 2")


# Switches that let a dataset run code on this machine. They come only from the command line or the
# user's own --config, never from a checkpoint or a run directory (those may be someone else's).
SECURITY_SWITCHES = {"data.allow_shell_urls": False}


def untrusted_overrides() -> list[str]:
    """Overrides that put the security switches back to their safe values; apply them right after
    loading a config from a checkpoint or run directory, before the user's own overrides."""
    return [f"{key}={str(value).lower()}" for key, value in SECURITY_SWITCHES.items()]


def reset_security_switches(cfg: "Config") -> "Config":
    """`cfg` (read from a checkpoint) with every security switch at its safe value."""
    for key, value in SECURITY_SWITCHES.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg

