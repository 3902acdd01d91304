"""Generative adversarial networks (Goodfellow et al. 2014) with DCGAN's architecture (Radford et
al. 2016) and the WGAN-GP objective as an option (Gulrajani et al. 2017).

The discriminator is the backbone (`self.encoder`) plus a linear score over its last feature map,
so the eval stage scores discriminator features, as Radford et al. evaluated them; with
`model.backbone: dcgan_discriminator` it follows DCGAN's guidelines (strided convolutions,
LeakyReLU, batch norm), and any timm backbone can stand in. The generator is the DCGAN generator
(`ConvTransposeDecoder`: fractionally strided convolutions, batch norm, ReLU, Tanh output).

One training step is `discriminator_steps` discriminator updates, each on its own slice of the
batch, then one generator update. Both models are wrapped for data-parallel training separately
and have their own optimizer; both optimizers' states travel in checkpoints.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from core.grids import save_grid, slerp
from pretext.base import ImageOnly, PretextTask, build_optimizer
from pretext.heads import ConvTransposeDecoder, feature_maps
from pretext.losses import (
    GAN_LOSSES,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)

log = logging.getLogger("sslpipe.gan")


class Critic(nn.Module):
    """The discriminator as one module: backbone feature map -> flatten -> linear score per image
    (DCGAN's last layer is a convolution over the whole final map, i.e. a linear layer on it)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(feature_maps(self.encoder, images)[-1].flatten(1)).squeeze(1)


class GAN(PretextTask):
    """Discriminator (the backbone + a linear score) against a DCGAN generator, two optimizers.

    Args:
        latent_dim: size of the generator's Gaussian noise z.
        loss: "non_saturating" (default), "minimax" or "wgan_gp".
        discriminator_steps: discriminator (critic) updates per generator update (WGAN-GP uses 5).
        gp_weight: lambda of the gradient penalty (wgan_gp only).
        generator_width: channels of the generator's last block.
    """

    adversarial = True  # no single loss falls as it trains; tests check each player's step instead

    def __init__(self, encoder: nn.Module, latent_dim: int = 100, loss: str = "non_saturating", discriminator_steps: int = 1,
                 gp_weight: float = 10.0, generator_width: int = 64, **kwargs):
        super().__init__(encoder, **kwargs)
        if loss not in GAN_LOSSES:
            raise ValueError(f"loss={loss!r}: choose from {list(GAN_LOSSES)}")
        if discriminator_steps < 1:
            raise ValueError(f"discriminator_steps={discriminator_steps}: must be >= 1")
        if loss == "wgan_gp" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
            log.warning("loss=wgan_gp with a batch-normalized critic: the gradient penalty assumes per-sample outputs; "
                        "use model.backbone_kwargs.norm: layer (dcgan_discriminator) as Gulrajani et al. do")
        self.latent_dim, self.loss_kind, self.discriminator_steps, self.gp_weight = latent_dim, loss, discriminator_steps, gp_weight
        self.generator_width = generator_width
        self.generator = ConvTransposeDecoder(latent_dim, self.in_chans, self.image_size, generator_width, output="tanh")
        # Fixed noise, saved in checkpoints: sample grids over training (and after a resume) show the same z.
        self.register_buffer("fixed_noise", torch.randn(64, latent_dim, generator=torch.Generator().manual_seed(0)))
        mean, std = self.pixel_stats()
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.build_players()

    def build_players(self) -> None:
        """The discriminator: the backbone plus a linear score over its last feature map."""
        was_training = self.encoder.training
        with torch.no_grad():  # the size of the last feature map sets the score layer's width
            last = feature_maps(self.encoder.eval(), torch.zeros(2, self.in_chans, self.image_size, self.image_size))[-1]
        self.encoder.train(was_training)
        self.critic_head = nn.Linear(last[0].numel(), 1)
        self.set_players(Critic(self.encoder, self.critic_head), self.generator)

    def set_players(self, critic: nn.Module, opponent: nn.Module) -> None:
        """The two sides, each one module with its own optimizer and DDP wrapper: the critic, and
        what it is played against (the generator; BiGAN: generator and encoder). Not registered as
        children (their parts already are); the steps call `_critic_ddp`/`_opponent_ddp`, which
        prepare_distributed replaces by the DDP wrappers."""
        for name, module in (("critic", critic), ("_critic_ddp", critic), ("opponent", opponent), ("_opponent_ddp", opponent)):
            object.__setattr__(self, name, module)

    def sample_transform(self) -> ImageOnly:
        return ImageOnly()

    def prepare_distributed(self, wrap) -> None:
        # Two models, two wrappers: each all-reduces its own gradients in its own backward pass.
        object.__setattr__(self, "_critic_ddp", wrap(self.critic))
        object.__setattr__(self, "_opponent_ddp", wrap(self.opponent))

    def make_optimizers(self, cfg, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"discriminator": build_optimizer(self.critic.parameters(), cfg, lr),
                "generator": build_optimizer(self.opponent.parameters(), cfg, lr)}

    def to_data_space(self, tanh_images: Tensor) -> Tensor:
        """Generator output in [-1, 1] to the normalized space real images arrive in (and eval feeds the backbone)."""
        return ((tanh_images + 1) / 2 - self.pixel_mean) / self.pixel_std

    def noise(self, count: int, device: torch.device) -> Tensor:
        return torch.randn(count, self.latent_dim, device=device)

    def discriminator_loss(self, real: Tensor, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on real images and G(z), the generator held fixed."""
        with torch.no_grad():
            fake = self.to_data_space(self.generator(z))
        real_scores, fake_scores = self._critic_ddp(real), self._critic_ddp(fake)
        loss = discriminator_loss(real_scores, fake_scores, self.loss_kind)
        logs = {"d_real": real_scores.float().mean().detach(), "d_fake": fake_scores.float().mean().detach()}
        if self.loss_kind == "wgan_gp":
            # Through the unwrapped critic: DDP supports only .backward(), not torch.autograd.grad
            # inside its forward. The penalty's parameter gradients still accumulate into .grad in
            # the one backward pass, where the wrapper's hooks all-reduce them with the rest.
            penalty = gradient_penalty(self.critic, real, fake)
            loss = loss + self.gp_weight * penalty
            logs["gradient_penalty"] = penalty.detach()
        return loss, logs

    def generator_loss(self, z: Tensor, real: Tensor | None = None) -> Tensor:
        """The generator's loss on D(G(z)), the discriminator held fixed (its gradients are not
        needed: the caller freezes its parameters, and the unwrapped critic is used so its DDP
        wrapper does not expect a reduction)."""
        return generator_loss(self.critic(self.to_data_space(self._opponent_ddp(z))), self.loss_kind)

    def train_step(self, batch, optimizers: dict, scaler: torch.amp.GradScaler, autocast) -> dict[str, Tensor]:
        real, _ = batch
        if len(real) < 2 * self.discriminator_steps:
            raise ValueError(f"a worker's batch of {len(real)} images cannot feed discriminator_steps={self.discriminator_steps} "
                             f"slices of at least 2 (batch norm): raise train.global_batch_size or lower discriminator_steps")
        opt_d, opt_g = optimizers["discriminator"], optimizers["generator"]
        # One slice per discriminator step (tensor_split always gives exactly that many, sizes within 1);
        # scaler.update() follows every step: one optimizer may not step twice between updates.
        for chunk in real.tensor_split(self.discriminator_steps):
            opt_d.zero_grad(set_to_none=True)
            with autocast():
                d_loss, logs = self.discriminator_loss(chunk, self.noise(len(chunk), real.device))
            scaler.scale(d_loss).backward()
            scaler.step(opt_d)
            scaler.update()
        self.critic.requires_grad_(False)
        try:
            opt_g.zero_grad(set_to_none=True)
            with autocast():
                g_loss = self.generator_loss(self.noise(len(chunk), real.device), chunk)  # the last slice
            scaler.scale(g_loss).backward()
            scaler.step(opt_g)
            scaler.update()
        finally:
            self.critic.requires_grad_(True)
        return {"loss": (d_loss + g_loss).detach(), "d_loss": d_loss.detach(), "g_loss": g_loss.detach(), **logs}

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Both players' losses on one batch without updating anything (for inspection)."""
        z = self.noise(len(inputs), inputs.device)
        d_loss, logs = self.discriminator_loss(inputs, z)
        g_loss = self.generator_loss(z, inputs)
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss, **logs}

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """`count` generated images in the decoder's normalized space (generator in eval mode)."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            z = torch.randn(count, self.latent_dim, generator=generator).to(self.fixed_noise.device)
            return self.to_data_space(self.generator(z))
        finally:
            self.generator.train(was_training)

    @torch.no_grad()
    def write_figures(self, directory: Path, step: int, inputs) -> list[Path]:
        """G(fixed noise), the same 64 z at every step, and slerp paths between pairs of them."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            samples = (self.generator(self.fixed_noise) + 1) / 2
            paths = slerp(self.fixed_noise[:8], self.fixed_noise[8:16], 10).flatten(0, 1)
            interpolations = (self.generator(paths) + 1) / 2
        finally:
            self.generator.train(was_training)
        prefix = f"step_{step:08d}"
        return [save_grid(samples, directory / f"{prefix}_fixed_noise_samples.png", nrow=8),
                save_grid(interpolations, directory / f"{prefix}_interpolations.png", nrow=10)]
