"""BiGAN / ALI (Donahue, Krähenbühl & Darrell, "Adversarial Feature Learning", ICLR 2017; Dumoulin
et al., "Adversarially Learned Inference", ICLR 2017): the discriminator judges (image, latent)
pairs, (x, E(x)) against (G(z), z). To fool it the encoder E must invert the generator, so E
learns features of real images without labels.

The backbone is E (what the eval stage scores, as Donahue et al. evaluated BiGAN); the
discriminator mirrors the DCGAN generator (as many stride-2 layers, the same width) on images,
joined with an MLP on latents. Training reuses the GAN's step: k discriminator updates, then one
update of generator and encoder together, each side with its own optimizer and DDP wrapper.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from core.grids import interleave_rows, save_grid
from models.timm_models import DCGANDiscriminator
from pretext.generative.gan import GAN
from pretext.losses import discriminator_loss


class JointCritic(nn.Module):
    """Score of an (image, latent) pair: DCGAN discriminator features of the image and an MLP
    embedding of the latent, concatenated, through a two-layer MLP (Donahue et al.'s joint layers)."""

    def __init__(self, image_net: DCGANDiscriminator, in_chans: int, image_size: int, latent_dim: int, hidden: int = 512):
        super().__init__()
        self.image_net = image_net
        with torch.no_grad():
            flat = image_net.eval().forward_features(torch.zeros(2, in_chans, image_size, image_size))[0].numel()
        image_net.train()
        self.latent_net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2, inplace=True))
        self.joint = nn.Sequential(nn.Linear(flat + hidden, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, 1))

    def forward(self, images: Tensor, latents: Tensor) -> Tensor:
        features = torch.cat([self.image_net.forward_features(images).flatten(1), self.latent_net(latents)], 1)
        return self.joint(features).squeeze(1)


class GeneratorEncoder(nn.Module):
    """Both of the discriminator's opponents as one module, so one DDP wrapper reduces their gradients."""

    def __init__(self, generator: nn.Module, encoder: nn.Module, to_latent: nn.Linear):
        super().__init__()
        self.generator, self.encoder, self.to_latent = generator, encoder, to_latent

    def forward(self, z: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.generator(z), self.to_latent(self.encoder(images))


class BiGAN(GAN):
    """A GAN whose discriminator judges (image, latent) pairs; the backbone is the encoder E.

    Options as the GAN's; `loss` is non_saturating or minimax (the gradient penalty is defined
    for image-only critics)."""

    def __init__(self, encoder: nn.Module, latent_dim: int = 100, loss: str = "non_saturating", discriminator_steps: int = 1,
                 generator_width: int = 64, **kwargs):
        if loss == "wgan_gp":
            raise ValueError("loss='wgan_gp' is not supported by bigan; choose 'non_saturating' or 'minimax'")
        super().__init__(encoder, latent_dim=latent_dim, loss=loss, discriminator_steps=discriminator_steps,
                         generator_width=generator_width, **kwargs)

    def build_players(self) -> None:
        self.to_latent = nn.Linear(self.embed_dim, self.latent_dim)  # E(x) = to_latent(backbone(x)), deterministic
        depth = sum(isinstance(m, nn.ConvTranspose2d) for m in self.generator.modules())
        image_net = DCGANDiscriminator(self.in_chans, width=self.generator_width, depth=depth)
        self.discriminator = JointCritic(image_net, self.in_chans, self.image_size, self.latent_dim)
        self.set_players(self.discriminator, GeneratorEncoder(self.generator, self.encoder, self.to_latent))

    def encode(self, images: Tensor) -> Tensor:
        return self.to_latent(self.encoder(images))

    def discriminator_loss(self, real: Tensor, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(x, E(x)) are the real pairs, (G(z), z) the fake ones; generator and encoder held fixed."""
        with torch.no_grad():
            fake = self.to_data_space(self.generator(z))
            codes = self.encode(real)
        real_scores, fake_scores = self._critic_ddp(real, codes), self._critic_ddp(fake, z)
        loss = discriminator_loss(real_scores, fake_scores, self.loss_kind)
        return loss, {"d_real": real_scores.float().mean().detach(), "d_fake": fake_scores.float().mean().detach()}

    def generator_loss(self, z: Tensor, real: Tensor | None = None) -> Tensor:
        """Generator and encoder together, the discriminator frozen: non_saturating swaps the
        labels (fakes called real, reals called fake); minimax is the negated discriminator loss."""
        fake, codes = self._opponent_ddp(z, real)
        real_scores, fake_scores = self.critic(real, codes), self.critic(self.to_data_space(fake), z)
        if self.loss_kind == "non_saturating":
            return discriminator_loss(fake_scores, real_scores, "non_saturating")
        return -discriminator_loss(real_scores, fake_scores, "minimax")

    @torch.no_grad()
    def write_figures(self, directory: Path, step: int, inputs) -> list[Path]:
        """The GAN's grids plus reconstructions G(E(x)) (odd rows: inputs, even rows: G(E(x)))."""
        paths = super().write_figures(directory, step, inputs)
        was_training = self.training
        self.eval()
        try:
            images = inputs[:32]
            pairs = interleave_rows(self.to_unit_range(images), (self.generator(self.encode(images)) + 1) / 2)
        finally:
            self.train(was_training)
        return paths + [save_grid(pairs, directory / f"step_{step:08d}_reconstructions.png", nrow=8)]
