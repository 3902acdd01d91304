"""Colorization (Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016): from the lightness
of an RGB image, predict its colour as a distribution over quantized CIE Lab ab bins.

The backbone sees one grayscale channel (luma as PIL's `convert("L")` computes it, so the eval stage,
which decodes with PIL, feeds the same signal); a dense decoder on its last feature maps predicts, per
output pixel, the ab bin of the image (soft-encoded, class-rebalanced cross-entropy) or, as an option,
the ab values themselves (L2 regression).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from core.grids import Panel
from pretext.base import PretextTask
from pretext.heads import feature_maps

# ITU-R 601 luma weights, as PIL's convert("L") uses them; PIL computes them in 16-bit fixed point.
LUMA = (0.299, 0.587, 0.114)
LUMA_FIXED = (19595, 38470, 7471)  # round(LUMA * 2**16); they sum to 2**16

# sRGB (D65) linear RGB -> XYZ, and the D65 reference white.
RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
              (0.2126729, 0.7151522, 0.0721750),
              (0.0193339, 0.1191920, 0.9503041))
WHITE_D65 = (0.95047, 1.0, 1.08883)
AB_SCALE = 110.0  # |a|, |b| of sRGB colours stay below 110: regression targets are ab / 110
LEVELS = 3  # backbone feature maps the decoder fuses
NEIGHBOURS, SIGMA = 5, 5.0  # soft-encoding and prior smoothing of Zhang et al.
ANNEALED_T = 0.38  # Zhang et al.'s temperature for turning predicted bin distributions into colours


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """CIE Lab (D65) of sRGB values in [0, 1], channels at dim -3: (..., 3, H, W) -> (..., 3, H, W),
    L in [0, 100]."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix, linear) / white
    delta = 6 / 29
    # Cube root above the CIE threshold, its linear continuation below (xyz >= 0 for in-range RGB).
    f = torch.where(xyz > delta**3, xyz ** (1 / 3), xyz / (3 * delta**2) + 4 / 29)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """sRGB values in [0, 1] of CIE Lab (D65), channels at dim -3: the inverse of `rgb_to_lab`,
    clipped where the colour lies outside the sRGB gamut."""
    L, a, b = lab.unbind(-3)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=-3)
    delta = 6 / 29
    white = torch.tensor(WHITE_D65, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    xyz = torch.where(f > delta, f**3, 3 * delta**2 * (f - 4 / 29)) * white
    matrix = torch.linalg.inv(torch.tensor(RGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    linear = torch.einsum("ij,...jhw->...ihw", matrix, xyz).clamp(0, 1)
    return torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055).clamp(0, 1)


def gray_stats(mean: list[float], std: list[float]) -> tuple[float, float]:
    """Normalization of the luma channel derived from the RGB data's: the luma-weighted mean, and
    the luma-weighted std (an upper bound of the true one; it only has to match between training and eval)."""
    return sum(w * m for w, m in zip(LUMA, mean)), sum(w * s for w, s in zip(LUMA, std))


@functools.lru_cache(maxsize=4)
def in_gamut_bins(grid_size: int) -> Tensor:
    """(Q, 2) centres of the ab grid cells (spacing `grid_size`) that some 8-bit sRGB colour falls into
    (grid 10: 261 bins; Zhang et al. report 313 from their own gamut estimate). Every data pixel's ab
    lies in the cell of a bin; cells on the gamut's edge may have their centre just outside it.

    Lab is a continuous one-to-one image of the RGB cube, so the gamut's ab projection is that of its
    surface: the 6 faces of the 8-bit cube (393k colours) give the same cells as all 16.7M colours.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255
    u, v = torch.meshgrid(levels, levels, indexing="ij")
    faces = []
    for axis in range(3):
        for value in (0.0, 1.0):
            planes = [u, v]
            planes.insert(axis, torch.full_like(u, value))
            faces.append(torch.stack(planes))  # (3, 256, 256): the face where channel `axis` is `value`
    ab = rgb_to_lab(torch.cat(faces, dim=1))[1:].flatten(1)  # (2, N)
    cells = torch.unique(torch.round(ab / grid_size).long(), dim=1)
    return (cells.T * grid_size).float()


def soft_encode(ab: Tensor, centres: Tensor, neighbours: int = NEIGHBOURS, sigma: float = SIGMA) -> tuple[Tensor, Tensor]:
    """Zhang's soft-encoding of (N, 2) ab values: the indices (N, k) of the k nearest bin centres,
    nearest first, and their Gaussian weights (N, k), summing to 1 per row."""
    dist2, index = torch.cdist(ab, centres).square().topk(neighbours, dim=1, largest=False)
    return index, torch.softmax(-dist2 / (2 * sigma**2), dim=1)


def rebalance_weights(prior: Tensor, lam: float) -> Tensor:
    """Per-bin loss weights w ∝ ((1 - λ) p + λ / Q)^-1, scaled so that E_p[w] = 1: rare colours
    weigh more, so the loss is not dominated by the desaturated ab values most pixels have."""
    weights = 1.0 / ((1 - lam) * prior + lam / prior.numel())
    return weights / (prior * weights).sum()


def conv_block(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))


class DenseDecoder(nn.Module):
    """Fuses feature maps (FPN-like: 1x1 projections summed at the finest resolution), then a conv
    block, a 2x upsampling with another conv block and a 1x1 projection to `out_chans`."""

    def __init__(self, in_dims: list[int], width: int, out_chans: int):
        super().__init__()
        # No bias: the sum goes straight into a conv + BatchNorm, which makes one redundant.
        self.lateral = nn.ModuleList(nn.Conv2d(dim, width, 1, bias=False) for dim in in_dims)
        self.fuse = conv_block(width, width)
        self.refine = conv_block(width, width)
        self.out = nn.Conv2d(width, out_chans, 1)

    def forward(self, maps: list[Tensor]) -> Tensor:
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        x = sum(F.interpolate(proj(m), size=size, mode="bilinear", align_corners=False) for proj, m in zip(self.lateral, maps))
        x = F.interpolate(self.fuse(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(self.refine(x))


class ColorizationTransform:
    """Per-sample transform: (normalized luma (1, H, W), ab of the image in CIE Lab (2, H, W)).

    A plain class holding only the normalization statistics, so loader workers receive no weights.
    """

    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = list(mean), list(std)
        self.gray_mean, self.gray_std = gray_stats(mean, std)

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        image = sample["image"]  # (3, H, W), (pixels / 255 - mean) / std
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        # Back to the decoder's 8-bit values, so the luma below is bit-identical to PIL's.
        rgb8 = (image * std + mean).clamp(0, 1).mul(255).round()
        weights = torch.tensor(LUMA_FIXED, dtype=torch.int64).view(3, 1, 1)
        luma = ((rgb8.long() * weights).sum(0, keepdim=True) + 2**15) >> 16  # PIL's rounding
        gray = (luma.float() / 255 - self.gray_mean) / self.gray_std
        ab = rgb_to_lab(rgb8 / 255)[1:]
        return gray, ab.float()


class Colorization(PretextTask):
    """Predicts the colour (ab of CIE Lab) of an image from its grayscale version, densely, with a
    decoder on the backbone's last three feature maps; predictions are at twice the resolution of
    the finest of them (a quarter of the image size for ResNets) and the target is area-downsampled
    to that size.

    Args:
        mode: "classification" (Zhang et al.): cross-entropy over the in-gamut ab bins against the
            target soft-encoded on its 5 nearest bins; logs the per-pixel accuracy of the top bin.
            "regression": L2 loss on ab / 110.
        rebalance: weight each pixel's loss by the rarity of its (nearest) ab bin, estimated online
            from the training batches (the counts are a buffer, so they are saved in checkpoints).
        rebalance_lambda: mixing weight λ of the uniform distribution in the rebalancing weights
            (0: pure inverse frequency, 1: no rebalancing).
        decoder_width: channels of the dense decoder.
        grid_size: spacing of the ab quantization grid (Zhang et al.: 10).
    """

    def __init__(self, encoder: nn.Module, mode: str = "classification", rebalance: bool = True,
                 rebalance_lambda: float = 0.5, decoder_width: int = 128, grid_size: int = 10, **kwargs):
        super().__init__(encoder, **kwargs)
        self.encoder_in_chans(self.in_chans)  # refuses data that is not RGB
        if mode not in ("classification", "regression"):
            raise ValueError(f"mode must be 'classification' or 'regression', not {mode!r}")
        if not 0 <= rebalance_lambda <= 1:
            raise ValueError(f"rebalance_lambda must be in [0, 1], not {rebalance_lambda}")
        if grid_size <= 0:
            raise ValueError(f"grid_size must be positive, not {grid_size}")
        self.mode, self.rebalance, self.rebalance_lambda = mode, rebalance, rebalance_lambda
        self.register_buffer("bin_centres", in_gamut_bins(grid_size).clone(), persistent=False)  # (Q, 2)
        num_bins = self.bin_centres.shape[0]
        # Gaussian smoothing of the bin distribution (Zhang's σ = 5): column j spreads bin j's mass
        # over its neighbours, columns sum to 1 so the smoothed distribution still sums to 1.
        kernel = torch.exp(-torch.cdist(self.bin_centres, self.bin_centres).square() / (2 * SIGMA**2))
        self.register_buffer("smoothing", kernel / kernel.sum(0, keepdim=True), persistent=False)
        # Hard-assigned pixel counts per bin, starting from one per bin (a uniform prior that keeps
        # the distribution defined before the first batch and vanishes against real counts).
        self.register_buffer("bin_counts", torch.ones(num_bins, dtype=torch.float64))
        self.decoder = DenseDecoder(self.probe_feature_dims(), decoder_width, num_bins if mode == "classification" else 2)

    @classmethod
    def encoder_in_chans(cls, data_channels: int) -> int:
        if data_channels != 3:
            kind = " (grayscale)" if data_channels == 1 else ""
            raise ConfigError(f"task colorization needs RGB data (3 channels); this data has {data_channels} channel(s){kind}: "
                              "choose another task, e.g. rotation or exemplar")
        return 1  # the backbone sees luma only

    def encoder_input(self, decoded: dict) -> dict:
        gray_mean, gray_std = gray_stats(decoded["mean"], decoded["std"])
        return {**decoded, "channels": 1, "mode": "L", "mean": [gray_mean], "std": [gray_std]}

    def probe_feature_dims(self) -> list[int]:
        """Channels of the backbone's last LEVELS feature maps, from one forward of a blank image;
        raises ValueError when the backbone cannot produce them at this image size."""
        was_training = self.encoder.training
        self.encoder.eval()  # keeps BatchNorm running statistics untouched
        blank = torch.zeros(1, 1, self.image_size, self.image_size, device=next(self.encoder.parameters()).device)
        try:
            with torch.no_grad():
                maps = feature_maps(self.encoder, blank, LEVELS)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(f"colorization needs the backbone's last {LEVELS} feature maps, which "
                             f"{self.image_size}x{self.image_size} images do not give: {err}") from err
        finally:
            self.encoder.train(was_training)
        if len(maps) < LEVELS:
            raise ValueError(f"colorization needs {LEVELS} feature maps; the backbone gives {len(maps)}")
        return [m.shape[1] for m in maps]

    def class_weights(self) -> Tensor:
        """Rebalancing weight of every bin under the smoothed empirical bin distribution p̃."""
        frequencies = (self.bin_counts / self.bin_counts.sum()).float()
        # An elementwise product, not a matmul, so autocast keeps it in float32.
        prior = (self.smoothing * frequencies).sum(1)
        return rebalance_weights(prior, self.rebalance_lambda)

    def sample_transform(self) -> ColorizationTransform:
        return ColorizationTransform(self.data_mean, self.data_std)

    def has_trained(self) -> bool:
        """Whether training batches went through this task (its bin counts grew past their start of
        one per bin): a fresh task's colours would be noise, so examples show predictions only then."""
        return bool(self.bin_counts.sum() > self.bin_counts.numel())

    @torch.no_grad()
    def predict_ab(self, gray: Tensor) -> Tensor:
        """(B, 2, H, W) ab predicted for (B, 1, H, W) normalized luma, upsampled to its size: the
        annealed mean of the bin distribution (Zhang et al.: less washed out than the mean, less
        patchy than the mode), or the regressed values."""
        was_training = self.training
        self.eval()
        try:
            out = self.decoder(feature_maps(self.encoder, gray, LEVELS)).float()  # (B, Q or 2, h, w)
        finally:
            self.train(was_training)
        if self.mode == "regression":
            ab = out * AB_SCALE
        else:
            probs = torch.softmax(F.log_softmax(out, dim=1) / ANNEALED_T, dim=1)
            ab = torch.einsum("bqhw,qc->bchw", probs, self.bin_centres)  # q: bins, c: (a, b)
        return F.interpolate(ab, size=gray.shape[-2:], mode="bilinear", align_corners=False)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The grayscale input, the colour target (its ab with the image's own L, shown as RGB) and,
        once the task has trained, its predicted colours (the predicted ab with the same L)."""
        transform = self.sample_transform()
        grays, ab_targets = zip(*(transform(s) for s in samples))
        lightness = rgb_to_lab(self.to_unit_range(torch.stack([s["image"] for s in samples])))[:, :1]  # (B, 1, H, W)
        targets = lab_to_rgb(torch.cat([lightness, torch.stack(ab_targets)], 1))
        gray_unit = (torch.stack(grays) * transform.gray_std + transform.gray_mean).clamp(0, 1)
        examples = [[Panel(g, "L input"), Panel(t, "ab target")] for g, t in zip(gray_unit, targets)]
        if self.has_trained():
            device = self.bin_centres.device
            predicted = lab_to_rgb(torch.cat([lightness, self.predict_ab(torch.stack(grays).to(device)).cpu()], 1))
            for example, colours in zip(examples, predicted):
                example.append(Panel(colours, "ab predicted"))
        return examples

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        # inputs: (B, 1, H, W) normalized luma; target: (B, 2, H, W) ab
        out = self.decoder(feature_maps(self.encoder, inputs, LEVELS))  # (B, Q or 2, h, w)
        # The mean ab of the image patch each output pixel covers (area downsampling).
        ab = F.adaptive_avg_pool2d(target.float(), out.shape[-2:]).permute(0, 2, 3, 1).flatten(0, 2)  # (N, 2)
        out = out.permute(0, 2, 3, 1).flatten(0, 2).float()  # (N, Q or 2), one row per output pixel
        with torch.no_grad():
            index, soft = soft_encode(ab, self.bin_centres)
            nearest = index[:, 0]
            if self.training:
                counts = torch.bincount(nearest, minlength=self.bin_counts.numel()).to(self.bin_counts.dtype)
                # DDP copies rank 0's buffers to every rank before each forward: sum all ranks'
                # counts so the prior sees the global batch, not a 1/W sample of it.
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(counts)
                self.bin_counts += counts
            # As in the paper, a pixel weighs what its nearest bin does.
            weight = self.class_weights()[nearest] if self.rebalance else torch.ones_like(ab[:, 0])
        if self.mode == "regression":
            loss = (weight * (out - ab / AB_SCALE).square().sum(1)).mean()
            return {"loss": loss}
        log_probs = F.log_softmax(out, dim=1)
        cross_entropy = -(soft * log_probs.gather(1, index)).sum(1)
        accuracy = (out.argmax(1) == nearest).float().mean()
        return {"loss": (weight * cross_entropy).mean(), "accuracy": accuracy.detach()}
