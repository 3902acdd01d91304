"""Generative objectives: the VAE's KL and ELBO against their definitions, GAN losses and steps,
the gradient penalty against its formula, PixelCNN's autoregressive masking and exact likelihood,
both optimizers restored on resume, sample grids written, and eval of a generative checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.grids import save_grid, slerp
from core.options import ModelConfig, OptimConfig
from models.backbone import create_backbone
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.loop import autocast_factory, train_worker
from pipeline.train.session import LocalSession
from pretext import create_task
from pretext.likelihoods import (
    discretized_gaussian_log_likelihood,
    from_pixels,
    gaussian_kl,
    to_pixels,
)
from pretext.losses import discriminator_loss, generator_loss, gradient_penalty
from tests.conftest import TINY_BACKBONE, synthetic_images
from tests.test_train import tiny_config

SMALL_DCGAN = {"backbone": "dcgan_discriminator", "backbone_kwargs": {"width": 8, "depth": 2}}
SMALL_PIXELCNN = {"backbone": "pixelcnn", "backbone_kwargs": {"width": 4, "depth": 2}}
MEAN, STD = [0.2], [0.3]


def images(count: int = 16, size: int = 16) -> torch.Tensor:
    """Glyph images normalized like the decoder does ((x / 255 - mean) / std)."""
    pixels, _ = synthetic_images(count, size)
    return from_pixels(torch.from_numpy(pixels).long()[:, None], torch.tensor(MEAN).view(1, 1, 1), torch.tensor(STD).view(1, 1, 1))


def make(name: str, model: dict, in_chans: int = 1, size: int = 16, **options):
    torch.manual_seed(0)
    encoder = create_backbone(ModelConfig(**model), in_chans)
    return create_task(name, encoder=encoder, in_chans=in_chans, image_size=size,
                       data_mean=MEAN * in_chans, data_std=STD * in_chans, **options)


# ---- VAE -------------------------------------------------------------------------------------

def test_gaussian_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64) * 0.5
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((400_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(gaussian_kl(mu, logvar), monte_carlo, atol=0.01), (gaussian_kl(mu, logvar), monte_carlo)


def test_discretized_gaussian_is_a_distribution_over_256_values():
    values = torch.arange(256).view(256, 1)
    for mean, log_scale in ((0.5, math.log(0.1)), (0.0, math.log(0.02)), (1.1, math.log(0.3)), (0.37, math.log(1e-3))):
        log_p = discretized_gaussian_log_likelihood(values, torch.tensor(mean), torch.tensor(log_scale))
        assert torch.isclose(log_p.double().exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-4)
    # An interior bin is the normal CDF difference across it.
    normal = torch.distributions.Normal(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))
    k = 140
    expected = normal.cdf(torch.tensor(k / 255 + 1 / 510, dtype=torch.float64)) - normal.cdf(torch.tensor(k / 255 - 1 / 510, dtype=torch.float64))
    got = discretized_gaussian_log_likelihood(torch.tensor([[k]]), torch.tensor(0.5), torch.tensor(math.log(0.1))).double().exp()
    assert torch.isclose(got, expected, rtol=1e-4)


def test_pixels_round_trip_through_normalization():
    pixels = torch.arange(256).view(1, 1, 16, 16)
    mean, std = torch.tensor(MEAN).view(1, 1, 1), torch.tensor(STD).view(1, 1, 1)
    assert torch.equal(to_pixels(from_pixels(pixels, mean, std), mean, std), pixels)


@pytest.mark.parametrize("likelihood,scale", [("gaussian", "channel"), ("gaussian", "pixel"), ("bernoulli", "channel")])
def test_elbo_is_below_exact_log_likelihood_by_the_posterior_kl(likelihood, scale):
    """A 1-D latent VAE, where log p(x) = log \\int p(x|z) p(z) dz is computed by quadrature: the
    task's own ELBO (its KL, its decoder likelihood) is below it, and the gap is KL(q(z|x) || p(z|x))."""
    task = make("vae", TINY_BACKBONE, size=8, latent_dim=1, likelihood=likelihood, scale=scale, decoder_width=4).eval()
    x = images(2, 8)
    pixels = to_pixels(x, *task.pixel_stats())
    grid = torch.linspace(-8, 8, 8001, dtype=torch.float64)
    dz = float(grid[1] - grid[0])
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(grid)
    with torch.no_grad():
        decoded = task.decoder(grid.float().view(-1, 1))
        mu, logvar = task.encode(x)
    for i in range(len(x)):
        if likelihood == "bernoulli":  # one fixed binarization of the image: the data is then discrete
            bits = torch.bernoulli(pixels[i : i + 1].float() / 255, generator=torch.Generator().manual_seed(i))
            log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(decoded, bits.expand_as(decoded), reduction="none").flatten(1).sum(1)
        else:
            log_lik = task.reconstruction_log_likelihood(decoded, pixels[i : i + 1].expand(len(grid), -1, -1, -1))
        log_joint = log_lik.double() + log_prior
        log_px = torch.logsumexp(log_joint, 0) + math.log(dz)
        q = torch.distributions.Normal(mu[i, 0].double(), torch.exp(0.5 * logvar[i, 0]).double())
        q_density = q.log_prob(grid).exp()
        assert abs(float(q_density.sum() * dz) - 1) < 1e-3  # the grid covers q
        elbo = (q_density * log_lik.double()).sum() * dz - gaussian_kl(mu[i : i + 1], logvar[i : i + 1]).double().squeeze()
        log_posterior = log_joint - log_px
        posterior_kl = (q_density * (q.log_prob(grid) - log_posterior)).sum() * dz
        assert elbo < log_px
        assert torch.isclose(log_px - elbo, posterior_kl, rtol=1e-3, atol=1e-2), (float(log_px - elbo), float(posterior_kl))


