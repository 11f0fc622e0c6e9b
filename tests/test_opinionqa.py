"""OpinionQA loaders: ordinal edge cases on the real info.csv files, group counts, responses.csv parsing."""

from __future__ import annotations

import ast
import logging

import numpy as np
import pandas as pd
import pytest
from helpers.data import opinionqa_root

from steer.persona.opinionqa import (
    DEMOGRAPHIC_COLUMNS,
    Question,
    group_distributions,
    group_shares,
    load_metadata,
    load_responses,
    load_wave,
    load_waves,
    wave_dirs,
)

ROOT = opinionqa_root()
needs_data = pytest.mark.skipif(
    ROOT is None, reason="OpinionQA data (../shared/data/opinionqa) not available"
)


@pytest.fixture(scope="module")
def all_questions():
    if ROOT is None:
        pytest.skip("OpinionQA data not available")
    return load_waves(ROOT)


# ----------------------------------------------------------------------------- real info.csv files
@needs_data
def test_non_monotone_ordinals_are_sorted_by_ordinal_not_position(all_questions):
    question = all_questions["WORLDDANGER_W26"]  # option_ordinal [1.0, 2.0, 1.5]
    assert question.references[1] == "We live in a more dangerous world"
    assert question.options == (
        "We live in a safer world",
        "The world we live in is neither safer nor more dangerous",
        "We live in a more dangerous world",
    )
    assert question.ordinals == (1.0, 1.5, 2.0)
    assert question.scaled == (0.0, 0.5, 1.0)
    assert question.option_index("We live in a more dangerous world") == 2
    assert question.option_index("Refused") == -1
    assert question.wave == "W26"


@needs_data
def test_every_question_matches_an_independent_parse_of_info_csv(all_questions):
    nominal_expected = 0
    for directory in wave_dirs(ROOT):
        frame = pd.read_csv(directory / "info.csv").drop_duplicates("key")
        for row in frame.itertuples():
            refs = ast.literal_eval(row.references)
            ords = ast.literal_eval(row.option_ordinal)
            question = all_questions[row.key]
            assert question.refusals == tuple(refs[len(ords) :])
            assert sorted(question.options) == sorted(refs[: len(ords)])
            assert list(question.ordinals) == sorted(ords)
            if len(set(ords)) == 1:
                nominal_expected += 1
                assert question.scaled is None and question.is_nominal
                assert np.isnan(question.scaled_array()).all()
            else:
                scaled = np.asarray(question.scaled)
                assert np.isfinite(scaled).all() and scaled.min() == 0.0 and scaled.max() == 1.0
                assert np.all(np.diff(scaled) >= 0)
                lo, hi = min(ords), max(ords)
                for text, o in zip(refs, ords):
                    assert question.scaled[question.option_index(text)] == pytest.approx((o - lo) / (hi - lo))
    assert nominal_expected > 0
    assert sum(q.is_nominal for q in all_questions.values()) == nominal_expected


@needs_data
def test_nominal_count_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="steer.persona.opinionqa"):
        questions = load_wave(wave_dirs(ROOT, [26])[0])
    assert questions["IMPREASONGUN_W26"].is_nominal
    assert any("1 nominal question" in record.message for record in caplog.records)


@needs_data
def test_refusal_type_options_and_ties(all_questions):
    assert "Not sure" in all_questions["WANTMOVE_W32"].refusals
    tied = all_questions["CONTROLGRPb_W49"]  # ordinals [1, 2, 3, 2]: two options share a value
    assert tied.scaled == (0.0, 0.5, 0.5, 1.0)
    assert tied.options[-1] == "No control"


@needs_data
def test_repeated_keys_are_merged_and_waves_stay_separate(all_questions):
    assert "IDIMPORT_W43" in all_questions  # five info.csv rows share this data column
    assert {q.wave for q in all_questions.values()} >= {"W26", "W82"}
    assert len(load_waves(ROOT, ["W26", 27])) == len(load_wave(wave_dirs(ROOT, [26])[0])) + len(
        load_wave(wave_dirs(ROOT, ["American_Trends_Panel_W27"])[0])
    )


@needs_data
def test_metadata_lists_the_demographic_columns():
    metadata = load_metadata(wave_dirs(ROOT, [26])[0])
    assert set(metadata) == set(DEMOGRAPHIC_COLUMNS)
    assert "Democrat" in metadata["POLPARTY"]


