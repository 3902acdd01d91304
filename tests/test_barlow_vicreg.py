"""Barlow Twins and VICReg losses: against lightly, against the papers' formulas and known minima, and
over the global batch of 2 gloo workers (the loss and DDP-averaged gradients of 1 worker with 2B)."""
from __future__ import annotations

import math

import pytest
import torch

from pretext.joint_embedding.barlow_twins import barlow_twins_loss, cross_correlation
from pretext.joint_embedding.vicreg import covariance_term, vicreg_loss, vicreg_terms
from tests.gloo import run_gloo


def pair(n: int = 32, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated (n, d) views with different per-dimension means and scales."""
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d) + torch.linspace(-2, 2, d)
    return z_a, 0.7 * z_a + 0.5 * torch.randn(n, d, generator=g)


def whitened(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d) with zero column means and biased covariance Z^T Z / n = I exactly (n > d)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))  # orthonormal columns inside the centred span: zero means
    return (q * math.sqrt(n)).float()


def lightly_barlow(z_a, z_b, lambda_offdiag=5e-3, gather_distributed=False):
    from lightly.loss import BarlowTwinsLoss

    return BarlowTwinsLoss(lambda_param=lambda_offdiag, gather_distributed=gather_distributed)(z_a, z_b)


def lightly_vicreg(z_a, z_b, gather_distributed=False):
    from lightly.loss import VICRegLoss

    return VICRegLoss(gather_distributed=gather_distributed)(z_a, z_b)


# --- against lightly -------------------------------------------------------------------------------

@pytest.mark.parametrize("lambda_offdiag", [5e-3, 0.1, 1.0])
def test_barlow_twins_loss_and_gradients_equal_lightly(lambda_offdiag):
    # Same normalization as lightly: batch norm without affine (biased variance, eps 1e-5), C / N.
    z_a, z_b = (z.requires_grad_() for z in pair())
    ours, _ = barlow_twins_loss(z_a, z_b, lambda_offdiag, gather=False)
    ours_grads = torch.autograd.grad(ours, (z_a, z_b))
    theirs = lightly_barlow(z_a, z_b, lambda_offdiag)
    theirs_grads = torch.autograd.grad(theirs, (z_a, z_b))
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), (ours, theirs)
    for mine, ref in zip(ours_grads, theirs_grads):
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-7)


def test_vicreg_loss_terms_and_gradients_equal_lightly():
    from lightly.loss.vicreg_loss import covariance_loss, invariance_loss, variance_loss

    z_a, z_b = (z.requires_grad_() for z in pair(seed=1))
    ours, terms = vicreg_loss(z_a, z_b, gather=False)
    theirs = lightly_vicreg(z_a, z_b)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), (ours, theirs)
    assert torch.allclose(terms["invariance"], invariance_loss(z_a, z_b))
    assert torch.allclose(terms["variance"], (variance_loss(z_a) + variance_loss(z_b)) / 2)
    assert torch.allclose(terms["covariance"], covariance_loss(z_a) + covariance_loss(z_b), rtol=1e-6)
    ours_grads, theirs_grads = torch.autograd.grad(ours, (z_a, z_b)), torch.autograd.grad(theirs, (z_a, z_b))
    for mine, ref in zip(ours_grads, theirs_grads):
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-7)


# --- against the papers' formulas -----------------------------------------------------------------

def test_cross_correlation_is_the_papers_pearson_correlation():
    # Paper eq. 2: C_ij = sum_b za_bi zb_bj / (||za_i|| ||zb_j||) over centred columns; the batch
    # norm's eps (1e-5 against variances of 0.25 to 9) moves it by well under 1e-4.
    z_a, z_b = pair(n=64, d=8, seed=2)
    expected = torch.corrcoef(torch.cat([z_a, z_b], 1).T)[:8, 8:]  # (D, D) block: view a x view b
    assert torch.allclose(cross_correlation(z_a, z_b, gather=False), expected, atol=1e-4)


def test_vicreg_terms_on_hand_computed_statistics():
    # Two identical columns with unbiased variance v: Cov = [[v, v], [v, v]], c = 2 v^2 / 2 = v^2
    # per view; their std sqrt(v + 1e-4) < 1 is hinged.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    z = torch.cat([x, x], 1) * 0.5  # unbiased variance 0.25 * 5/3
    v = 0.25 * 5 / 3
    assert covariance_term(z).item() == pytest.approx(v ** 2, rel=1e-6)
    terms = vicreg_terms(z, z + 1.0, gather=False)  # shifted copy: mse 1, same statistics
    assert terms["invariance"].item() == pytest.approx(1.0)
    assert terms["variance"].item() == pytest.approx(1 - math.sqrt(v + 1e-4), rel=1e-6)
    assert terms["covariance"].item() == pytest.approx(2 * v ** 2, rel=1e-6)


# --- known minima and extreme values --------------------------------------------------------------

def test_barlow_twins_is_zero_on_identical_whitened_views_whatever_their_scale_and_shift():
    z = whitened(64, 16).requires_grad_()
    loss, terms = barlow_twins_loss(z, z, gather=False)
    # C = I / (1 + 1e-5) through the batch norm's eps: loss = 16 * (1e-5)^2, a minimum (zero gradient).
    assert loss.item() < 1e-8 and terms["redundancy"].item() < 1e-10
    assert torch.autograd.grad(loss, z)[0].abs().max() < 1e-5
    # Standardization over the batch makes C blind to per-dimension affine maps of either view (up
    # to the eps: at a std of 0.5, C_ii = 1 - 2e-5).
    rescaled = z.detach() * torch.linspace(0.5, 10, 16) - 3.0
    assert barlow_twins_loss(z.detach(), rescaled, gather=False)[0].item() < 1e-8


def test_barlow_twins_extreme_values():
    z, d = whitened(64, 16), 16
    # Anti-correlated views: C = -I, every diagonal term (1 - (-1))^2 = 4.
    assert barlow_twins_loss(z, -z, gather=False)[0].item() == pytest.approx(4 * d, rel=1e-4)
    # Collapse: constant embeddings standardize to 0, so C = 0 and the loss is D.
    constant = torch.ones(64, d)
    loss, terms = barlow_twins_loss(constant, constant, gather=False)
    assert loss.item() == pytest.approx(d) and terms["redundancy"].item() == 0.0
    # Fully redundant dimensions (every column the same): C = all ones, the off-diagonal sum is D (D - 1).
    same = z[:, :1].expand(64, d)
    loss, terms = barlow_twins_loss(same, same, lambda_offdiag=0.5, gather=False)
    assert terms["redundancy"].item() == pytest.approx(d * (d - 1), rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * d * (d - 1), rel=1e-4)


def test_vicreg_is_zero_on_identical_whitened_views_and_known_at_collapse():
    n, d = 64, 16
    z = whitened(n, d).requires_grad_()
    loss, terms = vicreg_loss(z, z, gather=False)
    # Unbiased variance n / (n - 1) > 1: the hinge is off; covariances are 0 off the diagonal.
    assert loss.item() < 1e-8 and terms["covariance"].item() < 1e-10
    assert torch.autograd.grad(loss, z)[0].abs().max() < 1e-6
    # Collapse: std = sqrt(0 + 1e-4) = 0.01, so variance = 0.99 and the loss 25 * 0.99.
    constant = torch.full((n, d), 3.0)
    loss, terms = vicreg_loss(constant, constant, gather=False)
    assert terms["variance"].item() == pytest.approx(0.99, rel=1e-6)
    assert loss.item() == pytest.approx(25 * 0.99, rel=1e-6)
    # Whitened but half the scale: each std is sqrt(0.25 n / (n - 1) + 1e-4) < 1.
    half = z.detach() / 2
    expected = 25 * (1 - math.sqrt(0.25 * n / (n - 1) + 1e-4))
    assert vicreg_loss(half, half, gather=False)[0].item() == pytest.approx(expected, rel=1e-5)


# --- the global batch over 2 gloo workers ---------------------------------------------------------

VARIANTS = {
    "barlow_twins/global": lambda a, b: barlow_twins_loss(a, b, gather=True)[0],
    "barlow_twins/per_rank": lambda a, b: barlow_twins_loss(a, b, gather=False)[0],
    "barlow_twins/lightly": lambda a, b: lightly_barlow(a, b, gather_distributed=True),
    "vicreg/global": lambda a, b: vicreg_loss(a, b, gather=True)[0],
    "vicreg/per_rank": lambda a, b: vicreg_loss(a, b, gather=False)[0],
    "vicreg/lightly": lambda a, b: lightly_vicreg(a, b, gather_distributed=True),
}


def _global_batch_worker(rank: int, world_size: int, z_a: torch.Tensor, z_b: torch.Tensor) -> dict:
    rows = slice(rank * len(z_a) // world_size, (rank + 1) * len(z_a) // world_size)
    results = {}
    for name, loss_fn in VARIANTS.items():
        a, b = z_a[rows].clone().requires_grad_(), z_b[rows].clone().requires_grad_()
        loss = loss_fn(a, b)
        loss.backward()
        results[name] = {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad}
    return results


def test_two_workers_with_batch_b_equal_one_worker_with_batch_2b(tmp_path):
    """Each worker computes the whole global batch's loss; its gradient sums every worker's loss
    through the gather, so DDP's average over 2 workers gives 1 worker's gradient with batch 2B."""
    z_a, z_b = pair(n=16, d=8, seed=3)
    # The second worker's rows sit elsewhere: per-worker statistics then differ clearly from global ones.
    z_a[8:], z_b[8:] = z_a[8:] * 2 + 1.5, z_b[8:] * 2 + 1.5
    ranks = run_gloo(_global_batch_worker, 2, tmp_path, z_a, z_b)

    for task, full_loss_fn in (("barlow_twins", VARIANTS["barlow_twins/per_rank"]), ("vicreg", VARIANTS["vicreg/per_rank"])):
        a, b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
        full = full_loss_fn(a, b)  # one process, batch 2B, nothing to gather
        full.backward()

        def ddp(variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Mean loss over workers and DDP-averaged gradients w.r.t. the embeddings."""
            per_rank = [r[f"{task}/{variant}"] for r in ranks]
            return (torch.stack([r["loss"] for r in per_rank]).mean(),
                    torch.cat([r["grad_a"] for r in per_rank]) / 2, torch.cat([r["grad_b"] for r in per_rank]) / 2)

        ours = [r[f"{task}/global"]["loss"] for r in ranks]
        assert all(torch.allclose(loss, full, rtol=1e-5) for loss in ours), (task, ours, full)  # on every worker
        loss, grad_a, grad_b = ddp("global")
        assert torch.allclose(grad_a, a.grad, rtol=1e-4, atol=1e-6) and torch.allclose(grad_b, b.grad, rtol=1e-4, atol=1e-6), task

        # Statistics of one worker's rows only: another loss and other gradients.
        loss, grad_a, _ = ddp("per_rank")
        assert abs(loss - full) > 0.1 * abs(full), (task, loss, full)
        assert (grad_a - a.grad).abs().max() > 0.1 * a.grad.abs().max(), task

        # lightly's distributed VICReg gathers the embeddings as we do (its per-worker invariance
        # term averages to ours); its distributed Barlow Twins averages per-worker C, each from
        # per-worker standardization, so it is not the global batch's loss.
        loss, grad_a, grad_b = ddp("lightly")
        if task == "vicreg":
            assert torch.allclose(loss, full, rtol=1e-5)
            assert torch.allclose(grad_a, a.grad, rtol=1e-4, atol=1e-6) and torch.allclose(grad_b, b.grad, rtol=1e-4, atol=1e-6)
        else:
            assert abs(loss - full) > 0.1 * abs(full), (loss, full)


# --- the tasks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_task_logs_the_unweighted_terms_of_its_loss(name):
    from core.options import ModelConfig
    from models.backbone import create_backbone
    from pretext import create_task
    from tests.conftest import TINY_BACKBONE

    torch.manual_seed(0)
    encoder = create_backbone(ModelConfig(**TINY_BACKBONE), in_chans=1)
    task = create_task(name, encoder=encoder, in_chans=1, image_size=16, proj_dim=32, proj_hidden=[32, 32])
    out = task(torch.randn(8, 2, 1, 16, 16), torch.zeros(8, dtype=torch.long))  # (B, views, C, H, W)
    if name == "barlow_twins":
        expected = out["invariance"] + 5e-3 * out["redundancy"]
    else:
        expected = 25 * out["invariance"] + 25 * out["variance"] + out["covariance"]
        assert 0 < out["variance"] < 1  # a random expander's outputs have std below 1
    assert torch.allclose(out["loss"], expected, rtol=1e-5)
    assert all(not value.requires_grad for key, value in out.items() if key != "loss")


def test_vicreg_twenty_steps_lower_the_loss_with_an_expander_narrower_than_the_batch():
    """test_tasks' fixed-batch check, with an expander output (16) below the batch (32): with more
    dimensions than samples the covariance cannot vanish, and at 32 samples and D = 1024 even free
    embeddings bottom out at a loss of about 16 of the initial 25."""
    from core.options import OptimConfig
    from pipeline.train.loop import autocast_factory
    from tests.test_tasks import fixed_batch, make_task

    task = make_task("vicreg", proj_dim=16, proj_hidden=[256, 256])
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0), lr=3e-3)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    batch = fixed_batch(task, 32)
    torch.manual_seed(0)
    outs = [task.train_step(batch, optimizers, scaler, autocast) for _ in range(20)]
    losses = [float(out["loss"].detach()) for out in outs]
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses
    assert outs[-1]["variance"] < outs[0]["variance"] and outs[-1]["invariance"] < outs[0]["invariance"]