def test_vae_reports_elbo_and_bits_per_dim_consistently():
    task = make("vae", TINY_BACKBONE, latent_dim=4)
    x = images(8)
    out = task(x, None)
    dims = 16 * 16
    assert torch.isclose(out["bits_per_dim"], -out["elbo"] / (dims * math.log(2)))
    # beta=1: the loss is the negative ELBO per dimension (up to the sample it was estimated from).
    assert out["loss"].item() > 0
    ll = task.log_likelihood(x)
    assert ll.shape == (8,) and torch.equal(ll, task.log_likelihood(x))  # seeded: eval is reproducible


def test_vae_representation_options_set_the_eval_features():
    x = images(4)
    assert make("vae", TINY_BACKBONE, latent_dim=5, representation="mu").feature_extractor()(x).shape == (4, 5)
    both = make("vae", TINY_BACKBONE, latent_dim=5, representation="both")
    assert both.feature_extractor()(x).shape == (4, both.embed_dim + 5)
    pooled = make("vae", TINY_BACKBONE, latent_dim=5)
    assert pooled.feature_extractor() is pooled.encoder


# ---- GAN -------------------------------------------------------------------------------------

def test_gan_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sigmoid = torch.sigmoid
    expected_d = -(torch.log(sigmoid(real)).mean() + torch.log(1 - sigmoid(fake)).mean())
    assert torch.isclose(discriminator_loss(real, fake, "non_saturating"), expected_d)
    assert torch.isclose(discriminator_loss(real, fake, "minimax"), expected_d)
    assert torch.isclose(generator_loss(fake, "non_saturating"), -torch.log(sigmoid(fake)).mean())
    assert torch.isclose(generator_loss(fake, "minimax"), torch.log(1 - sigmoid(fake)).mean())
    assert torch.isclose(discriminator_loss(real, fake, "wgan_gp"), fake.mean() - real.mean())
    assert torch.isclose(generator_loss(fake, "wgan_gp"), -fake.mean())


