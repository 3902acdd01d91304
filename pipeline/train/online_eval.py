"""Online evaluation during pretraining: weighted kNN top-1 of the features being learned, every
`eval.online_every` steps on rank 0 (as solo-learn's online probe and lightly's kNN callback), so
representation quality shows over training, not only the pretext loss.

The bank is the first `eval.online_bank` labelled samples of the train split and the queries the
first `eval.online_queries` of the test split, decoded once as the eval stage decodes them (the
checkpoint's colour mode and normalization, at `eval.image_size` when set) and held in memory; the
score is the eval stage's own `knn_accuracy` with `eval.knn_k[0]` neighbours.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from core.knn import knn_accuracy
from pipeline.config import Config
from pipeline.data.bad_samples import BadSamples
from pipeline.data.dataset import Dataset
from pipeline.data.decode import ImageDecoder
from pipeline.data.streaming import first_decoded


def labelled_subset(cfg: Config, dataset: Dataset, split: str, decoder: ImageDecoder, count: int) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) images and (N,) labels: the first `count` samples of `split`, in shard order."""
    samples = first_decoded(dataset.urls(split), decoder, count, BadSamples.for_config(cfg.data))
    return torch.stack([s["image"] for s in samples]), torch.tensor([s["label"] for s in samples])


class OnlineKNN:
    """kNN top-1 of a model's pooled features on a fixed bank and query set (see the module docstring).

    Args:
        cfg: the run's config (data root and split names, eval.online_*, eval.knn_k, eval.knn_temperature).
        dataset: the opened dataset (`pipeline.data.dataset.Dataset`).
        encoder_input: how eval decodes for this backbone (the checkpoint's "manifest" entry: mode,
            image_size, mean, std).
    """

    def __init__(self, cfg: Config, dataset: Dataset, encoder_input: dict):
        decoder = ImageDecoder(encoder_input["mode"], cfg.eval.image_size or encoder_input["image_size"], encoder_input["mean"],
                               encoder_input["std"], require_label=True, num_classes=len(dataset.classes))
        self.bank_images, self.bank_labels = labelled_subset(cfg, dataset, cfg.data.train_split, decoder, cfg.eval.online_bank)
        self.query_images, self.query_labels = labelled_subset(cfg, dataset, cfg.data.test_split, decoder, cfg.eval.online_queries)
        self.k, self.temperature, self.batch_size = cfg.eval.knn_k[0], cfg.eval.knn_temperature, cfg.eval.batch_size

    @torch.no_grad()
    def features(self, model: nn.Module, images: Tensor, device: torch.device) -> Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                chunks.append(model(images[start:start + self.batch_size].to(device, non_blocking=True)).float().cpu())
        return torch.cat(chunks)

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """{"online_knn": top-1 in [0, 1], "online_eval_s": seconds}; `model` is put in eval mode
        for the scoring and back in its previous mode after."""
        start, was_training = time.perf_counter(), model.training
        model.eval()
        try:
            bank = self.features(model, self.bank_images, device)
            queries = self.features(model, self.query_images, device)
        finally:
            model.train(was_training)
        accuracy = knn_accuracy(bank, self.bank_labels, queries, self.query_labels, self.k, self.temperature)
        return {"online_knn": round(accuracy, 5), "online_eval_s": round(time.perf_counter() - start, 2)}
