"""Multi-task training on one backbone, and the exemplar task's MoCo queue."""
from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from core.options import OptimConfig
from pipeline.config import Config
from pipeline.train.loop import autocast_factory
from tests.test_tasks import fixed_batch, make_task


def test_multitask_loss_is_the_weighted_sum_of_its_tasks():
    task = make_task("multitask", tasks={"rotation": {"weight": 2.0}, "denoising_autoencoder": {"weight": 0.5, "noise": 0.3}}).eval()
    inputs, target = fixed_batch(task, 8)
    out = task(inputs, target)
    rotation = task.tasks["rotation"](inputs["rotation"], target["rotation"])["loss"]
    denoising = task.tasks["denoising_autoencoder"](inputs["denoising_autoencoder"], target["denoising_autoencoder"])["loss"]
    assert torch.allclose(out["loss"], 2.0 * rotation + 0.5 * denoising)
    assert torch.allclose(out["rotation/loss"], rotation)
    assert task.tasks["denoising_autoencoder"].noise == 0.3


def test_multitask_shares_one_backbone_stored_once():
    task = make_task("multitask", tasks={"rotation": {}, "jigsaw": {"num_permutations": 10}})
    assert task.tasks["rotation"].encoder is task.encoder is task.tasks["jigsaw"].encoder
    keys = task.state_dict().keys()
    assert any(k.startswith("encoder.") for k in keys)
    assert not any(".encoder." in k for k in keys), "the backbone must be saved once, under encoder."
    # One optimizer step moves the shared backbone with gradients from both heads.
    optimizers = task.make_optimizers(OptimConfig(), lr=0.1)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    before = task.encoder.conv1.weight.detach().clone()
    task.train_step(fixed_batch(task, 8), optimizers, scaler, autocast)
    assert not torch.equal(before, task.encoder.conv1.weight)
    assert task.tasks["jigsaw"].head[0].weight.grad is not None and task.tasks["rotation"].head[0].weight.grad is not None


@pytest.mark.parametrize("tasks, message", [
    ({"rotatoin": {}}, "tasks.rotatoin"),
    ({"rotation": {"all_rotation": True}}, r"task.options.tasks.rotation: .*all_rotations"),
    ({"rotation": {"weight": "heavy"}}, "tasks.rotation.weight='heavy'"),
    ({"multitask": {}}, "tasks.multitask"),
])
def test_multitask_bad_options_name_the_problem(tasks, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        make_task("multitask", tasks=tasks)


def test_multitask_config_from_yaml_overrides(tmp_path):
    path = tmp_path / "mt.yaml"
    path.write_text("task:\n  name: multitask\n  options:\n    tasks:\n      rotation: {weight: 1.0}\n      exemplar: {temperature: 0.3}\n")
    cfg = Config.load(path, ["--task.options.tasks.rotation.weight=0.5"])
    assert cfg.task.options["tasks"]["rotation"]["weight"] == 0.5


def test_moco_queue_fills_with_keys_and_key_encoder_trails_the_online_one():
    task = make_task("exemplar", queue_size=20, key_momentum=0.9)
    assert all(not p.requires_grad for p in task.key_encoder.parameters())
    optimizers = task.make_optimizers(OptimConfig(), lr=0.1)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    key_before = task.key_encoder.conv1.weight.detach().clone()
    online_before = task.encoder.conv1.weight.detach().clone()
    batch = fixed_batch(task, 8)
    task.train_step(batch, optimizers, scaler, autocast)
    online_after = task.encoder.conv1.weight.detach()
    # key <- 0.9 key + 0.1 online (after the online step)
    assert torch.allclose(task.key_encoder.conv1.weight, 0.9 * key_before + 0.1 * online_after, atol=1e-6)
    assert not torch.equal(online_before, online_after)
    assert int(task.queue_next) == 8
    queue_before = task.queue.clone()
    task.train_step(batch, optimizers, scaler, autocast)
    assert torch.equal(task.queue[16:], queue_before[16:]) and not torch.equal(task.queue[8:16], queue_before[8:16])
    task.train_step(batch, optimizers, scaler, autocast)  # 24 keys into 20 slots: the pointer wraps
    assert int(task.queue_next) == 24 % 20
    assert torch.allclose(task.queue.norm(dim=1), torch.ones(20), atol=1e-5)


def explicit_moco_loss(q, k, queue, temperature):
    """Cross-entropy over [q.k_i for the batch's keys] + [q.n for the queue], positive on the diagonal."""
    q, k, queue = (torch.nn.functional.normalize(t, dim=1) for t in (q, k, queue))
    logits = torch.cat([q @ k.T, q @ queue.T], 1) / temperature
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(q)))


def test_moco_loss_scores_against_the_queue_before_this_batch_is_enqueued():
    task = make_task("exemplar", queue_size=16)
    task.eval()  # fixed batch-norm statistics, so the explicit computation below sees the same features
    inputs, target = fixed_batch(task, 8)
    task.training = True  # but the task itself in training mode: it enqueues this batch's keys
    queue_before = task.queue.clone()
    with torch.no_grad():
        z = task.head(task.encoder(inputs.flatten(0, 1))).view(8, 2, -1)
        keys = task.key_head(task.key_encoder(inputs.flatten(0, 1))).view(8, 2, -1)
        loss = task(inputs, target)["loss"]
    expected = (explicit_moco_loss(z[:, 0], keys[:, 1], queue_before, task.temperature)
                + explicit_moco_loss(z[:, 1], keys[:, 0], queue_before, task.temperature)) / 2
    assert torch.allclose(loss, expected, atol=1e-5)
    assert not torch.equal(task.queue, queue_before), "training forward must enqueue the keys"
    assert torch.allclose(task.queue[:8], torch.nn.functional.normalize(keys[:, 1], dim=1), atol=1e-6)
