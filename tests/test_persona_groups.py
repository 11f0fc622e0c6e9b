"""Group personas: the real group table, the wave split (nothing scored reaches training), standardised
MF vectors, the distribution-level loss, and a toy model whose wrong persona scores below its own."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers.data import opinionqa_root

from steer.eval.opinion_metrics import representativeness
from steer.eval.opinions import OpinionEvalArguments, run_opinion_eval
from steer.eval.stats import interval
from steer.models import tiny_causal_lm
from steer.persona.data import WaveSplit, prepare_group_data
from steer.persona.embedder import PersonaEmbedder
from steer.persona.simulate import synthetic_responses
from steer.persona.steering import PersonaSteeredModel
from steer.scripts.persona import PersonaScriptArguments
from steer.trainers.persona import PersonaCollator, PersonaConfig, PersonaTrainer

needs_data = pytest.mark.skipif(opinionqa_root() is None, reason="OpinionQA data not available")


def _script(**overrides) -> PersonaScriptArguments:
    values = {
        "train_waves": [26, 27],
        "valid_waves": [29],
        "eval_waves": [34],
        "group_attributes": ["POLPARTY", "POLIDEOLOGY", "SEX"],
        "fold_in_groups": ["POLIDEOLOGY=Very liberal"],
        "fold_in_answers": 10,
        "embedding_dim": 4,
        "embedder_l2": 0.05,
        "max_train_examples": 40,
        "max_eval_examples": 16,
    }
    values.update(overrides)
    return PersonaScriptArguments(**values)


@needs_data
def test_group_table_holds_the_real_distributions():
    from steer.persona.groups import load_group_table
    from steer.persona.opinionqa import group_distributions, load_wave, wave_dirs

    table = load_group_table(None, [26], attributes=["POLPARTY", "SEX"])
    assert "POLPARTY=Democrat" in table.names and "SEX=Female" in table.names
    assert not any(n.endswith("=Refused") for n in table.names)
    directory = wave_dirs(None, [26])[0]
    real = group_distributions(directory, "POLPARTY", questions=load_wave(directory))
    key = table.question_keys[0]
    expected = real[key].probs[real[key].group_index("Democrat")]
    np.testing.assert_allclose(table.distribution("POLPARTY=Democrat", key), expected)
    responses = table.to_responses()
    j = 0
    scaled = table.questions[key].scaled_array()
    assert responses.values[table.index("POLPARTY=Democrat"), j] == pytest.approx(float(expected @ scaled))


def test_wave_split_rejects_overlap():
    with pytest.raises(ValueError, match="both train_waves and eval_waves"):
        WaveSplit([26, 27], [29], [27])
    assert WaveSplit(["W26"], [], ["American_Trends_Panel_W29"]).eval == ["W29"]


@needs_data
def test_split_no_evaluation_question_or_wave_reaches_training():
    data = prepare_group_data(_script(max_train_examples=None, max_eval_examples=None).group_data_settings())
    wave = {k: data.table.wave_of(k) for k in data.table.question_keys}
    assert {wave[k] for k in data.train_keys} == {"W26", "W27"}
    assert {wave[k] for k in data.valid_keys} == {"W29"}
    assert {wave[k] for k in data.eval_keys} == {"W34"}
    # every ordinal question of the evaluation wave with group counts is scored
    from steer.persona.opinionqa import group_distributions, load_wave, wave_dirs

    directory = wave_dirs(None, [34])[0]
    questions = load_wave(directory)
    ordinal = [
        k
        for k in group_distributions(directory, "POLPARTY", questions=questions)
        if not questions[k].is_nominal
    ]
    assert sorted(data.eval_keys) == sorted(ordinal)
    # the embedder, the training and validation examples and the fold-in never touch an evaluation question
    scored = set(data.eval_keys)
    assert not scored & set(data.embedder.question_keys)
    assert set(data.embedder.question_keys) == set(data.train_keys)
    assert {e["key"] for e in data.train_examples} <= set(data.train_keys)
    assert {e["key"] for e in data.valid_examples} <= set(data.valid_keys)
    assert len(data.train_examples) == sum(
        data.table.distribution(g, k) is not None for g in data.train_groups for k in data.train_keys
    )
    # the folded-in group is kept out of the embedder and of training, and folded in from training answers
    folded = data.metadata["fold_in"]["POLIDEOLOGY=Very liberal"]
    assert "POLIDEOLOGY=Very liberal" not in data.embedder.user_ids
    assert "POLIDEOLOGY=Very liberal" not in {e["group"] for e in data.train_examples}
    assert folded["answers"] == 10 and set(folded["question_keys"]) <= set(data.train_keys)
    # the target of an example is the real distribution
    example = data.train_examples[0]
    np.testing.assert_allclose(example["target"], data.table.distribution(example["group"], example["key"]))


def test_standardize_keeps_predictions_and_scales_vectors():
    responses = synthetic_responses(60, 30, dim=3, observed_frac=0.5, seed=1)
    embedder = PersonaEmbedder(3, l2=0.5, seed=0).fit(responses)
    before = embedder.predict().clone()
    embedder.standardize_()
    torch.testing.assert_close(embedder.predict(), before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embedder.embeddings.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(embedder.embeddings.std(0), torch.ones(3), atol=1e-4, rtol=0)
    # fold-in of a training person from all answers lands near their vector (same space)
    folded = embedder.fold_in(responses.select_users([0, 1]))
    assert torch.nn.functional.cosine_similarity(folded, embedder.embeddings[:2]).min() > 0.8


def test_bootstrap_interval_covers_and_pairs():
    rng = np.random.default_rng(0)
    values = rng.normal(0.5, 0.1, size=200)
    out = interval(values, seed=0)
    assert out["n"] == 200 and out["low"] < 0.5 < out["high"] and out["high"] - out["low"] < 0.05
    shifted = values + 0.01 + rng.normal(0, 0.001, size=200)
    paired = interval(shifted, paired_with=values)
    assert paired["low"] > 0.0  # a tiny but consistent paired gain is detected
    assert interval([np.nan, np.nan])["n"] == 0


def test_distribution_loss_is_the_cross_entropy_to_the_target():
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    collator = PersonaCollator(tokenizer)
    examples = [
        {
            "question": "Is it good?",
            "options": ["yes", "maybe", "no"],
            "answer": 0,
            "persona": [1.0, 0.0],
            "target": [0.5, 0.3, 0.2],
        },
        {
            "question": "Do you vote?",
            "options": ["yes", "no"],
            "answer": 1,
            "persona": [0.0, 1.0],
            "target": [0.1, 0.9],
        },
    ]
    batch = collator(examples)
    assert batch["target_probs"].shape == (2, 3) and batch["target_probs"][1, 2] == 0
    trainer = PersonaTrainer(
        model,
        PersonaConfig(output_dir="unused", use_cpu=True, num_virtual_tokens=2, report_to="none"),
        processing_class=tokenizer,
        persona_dim=2,
    )
    output = trainer.model(**batch)
    log_q = output.option_logits.log_softmax(-1)
    expected = (
        -(0.5 * log_q[0, 0] + 0.3 * log_q[0, 1] + 0.2 * log_q[0, 2] + 0.1 * log_q[1, 0] + 0.9 * log_q[1, 1])
        / 2
    )
    torch.testing.assert_close(output.loss, expected)
    with pytest.raises(ValueError, match="'target'"):
        collator([{**examples[0], "target": [0.5, 0.5]}])


WORDS = "the a cat dog good bad nice calm quick slow happy sad city day night friend music book idea".split()
OPTIONS = ["agree", "somewhat", "disagree"]
TARGETS = {"left": [0.7, 0.2, 0.1], "right": [0.1, 0.2, 0.7]}
VECTORS = {"left": [1.0, -1.0, 0.5, 0.0], "right": [-1.0, 1.0, 0.0, 0.5]}


def _toy(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        group = "left" if i % 2 == 0 else "right"
        question = " ".join(rng.choice(WORDS) for _ in range(5)) + "?"
        rows.append(
            {
                "question": question,
                "options": OPTIONS,
                "answer": int(np.argmax(TARGETS[group])),
                "target": TARGETS[group],
                "persona": VECTORS[group],
            }
        )
    return rows


def test_toy_wrong_persona_scores_below_own(tmp_path):
    """Trained with the distribution loss, the own persona represents its group on unseen questions better
    than the other group's persona does (and better than the unsteered model)."""
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    args = PersonaConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        num_virtual_tokens=4,
        soft_prompt_hidden=16,
        num_train_epochs=3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = PersonaTrainer(
        model, args, train_dataset=Dataset.from_list(_toy(64, 0)), processing_class=tokenizer
    )
    trainer.train()
    steered = PersonaSteeredModel(
        model, tokenizer, trainer.network, personas=VECTORS, prompt_format=trainer.prompt_format
    )
    support = [0.0, 0.5, 1.0]
    unseen = [(r["question"], OPTIONS) for r in _toy(16, 99)]
    scores = {}
    for persona in ("left", "right"):
        probs = steered.option_probs_batch(unseen, persona)
        for group in ("left", "right"):
            scores[persona, group] = np.mean(
                [representativeness(p.numpy(), TARGETS[group], support) for p in probs]
            )
    raw = steered.option_probs_batch(unseen, None)
    for group in ("left", "right"):
        wrong = "right" if group == "left" else "left"
        assert scores[group, group] > scores[wrong, group] + 0.1
        assert scores[group, group] > np.mean(
            [representativeness(p.numpy(), TARGETS[group], support) for p in raw]
        )


