"""Log-likelihoods of 8-bit images and the Gaussian KL, as pure functions (VAE, PixelCNN).

Images are scored as what they are on disk, 8-bit integers, so log-likelihoods are of discrete
data (in nats, summed over sub-pixels) and bits/dim are comparable between models and with the
literature: `bits_per_dim = -log_likelihood / (dims * ln 2)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LIKELIHOODS = ("gaussian", "bernoulli")


def to_pixels(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Normalized images back to their 8-bit values (long); the decoder divided by 255, subtracted mean, divided by std."""
    return (images.float() * std + mean).clamp(0, 1).mul(255).round().long()


def from_pixels(pixels: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """8-bit values to the normalized images the backbone sees."""
    return (pixels.float() / 255 - mean) / std


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def discretized_gaussian_log_likelihood(pixels: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(pixels) per image, each 8-bit value k the mass of N(mean, scale^2) on its bin
    [k/255 - 1/510, k/255 + 1/510] (the end bins reach to -inf and +inf, so the 256 masses sum
    to 1). `mean` is in [0, 1] units; summed over all but the batch dimension."""
    x = pixels.float() / 255
    inv_scale = torch.exp(-log_scale)
    half_bin = 1.0 / 510
    upper = (x - mean + half_bin) * inv_scale
    lower = (x - mean - half_bin) * inv_scale
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= upper edge)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower edge)
    # log(Phi(u) - Phi(l)) computed stably: log Phi(u) + log(1 - exp(log Phi(l) - log Phi(u))),
    # from the tail that is not ~1 (mirror for bins right of the mean).
    right = lower > 0
    a = torch.where(right, log_sf_lower, log_cdf_upper)
    b = torch.where(right, torch.special.log_ndtr(-upper), torch.special.log_ndtr(lower))
    log_mass = a + torch.log(-torch.expm1((b - a).clamp(max=-1e-12)))
    log_prob = torch.where(pixels == 0, log_cdf_upper, torch.where(pixels == 255, log_sf_lower, log_mass))
    return log_prob.flatten(1).sum(1)


def bernoulli_log_likelihood(bits: Tensor, logits: Tensor) -> Tensor:
    """log P(bits) per image under independent Bernoulli(sigmoid(logits)) sub-pixels."""
    return -F.binary_cross_entropy_with_logits(logits.float(), bits.float(), reduction="none").flatten(1).sum(1)


def categorical_log_likelihood(pixels: Tensor, logits: Tensor) -> Tensor:
    """log P(pixels) per image under 256-way logits (B, C, 256, H, W) (PixelCNN)."""
    return -F.cross_entropy(logits.float().transpose(1, 2), pixels, reduction="none").flatten(1).sum(1)


def bits_per_dim(log_likelihood: Tensor, dims: int) -> Tensor:
    return -log_likelihood / (dims * math.log(2))