def test_gradient_penalty_matches_its_formula():
    torch.manual_seed(0)
    real, fake = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    eps = torch.rand(5, 1, 1, 1)
    x_hat = eps * real + (1 - eps) * fake
    # Critic 0.5 ||x||^2: its gradient at x_hat is x_hat itself.
    penalty = gradient_penalty(lambda x: 0.5 * x.pow(2).flatten(1).sum(1), real, fake, eps)
    assert torch.isclose(penalty, (x_hat.flatten(1).norm(dim=1) - 1).pow(2).mean(), rtol=1e-5)
    # Linear critic w.x: the gradient is w everywhere; the penalty trains w towards norm 1.
    w = torch.randn(16, requires_grad=True)
    penalty = gradient_penalty(lambda x: x.flatten(1) @ w, real, fake, eps)
    assert torch.isclose(penalty, (w.norm() - 1).pow(2))
    penalty.backward()
    assert torch.allclose(w.grad, 2 * (w.norm() - 1) * w / w.norm())


def parameters(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


ADVERSARIAL = [("gan", "non_saturating"), ("gan", "minimax"), ("gan", "wgan_gp"), ("bigan", "non_saturating"), ("bigan", "minimax")]


def make_adversarial(name: str, loss: str, **options):
    """A GAN on the small DCGAN discriminator; a BiGAN whose backbone (its encoder) is the tiny ResNet."""
    return make(name, SMALL_DCGAN if name == "gan" else TINY_BACKBONE, loss=loss, latent_dim=8, generator_width=8, **options)


@pytest.mark.parametrize("name,loss", ADVERSARIAL)
def test_discriminator_step_lowers_its_loss_with_the_generator_fixed(name, loss):
    task = make_adversarial(name, loss)
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0, betas=[0.5, 0.999]), lr=1e-3)
    real, z = images(16), torch.randn(16, 8)
    generator_before = parameters(task.generator) + parameters(task.encoder if name == "bigan" else task.generator)
    torch.manual_seed(1)
    before, _ = task.discriminator_loss(real, z)
    optimizers["discriminator"].zero_grad()
    before.backward()
    optimizers["discriminator"].step()
    torch.manual_seed(1)  # the same interpolation points for the gradient penalty
    after, _ = task.discriminator_loss(real, z)
    assert after < before, (float(before), float(after))
    opponents = [*task.generator.parameters(), *(task.encoder if name == "bigan" else task.generator).parameters()]
    assert all(torch.equal(a, b) for a, b in zip(generator_before, opponents))


@pytest.mark.parametrize("name,loss", ADVERSARIAL)
def test_generator_step_lowers_its_loss_with_the_discriminator_fixed(name, loss):
    task = make_adversarial(name, loss)
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0, betas=[0.5, 0.999]), lr=1e-3)
    task.critic.eval()  # fixed: no batch statistics from the fake batch either
    task.encoder.eval()  # BiGAN: the encoder is a player here; eval mode keeps the loss a function of the weights alone
    z, real = torch.randn(16, 8), images(16)
    critic_before = parameters(task.critic)
    before = task.generator_loss(z, real)
    optimizers["generator"].zero_grad()
    before.backward()
    optimizers["generator"].step()
    after = task.generator_loss(z, real)
    assert after < before, (float(before), float(after))
    # The discriminator's optimizer never ran: its parameters are untouched.
    assert all(torch.equal(a, b) for a, b in zip(critic_before, task.critic.parameters()))


def test_gan_train_step_updates_both_players_and_discriminator_steps_split_the_batch():
    task = make("gan", SMALL_DCGAN, loss="wgan_gp", discriminator_steps=4, latent_dim=8, generator_width=8)
    optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0), lr=1e-3)
    autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
    critic_before, generator_before = parameters(task.critic), parameters(task.generator)
    out = task.train_step((images(16), None), optimizers, scaler, autocast)
    assert {"loss", "d_loss", "g_loss", "d_real", "d_fake", "gradient_penalty"} <= set(out)
    assert optimizers["discriminator"].state_dict()["state"][0]["step"] == 4
    assert optimizers["generator"].state_dict()["state"][0]["step"] == 1
    unchanged = [name for (name, p), before in zip(task.critic.named_parameters(), critic_before) if torch.equal(p, before)]
    assert unchanged == ["head.bias"]  # a constant added to every score cancels out of the Wasserstein loss
    assert not any(torch.equal(a, b) for a, b in zip(generator_before, task.generator.parameters()))
    assert all(p.requires_grad for p in task.critic.parameters())  # unfrozen after the generator step


