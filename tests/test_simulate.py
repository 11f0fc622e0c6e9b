"""The respondent simulator: grounded in the real Pew group counts, real-format csv round trip."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers.data import opinionqa_root

from steer.persona.opinionqa import group_distributions, group_shares, load_responses, load_wave, wave_dirs
from steer.persona.simulate import simulate_respondents, synthetic_responses

ROOT = opinionqa_root()
needs_data = pytest.mark.skipif(
    ROOT is None, reason="OpinionQA data (../shared/data/opinionqa) not available"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@needs_data
def test_group_shares_follow_the_real_population():
    responses = simulate_respondents(
        [26], root=ROOT, group_by=("POLPARTY", "RACE"), n_respondents=6000, seed=0
    )
    directory = wave_dirs(ROOT, [26])[0]
    real = group_shares(group_distributions(directory, ("POLPARTY", "RACE")), exclude=("Refused", "nan"))
    labels = responses.group_labels(["POLPARTY", "RACE"])
    for (party, race), share in real.items():
        simulated = float(np.mean(labels == f"{party} | {race}"))
        assert abs(simulated - share) < 0.02, (party, race, simulated, share)
    assert "Refused" not in set(responses.demographics["POLPARTY"])


@needs_data
def test_answers_follow_the_real_group_distributions():
    key = "SAFECRIME_W26"
    responses = simulate_respondents(
        [26],
        root=ROOT,
        group_by="POLPARTY",
        n_respondents=4000,
        seed=1,
        tilt=0.0,
        smoothing=0.0,
        observed_frac=1.0,
        questions=[key],
    )
    real = group_distributions(wave_dirs(ROOT, [26])[0], "POLPARTY")[key]
    party = responses.demographics["POLPARTY"].to_numpy()
    for group in ("Democrat", "Republican"):
        answers = responses.option_index[party == group, 0]
        answers = answers[answers >= 0]
        empirical = np.bincount(answers, minlength=real.question.num_options) / len(answers)
        expected = real.probs[real.group_index(group)]
        assert 0.5 * np.abs(empirical - expected).sum() < 0.05, (group, empirical, expected)
    refusal_rate = float((responses.refusal_index >= 0).mean())
    assert refusal_rate < 0.02  # real refusal rates are ~0.3%


@needs_data
def test_sparsity_and_determinism():
    kwargs = dict(root=ROOT, group_by="POLPARTY", n_respondents=300, observed_frac=0.15)
    first = simulate_respondents([26, 27], seed=3, **kwargs)
    again = simulate_respondents([26, 27], seed=3, **kwargs)
    other = simulate_respondents([26, 27], seed=4, **kwargs)
    assert np.array_equal(first.option_index, again.option_index)
    assert not np.array_equal(first.option_index, other.option_index)
    answered = (first.option_index >= 0) | (first.refusal_index >= 0)
    assert 0.12 < answered.mean() < 0.18 and answered.sum(1).min() >= 1
    nominal = [j for j, k in enumerate(first.question_keys) if first.questions[k].is_nominal]
    observed_nominal = first.option_index[:, nominal] >= 0 if nominal else np.zeros(1, bool)
    assert not nominal or np.isnan(first.values[:, nominal][observed_nominal]).all()


def _party_tv(responses, waves, groups=("Democrat", "Republican", "Independent"), min_answers=5):
    """Mean (over questions) total-variation distance between simulated and real party distributions."""
    party = responses.demographics["POLPARTY"].to_numpy()
    out = {}
    for wave in waves:
        directory = wave_dirs(ROOT, [wave])[0]
        real = group_distributions(directory, "POLPARTY", questions=load_wave(directory))
        for j, key in enumerate(responses.question_keys):
            if key not in real or responses.questions[key].is_nominal:
                continue
            for group in groups:
                answers = responses.option_index[party == group, j]
                answers = answers[answers >= 0]
                if len(answers) < min_answers:
                    continue
                empirical = np.bincount(answers, minlength=real[key].question.num_options) / len(answers)
                expected = real[key].probs[real[key].group_index(group)]
                out.setdefault(group, []).append(0.5 * np.abs(empirical - expected).sum())
    return {g: float(np.mean(v)) for g, v in out.items()}


TOLERANCE = 0.05  # mean TV distance per party between simulated and real Pew answer distributions


@needs_data
def test_marginals_match_pew_at_the_recipe_defaults():
    """The individual recipe's defaults (waves 26-27, POLPARTY x RACE, 400 people, 30% observed, tilt 0.5):
    every party's simulated answer distributions match the real Pew tables within TOLERANCE."""
    from steer.scripts.persona import PersonaScriptArguments

    d = PersonaScriptArguments()
    responses = simulate_respondents(
        d.waves,
        root=ROOT,
        group_by=tuple(d.group_by),
        n_respondents=d.n_respondents,
        seed=d.dataset_seed,
        observed_frac=d.observed_frac,
        tilt=d.tilt,
    )
    tv = _party_tv(responses, d.waves)
    assert set(tv) == {"Democrat", "Republican", "Independent"}
    assert max(tv.values()) < TOLERANCE, tv
    # every person has all the real attributes, drawn from the real shares
    assert {"AGE", "EDUCATION", "INCOME", "POLIDEOLOGY", "SEX", "CREGION"} <= set(
        responses.demographics.columns
    )
    assert responses.demographics.notna().all().all()


