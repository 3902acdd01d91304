"""DINO and SwAV: losses against lightly's, global-batch statistics over gloo workers, the EMA
teacher, frozen layers, resume, multi-crop, and a ViT student."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# pipeline.data.streaming.collate is this; importing pipeline.data.streaming would slow the start of the gloo workers.
from torch.utils.data import default_collate as collate

from core.options import OptimConfig
from pretext.joint_embedding.dino import DINO, dino_loss, updated_center
from pretext.joint_embedding.swav import SwAV, sinkhorn_knopp, swav_loss
from tests.gloo import run_gloo


class TinyConv(nn.Sequential):
    """A backbone without batch norm (so per-worker batch statistics cannot differ) for any input size."""

    def __init__(self, in_chans: int = 1, width: int = 8):
        super().__init__(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = width


def make(cls, seed: int = 0, in_chans: int = 1, image_size: int = 16, **options):
    torch.manual_seed(seed)
    if cls is DINO:
        small = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}
    else:
        small = {"num_prototypes": 24, "proj_hidden": [32], "proj_dim": 16}
    return cls(TinyConv(in_chans), in_chans=in_chans, image_size=image_size, **{"local_crops": 3, **small, **options})


def crops(batch: int, seed: int, local: int = 3, size: int = 16, local_size: int = 6):
    """A collated multi-crop batch [(B, 2, 1, size, size), (B, local, 1, local_size, local_size)]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 2, 1, size, size, generator=g), torch.randn(batch, local, 1, local_size, local_size, generator=g)]


def step(task, inputs, optimizer=None):
    optimizer = optimizer or task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0), lr=1e-2)
    autocast, scaler = contextlib.nullcontext, torch.amp.GradScaler("cpu", enabled=False)  # as the loop's on CPU
    return task.train_step((inputs, torch.zeros(len(inputs[0]), dtype=torch.long)), optimizer, scaler, autocast)


# ---- losses against lightly -----------------------------------------------------------------

def test_dino_loss_and_centre_update_match_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    torch.manual_seed(0)
    views, batch, dim = 5, 6, 32
    student, teacher = torch.randn(views, batch, dim) * 3, torch.randn(2, batch, dim) * 3
    center = torch.randn(1, dim)
    reference = lightly_loss.DINOLoss(output_dim=dim, teacher_temp=0.06, student_temp=0.1, center_momentum=0.9)
    reference.center.copy_(center.view_as(reference.center))
    expected = reference(list(teacher), list(student), teacher_temp=0.06)
    assert torch.allclose(dino_loss(student, teacher, center, 0.1, 0.06), expected, atol=1e-5)
    # lightly's centre update runs inside its forward, on the same teacher logits.
    assert torch.allclose(updated_center(center, teacher.flatten(0, 1), 0.9), reference.center.view(1, dim), atol=1e-6)


def test_dino_task_steps_on_lightlys_loss_minus_the_teacher_entropy():
    """End to end: the task's cross-entropy and centre update are lightly's on the task's own
    outputs; its "loss" is that minus the teacher's entropy (no gradient), so the gradients agree."""
    lightly_loss = pytest.importorskip("lightly.loss")
    task = make(DINO)
    task.set_progress(10, 100)  # warming up: teacher temperature 0.04 + 0.03 * 0.09 / 0.3 = 0.049
    assert task.teacher_temperature == pytest.approx(0.049)
    task.center.normal_()
    inputs = crops(4, seed=9)
    center = task.center.clone()
    out = task(inputs, None)
    with torch.no_grad():
        teacher = task.teacher_head(task.teacher_encoder(inputs[0].transpose(0, 1).flatten(0, 1))).view(2, 4, -1)
    student = torch.cat([task.head(task.encoder(x.transpose(0, 1).flatten(0, 1))).view(x.shape[1], 4, -1) for x in inputs])
    reference = lightly_loss.DINOLoss(output_dim=64, teacher_temp=0.07, student_temp=0.1, center_momentum=0.9)
    reference.center.copy_(center.view_as(reference.center))
    expected = reference(list(teacher), list(student), teacher_temp=task.teacher_temperature)
    assert torch.allclose(out["cross_entropy"], expected, atol=1e-5)
    assert torch.allclose(task.center, reference.center.view(1, -1), atol=1e-6)
    assert torch.allclose(out["loss"], out["cross_entropy"] - out["teacher_entropy"], atol=1e-6)
    grads = torch.autograd.grad(out["loss"], list(task.head.mlp.parameters()), retain_graph=True)
    grads_ce = torch.autograd.grad(expected, list(task.head.mlp.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ce))


