"""PersonaEmbedder: recovery of planted structure (ALS and Adam), fold-in, persistence, errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from steer.persona.embedder import PersonaEmbedder, option_accuracy, per_question_mean_rmse
from steer.persona.simulate import synthetic_responses

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted():
    """1,800 people x 200 questions, rank-4 planted structure, 30% observed; 300 people held out."""
    responses = synthetic_responses(1800, 200, dim=4, observed_frac=0.3, seed=0)
    return responses.select_users(np.arange(1500)), responses.select_users(np.arange(1500, 1800))


@pytest.fixture(scope="module")
def fitted(planted):
    people, _ = planted
    train, test = people.split(0.2, seed=0)
    with threadpool_limits(1):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        embedder = PersonaEmbedder(8, method="als").fit(train)
        torch.set_num_threads(threads)
    return embedder, train, test


def test_als_recovers_planted_structure(fitted):
    embedder, train, test = fitted
    baseline = per_question_mean_rmse(train, test)
    rmse = embedder.evaluate(test)
    assert rmse < 0.7 * baseline, (rmse, baseline)
    objectives = [h["objective"] for h in embedder.history]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(objectives, objectives[1:]))  # ALS never goes uphill
    assert embedder.embeddings.shape == (train.num_users, 8)
    accuracy = option_accuracy(embedder.predict(), test)
    assert accuracy > 0.6


def test_adam_recovers_planted_structure(planted):
    people, _ = planted
    small = people.select_users(np.arange(600))
    train, test = small.split(0.2, seed=0)
    embedder = PersonaEmbedder(8, method="adam", lr=3e-2, batch_size=2048, epochs=30, l2=1.0, seed=0)
    embedder.fit(train, valid=test)
    baseline = per_question_mean_rmse(train, test)
    assert embedder.evaluate(test) < 0.8 * baseline
    assert "valid_rmse" in embedder.history[-1]
    best = min(h["valid_rmse"] for h in embedder.history)
    assert embedder.evaluate(test) == pytest.approx(best, rel=1e-4)  # early stopping keeps the best state


def test_fold_in_accuracy_improves_with_more_answers(fitted, planted):
    embedder, _, _ = fitted
    _, newcomers = planted
    pool, evaluation = newcomers.split(0.5, seed=1)
    accuracies, errors = [], []
    for k in (1, 5, 20):
        embeddings = embedder.fold_in(pool, k_answers=k, seed=0)
        predictions = embedder.predict(embeddings, evaluation.question_keys)
        accuracies.append(option_accuracy(predictions, evaluation))
        errors.append(embedder.evaluate(evaluation, embeddings))
    assert accuracies[0] < accuracies[1] < accuracies[2], accuracies
    assert errors[0] > errors[1] > errors[2], errors
    assert accuracies[2] - accuracies[0] > 0.1


def test_fold_in_with_all_answers_reproduces_training_embeddings(fitted):
    embedder, train, _ = fitted
    subset = train.select_users(np.arange(50))
    folded = embedder.transform(subset)
    assert torch.allclose(folded, embedder.embeddings[:50], atol=1e-4)
    assert embedder.fold_in(subset.select_questions(subset.question_keys[:20])).shape == (50, 8)
    # answers to questions the embedder has never seen are ignored: no known answers -> the prior mean 0
    renamed = dataclasses.replace(
        subset,
        question_keys=[f"NEW_{k}" for k in subset.question_keys],
        questions={f"NEW_{k}": q for k, q in subset.questions.items()},
    )
    assert torch.count_nonzero(embedder.transform(renamed)) == 0


def test_fold_in_only_moves_the_new_vectors(fitted, planted):
    embedder, _, _ = fitted
    before = embedder.question_factors.clone(), embedder.question_bias.clone(), embedder.embeddings.clone()
    embedder.fold_in(planted[1], k_answers=5)
    after = embedder.question_factors, embedder.question_bias, embedder.embeddings
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_biases_and_user_bias(planted):
    people, _ = planted
    train, test = people.select_users(np.arange(400)).split(0.2, seed=0)
    embedder = PersonaEmbedder(4, user_bias=True, question_bias=False, max_iters=10).fit(train)
    assert embedder.embeddings.shape == (400, 5)
    assert torch.count_nonzero(embedder.question_bias) == 0
    assert np.isfinite(embedder.evaluate(test))


def test_save_and_load_round_trip(fitted, tmp_path):
    embedder, train, test = fitted
    directory = embedder.save_pretrained(tmp_path / "persona")
    config = json.loads((directory / "config.json").read_text())
    assert config["question_keys"] == train.question_keys and config["config"]["dim"] == 8
    loaded = PersonaEmbedder.from_pretrained(directory)
    assert torch.equal(loaded.predict(), embedder.predict())
    assert loaded.evaluate(test) == pytest.approx(embedder.evaluate(test))
    assert torch.allclose(loaded.fold_in(test, k_answers=5), embedder.fold_in(test, k_answers=5))
    assert loaded.user_ids == embedder.user_ids
    assert not list(directory.glob("*.tmp"))


def test_bad_checkpoints_and_inputs(fitted, tmp_path):
    embedder, train, _ = fitted
    with pytest.raises(FileNotFoundError, match="config.json"):
        PersonaEmbedder.from_pretrained(tmp_path)
    directory = embedder.save_pretrained(tmp_path / "bad")
    payload = json.loads((directory / "config.json").read_text())
    payload["question_keys"] = payload["question_keys"][:-1]
    (directory / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="question_factors shape"):
        PersonaEmbedder.from_pretrained(directory)
    with pytest.raises(RuntimeError, match="not fitted"):
        PersonaEmbedder(4).predict()
    with pytest.raises(KeyError, match="unknown"):
        embedder.predict(question_keys=["NOPE_W1"])
    with pytest.raises(ValueError, match="method"):
        PersonaEmbedder(4, method="sgd")
    with pytest.raises(ValueError, match="l2"):
        PersonaEmbedder(4, l2=0.0)
    empty = train.mask(np.zeros_like(train.observed))
    with pytest.raises(ValueError, match="no observed"):
        PersonaEmbedder(4).fit(empty)


def test_refit_questions_moves_the_question_side_to_new_vectors(fitted):
    """After the user vectors change (train_persona_vectors), the question side follows them, so fold-in of a
    training person lands on their new vector rather than in the old space."""
    import copy

    embedder, train, _ = fitted
    moved = copy.deepcopy(embedder)
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0]
    new_vectors = moved.embeddings @ rotation
    stale_fold = moved.fold_in(train.select_users(np.arange(50)))
    assert torch.nn.functional.cosine_similarity(stale_fold, new_vectors[:50]).mean() < 0.5
    moved.refit_questions(train, new_vectors)
    assert torch.equal(moved.embeddings, new_vectors)
    folded = moved.fold_in(train.select_users(np.arange(50)))
    assert torch.nn.functional.cosine_similarity(folded, new_vectors[:50]).mean() > 0.9
    with pytest.raises(ValueError, match="training users"):
        moved.refit_questions(train.select_users(np.arange(10)), new_vectors)
