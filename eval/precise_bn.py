"""Precise batch-norm statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; pycls'
and Detectron2's PreciseBN): a backbone's running means and variances are an exponential average
over training batches, and the joint-embedding tasks train on augmented views (crops, jitter,
erased rectangles), not on the whole images the eval stage scores. Before extracting frozen
features, the statistics are recomputed as a plain average over unaugmented train images, decoded
as eval decodes them; weights are untouched."""
from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.data.bad_samples import BadSamples
from pipeline.data.streaming import eval_loader

log = logging.getLogger("sslpipe.eval")


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, urls: list[str], decoder, images: int, batch_size: int = 500, loader_workers: int = 1,
                        device: torch.device | str = "cpu", bad_samples: BadSamples | None = None) -> int:
    """Replaces every batch norm's running statistics by their average over the first `images`
    train images (in the eval loader's order); returns how many were seen (0: no batch norm)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or images <= 0:
        return 0
    device = torch.device(device)
    model.eval().to(device)
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches, not an exponential one
        norm.train()  # only the norms: dropout and the like stay in eval mode
    seen = 0
    try:
        for batch, _, _ in eval_loader(urls, 0, 1, decoder, batch_size, loader_workers, bad_samples=bad_samples):
            batch = batch[: images - seen]
            if len(batch) < 2:  # training-mode batch norm needs two samples; one more changes nothing
                break
            model(batch.to(device))
            seen += len(batch)
            if seen >= images:
                break
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    log.info("precise batch norm: statistics of %d batch-norm layers recomputed on %d unaugmented train images", len(norms), seen)
    return seen
