"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised
Vision Transformers", ICCV 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.grids import Panel
from pretext.augment import MultiCrop, crop_groups, crop_panels
from pretext.base import PretextTask
from pretext.losses import all_reduce_sum
from pretext.momentum import cosine_schedule, ema_update_, momentum_copy


def multicrop_cross_entropy(targets: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """The mean cross-entropy H(targets, softmax(logits / temperature)) over every (target crop,
    predicting crop) pair except a crop with itself, and over the batch: DINO's loss with the
    teacher's probabilities as targets, SwAV's swapped prediction with the codes.

    Args:
        targets: (G, B, K) target distributions for the G crops that have them (the global ones).
        logits: (V, B, K) predictions for all V crops, the G target crops first, in the same order.
    """
    # In float32 under autocast too, which would run the einsum in 16 bits (0.03 nats of rounding at 8).
    with torch.autocast(logits.device.type, enabled=False):
        logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (V, B, K)
        # g: target crop, v: predicting crop, b: image, k: prototype
        cross_entropy = -torch.einsum("gbk,vbk->gv", targets.float(), logp) / logits.shape[1]  # (G, V)
    # Skip the pairs where both sides see the same crop (DINO's "skip cases where student and
    # teacher operate on the same view", SwAV's np.delete of the assigned crop).
    same_crop = torch.eye(*cross_entropy.shape, dtype=torch.bool, device=cross_entropy.device)
    return cross_entropy[~same_crop].mean()


def dino_loss(student: Tensor, teacher: Tensor, center: Tensor, student_temp: float, teacher_temp: float) -> Tensor:
    """DINO's loss: the teacher's logits centred and sharpened (softmax at `teacher_temp`) are the
    targets of the student's (softmax at `student_temp`), over all crop pairs but same-crop ones.

    Args:
        student: (V, B, K) student logits for all V crops, the G global crops first.
        teacher: (G, B, K) teacher logits for the global crops, in the same order.
        center: (K,) or (1, K) the running mean of the teacher logits, subtracted before the softmax.
    """
    teacher_probs = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)  # (G, B, K)
    return multicrop_cross_entropy(teacher_probs, student, student_temp)


@torch.no_grad()
def mean_entropy(probs: Tensor) -> Tensor:
    """The mean entropy (nats) of the distributions in the last dimension of `probs`."""
    return -torch.special.xlogy(probs, probs).sum(-1).mean()


@torch.no_grad()
def updated_center(center: Tensor, teacher: Tensor, momentum: float) -> Tensor:
    """center * momentum + (1 - momentum) * the mean teacher logit of the GLOBAL batch: the batch
    sum and count are summed over workers, so every worker keeps the same centre.

    Args:
        center: (1, K) the current centre.
        teacher: (N, K) this worker's teacher logits (all its global crops).
    """
    rows = teacher.new_full((1,), teacher.shape[0], dtype=torch.float32)
    total = all_reduce_sum(torch.cat([teacher.float().sum(0), rows]))  # one collective: (K + 1,)
    return center * momentum + total[:-1] / total[-1] * (1 - momentum)


class DINOHead(nn.Module):
    """DINO's projection head: an MLP (`layers` linear layers, GELU between them, no batch norm)
    down to a `bottleneck_dim` embedding, L2-normalized, then a weight-normalized linear layer
    without bias onto `out_dim` prototypes. With `norm_last_layer` the weight norm's gain g stays
    fixed at 1 (each prototype a unit vector), which the paper found more stable."""

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers={layers}: the head needs at least 1 linear layer")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            blocks += [nn.Linear(a, b)] + ([nn.GELU()] if i < layers - 1 else [])
        self.mlp = nn.Sequential(*blocks)
        for module in self.mlp:
            if isinstance(module, nn.Linear):  # DINO's init: truncated normal, zero bias
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # (out_dim, 1): g of w = g v / ||v||
        gain.data.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x).float(), dim=-1)  # (N, bottleneck_dim)
        # The cosines to the prototypes in float32 even under autocast: the teacher divides them by
        # 0.04, which would magnify bfloat16's rounding (0.4%) to 10% of a logit.
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(x)  # (N, out_dim)


