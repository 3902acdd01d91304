"""info_nce against explicit logits, analytic values, symmetry, and the cross-worker gather."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretext.losses import info_nce


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
