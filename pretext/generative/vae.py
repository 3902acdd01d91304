"""Variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014).

The backbone's pooled features give the posterior q(z|x) = N(mu, diag(sigma^2)); a sample
z = mu + sigma * eps (the reparameterization trick) is decoded by a DCGAN-style transposed-convolution
decoder into the parameters of p(x|z); training maximizes the ELBO
    log p(x) >= E_q[log p(x|z)] - beta * KL(q(z|x) || N(0, I))
with the KL in closed form. Likelihoods are of the 8-bit data, so the ELBO bounds a real
log-likelihood and bits/dim compare with PixelCNN's:
- "gaussian": a discretized Gaussian per sub-pixel, its mean decoded per pixel and its scale one
  learned value per channel (`scale: channel`, the default: the latent must explain the image) or
  decoded per pixel too (`scale: pixel`: sharper likelihoods, but on Fashion-MNIST the decoder then
  explains texture by variance and the KL, so the information in z, falls from ~110 to ~13 nats);
- "bernoulli": dynamically binarized pixels (each pixel ~ Bernoulli(intensity), redrawn every step;
  Salakhutdinov & Murray 2008), the classic binarized-MNIST setting.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import interleave_rows, lerp, save_grid
from pretext.base import ImageOnly, PretextTask
from pretext.heads import ConvTransposeDecoder
from pretext.likelihoods import (
    LIKELIHOODS,
    bernoulli_log_likelihood,
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    gaussian_kl,
    to_pixels,
)

REPRESENTATIONS = ("pooled", "mu", "both")


class PosteriorMean(nn.Module):
    """Eval features: mu of q(z|x), optionally concatenated with the pooled backbone features."""

    def __init__(self, encoder: nn.Module, to_latent: nn.Linear, latent_dim: int, with_pooled: bool):
        super().__init__()
        self.encoder, self.to_latent, self.latent_dim, self.with_pooled = encoder, to_latent, latent_dim, with_pooled

    def forward(self, images: Tensor) -> Tensor:
        pooled = self.encoder(images)
        mu = self.to_latent(pooled)[:, : self.latent_dim]
        return torch.cat([pooled, mu], 1) if self.with_pooled else mu


class VAE(PretextTask):
    """Maximizes the ELBO: backbone -> q(z|x), transposed-convolution decoder -> p(x|z) over 8-bit pixels.

    Args:
        latent_dim: size of z.
        likelihood: "gaussian" (discretized, on 8-bit values) or "bernoulli" (binarized pixels).
        beta: weight of the KL term (Higgins et al. 2017's beta-VAE; 1 is the ELBO).
        representation: what the eval stage scores: "pooled" backbone features, the posterior mean "mu", or "both".
        decoder_width: channels of the decoder's last block (doubling towards its input).
        scale: "channel" (one learned scale per colour channel) or "pixel" (decoded), gaussian only.
    """

    likelihood_kind = "elbo"

    def __init__(self, encoder: nn.Module, latent_dim: int = 32, likelihood: str = "gaussian", beta: float = 1.0,
                 representation: str = "pooled", decoder_width: int = 64, scale: str = "channel", **kwargs):
        super().__init__(encoder, **kwargs)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r}: choose from {list(LIKELIHOODS)}")
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation={representation!r}: choose from {list(REPRESENTATIONS)}")
        if scale not in ("channel", "pixel"):
            raise ValueError(f"scale={scale!r}: choose 'channel' or 'pixel'")
        if latent_dim < 1 or beta < 0:
            raise ValueError(f"latent_dim={latent_dim} must be >= 1 and beta={beta} >= 0")
        self.latent_dim, self.likelihood, self.beta, self.representation = latent_dim, likelihood, beta, representation
        if likelihood == "bernoulli":  # a bound on binarized images: not comparable with 8-bit bits/dim
            self.likelihood_kind = "elbo_binarized"
        self.to_latent = nn.Linear(self.embed_dim, 2 * latent_dim)  # mu and log sigma^2
        self.scale = scale
        decoded_scale = likelihood == "gaussian" and scale == "pixel"
        out_chans = 2 * self.in_chans if decoded_scale else self.in_chans  # (mean, log scale), or mean / logits
        self.decoder = ConvTransposeDecoder(latent_dim, out_chans, self.image_size, decoder_width, output="linear")
        if likelihood == "gaussian" and scale == "channel":
            self.log_scale = nn.Parameter(torch.full((self.in_chans, 1, 1), -2.0))
        self.dims = self.in_chans * self.image_size**2

    def sample_transform(self) -> ImageOnly:
        return ImageOnly()

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.to_latent(self.encoder(images)).float().chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)  # keeps exp(logvar) finite early in training

    def reconstruction_log_likelihood(self, decoded: Tensor, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """log p(x|z) per image; `decoded` is the decoder's output for z."""
        if self.likelihood == "gaussian":
            mean, log_scale = self.gaussian_parameters(decoded)
            return discretized_gaussian_log_likelihood(pixels, mean, log_scale)
        bits = torch.bernoulli(pixels.float() / 255, generator=generator)
        return bernoulli_log_likelihood(bits, decoded)

    def gaussian_parameters(self, decoded: Tensor) -> tuple[Tensor, Tensor]:
        """Per-pixel mean (in [0, 1] units, 0.5 at init) and log scale (about -2 at init), softly
        floored at a fifth of a pixel level: a hard clamp would leave pixels stuck at the floor with
        no gradient, where a mean a few levels off costs thousands of nats."""
        floor = math.log(1 / 255 / 5)
        if self.scale == "channel":
            return decoded.float() + 0.5, floor + F.softplus(self.log_scale - floor)
        mean, raw_scale = decoded.float().chunk(2, dim=1)
        return mean + 0.5, floor + F.softplus(raw_scale - 2.0 - floor)

    def elbo_terms(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(log p(x|z) at one reparameterized sample, KL(q(z|x) || p(z))), each per image, in nats."""
        mean, std = self.pixel_stats(images.device)
        pixels = to_pixels(images, mean, std)
        mu, logvar = self.encode(images)
        eps = torch.randn(mu.shape, device=mu.device, generator=generator)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.reconstruction_log_likelihood(self.decoder(z), pixels, generator), gaussian_kl(mu, logvar)

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        reconstruction, kl = self.elbo_terms(inputs)
        elbo = reconstruction - kl
        # Per dimension, so the loss (and a sensible learning rate) does not scale with image size.
        loss = -(reconstruction - self.beta * kl).mean() / self.dims
        return {"loss": loss, "elbo": elbo.mean().detach(), "kl": kl.mean().detach(),
                "bits_per_dim": bits_per_dim(elbo.mean().detach(), self.dims)}

    @torch.no_grad()
    def log_likelihood(self, images: Tensor) -> Tensor:
        """The ELBO of each image (a lower bound of log p(x)), one posterior sample, seeded per batch."""
        generator = torch.Generator(device=images.device).manual_seed(0)
        reconstruction, kl = self.elbo_terms(images, generator)
        return reconstruction - kl

    def mean_image(self, decoded: Tensor) -> Tensor:
        """E[x|z] in [0, 1] units, for pictures."""
        if self.likelihood == "gaussian":
            return self.gaussian_parameters(decoded)[0].clamp(0, 1)
        return torch.sigmoid(decoded.float())

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """Images from the prior, z ~ N(0, I), as E[x|z] in the decoder's normalized space."""
        device = self.to_latent.weight.device
        z = torch.randn(count, self.latent_dim, generator=generator).to(device)
        mean, std = self.pixel_stats(device)
        return (self.mean_image(self.decoder(z)) - mean) / std

    @torch.no_grad()
    def write_figures(self, directory: Path, step: int, inputs) -> list[Path]:
        """Reconstructions (odd rows: inputs; even rows: E[x|mu]), prior samples, and decodings
        along straight lines between the posterior means of pairs of inputs."""
        was_training = self.training
        self.eval()
        try:
            images = inputs[:32]
            mu, _ = self.encode(images)
            pairs = interleave_rows(self.to_unit_range(images), self.mean_image(self.decoder(mu)))
            samples = self.to_unit_range(self.sample(64, torch.Generator().manual_seed(step)))
            half = len(mu) // 2
            rows = min(8, half)
            path = lerp(mu[:rows], mu[half : half + rows], 10).flatten(0, 1)
            interpolations = self.mean_image(self.decoder(path))
            prefix = f"step_{step:08d}"
            return [
                save_grid(pairs, directory / f"{prefix}_reconstructions.png", nrow=8),
                save_grid(samples, directory / f"{prefix}_prior_samples.png", nrow=8),
                save_grid(interpolations, directory / f"{prefix}_interpolations.png", nrow=10),
            ]
        finally:
            self.train(was_training)

    def feature_extractor(self) -> nn.Module:
        if self.representation == "pooled":
            return self.encoder
        return PosteriorMean(self.encoder, self.to_latent, self.latent_dim, with_pooled=self.representation == "both")
