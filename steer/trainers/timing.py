"""Where a constrained run's wall time goes: always-on, cheap timers (``time.perf_counter`` around whole phases).

``ConstrainedTrainer.timings`` is a plain dict of totals for the run (this process, since the trainer was built):

- ``train_s``: the wall time of ``train()`` (steps, rounds, logging, checkpoints);
- ``rounds_s``: the time the training loop spent in guidance rounds (``run_due_rounds`` and the end-of-training
  wait). Under the ``parallel``/``process`` schedules that is the waiting only (a round overlapping the policy
  steps is not counted), so ``train_s - rounds_s`` is always the time of the steps without the rounds;
- ``round_sampling_s``, ``round_labelling_s``, ``round_guidance_steps_s``, ``round_auc_pool_s``, ``round_s``:
  the sums over finished rounds of their phases (:data:`ROUND_TIME_METRICS`, measured where the rounds run);
- ``sample_rows_s``, ``sample_rows``, ``sample_row_tokens``: drawing the newest round's policy samples and
  appending them to the training batches (``kl_positions`` 'samples'/'both'): the time, the rows and their
  non-padding tokens. The samples are generated in the rounds; what they cost in a step is the extra rows'
  forward and backward, which runs inside the batch's own pass (``sample_row_tokens`` against the corpus tokens
  gives its share; ``benchmarks/whole_run.py`` measures it against a ``kl_positions: corpus`` twin).

Per step, ``time/sample_rows_s`` goes to the trainer's logged metrics; per round, the ``time/round_*`` keys go
to the round metrics and ``trainer.round_history``.
"""

from __future__ import annotations

import contextlib
import time

__all__ = ["ROUND_TIME_METRICS", "add_round_totals", "count_sample_rows", "new_timings", "timed"]

ROUND_TIME_METRICS = (
    "time/round_sampling_s",
    "time/round_labelling_s",
    "time/round_guidance_steps_s",
    "time/round_auc_pool_s",
    "time/round_s",
)


def new_timings() -> dict[str, float]:
    """Every total at zero (the keys a run reports, whether or not its settings use them)."""
    keys = ("train_s", "rounds_s", "sample_rows_s", "sample_rows", "sample_row_tokens")
    return dict.fromkeys(keys + tuple(key.removeprefix("time/") for key in ROUND_TIME_METRICS), 0.0)


class _Clock:
    seconds = 0.0


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str):
    """Add the block's wall time to ``timings[key]`` (also when it raises); ``as clock``: ``clock.seconds``."""
    clock = _Clock()
    start = time.perf_counter()
    try:
        yield clock
    finally:
        clock.seconds = time.perf_counter() - start
        timings[key] = timings.get(key, 0.0) + clock.seconds


def add_round_totals(timings: dict[str, float], record: dict[str, float]) -> None:
    """Add a finished round's ``time/round_*`` metrics (those present) to the totals."""
    for key in ROUND_TIME_METRICS:
        if key in record:
            name = key.removeprefix("time/")
            timings[name] = timings.get(name, 0.0) + float(record[key])


def count_sample_rows(timings: dict[str, float], rows: dict | None) -> None:
    """Count the policy-sample rows appended to a batch and their non-padding tokens."""
    if rows is None:
        return
    timings["sample_rows"] += float(rows["input_ids"].shape[0])
    timings["sample_row_tokens"] += float(rows["attention_mask"].sum())
