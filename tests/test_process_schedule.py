"""The ``process`` guidance schedule: rounds in a worker process, equal to the thread worker, resumable, failing loudly.

Each test that runs rounds starts one or two worker processes (a fresh interpreter importing torch,
transformers and peft: a few seconds each).
"""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model

from steer.constraints import KeywordConstraint
from steer.guidance import GuidanceConfig, GuidanceModel
from steer.models import tiny_causal_lm
from steer.trainers.process_schedule import GuidanceWorkerError, ProcessSchedule, worker_copy
from steer.trainers.schedule import GuidanceLearner, ParallelSchedule, RoundSettings

PROMPTS = ["The cat", "A dog", "The bird is", "Good and", "It was", "The calm"]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:guidance round"),  # tiny random policies: one-sided labels
]


class FailingOracle(KeywordConstraint):
    """In a worker process, scores its first ``ok_calls`` batches and then fails (the process that built it, e.g.
    for the trainer's token prior and the warm-up round, is always served). Module level: the worker process
    imports it."""

    def __init__(self, ok_calls: int = 1) -> None:
        super().__init__(banned=["the"])
        self.ok_calls, self.calls, self.home = ok_calls, 0, os.getpid()

    def score(self, texts):
        self.calls += os.getpid() != self.home
        if self.calls > self.ok_calls:
            raise ConnectionError("oracle backend unreachable")
        return super().score(texts)


def _setup(kind: str, constraint=None, **overrides):
    """(schedule, trained policy's named params, trainable names, trainer-side guidance) on a tiny llama."""
    torch.manual_seed(0)  # LoRA initialisation draws from the global RNG: same adapters for both kinds
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    names = sorted(n for n, p in policy.named_parameters() if p.requires_grad)
    worker_policy = worker_copy(policy) if kind == "process" else copy.deepcopy(policy)
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    worker_guidance = GuidanceModel(worker_policy, GuidanceConfig(lora_r=4))
    for g in (guidance, worker_guidance):
        g.set_trainable(False)
    with torch.no_grad():
        for a, b in zip(worker_guidance.trainable_parameters(), guidance.trainable_parameters()):
            a.copy_(b)
    settings = RoundSettings(
        samples_per_round=8,
        sample_max_new_tokens=5,
        sample_batch_size=8,
        guidance_steps_per_round=3,
        guidance_batch_size=8,
    )
    learner = GuidanceLearner(
        worker_policy,
        worker_guidance,
        tokenizer,
        constraint or KeywordConstraint(banned=["the"]),
        PROMPTS,
        settings,
        lr=1e-2,
        seed=0,
        buffer_size=64,
    )
    main = dict(policy.named_parameters())
    common = dict(
        policy_params=lambda: [main[n] for n in names], guidance_params=guidance.trainable_parameters
    )
    if kind == "process":
        overrides = {"timeout": 120, **overrides}
        schedule = ProcessSchedule(learner, policy_names=names, worker_threads=1, **common, **overrides)
    else:
        worker = dict(worker_policy.named_parameters())
        schedule = ParallelSchedule(
            learner,
            worker_policy_params=lambda: [worker[n] for n in names],
            worker_threads=1,
            **common,
            **overrides,
        )
    return schedule, main, names, guidance


def _gone(pid: int) -> bool:
    """The process was reaped (not running, not a zombie)."""
    return not os.path.exists(f"/proc/{pid}")


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _drive(schedule, main, names, guidance):
    """Rounds 0..2 with the policy moving between them, a checkpoint while round 1 runs; returns what was seen."""
    seen = {"rounds": [len(schedule.on_round(0))], "versions": [schedule.version]}
    with torch.no_grad():  # the policy trains: round 1 must sample from the new weights
        main[names[0]].add_(0.5)
    seen["rounds"].append(len(schedule.on_round(1)))
    seen["versions"].append(schedule.version)
    seen["state"] = schedule.state_dict()  # waits for round 1 and keeps it pending
    seen["v0"] = [p.detach().clone() for p in guidance.trainable_parameters()]
    finished = schedule.on_round(2)
    seen["rounds"].append(len(finished))
    seen["versions"].append(schedule.version)
    seen["metrics"] = finished
    seen["rounds"].append(len(schedule.finish()))
    seen["versions"].append(schedule.version)
    seen["guidance"] = [p.detach().clone() for p in guidance.trainable_parameters()]
    seen["samples"] = list(schedule.samples)
    return seen


