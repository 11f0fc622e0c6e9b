"""The soft-prompt network's ordinal tilt (``ordinal_tilt``): a persona's lean along a survey's ordinal scales."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers.launch import load_example

from steer.errors import UserInputError
from steer.models import tiny_causal_lm
from steer.persona.opinionqa import Question
from steer.persona.soft_prompt import SoftPromptNetwork, apply_ordinal_tilt
from steer.persona.steering import PersonaSteeredModel
from steer.trainers.persona import PersonaConfig, PersonaTrainer

WORDS = "the a good bad nice calm quick slow happy sad city day night friend music book idea".split()
OPTIONS = ["very", "somewhat", "not much", "not at all"]
SCALE = [0.0, 1 / 3, 2 / 3, 1.0]
VECTORS = {"low": [1.0, -1.0, 0.5, 0.0], "high": [-1.0, 1.0, 0.0, 0.5]}
LOW, HIGH = [0.55, 0.25, 0.15, 0.05], [0.05, 0.15, 0.25, 0.55]


def _rows(n: int, seed: int) -> list[dict]:
    """'low' answers at the bottom of the scale on every question, 'high' at the top: a lean of the persona."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        group = ("low", "high")[i % 2]
        target = LOW if group == "low" else HIGH
        rows.append(
            {
                "question": " ".join(rng.choice(WORDS) for _ in range(5)) + "?",
                "options": OPTIONS,
                "answer": int(np.argmax(target)),
                "target": target,
                "scale": SCALE,
                "persona": VECTORS[group],
            }
        )
    return rows


def _config(tmp_path, **overrides) -> PersonaConfig:
    values = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "num_virtual_tokens": 2,
        "soft_prompt_hidden": 8,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 50,
        "seed": 0,
        "ordinal_tilt": True,
    }
    values.update(overrides)
    return PersonaConfig(**values)


def _trainer(tmp_path, rows, **overrides) -> PersonaTrainer:
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    return PersonaTrainer(
        model,
        _config(tmp_path, **overrides),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def _mean_scale(steered, questions, persona) -> float:
    probs = steered.option_probs_batch(questions, persona)
    return float(np.mean([p.numpy() @ np.array(SCALE) for p in probs]))


def test_tilt_starts_at_zero_and_moves_options_up_or_down_the_scale():
    config = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4}
    network = SoftPromptNetwork(4, 3, "prefix", 8, ordinal_tilt=True, **config)
    plain = SoftPromptNetwork(4, 3, "prefix", 8, **config)
    persona = torch.randn(5, 4)
    assert network(persona).shape == plain(persona).shape == (5, network.config.output_dim)
    assert torch.equal(network.tilt(persona), torch.zeros(5))
    with pytest.raises(ValueError, match="no ordinal tilt"):
        plain.tilt(persona)
    logits = torch.zeros(2, 4)
    scale = torch.tensor([SCALE, [0.0, 1.0, float("nan"), float("nan")]])
    moved = apply_ordinal_tilt(logits, torch.tensor([2.0, -1.0]), scale)
    expected = (torch.tensor(SCALE) * 2.0).softmax(-1)
    assert torch.allclose(moved[0].softmax(-1), expected)
    assert moved[1].tolist() == [0.0, -1.0, 0.0, 0.0]  # NaN (nominal options): no tilt


def test_tilt_learns_a_persona_lean_and_round_trips(tmp_path):
    trainer = _trainer(tmp_path, _rows(64, 0), num_train_epochs=6)
    trainer.train()
    network = trainer.network
    tilts = network.tilt(torch.tensor([VECTORS["low"], VECTORS["high"]])).detach()
    assert tilts[0] < -0.5 and tilts[1] > 0.5  # the two personas lean in opposite directions
    steered = PersonaSteeredModel(
        trainer.lm, trainer.processing_class, network, personas=VECTORS, prompt_format=trainer.prompt_format
    )
    unseen = [
        Question(
            key=f"Q{i}",
            text=r["question"],
            options=tuple(OPTIONS),
            ordinals=(1.0, 2.0, 3.0, 4.0),
            scaled=tuple(SCALE),
        )
        for i, r in enumerate(_rows(8, 7))
    ]
    low, high = _mean_scale(steered, unseen, "low"), _mean_scale(steered, unseen, "high")
    assert high - low > 0.2  # on questions never trained on, the persona's lean holds
    # a (text, options) tuple carries no scale: no tilt; a (text, options, scale) tuple gets it
    bare = [(q.text, list(q.options)) for q in unseen]
    with_scale = [(q.text, list(q.options), SCALE) for q in unseen]
    assert abs(_mean_scale(steered, bare, "high") - _mean_scale(steered, bare, "low")) < high - low - 0.1
    assert _mean_scale(steered, with_scale, "high") == pytest.approx(high)
    steered.save_pretrained(tmp_path / "persona")
    base, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    loaded = PersonaSteeredModel.from_pretrained(base, tmp_path / "persona", tokenizer=tokenizer)
    assert loaded.network.config.ordinal_tilt
    for persona in ("low", "high"):
        want = torch.stack(steered.option_probs_batch(unseen, persona))
        got = torch.stack(loaded.option_probs_batch(unseen, persona))
        assert torch.allclose(want, got, atol=1e-6)
    # examples/inference_persona.py (plain torch) reads the same virtual tokens and tilt from the folder
    exported = load_example("inference_persona").SoftPrompt(tmp_path / "persona")
    vector = torch.tensor(VECTORS["high"])
    with torch.no_grad():
        torch.testing.assert_close(exported(vector), network(vector)[0])
        assert exported.tilt(vector) == pytest.approx(float(network.tilt(vector)[0]))


def test_tilt_resumes_exactly(tmp_path):
    rows = _rows(48, 0)
    overrides = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    full = _trainer(tmp_path, rows, **overrides)
    full.train()
    resumed = _trainer(tmp_path, rows, **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    persona = torch.tensor([VECTORS["low"], VECTORS["high"]])
    torch.testing.assert_close(resumed.network.tilt(persona), full.network.tilt(persona), rtol=0, atol=0)
    for key, value in full.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value, rtol=0, atol=0)


def test_tilt_needs_scales_and_a_matching_network(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "scale"} for r in _rows(16, 0)]
    trainer = _trainer(tmp_path, rows, max_steps=1)
    with pytest.raises(ValueError, match="ordinal_tilt needs every example's 'scale'"):
        trainer.train()
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    network = SoftPromptNetwork(4, 2, "prefix", 8, model_config=model.config)
    with pytest.raises(UserInputError, match="ordinal_tilt"):
        PersonaTrainer(
            model,
            _config(tmp_path),
            train_dataset=Dataset.from_list(_rows(8, 0)),
            processing_class=tokenizer,
            network=network,
        )
