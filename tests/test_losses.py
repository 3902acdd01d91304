"""info_nce and multi_view_nt_xent against explicit logits, analytic values, symmetry, and the cross-worker gather."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretext.losses import info_nce, multi_view_nt_xent
from tests.gloo import run_gloo


def explicit_nt_xent(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per anchor: cross-entropy over [anchor.positive, anchor.every other embedding of both views]."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    losses = []
    for anchors, partners in ((q, k), (k, q)):
        for i in range(len(q)):
            others = [partners[j] for j in range(len(q)) if j != i] + [anchors[j] for j in range(len(q)) if j != i]
            logits = torch.stack([anchors[i] @ partners[i]] + [anchors[i] @ o for o in others]) / temperature
            losses.append(-F.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean()


def test_nt_xent_equals_cross_entropy_on_explicit_logits():
    torch.manual_seed(0)
    q, k = torch.randn(6, 5), torch.randn(6, 5)
    loss, _ = info_nce(q, k, temperature=0.3)
    assert torch.allclose(loss, explicit_nt_xent(q, k, 0.3), atol=1e-5)


def test_keys_only_info_nce_equals_cross_entropy_on_q_dot_k():
    torch.manual_seed(1)
    q, k = torch.randn(7, 4), torch.randn(7, 4)
    loss, _ = info_nce(q, k, temperature=0.5, query_negatives=False)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.5
    assert torch.allclose(loss, F.cross_entropy(logits, torch.arange(7)), atol=1e-6)


@pytest.mark.parametrize("n", [2, 8, 32])
def test_collinear_embeddings_give_log_of_the_candidate_count(n):
    same = torch.ones(n, 3)
    loss, _ = info_nce(same, same, temperature=0.1)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)  # -log(1 / (2n - 1))
    loss, _ = info_nce(same, same, temperature=0.1, query_negatives=False)
    assert loss.item() == pytest.approx(math.log(n), rel=1e-5)


def test_nt_xent_is_symmetric_and_perfect_pairs_score_low():
    torch.manual_seed(2)
    q, k = torch.randn(10, 16), torch.randn(10, 16)
    assert torch.allclose(info_nce(q, k, 0.2)[0], info_nce(k, q, 0.2)[0])
    orthogonal = torch.eye(10)
    loss, accuracy = info_nce(orthogonal, orthogonal.clone(), temperature=0.05)
    assert loss.item() < 1e-3 and accuracy.item() == 1.0


def _gather_worker(rank: int, world_size: int, init_file: str, out_dir: str, q: torch.Tensor, k: torch.Tensor) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    rows = slice(rank * len(q) // world_size, (rank + 1) * len(q) // world_size)
    q_local, k_local = q[rows].clone().requires_grad_(), k[rows].clone().requires_grad_()
    loss, _ = info_nce(q_local, k_local, temperature=0.2, gather=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "q_grad": q_local.grad, "k_grad": k_local.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gather_over_two_workers_matches_one_worker_with_the_whole_batch(tmp_path):
    """2 workers x batch B give the loss and gradients of 1 worker x batch 2B (DDP averages over workers)."""
    import torch.multiprocessing as mp

    torch.manual_seed(3)
    q, k = torch.randn(8, 6), torch.randn(8, 6)
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path), q, k), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    q_full, k_full = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss, _ = info_nce(q_full, k_full, temperature=0.2)
    loss.backward()
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), loss, atol=1e-6)
    # Each rank's gradient sums every rank's loss through the gather; DDP then divides by 2.
    assert torch.allclose(torch.cat([r["q_grad"] for r in ranks]) / 2, q_full.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["k_grad"] for r in ranks]) / 2, k_full.grad, atol=1e-6)


# --- multi-view NT-Xent (multi-crop exemplar) ------------------------------------------------------


def explicit_multi_view(views: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per anchor (view v of image i): mean over the other views u of image i of
    -log( exp(a.p / T) / sum over every other embedding e of exp(a.e / T) )."""
    views = F.normalize(views, dim=2)
    count, batch = views.shape[:2]
    losses = []
    for v in range(count):
        for i in range(batch):
            anchor = views[v, i]
            others = [(u, j) for u in range(count) for j in range(batch) if (u, j) != (v, i)]
            denominator = torch.logsumexp(torch.stack([anchor @ views[u, j] / temperature for u, j in others]), 0)
            positives = [anchor @ views[u, i] / temperature - denominator for u in range(count) if u != v]
            losses.append(-torch.stack(positives).mean())
    return torch.stack(losses).mean()


