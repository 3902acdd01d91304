"""Batch norm over the global batch across data-parallel workers (`train.sync_batchnorm`).

Per-worker batch statistics leak: with InfoNCE negatives from other workers, a worker's samples
share statistics the negatives do not, which a network can exploit (SimCLR and BYOL use global BN
for this reason; MoCo shuffles BN instead). torch's SyncBatchNorm computes global statistics on
GPUs only; `GlobalBatchNorm` does the same on the CPU (gloo), through a differentiable all-reduce
of the per-channel count, sum and sum of squares.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm with statistics over all workers' samples in training (any input rank >= 2);
    plain batch norm in eval mode and outside torch.distributed. Not a subclass of SyncBatchNorm:
    DDP refuses those on CPU modules."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        syncing = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not syncing:
            return super().forward(input)
        import torch.distributed.nn.functional as dist_nn

        dims = [d for d in range(input.dim()) if d != 1]  # every dimension but the channels
        x = input.float()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32)
        # One all-reduce of [count, sum (C), sum of squares (C)]; its backward all-reduces the
        # gradients, so every worker's samples receive the gradient through the shared statistics.
        totals = dist_nn.all_reduce(torch.cat([count, x.sum(dims), x.pow(2).sum(dims)]))
        n, channels = totals[0], x.shape[1]
        mean = totals[1:1 + channels] / n
        var = (totals[1 + channels:] / n - mean.pow(2)).clamp(min=0)  # biased, as batch norm normalizes
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), momentum)  # unbiased, as torch keeps it
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Every BatchNorm1d/2d/3d in `module` replaced by one over the global batch holding the same
    parameters and buffers (so optimizers and checkpoints see the same tensors and names): torch's
    SyncBatchNorm for CUDA training, GlobalBatchNorm elsewhere."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module._modules[name] = convert_sync_batchnorm(child, device)
    return module
