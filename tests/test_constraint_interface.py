"""The Constraint interface: NaN masking, labels, and the offline NonToxic default."""

from __future__ import annotations

import math

import pytest
import torch

from steer.constraints import Constraint, NonToxic, hard_labels, sanitize_scores, soft_labels


class _Faulty(Constraint):
    name = "faulty"

    def score(self, texts):
        table = {"ok": 0.9, "nan": math.nan, "none": None, "big": 1.7, "neg": -0.1, "zero": 0.0}
        return [table[t] for t in texts]


def test_invalid_scores_are_masked_counted_and_never_propagated(caplog):
    oracle = _Faulty()
    scores = oracle.evaluate(["ok", "nan", "none", "big", "neg", "zero"])
    assert scores.valid.tolist() == [True, False, False, False, False, True]
    assert scores.num_invalid == 4
    assert torch.isfinite(scores.probs).all()
    assert scores.probs.tolist() == pytest.approx([0.9, 0, 0, 0, 0, 0.0])
    assert oracle.stats == {"scored": 6, "invalid": 4}
    assert "masked" in caplog.text
    probs = oracle(["ok", "nan"])
    assert torch.isfinite(probs).all() and oracle.stats["invalid"] == 5


def test_labels():
    probs = torch.tensor([0.2, 0.5, 0.9])
    assert hard_labels(probs, 0.5).tolist() == [0.0, 1.0, 1.0]
    assert soft_labels(torch.tensor([-0.1, 0.3, 1.2])).tolist() == pytest.approx([0.0, 0.3, 1.0])
    with pytest.raises(ValueError, match="threshold"):
        hard_labels(probs, 1.5)
    assert sanitize_scores(torch.tensor([0.1, float("nan")])).valid.tolist() == [True, False]


def test_non_toxic_profanity_orders_texts_and_handles_edge_cases():
    oracle = NonToxic()
    polite, rude, empty, long = oracle(["have a nice day", "you are a fucking idiot", "", "nice " * 50_000])
    assert polite > 0.5 > rude
    assert 0.0 <= empty <= 1.0 and 0.0 <= long <= 1.0
    assert oracle.evaluate([]).probs.numel() == 0


def test_non_toxic_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown NonToxic backend 'perspective'"):
        NonToxic(backend="perspective")