class DINO(PretextTask):
    """A student network (backbone + DINOHead) learns to predict, for every crop of an image, the
    output distribution a teacher gives for the image's global crops; the teacher is an EMA of the
    student, and centring plus sharpening of its outputs prevent collapse.

    The student sees all crops (2 global + `local_crops` smaller local ones, multi-crop), the teacher
    only the global ones. The centre is a buffer, so checkpoints keep it. `self.encoder` is the
    student backbone, which the eval stage scores (the paper evaluates the teacher).

    `forward` logs DINO's loss as "cross_entropy" and steps on "loss", the KL part of it (the
    same gradients; see the comment there), next to "teacher_entropy".

    Args:
        out_dim: prototypes K of the head's last layer (paper: 65536; 4096 keeps a CPU run cheap).
        hidden_dim: width of the head's MLP (paper: 2048).
        bottleneck_dim: size of the L2-normalized embedding before the last layer (paper: 256).
        norm_last_layer: fix the last layer's weight-norm gain at 1 (paper's default).
        student_temp: temperature of the student softmax (paper: 0.1).
        teacher_temp: temperature of the teacher softmax after warmup (paper: 0.04, up to 0.07).
        warmup_teacher_temp: teacher temperature at the start (paper: 0.04).
        warmup_teacher_temp_fraction: fraction of the steps over which the teacher temperature rises
            linearly to `teacher_temp` (paper: 30 of 100 or 300 epochs; we count steps, not epochs).
        center_momentum: EMA factor of the centre (paper: 0.9).
        base_momentum: teacher EMA factor at the start, raised to 1 along a cosine (paper: 0.996).
        global_crops, local_crops: crops per image (paper: 2 global and 6 to 10 local).
        local_size: side of the local crops; 0 gives 3/7 of the image side (96 of 224 px).
        global_scale, local_scale: area ranges of the crops (paper: [0.4, 1] and [0.05, 0.4]).
        jitter: colour (RGB) or intensity (grayscale) jitter strength.
        blur: Gaussian blur probability of every crop (paper: 1.0 and 0.1 on the two global crops, 0.5
            on the local ones; the shared MultiCrop has one probability for all crops).
        clip_grad: clip each student parameter's gradient to this norm, 0 to turn off (paper: 3.0).
        freeze_last_layer_fraction: fraction of the steps during which the head's last layer is not
            updated (paper: the first epoch of 100, a stabilizer of the start).
    """

    # The paper evaluates the teacher (its kNN and linear results are the teacher's, which beats
    # the student throughout training): the eval stage, online kNN and export read it.
    eval_encoder = "teacher_encoder"

    def __init__(self, encoder: nn.Module, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_fraction: float = 0.3,
                 center_momentum: float = 0.9, base_momentum: float = 0.996, global_crops: int = 2,
                 local_crops: int = 6, local_size: int = 0, global_scale: list[float] = (0.4, 1.0),
                 local_scale: list[float] = (0.05, 0.4), jitter: float = 0.4, blur: float = 0.5,
                 clip_grad: float = 3.0, freeze_last_layer_fraction: float = 0.01, **kwargs):
        super().__init__(encoder, **kwargs)
        if not (0 <= base_momentum <= 1 and 0 <= center_momentum < 1):
            raise ValueError(f"base_momentum={base_momentum} must be in [0, 1] and center_momentum={center_momentum} in [0, 1)")
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0 or not 0 <= warmup_teacher_temp_fraction <= 1:
            raise ValueError("temperatures must be > 0 and warmup_teacher_temp_fraction in [0, 1]")
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_teacher_temp_fraction = warmup_teacher_temp, warmup_teacher_temp_fraction
        self.center_momentum, self.base_momentum = center_momentum, base_momentum
        self.clip_grad, self.freeze_last_layer_fraction = clip_grad, freeze_last_layer_fraction
        # Built here so bad crop options fail at construction, not in a loader worker.
        self.multicrop = MultiCrop(self.image_size, self.in_chans, global_crops, local_crops, local_size,
                                   tuple(global_scale), tuple(local_scale), jitter, blur, self.data_mean, self.data_std)
        self.head = DINOHead(self.embed_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        self.teacher_encoder = momentum_copy(self.encoder)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def sample_transform(self) -> MultiCrop:
        return self.multicrop

    @property
    def teacher_temperature(self) -> float:
        """warmup_teacher_temp at the first step, linearly up to teacher_temp over the warmup fraction."""
        if self.warmup_teacher_temp_fraction <= 0:
            return self.teacher_temp
        ramp = min(self.progress / self.warmup_teacher_temp_fraction, 1.0)
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * ramp

    @property
    def teacher_momentum(self) -> float:
        """base_momentum rising to 1 at the last step along a half cosine."""
        return cosine_schedule(self.base_momentum, 1.0, self.current_step, self.total_steps)

    @property
    def last_layer_frozen(self) -> bool:
        """Whether this step leaves the head's last layer as it is (steps 1 .. fraction * total)."""
        return 0 < self.current_step <= self.freeze_last_layer_fraction * self.total_steps

    def forward(self, inputs: list[Tensor], target: Tensor) -> dict[str, Tensor]:
        groups = crop_groups(inputs)  # per crop size: (V_i * B, C, H_i, W_i), crop-major
        batch = inputs[0].shape[0] if isinstance(inputs, (list, tuple)) else inputs.shape[0]
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(groups[0])).float()  # (G * B, K)
        # One backbone pass per crop size (DINO's MultiCropWrapper), one head pass over all crops.
        features = torch.cat([self.encoder(group) for group in groups])  # (V * B, D)
        student = self.head(features).float()  # (V * B, K)
        cross_entropy = dino_loss(student.view(-1, batch, student.shape[-1]), teacher.view(-1, batch, teacher.shape[-1]),
                                  self.center, self.student_temp, self.teacher_temperature)
        with torch.no_grad():
            # Near log K: a uniform teacher; near 0: one-hot (the two collapses of the paper's Fig. 7).
            teacher_entropy = mean_entropy(F.softmax((teacher - self.center) / self.teacher_temperature, dim=-1))
            if self.training:
                self.center.copy_(updated_center(self.center, teacher, self.center_momentum))
        # H(P_t, P_s) = H(P_t) + KL(P_t || P_s), and H(P_t) has no gradient: stepping on the KL is
        # stepping on DINO's loss. The KL is the part the student can lower; the cross-entropy's floor,
        # the teacher's entropy, moves with the temperature warmup and the centring.
        return {"loss": cross_entropy - teacher_entropy, "cross_entropy": cross_entropy.detach(), "teacher_entropy": teacher_entropy}

    def train_step(self, batch, optimizers: dict, scaler: torch.amp.GradScaler, autocast) -> dict[str, Tensor]:
        """DINO's student update: backward, per-parameter gradient clipping, the last layer left
        untouched while frozen, the optimizer step; then the teacher's EMA update."""
        inputs, target = batch
        opt = optimizers["main"]
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = self._forward_module(inputs, target)
        scaler.scale(out["loss"]).backward()
        if self.clip_grad > 0:
            scaler.unscale_(opt)
            clip_each_gradient_(self.parameters(), self.clip_grad)
        if self.last_layer_frozen:
            for p in self.head.last_layer.parameters():
                p.grad = None  # the optimizer skips it: no step, no weight decay
        scaler.step(opt)
        scaler.update()
        self.after_step()
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        momentum = self.teacher_momentum
        ema_update_(self.teacher_encoder, self.encoder, momentum)
        ema_update_(self.teacher_head, self.head, momentum)

    def example_panels(self, samples: list[dict]) -> list[list[Panel]]:
        """The global and local crops of each image (the teacher sees the global ones only)."""
        return crop_panels(self, self.multicrop, samples)


@torch.no_grad()
def clip_each_gradient_(params, max_norm: float) -> None:
    """Scales each parameter's gradient down to norm `max_norm` where it is larger (DINO clips
    per parameter, not the global norm as torch.nn.utils.clip_grad_norm_ does)."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm() + 1e-6)).clamp(max=1.0))
