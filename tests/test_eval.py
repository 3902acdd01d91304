"""kNN and linear probe against scikit-learn and hand-made cases; backbone export loads in timm."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from core.knn import knn_accuracy, knn_predict
from eval.linear_probe import fit_logistic_regression, linear_probe


def test_knn_on_a_hand_built_bank():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    queries = torch.tensor([[1.0, 0.05], [0.1, 1.0], [-1.0, -0.1], [0.5, 0.5]])
    assert knn_predict(bank, labels, queries, k=1).tolist() == [0, 1, 2, 0]
    # k=3 for [0.5, 0.5]: sims 0.707 (class 0), 0.778 (class 0), 0.707 (class 1): class 0 has two votes.
    assert knn_predict(bank, labels, queries[3:], k=3).tolist() == [0]
    # With a large temperature the votes are nearly equal counts: 2 of 3 for class 0 at k=3 near class 1.
    near_one = torch.tensor([[0.3, 1.0]])
    assert knn_predict(bank, labels, near_one, k=3, temperature=100.0).tolist() == [0]
    assert knn_predict(bank, labels, near_one, k=3, temperature=0.01).tolist() == [1]


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_scikit_learn(k):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    train_labels = rng.integers(0, 5, 400)
    test_labels = rng.integers(0, 5, 150)
    train = centers[train_labels] + rng.normal(scale=1.5, size=(400, 16))
    test = centers[test_labels] + rng.normal(scale=1.5, size=(150, 16))
    temperature = 0.07
    sklearn = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute",
        weights=lambda distances: np.exp((1.0 - distances) / temperature),
    ).fit(train, train_labels)
    expected = sklearn.predict(test)
    ours = knn_predict(torch.from_numpy(train).float(), torch.from_numpy(train_labels), torch.from_numpy(test).float(),
                       k, temperature, num_classes=5, chunk_size=32)
    assert (ours.numpy() == expected).mean() == 1.0


def test_knn_chunking_does_not_change_predictions():
    torch.manual_seed(0)
    bank, labels, queries = torch.randn(300, 8), torch.randint(0, 3, (300,)), torch.randn(100, 8)
    whole = knn_predict(bank, labels, queries, 10, chunk_size=1000)
    assert torch.equal(whole, knn_predict(bank, labels, queries, 10, chunk_size=7))


def test_logistic_regression_matches_scikit_learn_objective():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.5, size=300) > 0).astype(int) + (x[:, 2] > 1).astype(int)
    C = 0.5
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x, y)
    fit = fit_logistic_regression(torch.from_numpy(x), torch.from_numpy(y), C, num_classes=3, tolerance=1e-5, max_iter=5000)
    weight, bias = fit.weight, fit.bias
    ours_proba = torch.softmax(torch.from_numpy(x) @ weight.double() + bias.double(), 1).numpy()
    assert np.abs(ours_proba - reference.predict_proba(x)).max() < 1e-3


def test_logistic_regression_iterates_to_its_tolerance_on_ill_conditioned_features():
    """Feature scales from 1 to 100 (unstandardized): 200 L-BFGS iterations, where the solver used to
    stop, leave a gradient of about 0.06; the fit must reach the tolerance and say so."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(2000, 64) * torch.logspace(0, 2, 64)
    y = (x[:, :5].sum(1) + torch.randn(2000)).gt(0).long() + (x[:, 5:10].sum(1) > 0).long()
    fit = fit_logistic_regression(x, y, 1.0, 3, max_iter=5000, tolerance=1e-4)
    weight, bias = fit.weight.clone().requires_grad_(), fit.bias.clone().requires_grad_()
    (F.cross_entropy(x.double() @ weight + bias, y) + (weight**2).sum() / (2 * 1.0 * 2000)).backward()
    assert fit.converged and fit.iterations > 200 and max(weight.grad.abs().max(), bias.grad.abs().max()) <= 1e-4
    short = fit_logistic_regression(x, y, 1.0, 3, max_iter=50, tolerance=1e-4)
    assert not short.converged and short.gradient > 1e-4  # reported, not hidden


def test_knn_weights_do_not_overflow_at_a_low_temperature():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 1])
    # exp(1 / 0.005) overflows float32; the vote must still go to the nearest neighbour's class.
    assert knn_predict(bank, labels, torch.tensor([[1.0, 0.01]]), k=3, temperature=0.005).tolist() == [0]


def test_linear_probe_beats_chance_by_far_on_separable_data_and_chooses_C_without_test():
    rng = np.random.default_rng(2)
    centers = rng.normal(scale=3, size=(10, 32))
    train_y, test_y = rng.integers(0, 10, 2000), rng.integers(0, 10, 500)
    train_x = torch.from_numpy(centers[train_y] + rng.normal(size=(2000, 32))).float()
    test_x = torch.from_numpy(centers[test_y] + rng.normal(size=(500, 32))).float()
    result = linear_probe(train_x, torch.from_numpy(train_y), test_x, torch.from_numpy(test_y), [0.001, 0.1, 10.0])
    assert result.accuracy > 0.9  # chance is 0.1
    assert set(result.val_accuracy) == {0.001, 0.1, 10.0}
    # The choice of C must not depend on the test labels: shuffling them changes the test accuracy
    # (to near chance) and nothing else.
    shuffled = linear_probe(train_x, torch.from_numpy(train_y), test_x, torch.from_numpy(rng.permutation(test_y)), [0.001, 0.1, 10.0])
    assert shuffled.accuracy < 0.25
    assert shuffled.best_C == result.best_C and shuffled.val_accuracy == result.val_accuracy


def test_knn_accuracy_is_fraction_correct():
    bank = torch.eye(3)
    assert knn_accuracy(bank, torch.tensor([0, 1, 2]), bank, torch.tensor([0, 1, 0]), k=1) == pytest.approx(2 / 3)


def test_linear_probe_runs_under_no_grad():
    """Eval code extracts features under torch.no_grad(); the probe enables gradients for itself."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 4), torch.randint(0, 2, (200,))
    with torch.no_grad():
        result = linear_probe(x, y, x, y, [1.0])
    assert result.converged and 0 <= result.accuracy <= 1
