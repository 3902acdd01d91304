"""Multi-task self-supervision (Doersch & Zisserman, "Multi-task Self-Supervised Visual Learning",
ICCV 2017): several pretext tasks train one shared backbone at once, their losses summed with weights.

    task:
      name: multitask
      options:
        tasks:
          rotation: {weight: 1.0}
          exemplar: {weight: 1.0, temperature: 0.2}
"""
from __future__ import annotations

from torch import Tensor, nn

from core.grids import Panel
from pretext.base import PretextTask


class MultiTransform:
    """Runs every sub-task's transform on the same decoded sample: ({task: inputs}, {task: target})."""

    def __init__(self, transforms: dict):
        self.transforms = transforms

    def __call__(self, sample: dict) -> tuple[dict, dict]:
        pairs = {name: transform(sample) for name, transform in self.transforms.items()}
        return {name: p[0] for name, p in pairs.items()}, {name: p[1] for name, p in pairs.items()}


class MultiTask(PretextTask):
    """The weighted sum of sub-task losses on one backbone; each sub-task keeps its own head.

    Args:
        tasks: {task name: {"weight": float, **that task's options}}; every registered single task
            whose backbone takes the data's channels can take part.
    """

    def __init__(self, encoder: nn.Module, tasks: dict = None, **kwargs):
        from pretext import TASKS, check_task_options, task_class

        super().__init__(encoder, **kwargs)
        tasks = {"rotation": {}, "exemplar": {}} if tasks is None else tasks
        if not isinstance(tasks, dict) or not tasks:
            raise ValueError(f"tasks={tasks!r}: give a mapping of task names to options, e.g. {{rotation: {{weight: 1.0}}}}")
        self.weights: dict[str, float] = {}
        subtasks = {}
        for name, options in tasks.items():
            options = dict(options or {})
            if name == "multitask" or name not in TASKS:
                raise ValueError(f"tasks.{name}: not a single registered task; choose from {sorted(set(TASKS) - {'multitask'})}")
            if task_class(name).encoder_in_chans(self.in_chans) != self.in_chans:
                raise ValueError(f"tasks.{name}: feeds the backbone other channels than the data's, so it cannot share it")
            weight = options.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"tasks.{name}.weight={weight!r}: must be a number >= 0")
            self.weights[name] = float(weight)
            try:
                check_task_options(name, options)
            except ValueError as err:  # ConfigError names task.options.<key>: say which sub-task's
                raise ValueError(f"task.options.tasks.{name}: {err}") from None
            sub = task_class(name)(encoder=encoder, **kwargs, **options)
            # Keep the shared backbone out of the sub-task's modules: it is registered once, here, so
            # checkpoints hold it once (as `encoder.*`, where the eval stage looks).
            del sub._modules["encoder"]
            object.__setattr__(sub, "encoder", encoder)
            subtasks[name] = sub
        self.tasks = nn.ModuleDict(subtasks)

    def sample_transform(self) -> MultiTransform:
        return MultiTransform({name: task.sample_transform() for name, task in self.tasks.items()})

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """Every sub-task's examples of the same samples, captions prefixed with the sub-task's name."""
        return [[Panel(p.image, f"{name}: {p.caption}") for p in example]
                for name, task in self.tasks.items() for example in task.example_panels(samples)]

    def forward(self, inputs: dict, target: dict) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total = 0.0
        for name, task in self.tasks.items():
            sub = task(inputs[name], target[name])
            total = total + self.weights[name] * sub["loss"]
            out.update({f"{name}/{key}": value.detach() for key, value in sub.items()})
        out["loss"] = total
        return out

    def set_progress(self, step: int, total_steps: int) -> None:
        super().set_progress(step, total_steps)
        for task in self.tasks.values():
            task.set_progress(step, total_steps)

    def after_step(self) -> None:
        for task in self.tasks.values():
            task.after_step()
