"""Guidance rounds: the sample buffer, thread-safe sampling, one round, and the parallel schedule's versions."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model

from steer.constraints import KeywordConstraint
from steer.guidance import GuidanceConfig, GuidanceModel, LabelledSamples, SampleBatch
from steer.models import tiny_causal_lm
from steer.trainers.buffer import SampleBuffer
from steer.trainers.schedule import (
    GuidanceLearner,
    ParallelSchedule,
    RoundSettings,
    SequentialSchedule,
    _sequence_scores,
    sample_with_generator,
    set_thread_share,
)

PROMPTS = ["The cat", "A dog", "The bird is", "Good and", "It was", "The calm"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _labelled() -> LabelledSamples:
    pad = 1
    # prompt width 3 (left-padded), continuation width 4; row 0 stops at an EOS (id 0), row 1 runs to the end
    ids = torch.tensor(
        [[pad, 10, 11, 20, 0, pad, pad], [12, 13, 14, 21, 22, 23, 24], [pad, pad, 15, 0, pad, pad, pad]]
    )
    attention = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]])
    cont = torch.zeros_like(ids, dtype=torch.bool)
    cont[0, 3:5] = True
    cont[1, 3:7] = True
    cont[2, 3:4] = True
    batch = SampleBatch(ids, attention, cont, 3, torch.zeros(3), ["a", "b", "c"], ["x", "y", "z"])
    return LabelledSamples(batch, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.9, 0.1, 0.8]), 0)


def test_buffer_unpads_and_keeps_the_newest():
    buffer = SampleBuffer(capacity=4)
    assert buffer.add(_labelled()) == 3
    mb = buffer.collate(list(buffer._items), pad_token_id=1)
    assert mb["input_ids"].tolist() == [
        [10, 11, 20, 0, 1, 1, 1],
        [12, 13, 14, 21, 22, 23, 24],
        [15, 0, 1, 1, 1, 1, 1],
    ]
    assert mb["continuation_mask"][0].tolist() == [False, False, True, True, False, False, False]
    assert mb["attention_mask"].sum(1).tolist() == [4, 7, 2]
    assert mb["labels"].tolist() == [1.0, 0.0, 1.0]
    buffer.add(_labelled())
    assert len(buffer) == 4 and buffer.total_added == 6  # FIFO: the first two items were dropped
    assert [int(ids[0]) for ids, _, _ in buffer._items] == [15, 10, 12, 15]
    restored = SampleBuffer(capacity=4)
    restored.load_state_dict(buffer.state_dict())
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = buffer.sample(3, gen_a, 1), restored.sample(3, gen_b, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="capacity"):
        SampleBuffer(0)


def test_auc_sequence_score_follows_the_constraints_evidence():
    """guidance/auc scores a continuation by its lowest R for a violation constraint and by R at its last token
    otherwise (a topic is met once its word is written: only a prefix-aware R knows it at the end)."""
    token = torch.tensor([[0.5, -3.0, 2.0, 9.0], [1.0, 4.0, -2.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    assert _sequence_scores(token, mask, "violation").tolist() == [-3.0, -2.0]
    assert _sequence_scores(token, mask, "satisfaction").tolist() == [2.0, 0.0]
    assert _sequence_scores(token, mask, "none").tolist() == [2.0, 0.0]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    state = torch.get_rng_state()
    kwargs = dict(max_new_tokens=5, temperature=1.0, top_p=1.0, batch_size=4, seed=7)
    a = sample_with_generator(model, tokenizer, PROMPTS, **kwargs)
    b = sample_with_generator(model, tokenizer, PROMPTS, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.input_ids, b.input_ids)
    c = sample_with_generator(model, tokenizer, PROMPTS, **{**kwargs, "seed": 8})
    assert not torch.equal(a.input_ids, c.input_ids)
    # a vanishing nucleus is greedy decoding
    greedy = sample_with_generator(model, tokenizer, PROMPTS[:2], **{**kwargs, "top_p": 1e-6})
    with torch.no_grad():
        first = model(
            input_ids=greedy.input_ids[:, : greedy.prompt_length],
            attention_mask=greedy.attention_mask[:, : greedy.prompt_length],
        ).logits[:, -1]
    assert greedy.input_ids[:, greedy.prompt_length].tolist() == first.argmax(-1).tolist()


def test_thread_share_is_per_thread():
    torch.set_num_threads(2)
    seen = {}

    def worker():
        set_thread_share(1)
        seen["worker"] = torch.get_num_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["worker"] == 1
    assert torch.get_num_threads() == 2  # the main thread's OpenMP team size is untouched


def _learner(policy, guidance, tokenizer, **settings):
    defaults = dict(
        samples_per_round=8,
        sample_max_new_tokens=5,
        sample_batch_size=8,
        guidance_steps_per_round=3,
        guidance_batch_size=8,
    )
    defaults.update(settings)
    return GuidanceLearner(
        policy,
        guidance,
        tokenizer,
        KeywordConstraint(banned=["the"]),
        PROMPTS,
        RoundSettings(**defaults),
        lr=1e-2,
        seed=0,
        buffer_size=64,
    )


def _policy():
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    return policy, tokenizer


def test_a_round_samples_labels_and_trains_the_guidance():
    policy, tokenizer = _policy()
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    guidance.set_trainable(False)
    learner = _learner(policy, guidance, tokenizer)
    before = [p.detach().clone() for p in guidance.trainable_parameters()]
    policy_before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    metrics = learner.run_round(0)
    assert {"guidance/loss", "constraint/satisfaction", "samples_per_second", "guidance/buffer_size"} <= set(
        metrics
    )
    assert 0.0 <= metrics["constraint/satisfaction"] <= 1.0
    assert (
        len(learner.buffer) == 6 and len(learner.auc_pool) == 2 and learner.rounds_done == 1
    )  # 25% held back
    assert any(not torch.equal(a, b) for a, b in zip(before, guidance.trainable_parameters()))
    # the policy was neither trained nor left with the guidance adapter active or trainable
    assert policy.active_adapter == "default"
    for name, param in policy.named_parameters():
        if name in policy_before:
            assert param.requires_grad and torch.equal(param, policy_before[name])
    assert not any(p.requires_grad for p in guidance.trainable_parameters())


def _parallel(**options):
    """A ParallelSchedule on the tiny policy, its worker on one thread: (schedule, guidance, worker_guidance,
    the policy's and the worker copy's named parameters, the trainable names)."""
    policy, tokenizer = _policy()
    worker_policy = copy.deepcopy(policy)
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    worker_guidance = GuidanceModel(worker_policy, GuidanceConfig(lora_r=4))
    for g in (guidance, worker_guidance):
        g.set_trainable(False)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    main_named, worker_named = dict(policy.named_parameters()), dict(worker_policy.named_parameters())
    schedule = ParallelSchedule(
        _learner(worker_policy, worker_guidance, tokenizer),
        policy_params=lambda: [main_named[n] for n in names],
        worker_policy_params=lambda: [worker_named[n] for n in names],
        guidance_params=guidance.trainable_parameters,
        worker_threads=1,
        **options,
    )
    return schedule, guidance, worker_guidance, main_named, worker_named, names


def test_parallel_rounds_swap_in_one_round_late():
    schedule, guidance, worker_guidance, main_named, worker_named, names = _parallel()
    try:
        assert len(schedule.on_round(0)) == 1 and schedule.version == 0  # warm-up: waited for
        v0 = [p.detach().clone() for p in guidance.trainable_parameters()]
        with torch.no_grad():  # the policy moves; the next round must sample from the new weights
            main_named[names[0]].add_(0.5)
        assert schedule.on_round(1) == [] and schedule.version == 0
        state = schedule.state_dict()  # waits for round 1 and keeps it pending
        assert state["pending"]["round"] == 1 and schedule.version == 0
        assert torch.equal(worker_named[names[0]], main_named[names[0]])
        assert all(torch.equal(a, b) for a, b in zip(v0, guidance.trainable_parameters()))
        finished = schedule.on_round(2)
        assert len(finished) == 1 and schedule.version == 1
        assert schedule.finish() and schedule.version == 2
        assert all(
            torch.equal(a, b)
            for a, b in zip(guidance.trainable_parameters(), worker_guidance.trainable_parameters())
        )
    finally:
        schedule.close()


def test_a_warm_up_round_not_waited_for_runs_in_the_background():
    schedule, guidance = _parallel(wait_warmup=False)[:2]
    start = [p.detach().clone() for p in guidance.trainable_parameters()]
    try:
        # round 0 runs while the policy trains on the guidance it starts from, with no policy samples yet
        assert schedule.on_round(0) == [] and schedule.version == -1 and schedule.samples == []
        assert all(torch.equal(a, b) for a, b in zip(start, guidance.trainable_parameters()))
        finished = schedule.on_round(1)  # round 0 swapped in one interval late, with its samples
        assert len(finished) == 1 and schedule.version == 0 and schedule.samples
        assert not all(torch.equal(a, b) for a, b in zip(start, guidance.trainable_parameters()))
        assert len(schedule.finish()) == 1 and schedule.version == 1
    finally:
        schedule.close()


def test_sequential_state_round_trip():
    policy, tokenizer = _policy()
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    schedule = SequentialSchedule(_learner(policy, guidance, tokenizer))
    schedule.on_round(0)
    state = schedule.state_dict()
    other_policy, _ = _policy()
    other = SequentialSchedule(
        _learner(other_policy, GuidanceModel(other_policy, GuidanceConfig(lora_r=4)), tokenizer)
    )
    other.load_state_dict(state)
    assert other.version == 0 and len(other.learner.buffer) == len(schedule.learner.buffer)
    for a, b in zip(guidance.trainable_parameters(), other.learner.guidance.trainable_parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="schedule='sequential'"):
        bad = dict(state, schedule="parallel")
        other.load_state_dict(bad)


@pytest.mark.parametrize("importance", ["sequence", "suffix"])
def test_a_round_with_importance_weights(importance):
    """kl_reference='base': the guidance loss weights policy samples toward the base, per sample or per token."""
    policy, tokenizer = _policy()
    with torch.no_grad():  # a policy that differs from its base
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    guidance.set_trainable(False)
    learner = _learner(policy, guidance, tokenizer, importance_max_weight=5.0, importance=importance)
    metrics = learner.run_round(0)
    assert math.isfinite(metrics["guidance/loss"])
    batch = SampleBuffer.collate(list(learner.buffer.items())[:4], learner.pad_token_id)
    weights = learner._importance(batch)
    expected = (4,) if importance == "sequence" else (4, batch["input_ids"].shape[1] - 1)
    assert weights.shape == expected and (weights > 0).all() and (weights <= 5.0 + 1e-6).all()
    assert not torch.allclose(weights, torch.ones_like(weights))
