"""Checkpoints written before the restructure into subpackages still load and give the same numbers.

The fixtures (tests/fixtures/checkpoint_*/) were written by tests/fixtures/make_checkpoints.py with
the code of commit ca895b2 plus the ingest change, before any module moved: a backbone-only task
(rotation) and one eval rebuilds whole (the VAE: features from its encoder, the ELBO).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures.make_checkpoints import fixed_input

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["rotation", "vae"])
def test_a_checkpoint_from_before_the_restructure_loads_and_scores_the_same(name):
    from eval.evaluate import load_pretrained, scored_model

    folder = FIXTURES / f"checkpoint_{name}"
    expected = json.loads((folder / "expected.json").read_text())
    cfg, backbone, state = load_pretrained(folder / "checkpoint.pt")
    model, task = scored_model(cfg, backbone, state)
    assert cfg.task.name == name and (task is not None) == (name == "vae")
    with torch.no_grad():
        features = model.eval()(fixed_input())
        assert list(features.shape) == expected["shape"]
        torch.testing.assert_close(features.flatten(), torch.tensor(expected["features"]), rtol=1e-5, atol=1e-6)
        if name == "vae":
            torch.testing.assert_close(task.eval().log_likelihood(fixed_input()), torch.tensor(expected["log_likelihood"]),
                                       rtol=1e-5, atol=1e-4)
