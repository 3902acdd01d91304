"""Contrastive Predictive Coding for images (van den Oord, Li & Vinyals, "Representation Learning with
Contrastive Predictive Coding", 2018; Hénaff et al., "Data-Efficient Image Recognition with
Contrastive Predictive Coding", ICML 2020): a grid of overlapping patches is encoded by the backbone,
a row-causal context network summarizes the rows above each position, and linear predictors must
pick out the patch k rows below among the other patches of the same and of other images (InfoNCE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel, mosaic
from pretext.base import PretextTask
from pretext.losses import info_nce


def grid_size(image_size: int, patch_size: int, patch_stride: int) -> int:
    """Patches per side of the grid (0 when no patch fits)."""
    if patch_stride < 1 or not 1 <= patch_size <= image_size:
        return 0
    return (image_size - patch_size) // patch_stride + 1


def grid_origins(image_size: int, patch_size: int, patch_stride: int) -> Tensor:
    """(G*G, 2) top-left pixel (y, x) of every patch, row-major: patch n lies in row n // G, column n % G."""
    starts = torch.arange(grid_size(image_size, patch_size, patch_stride)) * patch_stride
    ys, xs = torch.meshgrid(starts, starts, indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], 1)


class PatchGrid:
    """Per-sample transform: the (G*G, C, p, p) grid of overlapping patches, row-major, and target 0.

    Each patch is augmented on its own, as in Hénaff et al.: its origin moves by up to `jitter`
    pixels on each axis (clamped to the image), so neighbouring rows do not overlap by a fixed,
    trivially matchable band of pixels, and it is flipped horizontally with probability 1/2.
    """

    def __init__(self, origins: Tensor, patch_size: int, jitter: int, flip: bool):
        self.origins, self.patch_size, self.jitter, self.flip = origins, patch_size, jitter, flip

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        image, p = sample["image"], self.patch_size  # image: (C, H, W)
        # Every p x p crop as a view (C, H-p+1, W-p+1, p, p), so cutting the grid is one indexing op.
        windows = image.unfold(-2, p, 1).unfold(-2, p, 1)
        shift = torch.randint(-self.jitter, self.jitter + 1, self.origins.shape)
        ys = (self.origins[:, 0] + shift[:, 0]).clamp(0, windows.shape[1] - 1)
        xs = (self.origins[:, 1] + shift[:, 1]).clamp(0, windows.shape[2] - 1)
        patches = windows[:, ys, xs].transpose(0, 1)  # (G*G, C, p, p)
        if self.flip:
            flipped = torch.rand(len(patches)) < 0.5
            patches = torch.where(flipped[:, None, None, None], patches.flip(-1), patches)
        # The target is unused: the grid layout is the supervision.
        return patches.contiguous(), torch.tensor(0)


