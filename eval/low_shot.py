"""Low-shot protocols on frozen features:
- the linear probe trained on a class-balanced fraction of the train labels (SimCLR's 1% and 10%
  semi-supervised rows, here with the backbone frozen), C chosen on a held-out part of that
  subset as the full probe does;
- k labelled images per class scored by a linear SVM on standardized features (the manner of
  mmselfsup's low-shot SVM, Goyal et al. 2019).
Each setting runs over several seeds (a new subset each) and reports the mean and the standard
deviation of top-1 accuracy on the whole test split."""
from __future__ import annotations

import statistics
import warnings

import torch
from torch import Tensor

from eval.linear_probe import Standardizer, linear_probe


def balanced_subset(labels: Tensor, seed: int, per_class: int = 0, fraction: float = 0.0) -> Tensor:
    """Indices of `per_class` samples of every class (or `fraction` of each class's samples, at
    least one), drawn without replacement with `seed`; sorted."""
    if (per_class > 0) == (fraction > 0):
        raise ValueError("give exactly one of per_class > 0 and fraction in (0, 1]")
    if fraction > 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        wanted = per_class or max(1, round(fraction * len(members)))
        if wanted > len(members):
            raise ValueError(f"low-shot: {wanted} labels per class asked for, but class {cls} has only {len(members)} train samples")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:wanted]])
    return torch.cat(chosen).sort().values


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "runs": values}


def low_shot_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                   fractions: list[float], Cs: list[float], val_fraction: float, seeds: int = 3) -> dict[str, dict]:
    """{"1%": {"mean", "std", "runs"}, ...}: the linear probe on balanced fractions of the train labels."""
    out = {}
    for fraction in fractions:
        runs = []
        for seed in range(seeds):
            subset = balanced_subset(train_labels, seed, fraction=fraction)
            probe = linear_probe(train_features[subset], train_labels[subset], test_features, test_labels, Cs, val_fraction, seed)
            runs.append(probe.accuracy)
        out[f"{100 * fraction:g}%"] = summary(runs)
    return out


def k_shot_svm(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
               shots: list[int], C: float = 1.0, seeds: int = 3) -> dict[str, dict]:
    """{"1-shot": {"mean", "std", "runs"}, ...}: a one-vs-rest linear SVM (scikit-learn) on k
    standardized samples per class (scaled on those samples alone: a k-shot learner sees no more).
    A k larger than the smallest class is skipped: {"skipped": the reason, naming the class}."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    out = {}
    for k in shots:
        runs, converged = [], True
        for seed in range(seeds):
            try:
                subset = balanced_subset(train_labels, seed, per_class=k)
            except ValueError as err:  # a class with fewer than k samples: this setting cannot run here
                out[f"{k}-shot"] = {"skipped": str(err)}
                break
            scale = Standardizer(train_features[subset])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                svm = LinearSVC(C=C, max_iter=20000, random_state=seed).fit(scale(train_features[subset]).numpy(),
                                                                             train_labels[subset].numpy())
            converged = converged and not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            predicted = torch.from_numpy(svm.predict(scale(test_features).numpy()))
            runs.append(float((predicted == test_labels).float().mean()))
        else:
            out[f"{k}-shot"] = summary(runs) | {"converged": converged}  # liblinear within max_iter on every seed
    return out