def test_swav_task_steps_on_lightlys_loss_minus_the_code_entropy():
    lightly_loss = pytest.importorskip("lightly.loss")
    task = make(SwAV, proj_hidden=[])
    inputs = crops(6, seed=10)
    out = task(inputs, None)
    z = F.normalize(task.projector(torch.cat([task.encoder(x.transpose(0, 1).flatten(0, 1)) for x in inputs])), dim=1)
    scores = task.prototypes(z).view(5, 6, -1)
    reference = lightly_loss.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    expected = reference(list(scores[:2]), list(scores[2:]))
    assert torch.allclose(out["cross_entropy"], expected, atol=1e-5)
    assert torch.allclose(out["loss"], out["cross_entropy"] - out["code_entropy"], atol=1e-6)
    grads = torch.autograd.grad(out["loss"], [task.prototypes.weight], retain_graph=True)
    grads_ce = torch.autograd.grad(expected, [task.prototypes.weight])
    assert torch.allclose(grads[0], grads_ce[0], atol=1e-6)


def test_dino_loss_of_uniform_outputs_is_log_k_and_same_crop_pairs_are_skipped():
    dim = 10
    flat = torch.zeros(4, 3, dim)
    assert dino_loss(flat, flat[:2], torch.zeros(dim), 0.1, 0.04).item() == pytest.approx(math.log(dim), rel=1e-6)
    # A student that copies the (sharpened) teacher on the same crop is not rewarded for it:
    # changing student crop 0 only changes the pair (teacher 1, student 0).
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4, dim), torch.randn(2, 4, dim)
    changed = student.clone()
    changed[0] = torch.randn(4, dim)
    t1 = F.softmax(teacher[1] / 0.04, -1)
    pair = lambda s: -(t1 * F.log_softmax(s[0] / 0.1, -1)).sum(-1).mean()  # noqa: E731
    delta = dino_loss(changed, teacher, torch.zeros(dim), 0.1, 0.04) - dino_loss(student, teacher, torch.zeros(dim), 0.1, 0.04)
    assert torch.allclose(delta, (pair(changed) - pair(student)) / 4, atol=1e-5)  # 4 pairs: (0,1), (0,2), (1,0), (1,2)


def test_sinkhorn_and_swav_loss_match_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    torch.manual_seed(2)
    views, batch, prototypes = 5, 8, 12
    scores = F.normalize(torch.randn(views, batch, prototypes), dim=-1)
    from lightly.loss.swav_loss import sinkhorn

    # lightly leaves out the paper's division of the rows by K: a constant factor, which the column
    # normalization that follows removes, so the codes agree.
    for view in range(2):
        expected = sinkhorn(scores[view], iterations=3, epsilon=0.05)
        assert torch.allclose(sinkhorn_knopp(scores[view], 0.05, 3), expected, atol=1e-6)
    codes = torch.stack([sinkhorn_knopp(scores[v], 0.05, 3) for v in range(2)])
    reference = lightly_loss.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    expected = reference(list(scores[:2]), list(scores[2:]))
    assert torch.allclose(swav_loss(scores, codes, 0.1), expected, atol=1e-5)


def test_sinkhorn_codes_are_assignments_balanced_over_prototypes():
    torch.manual_seed(3)
    scores = 0.5 * F.normalize(torch.randn(64, 8), dim=1)
    scores[:, 0] = 0.9  # every sample prefers prototype 0: the equipartition must spread them
    assert (scores.argmax(1) == 0).all()
    for iterations, tolerance in ((3, 0.3), (50, 1e-3)):  # 3 steps (the paper) roughly balance, more converge
        codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=iterations)
        assert torch.allclose(codes.sum(1), torch.ones(64), atol=1e-5)  # each sample's code: a distribution
        assert torch.allclose(codes.sum(0), torch.full((8,), 64 / 8), rtol=tolerance)  # B / K per prototype
        assert (codes.argmax(1) != 0).sum() > 40


# ---- the global batch over gloo workers -----------------------------------------------------