# ------------------------------------------------------------------------------- group distributions
@needs_data
def test_group_distributions_single_pair_and_population():
    directory = wave_dirs(ROOT, [26])[0]
    questions = load_wave(directory)
    party = group_distributions(directory, "POLPARTY", questions=questions)
    pair = group_distributions(directory, ("POLPARTY", "RACE"), questions=questions)
    reverse = group_distributions(directory, ("RACE", "POLPARTY"), questions=questions)
    population = group_distributions(directory, None, questions=questions)
    key = next(iter(party))
    dist = party[key]
    assert dist.counts.shape[1] == len(questions[key].all_options)
    probs = dist.probs[~np.isnan(dist.probs).any(1)]
    assert np.allclose(probs.sum(1), 1.0)
    assert all(len(g) == 2 for g in pair[key].groups)
    assert {(b, a) for a, b in pair[key].groups} == set(reverse[key].groups)
    for k in party:  # the pair file sums to the single-attribute file and to the population
        for g in party[k].groups:
            summed = sum(pair[k].counts[i] for i, group in enumerate(pair[k].groups) if group[0] == g[0])
            assert np.allclose(summed, party[k].counts[party[k].group_index(g)])
        assert np.allclose(population[k].counts[0], party[k].counts.sum(0))
    shares = group_shares(pair, exclude=("Refused",))
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares[("Democrat", "White")] > shares[("Democrat", "Asian")]


@needs_data
def test_population_without_none_file_and_case_typos():
    directory = wave_dirs(ROOT, [42])[0]  # no NONE_data.json; one answer text differs in case ("noR")
    assert not (directory / "NONE_data.json").exists()
    population = group_distributions(directory, None)
    assert all(len(d.groups) == 1 and d.counts.sum() > 0 for d in population.values())


def test_group_distributions_errors(tmp_path):
    (tmp_path / "info.csv").write_text(
        "key,question,references,option_ordinal\nQ1_W9,Agree?,\"['Yes', 'No', 'Refused']\",\"[1.0, 2.0]\"\n"
    )
    with pytest.raises(FileNotFoundError, match="SEX_data.json"):
        group_distributions(tmp_path, "SEX")
    (tmp_path / "SEX_data.json").write_text(
        '{"Q1_W9": {"Male": {"Yes": 3, "Maybe": 1}, "Female": {"No": 2}}}'
    )
    with pytest.raises(ValueError, match=r"SEX_data.json.*'Maybe'.*Q1_W9"):
        group_distributions(tmp_path, "SEX")
    dist = group_distributions(tmp_path, "SEX", on_error="skip")["Q1_W9"]
    assert dist.groups == [("Male",), ("Female",)]
    assert dist.counts.tolist() == [[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]]


# --------------------------------------------------------------------------------- bad info.csv
def _write_info(path, rows):
    path.write_text("key,question,references,option_ordinal\n" + "".join(rows))
    return path


def test_info_csv_errors_name_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="info.csv"):
        load_wave(tmp_path)
    (tmp_path / "info.csv").write_text("key,question,references\nQ1,x,\"['a']\"\n")
    with pytest.raises(ValueError, match="option_ordinal"):
        load_wave(tmp_path)
    good = "Q1_W9,Agree?,\"['Yes', 'No', 'Refused']\",\"[1.0, 2.0]\"\n"
    malformed = "Q2_W9,Broken?,\"['Yes', 'No'\",\"[1.0, 2.0]\"\n"
    too_many = 'Q3_W9,More?,"[\'Yes\']","[1.0, 2.0]"\n'
    _write_info(tmp_path / "info.csv", [good, malformed])
    with pytest.raises(ValueError, match=r"info.csv.*Q2_W9"):
        load_wave(tmp_path)
    _write_info(tmp_path / "info.csv", [good, too_many])
    with pytest.raises(ValueError, match=r"info.csv.*Q3_W9"):
        load_wave(tmp_path)
    _write_info(tmp_path / "info.csv", [good, malformed, too_many])
    assert list(load_wave(tmp_path, on_error="skip")) == ["Q1_W9"]


def test_question_from_lists_never_divides_by_zero():
    nominal = Question.from_lists("N_W1", "Why?", ["a", "b", "c", "Refused"], [1, 1, 1])
    assert nominal.scaled is None and nominal.refusals == ("Refused",)
    single = Question.from_lists("S_W1", "One?", ["only"], [3.0])
    assert single.is_nominal
    with pytest.raises(KeyError, match="S_W1"):
        single.option_index("other")


# ------------------------------------------------------------------------------------ responses.csv
@pytest.fixture
def two_questions():
    return {
        "Q1_W9": Question.from_lists("Q1_W9", "How much?", ["A lot", "Some", "None", "Refused"], [1, 2, 3]),
        "Q2_W9": Question.from_lists("Q2_W9", "Which?", ["Yes", "No", "Not sure"], [2.0, 1.0]),
        "Q3_W10": Question.from_lists("Q3_W10", "Later?", ["Agree", "Disagree"], [1.0, 2.0]),
    }


def _responses_csv(path, rows, *, drop=(), extra=None):
    columns = ["QKEY", "WEIGHT_W9", *DEMOGRAPHIC_COLUMNS]
    frame = pd.DataFrame([dict(zip(columns, [r[0], r[1]] + ["x"] * len(DEMOGRAPHIC_COLUMNS))) for r in rows])
    frame["POLPARTY"] = [r[2] for r in rows]
    for key in ("Q1_W9", "Q2_W9"):
        frame[key] = [r[3].get(key, np.nan) for r in rows]
    if extra:
        for key, values in extra.items():
            frame[key] = values
    frame = frame.drop(columns=list(drop))
    frame.to_csv(path, index=False)
    return path