class RowCausalConv(nn.Conv2d):
    """A square convolution whose output at row i reads rows i-k+1..i only (PixelCNN-style masking
    done by padding k-1 zero rows on top and none below); columns are zero-padded on both sides."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size[0]
        return super().forward(F.pad(x, ((k - 1) // 2, (k - 1) // 2, k - 1, 0)))


class ContextBlock(nn.Module):
    """Pre-activation residual block x + 1x1(ReLU(causal 3x3(ReLU(x)))). No normalization: batch
    statistics would mix patches of lower rows into the context (Hénaff et al. drop BatchNorm for this)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), RowCausalConv(dim), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class CPC(PretextTask):
    """Predicts the codes of patches k rows below from a row-causal context over the patch grid.

    Every patch is encoded by the shared backbone into z (B, D, G, G); a 1x1 projection and residual
    row-causal convolutions give the context c (B, context_dim, G, G), where c at row i depends on
    rows <= i only; for each k a linear map W_k (1x1 conv) predicts z[:, :, i+k, j] from c[:, :, i, j].
    The candidates for a prediction are the actual codes of all predictions scored for k in the global batch.

    Args:
        patch_size: side of the square patches in pixels.
        patch_stride: distance between neighbouring patch origins (patch_size / 2 gives Hénaff's 50% overlap).
        pred_steps: the row offsets k to predict, each between 1 and G-1; the loss averages over them.
        queries_per_image: predictions scored per image and offset, at random positions (all positions
            when there are fewer): caps the InfoNCE cost, quadratic in the candidates of the batch
            (scoring all 42 positions of a 7x7 grid for k=1 costs more than encoding the patches).
        context_dim: width of the context network.
        context_layers: residual blocks of the context network (each sees 2 more rows above).
        temperature: InfoNCE temperature.
        normalize: score cosine similarities (divided by the temperature) instead of raw dot products.
        jitter: per-patch random displacement of the crop origin, in pixels (0: none).
        flip: flip each patch horizontally with probability 1/2.
        gather: use the other workers' patches as negatives (gradients flow through the gather).
    """

    # Patch 8, stride 4: van den Oord's 64 px patches at stride 32 on 256 px images scaled to 32 px,
    # the same 7x7 grid (6x6 at Fashion-MNIST's 28 px, 3x3 at 16 px). pred_steps skips k=1: with 50%
    # overlap the patch one row below shares half its pixels with a patch the context sees, a
    # shortcut (Hénaff et al. and Greedy InfoMax skip the overlapping row too); k=2 fits all grids.
    def __init__(self, encoder: nn.Module, patch_size: int = 8, patch_stride: int = 4, pred_steps: tuple[int, ...] = (2,),
                 queries_per_image: int = 8, context_dim: int = 128, context_layers: int = 3, temperature: float = 0.1,
                 normalize: bool = True, jitter: int = 1, flip: bool = True, gather: bool = True, **kwargs):
        super().__init__(encoder, **kwargs)
        self.grid = grid_size(self.image_size, patch_size, patch_stride)
        if self.grid < 2:
            raise ValueError(
                f"cpc patch_size={patch_size}, patch_stride={patch_stride} on {self.image_size}px images gives a "
                f"{self.grid}x{self.grid} grid: needs 1 <= patch_size <= image size, patch_stride >= 1 and at least "
                f"2 rows, (image_size - patch_size) // patch_stride + 1 >= 2"
            )
        self.pred_steps = tuple(int(k) for k in pred_steps)
        if not self.pred_steps or len(set(self.pred_steps)) != len(self.pred_steps) or not all(1 <= k < self.grid for k in self.pred_steps):
            raise ValueError(f"cpc pred_steps={tuple(pred_steps)}: needs distinct row offsets between 1 and "
                             f"{self.grid - 1} for the {self.grid}x{self.grid} grid")
        if queries_per_image < 1 or jitter < 0:
            raise ValueError(f"cpc queries_per_image={queries_per_image}, jitter={jitter}: "
                             f"need queries_per_image >= 1 and jitter >= 0")
        self.queries_per_image = queries_per_image
        self.patch_size, self.patch_stride, self.jitter, self.flip = patch_size, patch_stride, jitter, flip
        # Cosine similarity with a temperature (as in SimCLR/MoCo) rather than the papers' raw dot
        # products: bounded logits keep the loss stable at high learning rates and under autocast.
        self.temperature, self.normalize, self.gather = temperature, normalize, gather
        self.context = nn.Sequential(nn.Conv2d(self.embed_dim, context_dim, 1),
                                     *[ContextBlock(context_dim) for _ in range(context_layers)])
        self.predictors = nn.ModuleList(nn.Conv2d(context_dim, self.embed_dim, 1) for _ in self.pred_steps)

    def patch_origins(self) -> Tensor:
        """(G*G, 2) top-left pixel (y, x) of each patch of the (unaugmented) grid, in the transform's order."""
        return grid_origins(self.image_size, self.patch_size, self.patch_stride)

    def sample_transform(self) -> PatchGrid:
        return PatchGrid(self.patch_origins(), self.patch_size, self.jitter, self.flip)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The grid of (augmented, overlapping) patches, laid out row-major as the context network sees them."""
        transform = self.sample_transform()
        return [[Panel(mosaic(self.to_unit_range(transform(s)[0]), self.grid), f"{self.grid}x{self.grid} patches")] for s in samples]

    def encode(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Patch codes z (B, D, G, G) and row-causal context c (B, context_dim, G, G) of (B, G*G, C, p, p) patches."""
        batch = inputs.shape[0]
        z = self.encoder(inputs.flatten(0, 1)).view(batch, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        return z, self.context(z)

    def prediction_pairs(self, z: Tensor, c: Tensor, k: int, predictor: nn.Module) -> tuple[Tensor, Tensor]:
        """(N, D) predictions and (N, D) actual codes of the patches k rows below: one row per sampled
        (image, row, column), image-major; at most `queries_per_image` positions of each image."""
        prediction = predictor(c[:, :, :-k]).flatten(2)  # (B, D, P) from rows 0..G-k-1 ...
        actual = z[:, :, k:].flatten(2)  # ... and the codes k rows below, P = (G-k) * G
        batch, dim, positions = actual.shape
        if self.queries_per_image < positions:
            # A fresh random subset of positions per image and step: the logits cost grows with the
            # square of the number of candidates, which all positions of a large batch make dominant.
            pick = torch.rand(batch, positions, device=z.device).argsort(1)[:, : self.queries_per_image]
            index = pick[:, None].expand(-1, dim, -1)
            prediction, actual = prediction.gather(2, index), actual.gather(2, index)
        return prediction.transpose(1, 2).flatten(0, 1).float(), actual.transpose(1, 2).flatten(0, 1).float()

    def forward(self, inputs: Tensor, target: Tensor) -> dict[str, Tensor]:
        z, c = self.encode(inputs)
        losses, accuracies = [], []
        for k, predictor in zip(self.pred_steps, self.predictors):
            # Every other actual code (other positions of the same image, other images, other workers'
            # images with `gather`) is a negative for each prediction.
            query, key = self.prediction_pairs(z, c, k, predictor)
            loss, accuracy = info_nce(query, key, self.temperature, gather=self.gather, query_negatives=False,
                                      normalize=self.normalize)
            losses.append(loss)
            accuracies.append(accuracy)
        return {"loss": torch.stack(losses).mean(), "accuracy": torch.stack(accuracies).mean().detach()}