def test_generated_images_live_in_the_data_space_real_images_do():
    task = make("gan", SMALL_DCGAN, latent_dim=8, generator_width=8)
    samples = task.sample(8)
    pixels01 = samples * task.pixel_std + task.pixel_mean
    assert samples.shape == (8, 1, 16, 16) and pixels01.min() >= -1e-6 and pixels01.max() <= 1 + 1e-6


def test_slerp_keeps_the_ends_and_the_norm_between_equal_norm_vectors():
    a, b = torch.nn.functional.normalize(torch.randn(3, 10), dim=1) * 3, torch.nn.functional.normalize(torch.randn(3, 10), dim=1) * 3
    path = slerp(a, b, 7)
    assert torch.allclose(path[:, 0], a, atol=1e-5) and torch.allclose(path[:, -1], b, atol=1e-5)
    assert torch.allclose(path.norm(dim=-1), torch.full((3, 7), 3.0), atol=1e-4)


# ---- PixelCNN --------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_pixelcnn_logits_depend_only_on_earlier_subpixels(channels):
    torch.manual_seed(0)
    net = create_backbone(ModelConfig(**SMALL_PIXELCNN), channels).eval()
    size = 6
    for c, i, j in [(0, 0, 0), (0, 2, 3), (channels - 1, 3, 1), (channels - 1, 5, 5)]:
        x = torch.randn(1, channels, size, size, requires_grad=True)
        net.logits(x)[0, c, :, i, j].sum().backward()
        depends = x.grad[0].abs() > 0
        order = torch.arange(size * size).view(size, size)
        position = int(order[i, j])
        for cc in range(channels):
            earlier = (order < position) | ((order == position) & torch.tensor(cc < c))
            assert not depends[cc][~earlier].any(), f"logits of ({c},{i},{j}) see channel {cc} at or after themselves"
        if position > 0:
            assert depends.any()


def test_pixelcnn_rows_up_to_i_give_row_i_exactly():
    """What sampling relies on to run the network on the rows generated so far only."""
    net = create_backbone(ModelConfig(**SMALL_PIXELCNN), 1).eval()
    x = torch.randn(2, 1, 7, 7)
    with torch.no_grad():
        full = net.logits(x)
        for i in (0, 3, 6):
            assert torch.allclose(net.logits(x[:, :, : i + 1])[:, :, :, i], full[:, :, :, i], atol=1e-5)


