"""Masked autoencoder (He, Chen, Xie, Li, Dollár & Girshick, "Masked Autoencoders Are Scalable
Vision Learners", CVPR 2022): a ViT encoder sees a random 25% of the image's patches, a light
transformer decoder fills in the pixels of the rest."""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from core.grids import Panel, save_panels
from pretext.base import PretextTask

POS_EMBEDS = ("sincos", "learned")
MASK_COLOUR = (0.35, 0.55, 0.85)  # how hidden patches are drawn: blue, unlike any gray level of the data
FIGURE_SEED = 0  # masks of the figures: the same patches hidden at every step, so figures compare


def patchify(images: Tensor, patch: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, N, ph * pw * C) in timm's PatchEmbed token order (rows of patches,
    raster order), each patch's pixels row-major with channels last (MAE's `patchify`)."""
    b, c, h, w = images.shape
    ph, pw = patch
    x = images.reshape(b, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(patches: Tensor, patch: tuple[int, int], grid: tuple[int, int], channels: int) -> Tensor:
    """The inverse of `patchify`: (B, N, ph * pw * C) -> (B, C, H, W)."""
    (ph, pw), (gh, gw) = patch, grid
    x = patches.reshape(patches.shape[0], gh, gw, ph, pw, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(patches.shape[0], channels, gh * ph, gw * pw)


def kept_count(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: MAE's int(N * (1 - ratio)), with a tolerance so that float error
    (1 - 0.9 = 0.0999...) does not drop one."""
    return int(num_patches * (1 - mask_ratio) + 1e-6)