def _no_rate(metrics):  # wall-time metrics (samples_per_second, time/round_*) differ from run to run
    return [
        {k: v for k, v in m.items() if k != "samples_per_second" and not k.startswith("time/")}
        for m in metrics
    ]


def test_worker_copy_shares_only_the_frozen_weights():
    import pickle

    model, _ = tiny_causal_lm("llama", seed=0)
    model.enable_input_require_grads()  # what SFTTrainer does with activation checkpointing: a closure hook
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    twin = worker_copy(policy)
    shipped = pickle.loads(pickle.dumps(twin))  # what the worker process receives
    embeddings = shipped.get_input_embeddings()
    assert embeddings(torch.tensor([[1, 2]])).requires_grad  # the hook survived, as a picklable function
    for (name, a), (_, b) in zip(policy.named_parameters(), twin.named_parameters()):
        if a.requires_grad:
            assert a is not b and a.data_ptr() != b.data_ptr() and torch.equal(a, b), name
        else:
            assert a is b, name
    with torch.no_grad():  # the copy's adapters are its own
        next(p for p in twin.parameters() if p.requires_grad).add_(1.0)
    assert not torch.equal(
        next(p for p in twin.parameters() if p.requires_grad),
        next(p for p in policy.parameters() if p.requires_grad),
    )