def test_pixelcnn_with_uniform_logits_has_exactly_eight_bits_per_dim():
    task = make("pixelcnn", SMALL_PIXELCNN)
    last = task.encoder.output[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    out = task(images(4), None)
    assert torch.isclose(out["bits_per_dim"], torch.tensor(8.0))
    assert torch.allclose(task.log_likelihood(images(4)), torch.full((4,), -256 * math.log(256)))


def test_pixelcnn_samples_follow_its_conditionals():
    """With every logit zero but value 200's, each sampled sub-pixel must be 200."""
    task = make("pixelcnn", SMALL_PIXELCNN, size=6)
    last = task.encoder.output[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.zero_()
        last.bias[200] = 50.0
    samples = task.sample(3, torch.Generator().manual_seed(0))
    assert torch.equal(to_pixels(samples, *task.pixel_stats()), torch.full((3, 1, 6, 6), 200))


def test_pixelcnn_refuses_another_backbone():
    with pytest.raises(ValueError, match="model.backbone: pixelcnn"):
        make("pixelcnn", TINY_BACKBONE)


# ---- Training loop: two optimizers, resume, grids; eval --------------------------------------

def gan_config(shards: Path, run_dir: Path, steps: int):
    cfg = tiny_config(shards, run_dir, train__steps=steps, train__checkpoint_every=2, train__log_every=1)
    cfg.model = ModelConfig(**SMALL_DCGAN)
    cfg.task.name, cfg.task.options = "gan", {"latent_dim": 8, "generator_width": 8, "loss": "wgan_gp", "discriminator_steps": 2}
    return cfg


def test_resume_restores_both_optimizers_and_grids_are_written(shards, tmp_path):
    cfg = gan_config(shards, tmp_path / "run", steps=2)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    first = load_checkpoint(cfg.run_dir)
    assert set(first["optimizers"]) == {"discriminator", "generator"}
    assert first["optimizers"]["discriminator"]["state"][0]["step"] == 4 and first["optimizers"]["generator"]["state"][0]["step"] == 2

    train_worker(gan_config(shards, tmp_path / "run", steps=3), LocalSession(cfg.run_dir, device="cpu"))
    final = load_checkpoint(cfg.run_dir)
    # Adam's step counts went on from the checkpoint (a fresh optimizer would be at 2 and 1).
    assert final["optimizers"]["discriminator"]["state"][0]["step"] == 6
    assert final["optimizers"]["generator"]["state"][0]["step"] == 3
    assert final["schedulers"]["generator"]["last_epoch"] == 3 and final["schedulers"]["discriminator"]["last_epoch"] == 3
    assert torch.equal(final["task"]["fixed_noise"], first["task"]["fixed_noise"])

    samples = Path(cfg.run_dir) / "samples"
    names = sorted(p.name for p in samples.iterdir())
    assert names == [f"step_0000000{s}_{kind}.png" for s in (2, 3) for kind in ("fixed_noise_samples", "interpolations")]
    with Image.open(samples / "step_00000003_fixed_noise_samples.png") as grid:
        assert grid.size == (8 * (32 + 2) + 2,) * 2  # 8 x 8 images of 16 px shown at 2x, 2 px padding


def test_save_grid_lays_images_out_in_rows(tmp_path):
    image = torch.zeros(3, 1, 4, 4)
    image[1] = 1.0
    path = save_grid(image, tmp_path / "grid.png", nrow=3, scale=1)
    with Image.open(path) as grid:
        assert grid.size == (3 * 6 + 2, 6 + 2)  # 2 px padding around and between
        assert grid.getpixel((2 + 6 + 1, 3)) == (255, 255, 255) and grid.getpixel((3, 3)) == (0, 0, 0)


def test_eval_of_a_vae_checkpoint_reports_test_elbo_and_writes_samples(shards, tmp_path):
    from eval.evaluate import evaluate

    cfg = tiny_config(shards, tmp_path / "run", train__steps=4, train__checkpoint_every=4)
    cfg.task.name, cfg.task.options = "vae", {"latent_dim": 6, "representation": "mu", "decoder_width": 8}
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    assert len(list((Path(cfg.run_dir) / "samples").glob("step_00000004_*.png"))) == 3
    results = evaluate(cfg.run_dir, device="cpu", baselines=[])
    generative = results["generative"]
    assert generative["kind"] == "elbo" and generative["images"] == 48
    assert generative["bits_per_dim"] == pytest.approx(-generative["nats_per_image"] / (256 * math.log(2)), rel=1e-3)
    assert results["rows"]["pretrained"]["dim"] == 6  # the posterior mean, as configured
    assert Path(results["samples"]).is_file()
    assert "bits/dim" in (Path(cfg.run_dir) / "eval" / "results.md").read_text()


def _gan_ddp_worker(rank: int, world: int, init_file: str, out_dir: str, name: str, loss: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        task = make_adversarial(name, loss, discriminator_steps=2)
        # Each rank a different init, data and noise: DDP must broadcast rank 0's weights and
        # average every player's gradients for the replicas to stay identical.
        torch.manual_seed(100 + rank)
        for p in task.parameters():
            p.data.add_(torch.randn_like(p) * 0.01)
        task.prepare_distributed(DistributedDataParallel)
        start = {n: p.detach().clone() for n, p in task.named_parameters()}
        optimizers = task.make_optimizers(OptimConfig(name="adamw", weight_decay=0.0, betas=[0.5, 0.999]), lr=1e-3)
        autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
        real = images(16) + 0.1 * torch.randn(16, 1, 16, 16)
        for _ in range(3):
            task.train_step((real, None), optimizers, scaler, autocast)
        torch.save({"start": start, "end": {n: p.detach() for n, p in task.named_parameters()}}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,loss", [("gan", "non_saturating"), ("gan", "wgan_gp"), ("bigan", "non_saturating")])
def test_every_player_stays_identical_across_ddp_workers(tmp_path, name, loss):
    import torch.multiprocessing as mp

    mp.spawn(_gan_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), name, loss), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for param, value in ranks[0]["end"].items():
        assert torch.equal(ranks[0]["start"][param], ranks[1]["start"][param]), f"{param}: rank 0's weights were not broadcast"
        assert torch.equal(value, ranks[1]["end"][param]), f"{param}: replicas diverged"
    # Every player trained (a constant added to all WGAN scores cancels from its loss: head.bias stays).
    still = sorted(p for p, v in ranks[0]["end"].items() if torch.equal(v, ranks[0]["start"][p]))
    assert still == (["critic_head.bias"] if loss == "wgan_gp" else []), still


@pytest.mark.ray
def test_wgan_gp_under_ray_two_workers_resumes_both_optimizers(shards, tmp_path, ray_local):
    """The real launch path: two Ray Train workers, each player in its own DDP wrapper, the
    gradient penalty's double backward through DDP, then a resume from the Ray checkpoint."""
    from pipeline.train.launch import pretrain

    cfg = gan_config(shards, tmp_path / "run", steps=4)
    cfg.scaling.num_workers = 2
    run_dir = pretrain(cfg)
    first = load_checkpoint(run_dir)
    assert first["optimizers"]["discriminator"]["state"][0]["step"] == 8 and first["optimizers"]["generator"]["state"][0]["step"] == 4
    pretrain(_with_steps(run_dir, 6), resume=run_dir)
    final = load_checkpoint(run_dir)
    assert final["step"] == 6
    assert final["optimizers"]["discriminator"]["state"][0]["step"] == 12 and final["optimizers"]["generator"]["state"][0]["step"] == 6
    assert (run_dir / "samples" / "step_00000006_fixed_noise_samples.png").is_file()


def _with_steps(run_dir: Path, steps: int):
    from pipeline.config import Config

    return Config.load(run_dir / "config.yaml", [f"train.steps={steps}"])


def test_interleave_rows_puts_each_reconstruction_row_under_its_originals():
    from core.grids import interleave_rows

    originals, recon = torch.arange(16.0).view(16, 1, 1, 1), -torch.arange(16.0).view(16, 1, 1, 1)
    grid = interleave_rows(originals, recon).flatten().tolist()
    assert grid == [*range(8), *[-i for i in range(8)], *range(8, 16), *[-i for i in range(8, 16)]]
    assert interleave_rows(originals[:3], recon[:3]).flatten().tolist() == [0, 1, 2, 0, -1, -2]


def test_exported_dcgan_discriminator_loads_back_through_timm_with_the_usage_file(shards, tmp_path):
    """`sslpipe export` writes backbone.json; timm.create_model with those arguments must load the
    weights for sslpipe's own registered networks too (they have no published weights)."""
    import json

    import timm

    from eval.export import export_backbone

    cfg = gan_config(shards, tmp_path / "run", steps=2)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    export_backbone(cfg.run_dir, tmp_path / "export")
    usage = json.loads((tmp_path / "export" / "backbone.json").read_text())
    model = timm.create_model(usage["model_name"], **usage["create_model_kwargs"], pretrained_cfg_overlay=usage["pretrained_cfg_overlay"])
    state = load_checkpoint(cfg.run_dir)["task"]
    assert torch.equal(model.stages[0][0].weight, state["encoder.stages.0.0.weight"])
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("dcgan_discriminator", pretrained=True)
