"""Global batch norm on CPU workers: 2 gloo processes x batch B == 1 process x batch 2B."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.train.sync_batchnorm import GlobalBatchNorm, convert_sync_batchnorm
from tests.gloo import run_gloo


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3))


def _worker(rank: int, world_size: int, x: torch.Tensor, sync: bool) -> dict:
    net = _net()
    if sync:
        net = convert_sync_batchnorm(net)
    rows = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    out = net(x[rows])
    loss = out.pow(2).sum() / len(x)  # this rank's share of the global batch's mean
    loss.backward()
    if sync:  # DDP takes the converted network on CPU (it refuses torch's SyncBatchNorm there)
        torch.nn.parallel.DistributedDataParallel(convert_sync_batchnorm(_net()))(x[rows]).sum().backward()
    return {"out": out.detach(), "grads": [p.grad for p in net.parameters()], "running_var": net[1].running_var.clone()}


def test_global_batch_norm_over_two_workers_equals_one_worker_with_the_whole_batch(tmp_path):
    x = torch.randn(16, 2, 6, 6) * 3 + 1
    ranks = run_gloo(_worker, 2, tmp_path / "sync", x, True)
    net = _net()
    out = net(x)
    (out.pow(2).sum() / len(x)).backward()
    assert torch.allclose(torch.cat([r["out"] for r in ranks]), out.detach(), atol=1e-5)
    for i, param in enumerate(net.parameters()):  # DDP would all-reduce (sum) these gradients
        assert torch.allclose(ranks[0]["grads"][i] + ranks[1]["grads"][i], param.grad, atol=1e-5), i
    assert torch.allclose(ranks[0]["running_var"], net[1].running_var, atol=1e-5)

    # Per-worker statistics (plain BatchNorm) give other outputs: what the option changes.
    local = run_gloo(_worker, 2, tmp_path / "local", x, False)
    assert not torch.allclose(torch.cat([r["out"] for r in local]), out.detach(), atol=1e-3)


def test_conversion_keeps_parameters_buffers_and_names():
    net = _net()
    weight, running_mean = net[1].weight, net[1].running_mean
    names = [n for n, _ in net.state_dict().items()]
    converted = convert_sync_batchnorm(net)
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[5], GlobalBatchNorm)
    assert converted[1].weight is weight and converted[1].running_mean is running_mean
    assert list(converted.state_dict()) == names
    # Outside torch.distributed it is ordinary batch norm.
    x = torch.randn(8, 2, 6, 6)
    assert torch.allclose(converted(x), _net()(x), atol=1e-6)