def _global_batch_worker(rank: int, world_size: int, inputs: list, swav_inputs: list) -> dict:
    rows = slice(rank * len(inputs[0]) // world_size, (rank + 1) * len(inputs[0]) // world_size)
    return _global_batch_results([x[rows] for x in inputs], [x[rows] for x in swav_inputs])


def _global_batch_results(inputs: list, swav_inputs: list) -> dict:
    dino = make(DINO, seed=5, base_momentum=0.9)
    dino.center.normal_()  # a centre already away from 0, identical on every worker
    dino_loss_value = dino(inputs, None)["loss"]
    swav = make(SwAV, seed=6, proj_hidden=[])  # a linear projector: no batch norm either
    loss, codes = loss_and_codes(swav, swav_inputs)
    loss.backward()
    return {"center": dino.center, "dino_loss": dino_loss_value.detach(), "codes": codes,
            "swav_loss": loss.detach(), "prototype_grad": swav.prototypes.weight.grad}


def loss_and_codes(task: SwAV, inputs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's loss on `inputs` and the codes its forward computed (recorded from `assign`)."""
    recorded = []
    assign = task.assign
    task.assign = lambda scores, embeddings: recorded.append(assign(scores, embeddings)) or recorded[-1]
    return task(inputs, None)["loss"], recorded[0]


def test_two_workers_with_batch_b_give_the_centre_and_codes_of_one_with_2b(tmp_path):
    inputs, swav_inputs = crops(8, seed=7), crops(8, seed=8)
    ranks = run_gloo(_global_batch_worker, 2, tmp_path, inputs, swav_inputs)
    single = _global_batch_results(inputs, swav_inputs)
    for r in ranks:  # every worker holds the centre of the whole batch
        assert torch.allclose(r["center"], single["center"], atol=1e-6)
    # Codes are balanced over the global batch: each worker's rows are the single process's rows.
    assert torch.allclose(torch.cat([r["codes"] for r in ranks], 1), single["codes"], atol=1e-6)
    for key in ("dino_loss", "swav_loss"):  # per-row means, so the workers' mean is the whole batch's
        assert torch.allclose(torch.stack([r[key] for r in ranks]).mean(), single[key], atol=1e-5)
    # DDP's average of the workers' gradients is the single process's gradient.
    assert torch.allclose(torch.stack([r["prototype_grad"] for r in ranks]).mean(0), single["prototype_grad"], atol=1e-6)
    # The global batch mattered: balanced over a worker's own half, the codes would differ.
    _, alone = loss_and_codes(make(SwAV, seed=6, proj_hidden=[]), [x[:4] for x in swav_inputs])
    assert (alone - ranks[0]["codes"]).abs().max() > 1e-3


# ---- the EMA teacher, frozen layers, resume -------------------------------------------------

def test_teacher_gets_no_gradient_and_every_student_parameter_does():
    task = make(DINO)
    task.set_progress(5, 10)
    before = {n: p.clone() for n, p in task.named_parameters() if n.startswith("teacher_")}
    step(task, crops(4, seed=0))
    teacher = {n: p for n, p in task.named_parameters() if n.startswith("teacher_")}
    student = {n: p for n, p in task.named_parameters() if not n.startswith("teacher_")}
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher.values())
    assert all(p.grad is not None for p in student.values() if p.requires_grad)
    # The last layer's weight-norm gain stays 1 (norm_last_layer); its direction v trains.
    assert not task.head.last_layer.parametrizations.weight.original0.requires_grad
    # teacher <- m * teacher + (1 - m) * student, with m from the cosine schedule at step 5 of 10.
    momentum = 1 - (1 - 0.996) * (math.cos(math.pi * 5 / 10) + 1) / 2
    assert task.teacher_momentum == pytest.approx(momentum)
    for name, p in teacher.items():
        online = student[name.removeprefix("teacher_")]
        assert torch.allclose(p, momentum * before[name] + (1 - momentum) * online, atol=1e-6), name


def test_teacher_momentum_rises_to_one_and_the_last_step_leaves_the_teacher_as_it_is():
    task = make(DINO, base_momentum=0.9)
    task.set_progress(0, 10)
    assert task.teacher_momentum == pytest.approx(0.9)
    task.set_progress(10, 10)
    assert task.teacher_momentum == 1.0
    before = [p.clone() for p in task.teacher_head.parameters()]
    step(task, crops(4, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(before, task.teacher_head.parameters()))


def test_teacher_temperature_warms_up_linearly_then_stays():
    task = make(DINO, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_fraction=0.5)
    temps = []
    for s in (1, 26, 51, 100):
        task.set_progress(s, 100)
        temps.append(task.teacher_temperature)
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])


@pytest.mark.parametrize("cls, part", [(DINO, "head.last_layer"), (SwAV, "prototypes")])
def test_frozen_parts_do_not_move_during_the_first_fraction_of_steps(cls, part):
    fraction = {"freeze_last_layer_fraction": 0.2} if cls is DINO else {"freeze_prototypes_fraction": 0.2}
    task = make(cls, **fraction)
    optimizer = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.1), lr=1e-2)
    frozen = lambda: torch.cat([p.detach().flatten() for p in task.get_submodule(part).parameters()])  # noqa: E731
    history = [frozen().clone()]
    for s in (1, 2, 3):  # steps 1 and 2 of 10 are frozen, step 3 is not
        task.set_progress(s, 10)
        step(task, crops(4, seed=s), optimizer)
        history.append(frozen().clone())
    # (SwAV renormalizes its prototypes every step, which may move unit vectors by rounding)
    assert (history[1] - history[0]).abs().max() < 1e-6 and (history[2] - history[1]).abs().max() < 1e-6
    assert (history[3] - history[2]).abs().max() > 1e-4