def test_load_responses_parses_the_real_format(tmp_path, two_questions):
    path = _responses_csv(
        tmp_path / "responses.csv",
        [
            (101, 0.5, "Democrat", {"Q1_W9": "A lot", "Q2_W9": "No"}),
            (102, 1.5, "Republican", {"Q1_W9": "Refused"}),
            (103, 2.0, "Independent", {"Q2_W9": "Not sure"}),
        ],
        extra={"UNRELATED_W9": ["a", "b", "c"]},
    )
    responses = load_responses(path, two_questions)
    assert responses.question_keys == ["Q1_W9", "Q2_W9"]
    assert list(responses.user_ids) == ["101", "102", "103"]
    assert responses.option_index.tolist() == [[0, 0], [-1, -1], [-1, -1]]  # Q2 ordinal order: No, Yes
    assert responses.values[0].tolist() == [0.0, 0.0]
    assert np.isnan(responses.values[1:]).all()
    assert responses.refusal_index.tolist() == [[-1, -1], [0, -1], [-1, 0]]
    assert responses.weights.tolist() == [0.5, 1.5, 2.0]
    assert responses.demographics["POLPARTY"].tolist() == ["Democrat", "Republican", "Independent"]
    assert responses.stats["refusals"] == 2
    assert responses.group_labels(["POLPARTY", "SEX"])[0] == "Democrat | x"


def test_load_responses_bad_input(tmp_path, two_questions):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_responses(tmp_path / "nope.csv", two_questions)
    rows = [(101, 1.0, "Democrat", {"Q1_W9": "A lot"}), (102, 1.0, "Democrat", {"Q1_W9": "Plenty"})]
    path = _responses_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ValueError, match=r"bad.csv.*'Plenty'.*Q1_W9.*102"):
        load_responses(path, two_questions)
    skipped = load_responses(path, two_questions, on_error="skip")
    assert skipped.stats["unknown_answers"] == 1 and skipped.option_index[:, 0].tolist() == [0, -1]
    path = _responses_csv(tmp_path / "noparty.csv", rows[:1], drop=("POLPARTY",))
    with pytest.raises(ValueError, match=r"noparty.csv.*'POLPARTY'"):
        load_responses(path, two_questions)
    assert load_responses(path, two_questions, on_error="skip").stats["missing_columns"] == 1
    path = _responses_csv(tmp_path / "noqkey.csv", rows[:1], drop=("QKEY",))
    with pytest.raises(ValueError, match=r"noqkey.csv.*'QKEY'"):
        load_responses(path, two_questions)
    path = _responses_csv(tmp_path / "dupe.csv", [rows[0], rows[0]])
    with pytest.raises(ValueError, match=r"dupe.csv.*duplicate QKEY '101'"):
        load_responses(path, two_questions)


def test_waves_merge_by_qkey(tmp_path, two_questions):
    first = _responses_csv(
        tmp_path / "w9.csv",
        [(1, 1.0, "Democrat", {"Q1_W9": "Some"}), (2, 2.0, "Republican", {"Q2_W9": "Yes"})],
    )
    second = pd.DataFrame({"QKEY": [2, 3], "WEIGHT_W10": [5.0, 6.0], "Q3_W10": ["Disagree", "Agree"]})
    for column in DEMOGRAPHIC_COLUMNS:
        second[column] = ["y", "z"]
    second.to_csv(tmp_path / "w10.csv", index=False)
    merged = load_responses([first, tmp_path / "w10.csv"], two_questions)
    assert list(merged.user_ids) == ["1", "2", "3"]
    assert merged.question_keys == ["Q1_W9", "Q2_W9", "Q3_W10"]
    assert merged.option_index.tolist() == [[1, -1, -1], [-1, 1, 1], [-1, -1, 0]]
    assert merged.weights.tolist() == [1.0, 2.0, 6.0]  # first wave's weight wins for person 2
    assert merged.demographics["POLPARTY"].tolist() == ["Democrat", "Republican", "z"]


def test_splits_partition_observed_entries(tmp_path, two_questions):
    rows = [(i, 1.0, "Democrat", {"Q1_W9": "Some", "Q2_W9": "Yes"}) for i in range(200)]
    responses = load_responses(_responses_csv(tmp_path / "r.csv", rows), two_questions)
    train, held = responses.split(0.3, seed=0)
    assert not (train.observed & held.observed).any()
    assert ((train.observed | held.observed) == responses.observed).all()
    assert train.observed.sum(1).min() >= 1 and 0.15 < held.density() < 0.45
    first, rest = responses.split_per_user(1, seed=0)
    assert (first.observed.sum(1) == 1).all() and (rest.observed.sum(1) == 1).all()
    assert not (first.observed & rest.observed).any()