@needs_data
def test_group_protocol_end_to_end(tmp_path):
    """Train (tiny model) on the group protocol, then `steer eval opinions` scores the evaluation wave only,
    with every baseline, ablation, contrast and interval in the report."""
    from steer.scripts.persona import train_persona

    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    script = _script(model_name_or_path=str(tmp_path / "tiny"))
    config = PersonaConfig(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        bf16=False,
        max_steps=3,
        per_device_train_batch_size=8,
        num_virtual_tokens=2,
        soft_prompt_hidden=8,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = train_persona(script, config)
    assert trainer.state.global_step == 3
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    split = json.loads((tmp_path / "run" / "data" / "split.json").read_text())
    assert split["protocol"] == "groups" and split["eval_waves"] == ["W34"]
    index = json.loads((tmp_path / "run" / "persona" / "personas.json").read_text())
    assert "POLPARTY=Democrat" in index["names"] and "POLIDEOLOGY=Very liberal" in index["names"]
    norms = [v for k, v in split["persona_norms"].items() if k.startswith("POLPARTY=")]
    assert min(norms) > 0.5  # standardised: group vectors are not all near the origin

    result = run_opinion_eval(
        OpinionEvalArguments(
            persona_dir=str(tmp_path / "run" / "persona"),
            output_dir=str(tmp_path / "eval"),
            max_questions=3,
            batch_size=16,
            n_bootstrap=200,
        )
    )
    groups = result["groups"]
    assert set(groups["question_keys"]) <= set(split["eval_question_keys"])
    assert groups["fold_in_groups"] == ["POLIDEOLOGY=Very liberal"]
    for method in (
        "steered",
        "zero",
        "shuffled",
        "wrong_group",
        "raw",
        "demographic",
        "few_shot",
        "population",
        "majority",
        "uniform",
    ):
        value = groups["methods"][method]["per_group"]["POLPARTY=Democrat"]
        assert value["n"] == 3 and value["low"] <= value["mean"] <= value["high"], method
    assert "steered - raw" in groups["contrasts"] and "POLPARTY=Republican" in groups["specificity"]
    assert groups["real_specificity"]["POLPARTY=Democrat"]["mean"] > 0
    assert result["individuals"] is None
    markdown = (tmp_path / "eval" / "opinions.md").read_text()
    assert "steered - wrong_group" in markdown and "[" in markdown


def test_group_contrast_is_one_when_blind_and_zero_when_exact():
    from steer.trainers.persona import group_contrast

    scale = torch.tensor([[0.0, 0.5, 1.0]] * 4)
    target = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    question = torch.tensor([0, 0, 1, 1])
    blind = torch.tensor([[0.4, 0.3, 0.3]] * 4)
    assert group_contrast(blind, target, scale, question).item() == pytest.approx(1.0, abs=1e-4)
    assert group_contrast(target, target, scale, question).item() == pytest.approx(0.0, abs=1e-6)
    assert group_contrast(blind, target, scale, torch.tensor([0, 1, 2, 3])) is None


@needs_data
def test_question_blocks_keep_one_question_per_block():
    data = prepare_group_data(_script(question_block=4, max_train_examples=40).group_data_settings())
    keys = [e["key"] for e in data.train_examples]
    assert len(keys) == 40
    for start in range(0, 40, 4):
        assert len(set(keys[start : start + 4])) == 1
    assert len({(e["group"], e["key"]) for e in data.train_examples}) == 40  # no pair twice
