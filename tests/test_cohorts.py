"""Cohorts (k-means + MF-loss elbow), demographic centroids and the embedding plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.data import opinionqa_root
from sklearn.metrics import adjusted_rand_score

from steer.persona.cohorts import CohortResult, elbow, find_cohorts, group_centroids
from steer.persona.embedder import PersonaEmbedder
from steer.persona.plots import plot_embeddings, project_2d
from steer.persona.simulate import simulate_respondents, synthetic_responses

ROOT = opinionqa_root()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(ROOT is None, reason="OpinionQA data (../shared/data/opinionqa) not available")
def test_cohorts_recover_planted_party_groups():
    """Easy planted setting: real POLPARTY distributions + strong planted group separation."""
    responses = simulate_respondents(
        [26, 27, 29, 32],
        root=ROOT,
        group_by="POLPARTY",
        n_respondents=600,
        seed=0,
        separation=3.0,
        tilt=0.3,
        observed_frac=0.3,
    )
    embedder = PersonaEmbedder(8).fit(responses)
    parties = responses.group_labels("POLPARTY")
    cohorts = find_cohorts(embedder.embeddings, k=4, seed=0)
    score = adjusted_rand_score(parties, cohorts.labels)
    print(f"ARI(k=4) vs simulated parties: {score:.3f}")
    assert score > 0.5
    chosen = find_cohorts(embedder.embeddings, embedder=embedder, responses=responses, seed=0)
    assert chosen.criterion == "mf_loss" and chosen.k in chosen.k_values
    assert adjusted_rand_score(parties, chosen.labels) > 0.5
    # the demographic personas are the party means of the embeddings
    centroids = group_centroids(embedder.embeddings, parties)
    assert set(centroids) == set(parties)
    democrat = torch.as_tensor(parties == "Democrat")
    assert torch.allclose(centroids["Democrat"], embedder.embeddings[democrat].mean(0), atol=1e-5)


def test_elbow_by_mf_loss_finds_the_planted_number_of_cohorts():
    responses = synthetic_responses(800, 150, dim=4, n_groups=4, spread=0.3, observed_frac=0.3, seed=1)
    embedder = PersonaEmbedder(8).fit(responses)
    result = find_cohorts(embedder.embeddings, embedder=embedder, responses=responses, seed=0)
    assert result.k == 4, result.losses
    assert result.k_values == list(range(2, 11)) and len(result.losses) == 9
    assert result.losses[0] > result.losses[2] > result.losses[-1]
    assert adjusted_rand_score(responses.demographics["GROUP"], result.labels) > 0.9
    assert result.centroids.shape == (4, 8) and result.sizes.sum() == 800
    # replacing people by their centroid costs MF loss compared with their own embeddings
    assert result.losses[2] >= embedder.evaluate(responses) ** 2


def test_inertia_fallback_and_fixed_k():
    points = np.concatenate([np.random.default_rng(0).normal(c, 0.1, size=(50, 2)) for c in (-3, 0, 3)])
    result = find_cohorts(points, k_range=range(1, 7), seed=0)
    assert result.criterion == "inertia" and result.k == 3
    fixed = find_cohorts(torch.as_tensor(points), k=2)
    assert fixed.k == 2 and fixed.k_values == [2]


def test_elbow_helper():
    assert elbow([2, 3, 4, 5, 6], [10.0, 4.0, 3.5, 3.2, 3.0]) == 3
    assert elbow([2, 3], [5.0, 4.0]) == 3
    assert elbow([2, 3, 4], [1.0, 1.0, 1.0]) == 2
    with pytest.raises(ValueError):
        elbow([], [])


def test_group_centroids_weights_and_exclusions():
    embeddings = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, 0.0], [9.0, 9.0], [7.0, 7.0]])
    labels = np.array(["a", "a", "b", None, "nan"], dtype=object)
    centroids = group_centroids(embeddings, labels, weights=[1.0, 3.0, 1.0, 1.0, 1.0])
    assert set(centroids) == {"a", "b"}
    assert torch.allclose(centroids["a"], torch.tensor([1.5, 1.5]))
    assert set(group_centroids(embeddings, labels, min_count=2)) == {"a"}
    with pytest.raises(ValueError, match="attribute values"):
        group_centroids(embeddings, labels[:3])
    with pytest.raises(ValueError, match="weights"):
        group_centroids(embeddings, labels, weights=[1, 1, 1, 1, -1])


def test_cohort_table_round_trip_and_errors(tmp_path):
    points = np.random.default_rng(0).normal(size=(40, 3))
    result = find_cohorts(points, k=3)
    loaded = CohortResult.load(result.save(tmp_path / "cohorts.json"))
    assert loaded.k == 3 and np.array_equal(loaded.labels, result.labels)
    assert torch.allclose(loaded.centroids, result.centroids)
    (tmp_path / "broken.json").write_text('{"k": 2}')
    with pytest.raises(ValueError, match="broken.json"):
        CohortResult.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="exceeds"):
        find_cohorts(points, k=41)
    with pytest.raises(ValueError, match="NaN"):
        find_cohorts(np.full((5, 2), np.nan), k=2)
    with pytest.raises(ValueError, match="both embedder and responses"):
        find_cohorts(points, embedder=object())


def test_plot_embeddings_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(120, 6))
    result = find_cohorts(embeddings, k=3)
    party = rng.choice(["Democrat", "Republican", "Independent"], size=120)
    path = plot_embeddings(
        embeddings,
        tmp_path / "plots" / "personas.png",
        cohorts=result.labels,
        party=party,
        centroids=result.centroids,
        title="personas",
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(path.parent.glob("*.tmp*"))
    projected = project_2d(embeddings)
    assert projected.shape == (120, 2)
    assert projected[:, 0].var() >= projected[:, 1].var()
    with pytest.raises(ValueError, match="party labels"):
        plot_embeddings(embeddings, tmp_path / "bad.png", party=party[:10])