def test_swav_step_normalizes_the_prototypes_before_its_forward():
    task = make(SwAV)
    with torch.no_grad():
        task.prototypes.weight.mul_(5.0)
    seen = []
    original = task.forward
    task.forward = lambda *a: seen.append(task.prototypes.weight.norm(dim=1).clone()) or original(*a)
    object.__setattr__(task, "_forward_module", task.forward)
    step(task, crops(4, seed=0))
    assert torch.allclose(seen[0], torch.ones_like(seen[0]), atol=1e-6)


def test_resume_restores_teacher_centre_prototypes_and_queue_exactly():
    dino, swav = make(DINO), make(SwAV, queue_size=6)
    for s in (1, 2, 3):
        for task in (dino, swav):
            task.set_progress(s, 10)
            step(task, crops(4, seed=s))
    assert dino.center.abs().sum() > 0 and int(swav.queue_rows) == 6
    for task, cls, keys in ((dino, DINO, ("center", "teacher_head.mlp.0.weight", "teacher_encoder.0.weight")),
                            (swav, SwAV, ("prototypes.weight", "queue", "queue_rows"))):
        state = task.state_dict()
        assert all(k in state for k in keys)
        fresh = make(cls, seed=1, **({"queue_size": 6} if cls is SwAV else {}))
        assert not torch.equal(fresh.state_dict()[keys[0]], state[keys[0]])
        fresh.load_state_dict(state, strict=True)
        assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_swav_queue_joins_the_assignment_once_full():
    task = make(SwAV, queue_size=8)
    torch.manual_seed(4)
    scores = F.normalize(torch.randn(2, 4, 24), dim=-1)
    first, second = F.normalize(torch.randn(2, 2, 4, 16), dim=-1)  # two batches' projections (G, B, P)
    alone = task.assign(scores, first)  # the queue is not full: the batch alone
    assert torch.allclose(alone, torch.stack([sinkhorn_knopp(s) for s in scores]), atol=1e-6)
    task.assign(scores, second)
    assert int(task.queue_rows) == 8 and torch.equal(task.queue, torch.cat([second, first], 1))  # newest first
    queue = task.queue.clone()
    with_queue = task.assign(scores, first)
    expected = torch.stack([sinkhorn_knopp(torch.cat([task.prototypes(queue[c]), scores[c]]))[-4:] for c in range(2)])
    assert torch.allclose(with_queue, expected, atol=1e-6) and (with_queue - alone).abs().max() > 1e-3
    # lightly appends the queue after the batch; Sinkhorn treats samples alike, so the loss agrees.
    lightly_loss = pytest.importorskip("lightly.loss")
    local = F.normalize(torch.randn(3, 4, 24), dim=-1)
    with torch.no_grad():
        queue_scores = [task.prototypes(queue[c]) for c in range(2)]
    reference = lightly_loss.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    expected_loss = reference(list(scores), list(local), queue_outputs=queue_scores)
    assert torch.allclose(swav_loss(torch.cat([scores, local]), with_queue, 0.1), expected_loss, atol=1e-5)
    assert torch.equal(task.queue, torch.cat([first, second], 1))  # the oldest batch fell off


# ---- multi-crop ---------------------------------------------------------------------------

def coordinate_image(index: int, size: int = 32) -> dict:
    """4 channels: x and y of each pixel in [0, 1], the image's index, zeros."""
    ramp = torch.linspace(0, 1, size)
    return {"image": torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size),
                                  torch.full((size, size), float(index)), torch.zeros(size, size)])}


