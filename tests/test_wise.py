"""WiSE-FT (loop/wise.py): the grid is scored on the development fold and the chosen mix is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loop.wise import DevTask, apply, choose, dev_task, mix, ndcg_at_10, unmix


class OneWeightModel(torch.nn.Module):
    """A 'model' whose only weight w moves its relevant passage: best near w = 0.5, worst at 0 and 1."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.register_buffer("ids", torch.tensor([7]))  # not a float: never mixed

    def encode(self, texts, **_kw):
        w = float(self.w.detach())
        vec = {"q": [1.0, 0.0], "rel": [1.0 - abs(w - 0.5), 0.5], "other": [0.8, 0.6]}
        out = np.array([vec[t] for t in texts])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_the_best_weight_of_the_grid_wins_and_a_tie_goes_to_the_base_side():
    model = OneWeightModel(1.0)  # tuned: w = 1
    base = OneWeightModel(0.0).state_dict()  # base: w = 0, so the mix a has w = a
    task = DevTask(queries=["q"], pool=["other", "rel"], relevant=[[1]])
    record = choose(model, base, task, [0.0, 0.25, 0.5, 0.75, 1.0])
    # w 0 and 1 rank the relevant passage second (NDCG 0.631); 0.25, 0.5 and 0.75 rank it first.
    assert record["dev_ndcg@10"] == {"0.0": 0.6309, "0.25": 1.0, "0.5": 1.0, "0.75": 1.0, "1.0": 0.6309}
    assert record["alpha"] == 0.25 and float(model.w.detach()) == pytest.approx(0.25)
    assert int(model.ids) == 7


def test_one_fixed_weight_is_applied_without_scoring():
    model = OneWeightModel(1.0)
    record = apply(model, OneWeightModel(0.0).state_dict(), 0.75)
    assert record == {"alpha": 0.75, "fixed": True} and float(model.w.detach()) == pytest.approx(0.75)


def test_mix_interpolates_floats_only():
    tuned = {"w": torch.tensor([2.0, 4.0]), "n": torch.tensor([3])}
    base = {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor([9])}
    out = mix(base, tuned, 0.25)
    assert out["w"].tolist() == [0.5, 1.0] and out["n"].tolist() == [3]
    assert all(mix(base, tuned, 1.0)[k] is v for k, v in tuned.items())  # the tuned weights as they are


def test_unmix_recovers_the_tuned_weights_from_a_mix():
    base = {"w": torch.tensor([1.0, -2.0, 0.5]), "n": torch.tensor([9])}
    tuned = {"w": torch.tensor([3.0, 4.0, -1.5]), "n": torch.tensor([3])}
    for a in (0.25, 0.5, 1.0):
        back = unmix(base, mix(base, tuned, a), a)
        assert torch.allclose(back["w"], tuned["w"], atol=1e-6) and back["n"].tolist() == [3]
    with pytest.raises(ValueError, match="weight 0"):
        unmix(base, tuned, 0)


def test_ndcg_and_the_dev_task_from_passage_ids():
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    assert ndcg_at_10(scores, [[0], [0]]) == pytest.approx((1.0 + 0.5) / 2)
    task = dev_task(["a", "b"], [{"p1"}, {"gone"}], [["p2", "p1"], ["p2"]], {"p1": "one", "p2": "two"})
    assert task.queries == ["a"] and task.pool == ["one", "two"] and task.relevant == [[0]]
    assert dev_task(["b"], [{"gone"}], [["p2"]], {"p2": "two"}) is None
    with pytest.raises(ValueError, match="relevant"):
        DevTask(queries=["a"], pool=["x"], relevant=[[3]])
