"""What the eval stage measures of generative objectives beyond their features: test log-likelihood
(exact for PixelCNN, the ELBO bound for the VAE) in nats and bits/dim, generated samples, and the
Frechet distance between generated and real images in a feature space of the caller's choosing."""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.data.bad_samples import BadSamples
from pipeline.data.decode import ImageDecoder
from pipeline.data.streaming import eval_loader


class GenerativeTask(Protocol):
    """What this module uses of a generative pretext task (the VAE, PixelCNN, the GANs); the eval
    stage gets one from `pipeline.train.tasks.rebuild_task` and never imports `pretext`."""

    likelihood_kind: str | None  # "exact", "elbo", "elbo_binarized" or None (no likelihood)

    def log_likelihood(self, images: Tensor) -> Tensor: ...

    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor: ...

    def eval(self) -> "GenerativeTask": ...

    def to(self, device) -> "GenerativeTask": ...


@torch.no_grad()
def test_log_likelihood(task: GenerativeTask, urls: list[str], decoder: ImageDecoder, batch_size: int, device: str,
                        total: int | None = None, bad_samples: BadSamples | None = None) -> dict:
    """Mean log p(x) (or its ELBO) over every image of a split, in nats per image and bits/dim."""
    task.eval().to(device)
    loader = eval_loader(urls, 0, 1, decoder, batch_size, loader_workers=1, bad_samples=bad_samples)
    total_ll, count, dims = 0.0, 0, None
    with tqdm(total=total, desc="test log-likelihood", unit="img", mininterval=2.0) as progress:
        for images, _, keys in loader:
            ll = task.log_likelihood(images.to(device))
            total_ll += float(ll.double().sum())
            count += len(keys)
            dims = images[0].numel()
            progress.update(len(keys))
    if count == 0:
        raise ValueError("the test split holds no images")
    mean = total_ll / count
    skipped = loader.bad_samples.counts()["bad_samples"]
    return {"skipped_bad_samples": skipped, "kind": task.likelihood_kind, "nats_per_image": round(mean, 2), "bits_per_dim": round(-mean / (dims * math.log(2)), 4),
            "images": count}


@torch.no_grad()
def generate(task: GenerativeTask, count: int, batch_size: int = 256, seed: int = 0) -> Tensor:
    """`count` samples of the task's model in the decoder's normalized space (CPU tensor)."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, count, batch_size), desc="sampling", unit="batch", mininterval=2.0):
        chunks.append(task.sample(min(batch_size, count - start), generator).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def embed(model: nn.Module | None, images: Tensor, batch_size: int = 512, device: str = "cpu") -> Tensor:
    """Pooled features of in-memory images (None: the flattened pixels)."""
    if model is None:
        return images.flatten(1).double()
    model.eval().to(device)
    return torch.cat([model(images[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)])


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) (Heusel et al. 2017's
    FID formula): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with the trace of the root
    computed from the symmetric S_a^(1/2) S_b S_a^(1/2), whose eigenvalues are those of S_a S_b."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)
