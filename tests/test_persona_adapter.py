"""The persona LM adapter (``lm_adapter: lora``, ``lm_adapter_gate``), the within-wave split and the text baselines."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers.data import opinionqa_root

from steer.errors import UserInputError
from steer.models import tiny_causal_lm
from steer.persona.data import question_batteries, within_wave_split
from steer.persona.groups import GroupTable
from steer.persona.opinionqa import Question
from steer.persona.steering import PersonaSteeredModel
from steer.persona.text_baseline import TextBaseline, fit_text_baselines
from steer.trainers.persona import PersonaConfig, PersonaTrainer

WORDS = "the a good bad nice calm quick slow happy sad city day night friend music book idea".split()
OPTIONS = ["agree", "somewhat", "disagree"]
VECTORS = {"left": [1.0, -1.0, 0.5, 0.0], "right": [-1.0, 1.0, 0.0, 0.5]}
AGREE, DISAGREE = [0.8, 0.15, 0.05], [0.05, 0.15, 0.8]


def _xor(n: int, seed: int) -> list[dict]:
    """'left' agrees with questions about a cat and disagrees with questions about a dog; 'right' the opposite.
    The persona decides the answer only together with the question's topic word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        group = ("left", "right")[i % 2]
        topic = rng.choice(["cat", "dog"])
        words = [rng.choice(WORDS) for _ in range(4)]
        words.insert(rng.randrange(5), topic)
        target = AGREE if (group == "left") == (topic == "cat") else DISAGREE
        rows.append(
            {
                "question": " ".join(words) + "?",
                "options": OPTIONS,
                "answer": int(np.argmax(target)),
                "target": target,
                "persona": VECTORS[group],
                "group": group,
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
        "num_virtual_tokens": 4,
        "soft_prompt_hidden": 16,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 50,
        "seed": 0,
    }
    values.update(overrides)
    return PersonaConfig(**values)


def _train(tmp_path, rows, **overrides) -> PersonaTrainer:
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    data = Dataset.from_list([{k: v for k, v in r.items() if k != "group"} for r in rows])
    trainer = PersonaTrainer(
        model, _config(tmp_path, **overrides), train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    return trainer


def _steered(trainer) -> PersonaSteeredModel:
    return PersonaSteeredModel(
        trainer.lm,
        trainer.processing_class,
        trainer.network,
        gate=trainer.gate,
        personas=VECTORS,
        prompt_format=trainer.prompt_format,
    )


def _accuracy(steered, rows) -> float:
    probs = steered.option_probs_batch([(r["question"], OPTIONS) for r in rows], [r["group"] for r in rows])
    return float(np.mean([int(p.argmax()) == r["answer"] for p, r in zip(probs, rows)]))


def test_gated_adapter_learns_a_persona_rule_the_frozen_lm_cannot(tmp_path):
    """On unseen questions, a persona x topic rule: the frozen LM + soft prompt stays near chance, the LM adapter
    with the persona gate learns it."""
    train, test = _xor(80, 0), _xor(64, 99)
    frozen = _accuracy(_steered(_train(tmp_path / "f", train, num_train_epochs=20)), test)
    gated = _train(
        tmp_path / "g",
        train,
        num_train_epochs=20,
        lm_adapter="lora",
        lm_adapter_gate=True,
        lm_lora_r=4,
        lm_learning_rate=1e-2,
    )
    adapted = _accuracy(_steered(gated), test)
    assert frozen <= 0.65
    assert adapted >= 0.75
    assert float(gated.gate.proj.weight.norm()) > 0  # the gate moved away from the plain adapter


def test_adapter_round_trips_and_resumes_exactly(tmp_path):
    rows = _xor(48, 0)
    overrides = {
        "max_steps": 6,
        "lm_adapter": "lora",
        "lm_adapter_gate": True,
        "lm_lora_r": 4,
        "save_strategy": "steps",
        "save_steps": 3,
    }
    trainer = _train(tmp_path, rows, **overrides)
    groups = trainer.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == pytest.approx(
        [trainer.args.learning_rate, trainer.args.lm_learning_rate]
    )
    steered = _steered(trainer)
    steered.save_pretrained(tmp_path / "persona")
    assert (tmp_path / "persona" / "lm_adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "persona" / "lm_adapter" / "persona_gate.safetensors").is_file()
    base, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    loaded = PersonaSteeredModel.from_pretrained(base, tmp_path / "persona", tokenizer=tokenizer)
    questions = [(r["question"], OPTIONS) for r in _xor(6, 5)]
    for persona in ("left", "right"):
        want = torch.stack(steered.option_probs_batch(questions, persona))
        got = torch.stack(loaded.option_probs_batch(questions, persona))
        torch.testing.assert_close(got, want)
    # persona=None: the base LM without the adapter (the unsteered baselines)
    plain, _ = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    bare = PersonaSteeredModel(plain, tokenizer, trainer.network)
    torch.testing.assert_close(
        torch.stack(loaded.option_probs_batch(questions, None)),
        torch.stack(bare.option_probs_batch(questions, None)),
    )
    # the two personas' adapted outputs differ from each other
    assert not torch.allclose(
        torch.stack(loaded.option_probs_batch(questions, "left")),
        torch.stack(loaded.option_probs_batch(questions, "right")),
    )
    # resume from the step-3 checkpoint: the adapter, the gate and the network end where the full run ended
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    data = Dataset.from_list([{k: v for k, v in r.items() if k != "group"} for r in rows])
    resumed = PersonaTrainer(
        model, _config(tmp_path, **overrides), train_dataset=data, processing_class=tokenizer
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    want = {k: v for k, v in trainer.lm.named_parameters() if "lora_" in k}
    got = {k: v for k, v in resumed.lm.named_parameters() if "lora_" in k}
    assert want.keys() == got.keys() and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    torch.testing.assert_close(resumed.gate.proj.weight, trainer.gate.proj.weight, rtol=0, atol=0)


def test_ungated_adapter_loads_in_plain_peft(tmp_path):
    """Without the gate the exported adapter is an ordinary PEFT adapter: PeftModel + the soft prompt give the
    steered model's logits."""
    from peft import PeftModel

    from steer.persona.soft_prompt import steered_inputs

    trainer = _train(tmp_path, _xor(32, 0), max_steps=3, lm_adapter="lora", lm_lora_r=4)
    steered = _steered(trainer)
    steered.save_pretrained(tmp_path / "persona")
    base, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    model = PeftModel.from_pretrained(base, str(tmp_path / "persona" / "lm_adapter")).eval()
    prompt = steered.prompt_format.build(tokenizer, "the cat day?", OPTIONS)
    enc = tokenizer(
        [prompt], return_tensors="pt", add_special_tokens=steered.prompt_format.add_special_tokens
    )
    persona = torch.tensor([VECTORS["left"]])
    with torch.no_grad():
        kwargs = steered_inputs(model, trainer.network, persona, enc["input_ids"], enc["attention_mask"])
        plain = model(**kwargs).logits[0, -1].log_softmax(-1)
    probs = steered.option_probs("the cat day?", OPTIONS, persona="left")
    from steer.persona.steering import answer_token_ids

    letters = [steered.prompt_format.answer_text(x) for x in steered.prompt_format.letters(3)]
    ids = answer_token_ids(tokenizer, prompt, letters, steered.prompt_format.add_special_tokens)
    torch.testing.assert_close(plain[ids].softmax(-1), probs, rtol=1e-5, atol=1e-6)


def test_adapter_options_are_checked(tmp_path):
    with pytest.raises(UserInputError, match="lm_adapter_gate applies only with lm_adapter: lora"):
        _config(tmp_path, lm_adapter_gate=True)
    with pytest.raises(UserInputError, match="lm_adapter must be one of"):
        _config(tmp_path, lm_adapter="full")
    with pytest.raises(UserInputError, match="lm_lora_r must be >= 1"):
        _config(tmp_path, lm_adapter="lora", lm_lora_r=0)
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    data = Dataset.from_list([{k: v for k, v in r.items() if k != "group"} for r in _xor(8, 0)])
    with pytest.raises(
        UserInputError, match=r"lm_lora_target_modules: the model has no module named \['qkv'\]"
    ):
        PersonaTrainer(
            model,
            _config(tmp_path, lm_adapter="lora", lm_lora_target_modules=["qkv"]),
            train_dataset=data,
            processing_class=tokenizer,
        )


# ------------------------------------------------------------------------------------------------ data


def _question(key: str, text: str, n: int = 3) -> Question:
    options = tuple(f"option {i}" for i in range(n))
    ordinals = tuple(float(i + 1) for i in range(n))
    return Question(key, text, options, ordinals, tuple(i / (n - 1) for i in range(n)))


def _table(questions: list[Question], probs: dict[str, np.ndarray], names: list[str]) -> GroupTable:
    keys = [q.key for q in questions]
    return GroupTable(
        names=names,
        question_keys=keys,
        questions={q.key: q for q in questions},
        probs=probs,
        sizes={k: np.full(len(names), 100.0) for k in keys},
        population={k: probs[k].mean(0) for k in keys},
    )


def test_within_wave_split_never_splits_a_battery():
    questions = []
    for wave in (26, 27):
        for stem in ("GUNACTIVITY", "ROBJOB4", "DIFF1"):
            questions += [_question(f"{stem}{letter}_W{wave}", f"{stem} item {letter}") for letter in "ABCDE"]
        questions += [_question(f"SINGLE{i}_W{wave}", f"single question {i}") for i in range(12)]
        questions += [_question(f"SAME{i}_W{wave}", "one text for two keys") for i in range(2)]
    table = _table(questions, {q.key: np.full((1, 3), 1 / 3) for q in questions}, ["POLPARTY=Democrat"])
    keys = [q.key for q in questions]
    batteries = question_batteries(table, keys)
    assert sorted(len(b) for b in batteries) == [1] * 24 + [2, 2] + [5] * 6
    for seed in range(5):
        kept, held = within_wave_split(table, keys, 0.25, seed=seed)
        assert sorted(kept + held) == sorted(keys) and not set(kept) & set(held)
        for battery in batteries:
            assert set(battery) <= set(kept) or set(battery) <= set(held), battery
        for wave in ("W26", "W27"):
            share = sum(k.endswith(wave) for k in held) / sum(k.endswith(wave) for k in keys)
            assert 0.1 <= share <= 0.45
    assert within_wave_split(table, keys, 0.25, seed=1) == within_wave_split(table, keys, 0.25, seed=1)


def test_text_baselines_read_the_question_text():
    """Democrats agree with questions about schools and disagree with questions about taxes, Republicans the
    opposite; both baselines predict that for unseen questions from their text alone, with settings chosen on the
    validation questions."""
    rng = np.random.default_rng(0)
    names = ["POLPARTY=Democrat", "POLPARTY=Republican"]
    filler = "people country year plan city rules money work family news".split()
    questions, probs = [], {}
    for i in range(60):
        topic = ("public schools teachers", "income taxes rates")[i % 2]
        text = f"Do you favor the {topic} {' '.join(rng.choice(filler, 2))} proposal?"
        question = _question(f"Q{i}_W{26 + i % 3}", text)
        agree, disagree = np.array(AGREE), np.array(DISAGREE)
        probs[question.key] = np.stack([agree, disagree] if i % 2 == 0 else [disagree, agree])
        questions.append(question)
    table = _table(questions, probs, names)
    keys = [q.key for q in questions]
    train, valid, test = keys[:36], keys[36:48], keys[48:]

    def score(p, g, k):
        return -float(np.abs(p - table.distribution(g, k)).sum())

    fitted = fit_text_baselines(table, train, valid, names, score)
    for name, (baseline, record) in fitted.items():
        assert record["chosen_on"] == "validation questions" and record["grid"]
        for key in test:
            for g in names:
                predicted = baseline.predict(g, key)
                assert predicted.shape == (3,) and predicted.sum() == pytest.approx(1.0)
                assert int(predicted.argmax()) == int(table.distribution(g, key).argmax()), (name, key, g)
    # a group fitted on a few answers only (a folded-in group) uses just those
    few = TextBaseline(table, train, kind="knn", params={"k": 3}, group_keys={names[0]: train[:2]})
    assert few.predict(names[0], test[0]) is not None
    assert (
        TextBaseline(table, train, kind="knn", group_keys={names[0]: []}).predict(names[0], test[0]) is None
    )


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.skipif(opinionqa_root() is None, reason="OpinionQA data not available")
def test_adapted_group_protocol_end_to_end(tmp_path):
    """Train with the gated LM adapter and a within-wave holdout on the real tables (tiny model), then score both
    protocols: the within-wave questions never reached training, and the report carries the text baselines, the
    direction agreement, the cohorts and a chart."""
    import json

    from steer.eval.opinions import OpinionEvalArguments, run_opinion_eval
    from steer.scripts.persona import PersonaScriptArguments, train_persona

    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    script = PersonaScriptArguments(
        model_name_or_path=str(tmp_path / "tiny"),
        train_waves=[26, 27],
        valid_waves=[29],
        eval_waves=[34],
        group_attributes=["POLPARTY", "POLIDEOLOGY", "SEX"],
        fold_in_groups=["POLIDEOLOGY=Very liberal"],
        fold_in_answers=10,
        embedding_dim=4,
        embedder_l2=0.05,
        max_train_examples=24,
        max_eval_examples=8,
        within_wave_holdout=0.25,
    )
    config = _config(
        tmp_path,
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        num_virtual_tokens=2,
        soft_prompt_hidden=8,
        lm_adapter="lora",
        lm_adapter_gate=True,
        lm_lora_r=2,
    )
    train_persona(script, config)
    split = json.loads((tmp_path / "run" / "data" / "split.json").read_text())
    within = split["within_question_keys"]
    assert within and not set(within) & set(split["train_question_keys"])
    assert {k.rsplit("_", 1)[1] for k in within} <= {"W26", "W27"}
    assert (
        split["group_cohorts"]
        and (tmp_path / "run" / "persona" / "lm_adapter" / "persona_gate.json").is_file()
    )
    with pytest.raises(
        UserInputError, match=r"group_attribute: .* stores no 'POLPARTYY' personas .*'POLPARTY'"
    ):
        run_opinion_eval(
            OpinionEvalArguments(
                persona_dir=str(tmp_path / "run" / "persona"),
                output_dir=str(tmp_path / "x"),
                group_attribute="POLPARTYY",
            )
        )
    assert not (tmp_path / "x").exists()
    for part in ("within", "eval"):
        result = run_opinion_eval(
            OpinionEvalArguments(
                persona_dir=str(tmp_path / "run" / "persona"),
                output_dir=str(tmp_path / f"eval_{part}"),
                split=part,
                methods=["steered", "raw", "zero", "wrong_group", "text_ridge", "text_knn"],
                max_questions=4,
                n_bootstrap=100,
            )
        )
        groups = result["groups"]
        assert groups["split"] == part
        if part == "within":
            assert set(groups["question_keys"]) <= set(within)
        for method in ("text_ridge", "text_knn"):
            value = groups["methods"][method]["per_group"]["POLPARTY=Democrat"]
            assert value["n"] >= 1 and groups["text_baselines"][method]["chosen_on"] == "validation questions"
        pair = groups["direction"]["POLPARTY=Democrat - POLPARTY=Independent"]
        assert {"steered", "text_ridge", "constant"} <= set(pair["methods"])
        assert pair["methods"]["constant"]["sign"] in (-1.0, 1.0)
        assert groups["cohorts"] and all("steered - raw" in c for c in groups["cohorts"].values())
        markdown = (tmp_path / f"eval_{part}" / "opinions.md").read_text()
        assert "Direction:" in markdown and "Cohorts" in markdown
        assert (tmp_path / f"eval_{part}" / "opinions.png").stat().st_size > 1000


def test_plain_peft_example_generates_like_steer_with_the_gate(tmp_path, capsys):
    """examples/inference_persona.py (plain transformers + peft) rebuilds the gated adapter and writes what
    PersonaSteeredModel writes; another base model is refused unless --allow_base_mismatch."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "inference_persona", Path(__file__).resolve().parent.parent / "examples" / "inference_persona.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = _train(
        tmp_path,
        _xor(32, 0),
        max_steps=8,
        lm_adapter="lora",
        lm_adapter_gate=True,
        lm_lora_r=4,
        lm_learning_rate=5e-2,
        learning_rate=5e-2,
    )
    base, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    steered = _steered(trainer)
    steered.metadata["base_model"] = str(tmp_path / "base")
    steered.save_pretrained(tmp_path / "persona")
    prompts = ["the cat day", "a dog night idea"]
    argv = [
        str(tmp_path / "persona"),
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--max_new_tokens",
        "5",
    ]
    for name in ("left", "right"):
        assert example.main([*argv, "--persona", name]) == steered.generate(
            prompts, persona=name, max_new_tokens=5
        )
    other, _ = tiny_causal_lm("llama", seed=3, num_kv_heads=2)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit) as stop:
        example.main([*argv, "--persona", "left", "--base_model", str(tmp_path / "other")])
    assert stop.value.code == 2
    assert "--allow_base_mismatch" in capsys.readouterr().err
    assert (
        len(
            example.main(
                [*argv, "--persona", "left", "--base_model", str(tmp_path / "other"), "--allow_base_mismatch"]
            )
        )
        == 2
    )


def test_empty_fold_in_is_refused(tmp_path):
    import types

    trainer = _train(tmp_path, _xor(16, 0), max_steps=1)
    steered = _steered(trainer)
    steered.embedder = types.SimpleNamespace(question_keys=["Q1_W26"])
    with pytest.raises(UserInputError, match="fold_in: no answers given"):
        steered.fold_in({})
    with pytest.raises(UserInputError, match="fold_in: no answers given"):
        steered.option_probs("the cat day?", OPTIONS, persona={})
