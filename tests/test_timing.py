"""Where a constrained run's wall time goes: the round phases, the rounds and the appended policy-sample rows."""

from __future__ import annotations

import math

import pytest
from helpers.constrained import trainer as tiny_trainer

from steer.trainers.timing import ROUND_TIME_METRICS, add_round_totals, new_timings, timed

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:guidance round"),  # tiny random policies: one-sided labels
]

TOTALS = ("train_s", "rounds_s", "sample_rows_s", "round_sampling_s", "round_labelling_s")
TOTALS += ("round_guidance_steps_s", "round_auc_pool_s", "round_s")


def _check_rounds(trainer, rounds: int) -> None:
    assert len(trainer.round_history) == rounds
    for record in trainer.round_history:
        for key in ROUND_TIME_METRICS:
            assert record[key] >= 0.0 and math.isfinite(record[key]), key
        phases = sum(record[key] for key in ROUND_TIME_METRICS if key != "time/round_s")
        assert phases <= record["time/round_s"] + 1e-6
    timings = trainer.timings
    for key in TOTALS:
        assert timings[key] >= 0.0, key
    assert timings["round_s"] == pytest.approx(sum(r["time/round_s"] for r in trainer.round_history))
    assert 0.0 < timings["rounds_s"] <= timings["train_s"]


def test_a_run_with_samples_and_rounds_reports_where_its_time_went(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=4, kl_positions="both", kl_sample_batch_size=2)
    trainer.train()
    _check_rounds(trainer, rounds=2)  # before steps 1 and 3
    timings = trainer.timings
    assert timings["sample_rows"] == 4 * 2  # every step appends kl_sample_batch_size rows
    assert timings["sample_row_tokens"] >= timings["sample_rows"]
    assert timings["sample_rows_s"] < timings["train_s"] - timings["rounds_s"]
    per_step = [h["time/sample_rows_s"] for h in trainer.state.log_history if "time/sample_rows_s" in h]
    assert len(per_step) == 4 and all(t >= 0.0 for t in per_step)
    rounds = [h for h in trainer.state.log_history if "time/round_s" in h]
    assert len(rounds) == 2 and all(h["time/round_sampling_s"] > 0.0 for h in rounds)


def test_the_parallel_schedule_reports_the_round_times_and_only_the_waiting_as_rounds(tmp_path):
    trainer = tiny_trainer(
        tmp_path, max_steps=4, schedule="parallel", parallel_worker_threads=1, kl_positions="corpus"
    )
    trainer.train()
    _check_rounds(trainer, rounds=2)
    assert trainer.timings["sample_rows"] == 0  # kl_positions 'corpus': no rows appended


def test_the_plain_sft_twin_has_no_rounds(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=2, kl_coef=0.0)
    trainer.train()
    assert trainer.round_history == []
    assert trainer.timings["round_s"] == 0.0 and trainer.timings["train_s"] > 0.0
    assert trainer.timings["rounds_s"] < trainer.timings["train_s"]


def test_totals_helpers():
    timings = new_timings()
    with timed(timings, "rounds_s") as clock:
        pass
    assert timings["rounds_s"] == clock.seconds >= 0.0
    with pytest.raises(KeyError), timed(timings, "rounds_s"):
        raise KeyError("a failing block is still counted")
    assert timings["rounds_s"] >= clock.seconds
    add_round_totals(timings, {"time/round_s": 2.0, "time/round_sampling_s": 1.5, "guidance/loss": 0.3})
    add_round_totals(timings, {"time/round_s": 1.0})
    assert timings["round_s"] == 3.0 and timings["round_sampling_s"] == 1.5
    assert timings["round_labelling_s"] == 0.0