def test_multi_view_nt_xent_with_two_views_is_nt_xent():
    torch.manual_seed(5)
    views = torch.randn(2, 7, 5)
    loss, accuracy = multi_view_nt_xent(views, 0.3)
    expected, expected_accuracy = info_nce(views[0], views[1], 0.3)
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(accuracy, expected_accuracy)


@pytest.mark.parametrize("count", [3, 5])
def test_multi_view_nt_xent_equals_the_explicit_multi_positive_formula(count):
    torch.manual_seed(count)
    views = torch.randn(count, 6, 4)
    assert torch.allclose(multi_view_nt_xent(views, 0.2)[0], explicit_multi_view(views, 0.2), atol=1e-5)


def test_multi_view_nt_xent_is_low_for_matching_views_and_refuses_one_view():
    orthogonal = torch.eye(6)
    matched = torch.stack([orthogonal, orthogonal.clone(), orthogonal.clone()])  # 3 views, 6 images
    loss, accuracy = multi_view_nt_xent(matched, 0.05)
    # Each anchor: its 2 positives at similarity 1, 15 negatives at 0 -> log(2 + 15 e^-20) - ... ~ log 2.
    assert loss.item() == pytest.approx(math.log(2), abs=1e-3) and accuracy.item() == 1.0
    with pytest.raises(ValueError, match="at least 2 views"):
        multi_view_nt_xent(torch.randn(1, 4, 3))


def _multi_view_rank(rank: int, world_size: int, views: torch.Tensor) -> dict:
    rows = slice(rank * views.shape[1] // world_size, (rank + 1) * views.shape[1] // world_size)
    local = views[:, rows].clone().requires_grad_()
    loss, _ = multi_view_nt_xent(local, 0.2, gather=True)
    loss.backward()
    return {"loss": loss.detach(), "grad": local.grad}


def test_multi_view_gather_over_two_workers_matches_one_worker_with_the_whole_batch(tmp_path):
    torch.manual_seed(4)
    views = torch.randn(3, 8, 6)
    ranks = run_gloo(_multi_view_rank, 2, tmp_path, views)
    full = views.clone().requires_grad_()
    loss, _ = multi_view_nt_xent(full, 0.2)
    loss.backward()
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), loss, atol=1e-6)
    assert torch.allclose(torch.cat([r["grad"] for r in ranks], dim=1) / 2, full.grad, atol=1e-6)


def test_decoupled_nt_xent_equals_lightly_dcl_and_multi_view_dcl():
    lightly_loss = pytest.importorskip("lightly.loss")
    torch.manual_seed(6)
    q, k = torch.randn(12, 5), torch.randn(12, 5)
    ours, _ = info_nce(q, k, 0.2, decoupled=True)
    assert torch.allclose(ours, lightly_loss.DCLLoss(temperature=0.2)(q, k), atol=1e-5)
    assert torch.allclose(multi_view_nt_xent(torch.stack([q, k]), 0.2, decoupled=True)[0], ours, atol=1e-5)
    # Leaving the positive out of the denominator lowers every anchor's loss: DCL < NT-Xent.
    assert ours < info_nce(q, k, 0.2)[0]
    with pytest.raises(ValueError, match="decoupled"):
        info_nce(q, k, 0.2, query_negatives=False, decoupled=True)
