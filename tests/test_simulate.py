"""The respondent simulator: grounded in the real Pew group counts, real-format csv round trip."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from steer.persona.opinionqa import group_distributions, group_shares, load_responses, load_wave, wave_dirs
from steer.persona.simulate import simulate_respondents, synthetic_responses


def _root():
    from steer.data import opinionqa_dir

    try:
        return opinionqa_dir()
    except FileNotFoundError:
        return None


ROOT = _root()
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
def test_sparsity_determinism_and_tilt():
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
    # the personal tilt is low-rank (latent_dim=2): it concentrates the answers' variance in two components
    full = {**kwargs, "n_respondents": 600, "observed_frac": 1.0}
    flat = simulate_respondents([26], seed=5, tilt=0.0, **full)
    tilted = simulate_respondents([26], seed=5, tilt=1.0, **full)
    assert _top2_share(tilted.values) > 1.8 * _top2_share(flat.values)


def _top2_share(values):
    filled = np.where(np.isnan(values), np.nanmean(values, 0), values)
    spectrum = np.linalg.svd(filled - filled.mean(0), compute_uv=False) ** 2
    return spectrum[:2].sum() / spectrum.sum()


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
    for column in ("POLPARTY", "SEX"):
        assert loaded.demographics[column].tolist() == simulated.demographics[column].tolist()
    assert loaded.demographics["AGE"].isna().all()


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