@needs_data
def test_tilt_keeps_the_group_distributions():
    kwargs = dict(root=ROOT, group_by="POLPARTY", n_respondents=3000, observed_frac=1.0, seed=7)
    flat = simulate_respondents([26], tilt=0.0, noise=1.0, **kwargs)
    tilted = simulate_respondents([26], tilt=2.0, noise=0.1, **kwargs)
    for responses in (flat, tilted):
        assert max(_party_tv(responses, [26]).values()) < 0.03
    # the tilt adds a real, question-dependent common factor: the first principal component grows
    assert _top_share(tilted.values) > 1.5 * _top_share(flat.values)


def _top_share(values):
    filled = np.where(np.isnan(values), np.nanmean(values, 0), values)
    spectrum = np.linalg.svd(filled - filled.mean(0), compute_uv=False) ** 2
    return spectrum[0] / spectrum.sum()


@needs_data
def test_other_attributes_move_answers_the_real_way():
    """Within-group structure comes from real attributes: simulated very liberal and very conservative people
    differ in the direction the real groups differ, question by question."""
    responses = simulate_respondents(
        [26, 27], root=ROOT, group_by="POLPARTY", n_respondents=3000, observed_frac=1.0
    )
    ideology = responses.demographics["POLIDEOLOGY"].to_numpy()
    agree = total = 0
    for wave in (26, 27):
        directory = wave_dirs(ROOT, [wave])[0]
        real = group_distributions(directory, "POLIDEOLOGY", questions=load_wave(directory))
        for j, key in enumerate(responses.question_keys):
            if key not in real or responses.questions[key].is_nominal:
                continue
            scaled = real[key].question.scaled_array()
            probs = real[key].probs
            gap = (
                probs[real[key].group_index("Very conservative")] @ scaled
                - probs[real[key].group_index("Very liberal")] @ scaled
            )
            if abs(gap) < 0.1:
                continue
            simulated = np.nanmean(responses.values[ideology == "Very conservative", j]) - np.nanmean(
                responses.values[ideology == "Very liberal", j]
            )
            agree += np.sign(simulated) == np.sign(gap)
            total += 1
    assert total >= 20 and agree / total > 0.8, (agree, total)


@needs_data
def test_cohorts_are_not_trivial_at_the_defaults():
    """MF embeddings of simulated people carry their party (above the base rate) and k-means cohorts differ in
    party composition; real party gaps are small, so this is far from a clean party split (docs/persona.md)."""
    import pandas as pd
    from scipy.stats import chi2_contingency
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from steer.persona.cohorts import find_cohorts
    from steer.persona.embedder import PersonaEmbedder

    responses = simulate_respondents([26, 27], root=ROOT, n_respondents=400, observed_frac=0.3, seed=0)
    party = responses.demographics["POLPARTY"].to_numpy()
    embedder = PersonaEmbedder(4).fit(responses)
    x = embedder.embeddings.numpy()
    two = np.isin(party, ["Democrat", "Republican"])
    accuracy = cross_val_score(LogisticRegression(max_iter=1000), x[two], party[two], cv=5).mean()
    base = max(np.mean(party[two] == "Democrat"), np.mean(party[two] == "Republican"))
    assert accuracy > base + 0.07, (accuracy, base)
    cohorts = find_cohorts(embedder.embeddings, k=3, seed=0)
    assert chi2_contingency(pd.crosstab(cohorts.labels, party))[1] < 0.05


@needs_data
def test_pairs_without_a_joint_file_fall_back(caplog):
    with caplog.at_level(logging.INFO, logger="steer.persona.simulate"):
        responses = simulate_respondents([26, 41], root=ROOT, n_respondents=200, seed=0)
    assert any("combined the single-attribute files" in r.message for r in caplog.records)
    assert any(k.endswith("_W41") for k in responses.question_keys)
    assert {"POLPARTY", "RACE"} <= set(responses.demographics.columns)


@needs_data
def test_real_format_csv_round_trip(tmp_path):
    simulated = simulate_respondents(
        [26, 27], root=ROOT, group_by=("POLPARTY", "SEX"), n_respondents=250, seed=2
    )
    assert simulated.stats["refusals"] >= 0
    path = simulated.to_csv(tmp_path / "responses.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[:2] == ["QKEY", "WEIGHT_W26"] and "POLIDEOLOGY" in header and "SAFECRIME_W26" in header
    questions = {**load_wave(wave_dirs(ROOT, [26])[0]), **load_wave(wave_dirs(ROOT, [27])[0])}
    loaded = load_responses(path, questions)
    assert loaded.question_keys == simulated.question_keys
    assert list(loaded.user_ids) == list(simulated.user_ids)
    assert np.array_equal(loaded.option_index, simulated.option_index)
    assert np.array_equal(loaded.values, simulated.values, equal_nan=True)
    assert np.array_equal(loaded.refusal_index, simulated.refusal_index)
    for column in simulated.demographics.columns:
        assert loaded.demographics[column].tolist() == simulated.demographics[column].tolist()
    assert loaded.demographics["CITIZEN"].isna().all()  # not simulated: no Pew table for it


def test_simulator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_respondents"):
        simulate_respondents(n_respondents=0, root=tmp_path)
    with pytest.raises(ValueError, match="group_by"):
        simulate_respondents(root=tmp_path, group_by=("A", "B", "C"))
    with pytest.raises(FileNotFoundError, match="American_Trends_Panel"):
        simulate_respondents(root=tmp_path)


def test_synthetic_responses_shape_and_levels():
    responses = synthetic_responses(500, 80, n_options=5, observed_frac=0.2, seed=0)
    assert responses.values.shape == (500, 80)
    assert 0.17 < responses.density() < 0.23
    levels = np.unique(responses.values[responses.observed])
    assert set(levels.tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0} and len(levels) == 5
    assert set(responses.demographics["GROUP"]) == {"G0", "G1", "G2", "G3"}