def random_masking(noise: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by sorting noise (MAE): the `keep` patches with the smallest
    noise stay visible.

    Args:
        noise: (B, N) one random number per patch.
        keep: visible patches per sample.

    Returns:
        keep_ids (B, keep): indices of the visible patches; mask (B, N): 1 where masked;
        restore_ids (B, N): the permutation that puts [visible, masked] back in patch order.
    """
    shuffle = noise.argsort(dim=1)  # (B, N) ascending: visible first
    restore = shuffle.argsort(dim=1)  # (B, N)
    mask = torch.ones_like(noise)
    mask[:, :keep] = 0
    return shuffle[:, :keep], torch.gather(mask, 1, restore), restore


def sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """(gh * gw, dim) fixed 2-D sine-cosine position codes (MAE's `get_2d_sincos_pos_embed`): half
    the channels encode the row, half the column, each as sines and cosines of 10000^-k frequencies."""
    if dim % 4:
        raise ValueError(f"sin-cos position codes need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    angles = [pos.flatten()[:, None] * omega[None] for pos in (rows, cols)]  # 2 x (N, dim/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch's pixels to zero mean and unit variance (MAE's norm_pix_loss; unbiased variance, as MAE)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean squared error over the masked patches only.

    Args:
        pred: (B, N, P) predicted pixels of every patch.
        target: (B, N, P) the image's patches (`patchify`).
        mask: (B, N), 1 where the patch was hidden from the encoder.
        norm_pix: compare with per-patch normalized pixels (MAE's default: sharper features).
    """
    if norm_pix:
        target = normalize_patches(target)
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """Embeds the encoder's tokens, puts a shared learned mask token at every hidden patch, adds
    fixed 2-D sin-cos positions (MAE; zeros for the encoder's class/register tokens) and predicts
    each patch's pixels with a few transformer blocks."""

    def __init__(self, encoder_dim: int, grid: tuple[int, int], num_prefix: int, patch_pixels: int, dim: int = 128,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder_dim={dim} must be divisible by decoder_heads={heads}")
        self.num_prefix = num_prefix
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        positions = torch.cat([torch.zeros(num_prefix, dim), sincos_2d(grid, dim)])[None]  # (1, prefix + N, dim)
        self.register_buffer("pos_embed", positions, persistent=False)  # fixed: rebuilt, not checkpointed
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        # MAE's initialization: xavier-uniform linear layers, small normal mask token.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, restore: Tensor) -> Tensor:
        """(B, prefix + K, D) encoder tokens and (B, N) restore ids -> (B, N, patch_pixels)."""
        x = self.embed(latent)  # (B, prefix + K, dim)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, n = restore.shape
        tokens = torch.cat([visible, self.mask_token.expand(b, n - visible.shape[1], -1)], dim=1)  # (B, N, dim) shuffled
        tokens = torch.gather(tokens, 1, restore[..., None].expand(-1, -1, tokens.shape[-1]))  # patch order
        x = self.norm(self.blocks(torch.cat([prefix, tokens], dim=1) + self.pos_embed))
        return self.pred(x[:, self.num_prefix :])  # the prefix tokens predict nothing


class CropFlip:
    """Per-sample transform: MAE's only augmentation, a random resized crop and horizontal flip."""

    def __init__(self, size: int, crop_scale: tuple[float, float]):
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={list(crop_scale)}: need 0 < low <= high <= 1")
        self.augment = T.Compose([T.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True), T.RandomHorizontalFlip()])

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        return self.augment(sample["image"]), torch.zeros((), dtype=torch.long)  # the image is its own target


class MAE(PretextTask):
    """Masked autoencoder on a timm VisionTransformer backbone (`self.encoder`).

    Training runs the encoder on the visible patches only: patch embedding and positions (timm's
    `_pos_embed`, which also prepends the class/register tokens), per-sample random masking, then
    the encoder's own blocks and final norm, so every encoder parameter the eval stage uses is
    trained (with `global_pool: avg`, timm moves the final norm to `fc_norm`, applied here to
    each token as MAE's pretraining norm). The eval stage runs `self.encoder` as a plain timm
    model on whole images: its pooled output (class token by default, as MAE's linear probe).

    Args:
        mask_ratio: fraction of the patches hidden from the encoder (MAE: 0.75).
        norm_pix_loss: regress per-patch normalized pixels (MAE's default) instead of raw ones.
        decoder_dim: width of the decoder (MAE: 512; much smaller suits small images on CPU).
        decoder_depth: transformer blocks of the decoder (MAE: 8; 1-2 keep it light).
        decoder_heads: attention heads of the decoder.
        encoder_pos_embed: "sincos" replaces the ViT's learned positions with fixed 2-D sin-cos
            codes, frozen (MAE); "learned" keeps timm's trained ones.
        crop_scale: area range of the random resized crop (MAE: 0.2-1).
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.75, norm_pix_loss: bool = True, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, encoder_pos_embed: str = "sincos",
                 crop_scale: list[float] = (0.2, 1.0), **kwargs):
        super().__init__(encoder, **kwargs)
        if not isinstance(encoder, VisionTransformer):
            raise ValueError(f"model.backbone: MAE masks the patch tokens of a timm VisionTransformer (e.g. vit_tiny_patch16_224 "
                             f"with backbone_kwargs img_size and patch_size), got {type(encoder).__name__}")
        if encoder.attn_pool is not None:
            raise ValueError(f"model.backbone_kwargs.global_pool={encoder.global_pool!r}: its attention-pool head would never "
                             "be trained by MAE; use 'token' or 'avg'")
        if encoder.patch_embed.img_size != (self.image_size, self.image_size):
            raise ValueError(f"model.backbone_kwargs.img_size: the ViT takes {encoder.patch_embed.img_size} images, "
                             f"the data are {self.image_size}px; set img_size: {self.image_size}")
        if encoder_pos_embed not in POS_EMBEDS:
            raise ValueError(f"encoder_pos_embed={encoder_pos_embed!r}: choose from {list(POS_EMBEDS)}")
        self.patch = tuple(encoder.patch_embed.patch_size)
        self.grid = tuple(encoder.patch_embed.grid_size)
        num_patches = self.grid[0] * self.grid[1]
        self.keep = kept_count(num_patches, mask_ratio)
        if not 0 < mask_ratio < 1 or not 0 < self.keep < num_patches:
            raise ValueError(f"mask_ratio={mask_ratio} must leave at least one of the {num_patches} patches visible and mask one")
        self.mask_ratio, self.norm_pix_loss, self.crop_scale = mask_ratio, norm_pix_loss, tuple(crop_scale)
        if encoder_pos_embed == "sincos" and encoder.pos_embed is not None:
            with torch.no_grad():
                encoder.pos_embed.zero_()  # class/register tokens: no position
                encoder.pos_embed[0, -num_patches:] = sincos_2d(self.grid, encoder.embed_dim)
            encoder.pos_embed.requires_grad_(False)
        self.decoder = MAEDecoder(encoder.embed_dim, self.grid, encoder.num_prefix_tokens, self.patch[0] * self.patch[1] * self.in_chans,
                                  decoder_dim, decoder_depth, decoder_heads)

    def sample_transform(self) -> CropFlip:
        return CropFlip(self.image_size, self.crop_scale)

    def encode_visible(self, images: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Runs the encoder on a random `1 - mask_ratio` of each image's patches.

        Args:
            images: (B, C, H, W).
            noise: (B, N) fixes the mask (the lowest-noise patches stay visible); random if None.

        Returns:
            latent (B, prefix + K, D) normalized tokens; mask (B, N), 1 where hidden; restore ids (B, N).
        """
        enc, prefix = self.encoder, self.encoder.num_prefix_tokens
        x = enc._pos_embed(enc.patch_embed(images))  # (B, prefix + N, D): positions added, class token first
        patches = x[:, prefix:]  # (B, N, D)
        if noise is None:
            noise = torch.rand(patches.shape[:2], device=images.device)
        keep_ids, mask, restore = random_masking(noise, self.keep)
        visible = torch.gather(patches, 1, keep_ids[..., None].expand(-1, -1, patches.shape[-1]))  # (B, K, D)
        # timm's patch_drop is skipped: the masking above takes its place.
        x = enc.blocks(enc.norm_pre(torch.cat([x[:, :prefix], visible], dim=1)))
        return enc.fc_norm(enc.norm(x)), mask, restore  # one of norm / fc_norm is timm's Identity

    def predict(self, images: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, N, ph * pw * C) predicted pixels of every patch (float32), and the (B, N) mask."""
        latent, mask, restore = self.encode_visible(images, noise)
        return self.decoder(latent, restore).float(), mask

    def forward(self, inputs: Tensor, target: Tensor, noise: Tensor | None = None) -> dict[str, Tensor]:
        """The loss on (B, C, H, W) `inputs` (their own target; `target` is the transform's dummy);
        `noise` (B, N) fixes the mask, as in `encode_visible`."""
        pred, mask = self.predict(inputs, noise)
        return {"loss": mae_loss(pred, patchify(inputs.float(), self.patch), mask, self.norm_pix_loss)}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) 0/1 mask of the hidden pixels and the reconstruction with the visible
        patches pasted in (MAE's figures), in the decoder's normalized space. With norm_pix_loss
        the predictions are per-patch normalized: they are drawn with each hidden patch's true mean
        and variance, so the picture shows the predicted structure, not the predicted brightness."""
        noise = torch.rand(images.shape[0], self.grid[0] * self.grid[1], generator=generator).to(images.device)
        pred, mask = self.predict(images, noise)
        target = patchify(images.float(), self.patch)
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        hidden = mask[..., None].expand_as(target)  # (B, N, P)
        pasted = torch.where(hidden.bool(), pred, target)
        return (unpatchify(hidden, self.patch, self.grid, self.in_chans),
                unpatchify(pasted, self.patch, self.grid, self.in_chans))

    def reconstruction_panels(self, images: Tensor, generator: torch.Generator | None = None) -> list[list[Panel]]:
        """Per image: the input, the input with its hidden patches blue (RGB), and the reconstruction."""
        was_training = self.training
        self.eval()
        try:
            hidden, pasted = self.reconstruct(images, generator)
        finally:
            self.train(was_training)
        shown = self.to_unit_range(images)
        colour = torch.tensor(MASK_COLOUR, device=images.device).view(1, 3, 1, 1)
        masked = shown.expand(-1, 3, -1, -1) * (1 - hidden[:, :1]) + colour * hidden[:, :1]  # (B, 3, H, W)
        return [[Panel(a, "input"), Panel(b, f"masked {self.mask_ratio:.0%}"), Panel(c, "reconstruction")]
                for a, b, c in zip(shown, masked, self.to_unit_range(pasted))]

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        transform = self.sample_transform()
        device = next(self.parameters()).device
        images = torch.stack([transform(s)[0] for s in samples]).to(device)
        return self.reconstruction_panels(images, torch.Generator().manual_seed(FIGURE_SEED))

    def write_figures(self, directory: Path, step: int, inputs) -> list[Path]:
        """The first 8 training inputs of the step, masked and reconstructed (the same masks at every step)."""
        panels = self.reconstruction_panels(inputs[:8], torch.Generator().manual_seed(FIGURE_SEED))
        return [save_panels(panels, directory / f"step_{step:08d}_reconstructions.png", columns=9)]
