"""BYOL and SimSiam: losses against lightly, the target network's EMA and schedule, gradients,
stop-gradient, resume, and BYOL as a multi-task sub-task."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from core.options import OptimConfig
from pipeline.train.loop import autocast_factory
from pretext.joint_embedding.byol import byol_loss, normalized_mse
from pretext.joint_embedding.simsiam import output_std, simsiam_loss
from tests.test_tasks import fixed_batch, make_task

lightly_loss = pytest.importorskip("lightly.loss")


def random_pairs(n: int = 12, d: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for _ in range(4)]


def step_parts(task, lr: float = 0.05):
    optimizers = task.make_optimizers(OptimConfig(), lr=lr)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    return optimizers, scaler, autocast


def target_params(task) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in task.named_parameters() if n.startswith("target_")}


# --- losses ---------------------------------------------------------------------------------

def test_byol_normalized_mse_is_two_plus_twice_lightly_negative_cosine():
    p, z, _, _ = random_pairs()
    reference = lightly_loss.NegativeCosineSimilarity()(p, z)
    assert torch.allclose(normalized_mse(p, z), 2 + 2 * reference, atol=1e-6)
    # ... and the paper's definition: squared distance of the l2-normalized vectors.
    explicit = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1).mean()
    assert torch.allclose(normalized_mse(p, z), explicit, atol=1e-6)


def test_byol_loss_sums_both_view_orders():
    p1, p2, z1, z2 = random_pairs()
    cos = lightly_loss.NegativeCosineSimilarity()
    expected = (2 + 2 * cos(p1, z2)) + (2 + 2 * cos(p2, z1))
    assert torch.allclose(byol_loss(p1, p2, z1, z2), expected, atol=1e-6)
    assert float(byol_loss(z2, z1, z1, z2)) == pytest.approx(0.0, abs=1e-6)  # perfect predictions
    assert float(byol_loss(-z2, -z1, z1, z2)) == pytest.approx(8.0, abs=1e-5)  # opposite ones


def test_simsiam_loss_matches_lightly_symmetrized():
    p1, p2, z1, z2 = random_pairs()
    cos = lightly_loss.NegativeCosineSimilarity()
    expected = (cos(p1, z2) + cos(p2, z1)) / 2
    assert torch.allclose(simsiam_loss(p1, p2, z1, z2), expected, atol=1e-6)
    assert float(simsiam_loss(z2, z1, z1, z2)) == pytest.approx(-1.0, abs=1e-6)


def test_simsiam_loss_stops_the_gradient_of_the_targets():
    p1, p2, z1, z2 = (t.requires_grad_(True) for t in random_pairs())
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None, "z must be detached inside the loss"
    # d/dp of -cos(p, z)/2 for each row, divided by the batch size.
    n = p1.shape[0]
    p, z = p1.detach(), z2.detach()
    pn, zn = p.norm(dim=1, keepdim=True), F.normalize(z, dim=1)
    cos = (F.normalize(p, dim=1) * zn).sum(1, keepdim=True)
    expected = -(zn - cos * p / pn) / pn / 2 / n
    assert torch.allclose(p1.grad, expected, atol=1e-6)


def test_output_std_is_zero_when_collapsed_and_about_inverse_sqrt_dim_when_spread():
    assert float(output_std(torch.ones(64, 32) + 1e-3 * torch.randn(1, 32))) == pytest.approx(0.0, abs=1e-6)
    assert float(output_std(torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)))) == pytest.approx(1 / math.sqrt(64), rel=0.05)


# --- BYOL's target network -------------------------------------------------------------------

def test_momentum_schedule_starts_at_base_and_reaches_one_at_the_last_step():
    from lightly.utils.scheduler import cosine_schedule as lightly_cosine

    task = make_task("byol", base_momentum=0.9)
    total = 50
    task.set_progress(0, total)
    assert task.target_momentum() == pytest.approx(0.9)
    task.set_progress(total, total)
    assert task.target_momentum() == 1.0
    for k in (1, 13, 25, 49):
        task.set_progress(k, total)
        paper = 1 - (1 - 0.9) * (math.cos(math.pi * k / total) + 1) / 2
        assert task.target_momentum() == pytest.approx(paper)
        # lightly counts steps from 0 and reaches the end at max_steps - 1: one more step for the same curve.
        assert task.target_momentum() == pytest.approx(lightly_cosine(k, total + 1, 0.9, 1.0))
    task.set_progress(total // 2, total)
    assert task.target_momentum() == pytest.approx(0.95)


def test_target_starts_as_a_frozen_copy_of_the_online_network():
    task = make_task("byol")
    for online, target in ((task.encoder, task.target_encoder), (task.projector, task.target_projector)):
        assert target is not online
        for p, q in zip(online.parameters(), target.parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr() and not q.requires_grad


def test_target_gets_no_gradient_and_changes_only_through_after_step():
    task = make_task("byol", base_momentum=0.8)
    optimizers, _, _ = step_parts(task)
    batch = fixed_batch(task, 8)
    before = target_params(task)
    task.set_progress(3, 10)
    out = task(*batch)
    out["loss"].backward()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("target_") for n in trainable)
    assert all(p.grad is None for n, p in task.named_parameters() if n.startswith("target_"))
    assert all(task.get_parameter(n).grad is not None for n in trainable), "every online parameter gets a gradient"
    optimizers["main"].step()
    assert all(torch.equal(task.get_parameter(n), v) for n, v in before.items()), "the optimizer must not move the target"
    online = {n: p.detach().clone() for n, p in task.named_parameters() if not n.startswith("target_")}
    task.after_step()
    m = 1 - (1 - 0.8) * (math.cos(math.pi * 3 / 10) + 1) / 2
    for name, old in before.items():
        online_name = name.replace("target_", "", 1)
        assert torch.allclose(task.get_parameter(name), m * old + (1 - m) * online[online_name], atol=1e-6), name
    assert any(not torch.equal(task.get_parameter(n), v) for n, v in before.items())
    # Buffers (batch-norm running statistics) are copied from the online network.
    for (n, b), (_, tb) in zip(task.projector.named_buffers(), task.target_projector.named_buffers()):
        assert torch.equal(b, tb), n


def test_ema_update_matches_lightly_update_momentum():
    from lightly.models.utils import update_momentum

    task = make_task("byol", base_momentum=0.7)
    with torch.no_grad():  # move the online projector away from its target
        for p in task.projector.parameters():
            p.add_(torch.randn_like(p))
    reference = copy.deepcopy(task.target_projector)
    update_momentum(task.projector, reference, 0.7)
    task.set_progress(0, 1)  # momentum = base_momentum
    before = target_params(task)
    task.after_step()
    for (n, p), (_, q) in zip(task.target_projector.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
        assert not torch.equal(p, before[f"target_projector.{n}"]), n


def test_train_step_on_the_last_step_leaves_the_target_unchanged():
    task = make_task("byol")
    optimizers, scaler, autocast = step_parts(task)
    task.set_progress(5, 5)
    before = target_params(task)
    task.train_step(fixed_batch(task, 8), optimizers, scaler, autocast)
    assert all(torch.equal(task.get_parameter(n), v) for n, v in before.items())


def test_resume_restores_the_target_network_exactly():
    task = make_task("byol", base_momentum=0.5)
    optimizers, scaler, autocast = step_parts(task, lr=0.1)
    batch = fixed_batch(task, 8)
    for step in (1, 2):
        task.set_progress(step, 10)
        task.train_step(batch, optimizers, scaler, autocast)
    restored = make_task("byol", base_momentum=0.5)
    fresh = restored.state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in task.state_dict().items() if k.startswith("target_"))
    restored.load_state_dict(task.state_dict(), strict=True)
    for key, value in task.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert any(k.startswith("target_encoder.") for k in task.state_dict())
    # The resumed task continues the schedule where the first one would.
    for t in (task, restored):
        t.set_progress(3, 10)
        t.after_step()
    for (n, p), (_, q) in zip(task.target_encoder.named_parameters(), restored.target_encoder.named_parameters()):
        assert torch.equal(p, q), n


# --- SimSiam ---------------------------------------------------------------------------------

def test_simsiam_heads_follow_the_paper():
    task = make_task("simsiam", proj_dim=64, proj_hidden=[48, 48], pred_hidden=16)
    linears = [m for m in task.projector if isinstance(m, torch.nn.Linear)]
    norms = [m for m in task.projector if isinstance(m, torch.nn.BatchNorm1d)]
    assert [l.out_features for l in linears] == [48, 48, 64] and len(norms) == 3
    assert isinstance(task.projector[-1], torch.nn.BatchNorm1d) and not task.projector[-1].affine
    assert linears[-1].bias is None  # followed by batch norm
    pred = [m for m in task.predictor if isinstance(m, torch.nn.Linear)]
    assert [l.out_features for l in pred] == [16, 64] and isinstance(task.predictor[-1], torch.nn.Linear)
    assert not hasattr(task, "target_encoder")


def test_simsiam_gradient_flows_only_through_the_predictor_branch():
    task = make_task("simsiam", proj_dim=64, proj_hidden=[48, 48], pred_hidden=16)
    inputs, target = fixed_batch(task, 8)

    def grads(stop: bool) -> dict[str, torch.Tensor]:
        task.zero_grad(set_to_none=True)
        if stop:
            out = task(inputs, target)
            loss = out["loss"]
            assert 0 < float(out["output_std"]) <= 1
        else:  # the same computation without the stop-gradient
            z1, z2 = (task.projector(task.encoder(inputs[:, v])) for v in (0, 1))
            p1, p2 = task.predictor(z1), task.predictor(z2)
            loss = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
        loss.backward()
        return {n: p.grad.clone() for n, p in task.named_parameters()}

    with_stop, without = grads(True), grads(False)
    # The predictor sees the same gradient either way; everything before it gets extra gradient
    # through the target side when it is not stopped.
    for n in with_stop:
        if n.startswith("predictor."):
            assert torch.allclose(with_stop[n], without[n], atol=1e-6), n
    assert not torch.allclose(with_stop["projector.0.weight"], without["projector.0.weight"], atol=1e-6)


# --- multitask ---------------------------------------------------------------------------------

def test_multitask_with_byol_trains_a_step_and_updates_its_target():
    task = make_task("multitask", tasks={"rotation": {"weight": 1.0}, "byol": {"weight": 0.5, "proj_hidden": [64], "pred_hidden": [64]}})
    byol = task.tasks["byol"]
    assert byol.encoder is task.encoder and byol.target_encoder is not task.encoder
    keys = task.state_dict().keys()
    assert any(k.startswith("tasks.byol.target_encoder.") for k in keys)
    assert not any(".encoder." in k for k in keys), "the shared backbone is stored once"
    optimizers, scaler, autocast = step_parts(task, lr=0.1)
    before = task.encoder.conv1.weight.detach().clone()
    target_before = byol.target_encoder.conv1.weight.detach().clone()
    task.set_progress(1, 4)  # forwarded to the sub-tasks
    assert byol.current_step == 1 and byol.total_steps == 4
    out = task.train_step(fixed_batch(task, 8), optimizers, scaler, autocast)
    assert torch.isfinite(out["loss"]) and "byol/loss" in out and "rotation/loss" in out
    assert torch.allclose(out["loss"], out["rotation/loss"] + 0.5 * out["byol/loss"])
    after = task.encoder.conv1.weight.detach()
    assert not torch.equal(before, after)
    m = byol.target_momentum()
    assert torch.allclose(byol.target_encoder.conv1.weight, m * target_before + (1 - m) * after, atol=1e-6)
