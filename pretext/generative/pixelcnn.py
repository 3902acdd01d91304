"""PixelCNN (van den Oord, Kalchbrenner & Kavukcuoglu, "Pixel Recurrent Neural Networks", ICML
2016): an explicit density p(x) = prod_i p(x_i | x_<i) over 8-bit sub-pixels in raster order,
each conditional a 256-way softmax computed by masked convolutions, so training maximizes the
exact log-likelihood and test bits/dim are exact. Samples are drawn pixel by pixel.

The network is the backbone (`model.backbone: pixelcnn`, registered with timm in
models/timm_models.py): the eval stage scores its residual stack's features, averaged over
positions, like any backbone's pooled features.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from core.grids import Panel, save_grid
from models.timm_models import PixelCNNNet
from pretext.base import ImageOnly, PretextTask
from pretext.likelihoods import (
    bits_per_dim,
    categorical_log_likelihood,
    from_pixels,
    to_pixels,
)


class PixelCNN(PretextTask):
    """Exact autoregressive likelihood of 8-bit sub-pixels with masked convolutions (the backbone).

    Args:
        samples_in_figures: images drawn for the sample grid (each costs H * W * C forward passes).
        temperature: softmax temperature when sampling (1 samples the model's own distribution).
    """

    likelihood_kind = "exact"

    def __init__(self, encoder: nn.Module, samples_in_figures: int = 64, temperature: float = 1.0, **kwargs):
        super().__init__(encoder, **kwargs)
        if not isinstance(encoder, PixelCNNNet):
            raise ValueError(f"task pixelcnn needs model.backbone: pixelcnn (the masked-convolution network), not {type(encoder).__name__}")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: must be > 0")
        self.samples_in_figures, self.temperature = samples_in_figures, temperature
        self.dims = self.in_chans * self.image_size**2

    def sample_transform(self) -> ImageOnly:
        return ImageOnly()

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        log_likelihood = self.log_likelihood_with_grad(inputs)
        loss = -log_likelihood.mean() / self.dims  # nats per sub-pixel
        return {"loss": loss, "bits_per_dim": bits_per_dim(log_likelihood.mean().detach(), self.dims)}

    def log_likelihood_with_grad(self, images: Tensor) -> Tensor:
        mean, std = self.pixel_stats(images.device)
        # The network sees exactly the quantized values it is scored on (normalized as eval feeds them).
        pixels = to_pixels(images, mean, std)
        return categorical_log_likelihood(pixels, self.encoder.logits(from_pixels(pixels, mean, std)))

    @torch.no_grad()
    def log_likelihood(self, images: Tensor) -> Tensor:
        """Exact log p(x) of each image in nats."""
        return self.log_likelihood_with_grad(images)

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """`count` images drawn sub-pixel by sub-pixel in raster order, in the normalized space."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.encoder.parameters()).device
            mean, std = self.pixel_stats(device)
            pixels = torch.zeros(count, self.in_chans, self.image_size, self.image_size, dtype=torch.long, device=device)
            for i in range(self.image_size):
                for j in range(self.image_size):
                    for c in range(self.in_chans):
                        # Rows below i cannot influence row i (masked kernels look up and left only),
                        # so the network runs on rows 0..i: exact, and half the work on average.
                        visible = from_pixels(pixels[:, :, : i + 1], mean, std)
                        logits = self.encoder.logits(visible)[:, c, :, i, j].float() / self.temperature
                        probs = torch.softmax(logits, -1).cpu()
                        pixels[:, c, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
            return from_pixels(pixels, mean, std)
        finally:
            self.train(was_training)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The images it is fed, which are also its targets, and not `write_figures`' samples:
        drawing them costs H * W * C passes (minutes on a CPU for a 28 px grid), and an untrained
        PixelCNN's samples are noise. Training (at checkpoints) and `sslpipe eval` draw samples."""
        return [[Panel(self.to_unit_range(s["image"]), "input = target")] for s in samples]

    def write_figures(self, directory: Path, step: int, inputs) -> list[Path]:
        if self.samples_in_figures <= 0:
            return []
        samples = self.sample(self.samples_in_figures, torch.Generator().manual_seed(step))
        return [save_grid(self.to_unit_range(samples), directory / f"step_{step:08d}_samples.png", nrow=8)]