@pytest.mark.parametrize("cls", [DINO, SwAV])
def test_multicrop_counts_shapes_scales_and_one_source_image(cls):
    task = make(cls, in_chans=4, image_size=32, local_crops=5, local_size=12, global_scale=[0.7, 1.0],
                local_scale=[0.05, 0.15], jitter=0.0, blur=0.0)
    transform = task.sample_transform()
    batch, _ = collate([transform(coordinate_image(i)) for i in range(6)])
    assert [tuple(x.shape) for x in batch] == [(6, 2, 4, 32, 32), (6, 5, 4, 12, 12)]
    for group, (low, high) in zip(batch, ((0.7, 1.0), (0.05, 0.15))):
        side = group.shape[-1]
        values = group[:, :, :2]  # (B, V, 2, side, side): x and y in units of the image side
        span = (values.amax((-2, -1)) - values.amin((-2, -1))) * 31  # (B, V, 2) in source pixels
        # Downsampling w source pixels to `side` spans (side - 1) w / side of them; upsampling
        # clamps at the edges and spans w - 1. The larger estimate is the right one in either case.
        width = torch.maximum(span * side / (side - 1), span + 1)
        area = width.prod(-1) / 32**2
        # RandomResizedCrop rounds the crop's sides to whole pixels: up to ~25% on a 7 px local crop.
        assert area.min() > 0.75 * low and area.max() < 1.25 * high, (area.min(), area.max())
        # Every crop in row b comes from image b (the collate keeps each image's crops together).
        assert torch.allclose(group[:, :, 2], torch.arange(6.0).view(6, 1, 1, 1).expand_as(group[:, :, 2]), atol=1e-5)


def test_multicrop_local_side_defaults_to_three_sevenths():
    inputs, _ = make(DINO, image_size=28, local_crops=4).sample_transform()({"image": torch.rand(1, 28, 28)})
    assert [tuple(x.shape) for x in inputs] == [(2, 1, 28, 28), (4, 1, 12, 12)]


# ---- a ViT student --------------------------------------------------------------------------

def test_vit_dino_trains_one_step_on_crops_of_two_sizes():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # The shipped config's kwargs (dino_vit_fmnist.yaml), shrunk: 16 px, 4 px patches, 2 blocks.
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=16,
                            patch_size=4, dynamic_img_size=True, depth=2, embed_dim=48, num_heads=3)
    task = DINO(vit, in_chans=1, image_size=16, local_crops=2, local_size=8, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    inputs, _ = collate([task.sample_transform()({"image": torch.rand(1, 16, 16)}) for _ in range(4)])
    assert [tuple(x.shape) for x in inputs] == [(4, 2, 1, 16, 16), (4, 2, 1, 8, 8)]
    task.set_progress(5, 10)
    before = vit.pos_embed.detach().clone()
    out = step(task, inputs)
    assert torch.isfinite(out["loss"])
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert not torch.equal(before, vit.pos_embed)
    # Without dynamic_img_size timm refuses inputs of another size than img_size: the local crops.
    static = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=16,
                               patch_size=4, depth=1, embed_dim=48, num_heads=3)
    with pytest.raises(AssertionError, match="doesn't match model"):
        static(inputs[1][:, 0])


def test_vit_config_takes_global_and_local_crops():
    from pathlib import Path

    from models.backbone import create_backbone
    from pipeline.config import Config

    cfg = Config.load(Path(__file__).parents[1] / "configs" / "dino_vit_fmnist.yaml")
    assert cfg.optim.name == "adamw" and cfg.task.name == "dino"
    vit = create_backbone(cfg.model, in_chans=1)
    assert vit.patch_embed.patch_size == (4, 4)
    task = DINO(vit, in_chans=1, image_size=28, **cfg.task.options)
    inputs, _ = task.sample_transform()({"image": torch.rand(1, 28, 28)})
    assert [tuple(x.shape) for x in inputs] == [(2, 1, 28, 28), (6, 1, 12, 12)]
    with torch.no_grad():
        assert vit(inputs[0]).shape == (2, 192) and vit(inputs[1]).shape == (6, 192)


def test_eval_reads_the_dino_teacher_from_the_checkpoint(shards, tmp_path):
    """DINO's results are its teacher's: the checkpoint names it, the eval stage and export load it."""
    from pipeline.train.checkpoint import encoder_state, load_checkpoint
    from pipeline.train.loop import train_worker
    from pipeline.train.session import LocalSession
    from tests.test_train import tiny_config

    cfg = tiny_config(shards, tmp_path / "run", train__steps=3, train__checkpoint_every=3, task__name="dino",
                      task__options={"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops": 2, "base_momentum": 0.5})
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    state = load_checkpoint(cfg.run_dir)
    assert state["eval_encoder"] == "teacher_encoder"
    weights = encoder_state(state)
    teacher = {k[len("teacher_encoder."):]: v for k, v in state["task"].items() if k.startswith("teacher_encoder.")}
    student = {k[len("encoder."):]: v for k, v in state["task"].items() if k.startswith("encoder.")}
    assert weights.keys() == teacher.keys() and all(torch.equal(weights[k], teacher[k]) for k in weights)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # the two differ after training
