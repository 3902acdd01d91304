"""Cross-modal recall@K against hand-computed examples."""
from __future__ import annotations

import pytest
import torch

from eval.retrieval import cross_modal_retrieval, recall_at_k, retrieval_ranks


def test_recall_matches_a_hand_computed_example():
    # Unit vectors at angles (degrees): images at 0, 90, 180; audio at 10, 170, 100.
    # image 0 (0 deg): cos to audio = cos10, cos170, cos100 -> its pair (audio 0) is the top hit: rank 0.
    # image 1 (90 deg): cos80 (a0), cos80 (a1), cos10 (a2): pair a1 ties with a0 (ties count for the
    #   query), a2 is above both -> rank 1.
    # image 2 (180 deg): cos170 (a0), cos10 (a1), cos80 (a2): pair a2 is below a1 -> rank 1.
    def at(degrees):
        rad = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
        return torch.stack([rad.cos(), rad.sin()], 1)

    image, audio = at([0, 90, 180]), at([10, 170, 100])
    assert retrieval_ranks(image, audio).tolist() == [0, 1, 1]
    assert recall_at_k(image, audio, (1, 2)) == {"R@1": pytest.approx(1 / 3), "R@2": 1.0}
    # Audio -> image: a0 (10): images at cos10, cos80, cos170 -> rank 0; a1 (170): cos170, cos80, cos10
    # -> pair i1 below i2 -> rank 1; a2 (100): cos100, cos10, cos80 -> i2 below i1 -> rank 1.
    both = cross_modal_retrieval(image, audio, ks=(1, 2))
    assert both["audio_to_image"] == {"R@1": pytest.approx(1 / 3), "R@2": 1.0}
    assert both["chance"] == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}


def test_groups_make_any_item_of_the_same_clip_a_hit():
    image = torch.tensor([[1.0, 0.0], [1.0, -0.1], [0.0, 1.0]])
    audio = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.05]])
    # Without groups image 0's pair (audio 0) is last of three.
    assert retrieval_ranks(image, audio).tolist()[0] == 2
    # Frames 0 and 1 come from the same clip: audio 1 (same clip) is the top hit of images 0 and 1;
    # image 2's only positive, audio 2 (cos ~0.05), is beaten by audio 0 (cos 1) alone.
    ranks = retrieval_ranks(image, audio, groups=torch.tensor([7, 7, 3]))
    assert ranks.tolist() == [0, 0, 1]


def test_chunking_does_not_change_ranks():
    torch.manual_seed(0)
    image, audio = torch.randn(50, 8), torch.randn(50, 8)
    assert torch.equal(retrieval_ranks(image, audio, chunk=7), retrieval_ranks(image, audio, chunk=1024))
    # Perfectly paired embeddings are all found first.
    assert recall_at_k(image, image * 3.0)["R@1"] == 1.0


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="paired"):
        retrieval_ranks(torch.randn(3, 4), torch.randn(4, 4))