@pytest.mark.slow  # two worker processes and a thread run (~30 s on 2 busy cores)
def test_process_rounds_equal_the_thread_worker_and_resume():
    """Same seeds, samples and weights: the worker process computes bit-identical guidance versions, swapped in
    at the same steps; a schedule restored from the mid-run checkpoint finishes the run identically."""
    thread = _drive(*_setup("thread"))
    schedule, main, names, guidance = _setup("process")
    process = _drive(schedule, main, names, guidance)
    pid = None
    assert process["rounds"] == thread["rounds"] == [1, 0, 1, 1]
    assert process["versions"] == thread["versions"] == [0, 0, 1, 2]
    assert process["state"]["pending"]["round"] == thread["state"]["pending"]["round"] == 1
    assert _same(process["v0"], thread["v0"])
    assert _same(process["guidance"], thread["guidance"])
    assert _no_rate(process["metrics"]) == _no_rate(thread["metrics"])
    assert [s[0].tolist() for s in process["samples"]] == [s[0].tolist() for s in thread["samples"]]
    for key in ("guidance", "buffer", "rounds_done"):
        a, b = process["state"]["learner"][key], thread["state"]["learner"][key]
        if key == "guidance":
            assert _same(a, b)
        elif key == "buffer":
            assert _same(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        else:
            assert a == b
    assert schedule.pid is None  # finish() stopped and joined the worker

    # resume: a fresh schedule (fresh learner) loads the checkpoint taken while round 1 ran, then rounds 2..end
    restored, main2, names2, guidance2 = _setup("process")
    with torch.no_grad():
        main2[names2[0]].add_(0.5)
    restored.load_state_dict(process["state"])
    assert restored.version == 0 and _same(list(guidance2.trainable_parameters()), process["v0"])
    try:
        assert len(restored.on_round(2)) == 1 and restored.version == 1  # the pending round 1 is swapped in
        pid = restored.pid
        assert len(restored.finish()) == 1 and restored.version == 2
        assert _same([p.detach() for p in guidance2.trainable_parameters()], process["guidance"])
    finally:
        restored.close()
    assert pid is not None and _gone(pid)
    with pytest.raises(ValueError, match="schedule='process'"):
        restored.load_state_dict(thread["state"])  # a thread-schedule checkpoint is refused


def test_a_running_worker_loads_a_state_replays_a_round_and_is_terminated_by_close():
    """load_state_dict on a started worker (its running round dropped) rewinds it: the replayed round is equal;
    close() while a round runs terminates and reaps the worker."""
    schedule, main, names, guidance = _setup("process")
    try:
        schedule.on_round(0)
        state = schedule.state_dict()
        assert state["pending"] is None and state["learner"]["rounds_done"] == 1
        schedule.on_round(1)
        first = schedule.state_dict()
        schedule.load_state_dict(state)  # back to after round 0, sent to the running worker
        assert schedule.version == 0 and schedule.pid is not None
        schedule.on_round(1)
        again = schedule.state_dict()
        assert again["pending"]["round"] == first["pending"]["round"] == 1
        assert _same(again["learner"]["guidance"], first["learner"]["guidance"])
        assert again["learner"]["rounds_done"] == 2
        schedule.on_round(2)  # running when close() comes: the worker is terminated, not waited for
    finally:
        pid = schedule.pid
        schedule.close()
    assert schedule.pid is None and _gone(pid)
    schedule.close()  # idempotent


class PidOracle(KeywordConstraint):
    """Records the ids of the processes it scores in (readable in this process only)."""

    pids: set = set()

    def score(self, texts):
        PidOracle.pids.add(os.getpid())
        return super().score(texts)


def test_the_warm_up_runs_here_while_the_worker_starts_and_threads_follow_the_round():
    """The waited-for round 0 runs in the trainer's process (the worker, already spawned, imports meanwhile);
    round 1 runs in the worker with the CPU threads split, and the policy takes them all back once it is in."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    PidOracle.pids = set()
    schedule, main, names, guidance = _setup("process", constraint=PidOracle(banned=["the"]))
    pid = None
    try:
        assert len(schedule.on_round(0)) == 1 and schedule.version == 0
        pid = schedule.pid
        assert pid is not None and PidOracle.pids == {os.getpid()}  # scored here; the worker exists already
        assert torch.get_num_threads() == 2  # nothing runs in the worker
        assert schedule.on_round(1) == []
        assert torch.get_num_threads() == 1  # round 1 runs in the worker on the other thread
        state = schedule.state_dict()  # waits for round 1
        assert state["pending"]["round"] == 1 and state["learner"]["rounds_done"] == 2
        assert PidOracle.pids == {os.getpid()}  # round 1 was scored in the worker
        assert torch.get_num_threads() == 2
    finally:
        schedule.close()
        torch.set_num_threads(threads)
    assert _gone(pid)


def test_a_failed_round_surfaces_at_the_next_check_with_the_workers_error():
    schedule, main, names, guidance = _setup("process", constraint=FailingOracle(ok_calls=0))
    try:
        # the warm-up runs here, not in the worker
        assert len(schedule.on_round(0)) == 1 and schedule.version == 0
        good = [p.detach().clone() for p in guidance.trainable_parameters()]
        assert schedule.on_round(1) == []  # round 1 runs in the worker and fails there
        with pytest.raises(GuidanceWorkerError, match="oracle backend unreachable") as raised:
            for _ in range(1200):  # the next policy step's check (bounded wait, no timing asserted)
                schedule.check()
                time.sleep(0.1)
        assert raised.value.worker_type == "ConnectionError"
        assert "FailingOracle" in raised.value.worker_traceback or "score" in raised.value.worker_traceback
        schedule.check()  # raised once: training is unwinding from it
        state = schedule.state_dict()  # a checkpoint now holds the last good state, no pending round
        assert state["pending"] is None and state["version"] == 0
        assert _same(state["guidance"], good) and _same(state["learner"]["guidance"], good)
        assert _same([p.detach() for p in guidance.trainable_parameters()], good)
        with pytest.raises(GuidanceWorkerError, match="oracle backend unreachable"):
            schedule.on_round(2)  # no new round after a failed one
        assert schedule.finish() == []
    finally:
        pid = schedule.pid
        schedule.close()
    assert schedule.pid is None and (pid is None or _gone(pid))


def test_a_dead_worker_is_reported_and_close_leaves_no_child():
    schedule, main, names, guidance = _setup("process")
    try:
        schedule.on_round(0)
        pid = schedule.pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(GuidanceWorkerError, match="exit code -9"):
            schedule.on_round(1)
            for _ in range(1200):
                schedule.check()
                time.sleep(0.1)
        assert _gone(pid)  # reaped as soon as its death was noticed
        with pytest.raises(GuidanceWorkerError):
            schedule.on_round(2)
    finally:
        schedule.close()
    assert schedule.pid is None


UNGUARDED_SCRIPT = """
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
with open({marker!r}, "a") as handle:  # top-level code: must run once, in this process only
    handle.write("ran\\n")
from test_process_schedule import _setup

schedule, main, names, guidance = _setup("process")
schedule.on_round(0)
assert schedule.finish() == [] and schedule.version == 0 and schedule.pid is None
print("versions ok")
"""


@pytest.mark.slow  # a fresh interpreter + a worker process (~15-22 s on 2 busy cores)
def test_an_unguarded_script_is_not_run_again_in_the_worker(tmp_path):
    """spawn would re-import the script run as __main__ in the worker; an unguarded training script must not
    start a second training there."""
    import subprocess
    import sys
    from pathlib import Path

    marker = tmp_path / "marker.txt"
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED_SCRIPT.format(tests=str(Path(__file__).parent), marker=str(marker)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "versions ok" in proc.stdout
    assert marker.read_text() == "ran\n"


def test_a_constraint_defined_in_main_is_refused_before_the_worker_starts():
    from steer.errors import UserInputError

    class ScriptConstraint(KeywordConstraint):
        pass

    ScriptConstraint.__module__ = "__main__"
    schedule, *_ = _setup("process", constraint=ScriptConstraint(banned=["the"]))
    with pytest.raises(UserInputError, match="ScriptConstraint is defined in the script"):
        schedule.on_round(0)
    assert schedule.pid is None
    schedule.close()


def test_arguments_are_checked():
    schedule, main, names, guidance = _setup("process")
    with pytest.raises(ValueError, match="policy_names"):
        ProcessSchedule(
            schedule._learner,
            policy_params=lambda: [main[n] for n in names],
            policy_names=names[:-1],
            guidance_params=guidance.trainable_parameters,
        )
    with pytest.raises(ValueError, match="timeout"):
        ProcessSchedule(
            schedule._learner,
            policy_params=lambda: [main[n] for n in names],
            policy_names=names,
            guidance_params=guidance.trainable_parameters,
            timeout=0,
        )
    # before the first round nothing runs: state round trip is local, and no process was started
    state = schedule.state_dict()
    assert state["schedule"] == "process" and state["version"] == -1 and schedule.pid is None
    schedule.load_state_dict(state)
    schedule.close()


# --------------------------------------------------------------------------------------------- the trainer
def _process_schedule_available() -> bool:
    from steer.trainers.constrained import ConstrainedConfig

    return "guidance_process_timeout" in ConstrainedConfig.__dataclass_fields__


needs_trainer = pytest.mark.skipif(
    not _process_schedule_available(), reason="ConstrainedTrainer has no schedule='process' yet"
)


def _trainer(tmp_path, **overrides):
    """The tiny trainer of ``helpers.constrained``, 6 steps, the worker on one thread."""
    from helpers.constrained import trainer

    return trainer(tmp_path, **{"max_steps": 6, "parallel_worker_threads": 1, **overrides})


def _losses(trainer) -> list[float]:
    from helpers.constrained import losses

    return losses(trainer)


def _staleness(trainer) -> list[float]:
    return [h["guidance/staleness"] for h in trainer.state.log_history if "guidance/staleness" in h]


@needs_trainer
@pytest.mark.slow  # two trainers, one worker process (~30 s on 2 busy cores)
def test_trainer_process_schedule_equals_the_thread_schedule(tmp_path):
    thread = _trainer(tmp_path / "t", schedule="parallel")
    thread.train()
    process = _trainer(tmp_path / "p", schedule="process")
    process.train()
    assert _staleness(process) == _staleness(thread) == [0, 0, 1, 1, 1, 1]
    a, b = _losses(thread), _losses(process)
    assert len(a) == len(b) == 6 and a == b
    assert _same(list(thread.guidance.trainable_parameters()), list(process.guidance.trainable_parameters()))
    assert (
        process.schedule.version == 2 and process.schedule.pid is None
    )  # last round swapped in, worker gone
    assert process.model.active_adapter == "default"


@needs_trainer
@pytest.mark.slow  # three trainings with a worker process each
def test_trainer_process_schedule_resumes_exactly(tmp_path):
    full = _trainer(tmp_path, schedule="process", save_strategy="steps", save_steps=3)
    full.train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    state = torch.load(checkpoint / "constrained_state.pt", weights_only=True)
    assert state["schedule"]["schedule"] == "process" and state["schedule"]["pending"] is not None
    resumed = _trainer(tmp_path, schedule="process")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = _losses(full), _losses(resumed)
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    for x, y in zip(full.guidance.trainable_parameters(), resumed.guidance.trainable_parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@needs_trainer
@pytest.mark.slow  # one training with a worker process
def test_trainer_without_the_warm_up_wait_trains_on_its_priors_until_round_0_returns(tmp_path):
    trainer = _trainer(
        tmp_path, schedule="process", guidance_warmup_wait=False, kl_positions="both", kl_sample_batch_size=2
    )
    trainer.train()
    # every step is one round behind: steps 0-1 use the starting guidance (no samples), round 0 arrives at step 2
    assert _staleness(trainer) == [1, 1, 1, 1, 1, 1]
    assert [h["step"] for h in trainer.round_history] == [2, 4, 6]
    assert trainer.schedule.version == 2 and trainer.schedule.pid is None
    assert (
        trainer.timings["sample_rows"] == 2 * 4
    )  # the samples term starts with round 0's samples, at step 2
    with pytest.raises(ValueError, match="guidance_warmup_wait=False needs schedule='parallel' or 'process'"):
        _trainer(tmp_path / "s", schedule="sequential", guidance_warmup_wait=False)


@needs_trainer
def test_trainer_stops_at_the_next_step_when_a_worker_round_fails(tmp_path):
    trainer = _trainer(tmp_path, schedule="process", max_steps=40, constraint=FailingOracle(ok_calls=0))
    seen = {}
    on_round = trainer.schedule.on_round

    def spy(index):
        out = on_round(index)
        seen["pid"] = trainer.schedule.pid
        return out

    trainer.schedule.on_round = spy
    with pytest.raises(GuidanceWorkerError, match="oracle backend unreachable"):
        trainer.train()
    assert trainer.state.global_step <= 4  # round 1 starts at step 2; raised at step 4 at the latest
    assert trainer.schedule.pid is None and _gone(seen["pid"])


@needs_trainer
@pytest.mark.slow  # accelerate launch: 2 gloo ranks, each with its own worker process (~1-2 min)
def test_two_ranks_each_own_a_worker_and_end_identical(tmp_path, tiny_model_dir):
    from helpers.launch import check_two_ranks, constrained_args, launch

    out = tmp_path / "out"
    log, _ = launch(
        [
            *constrained_args(tmp_path, tiny_model_dir),
            "--output_dir",
            str(out),
            "--schedule",
            "process",
            "--parallel_worker_threads",
            "1",
            "--max_steps",
            "6",
        ],
        tmp_path,
    )
    check_two_ranks(log, out, "train constrained")  # identical policy weights on both ranks
    assert log.count("guidance worker process") >= 2, log[-3000:]  # one worker per rank
    import json

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # each rank's worker trained on its own samples; the swapped-in versions are averaged over the ranks
    assert ranks[0]["guidance_digest"] and ranks[0]["guidance_digest"] == ranks[1]["guidance_digest"]
    assert "guidance/loss" in log


@needs_trainer
def test_the_process_schedule_is_refused_under_fsdp2(tmp_path):
    """Its worker would copy the sharded policy: refused in one line (as schedule='parallel'), no worker started."""
    from steer.errors import UserInputError

    trainer = _trainer(tmp_path, schedule="process")
    with pytest.raises(UserInputError, match="schedule='process' is not supported under FSDP2"):
        trainer._setup_fsdp2()  # what the constructor runs when FSDP is enabled
    assert trainer.schedule.pid is None
