"""Bad input ends in one clear line: the CLI exits with status 2 and no traceback, naming the field, file,
column or row; the Python API raises :class:`steer.errors.UserInputError` (or a subclass). Every check here
runs before a model loads, except the artefact checks, which load tiny random models."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers.cli import fails, never_load
from helpers.data import opinionqa_root

from steer import cli
from steer.errors import ArtefactMismatchError, InputFileNotFoundError, ModelLoadError, UserInputError
from steer.models import tiny_causal_lm

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def files(tmp_path):
    """Bad and good data files, model dirs and output dirs (names are what the tests look for)."""
    f = {}
    f["empty"] = tmp_path / "empty.jsonl"
    f["empty"].write_text("")
    f["blank"] = tmp_path / "blank.jsonl"
    f["blank"].write_text("\n  \n")
    f["wrong_columns"] = _jsonl(tmp_path / "wrong_columns.jsonl", [{"body": "a"}, {"body": "b"}])
    f["text_only"] = _jsonl(tmp_path / "text_only.jsonl", [{"text": "a cat"}, {"text": "a dog"}])
    f["bad_prompts"] = _jsonl(tmp_path / "bad_prompts.jsonl", [{"prompt": "The cat"}, {"prompt": "  "}])
    f["unsupported"] = tmp_path / "data.txt"
    f["unsupported"].write_text("a cat\n")
    f["rtp_missing_prompt"] = _jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": {"text": "The cat"}}, {"continuation": {"text": "no prompt here"}}],
    )
    f["invalid_json"] = tmp_path / "invalid.jsonl"
    f["invalid_json"].write_text('{"prompt": "ok"}\n{"prompt": \n')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "smollm2-135m"}')
    f["adapter_without_weights"] = adapter
    f["empty_dir"] = tmp_path / "empty_dir"
    f["empty_dir"].mkdir()
    previous = tmp_path / "previous_run"
    (previous / "guidance").mkdir(parents=True)
    (previous / "adapter_config.json").write_text("{}")
    f["previous_run"] = previous
    f["out"] = tmp_path / "out"
    return f


CONSTRAINED = ["train", "constrained"]
PERSONA = ["train", "persona"]


# --------------------------------------------------------------------------------------------------
# CLI: values rejected while parsing (no data, no model)
# --------------------------------------------------------------------------------------------------

PARSE_CASES = [
    (["eval", "toxicity", "--num_prompts", "0"], ["ToxicityEvalArguments.num_prompts", ">= 1"]),
    (["eval", "toxicity", "--num_generations", "0"], ["ToxicityEvalArguments.num_generations"]),
    (["eval", "toxicity", "--top_p", "0"], ["ToxicityEvalArguments.top_p", "(0, 1]"]),
    (["eval", "toxicity", "--temperature", "0"], ["ToxicityEvalArguments.temperature"]),
    (["eval", "toxicity", "--toxicity_threshold", "1.5"], ["ToxicityEvalArguments.toxicity_threshold"]),
    (["eval", "toxicity", "--batch_size", "0"], ["ToxicityEvalArguments.batch_size"]),
    (["eval", "toxicity", "--dtype", "float8"], ["ToxicityEvalArguments.dtype"]),
    (["eval", "opinions", "--methods", "magic"], ["OpinionEvalArguments.methods", "magic"]),
    (["eval", "opinions", "--max_users", "0"], ["OpinionEvalArguments.max_users"]),
    (["eval", "opinions", "--split", "test"], ["OpinionEvalArguments.split"]),
    (["demo", "--threads", "0"], ["DemoArguments.threads"]),
    (["demo", "--kl_coef", "0"], ["DemoArguments.kl_coef"]),
    (["demo", "--max_steps", "10", "--guidance_interval", "50"], ["DemoArguments.guidance_interval"]),
    ([*CONSTRAINED, "--lora_dropout", "1.5"], ["ConstrainedScriptArguments.lora_dropout"]),
    ([*CONSTRAINED, "--dataset_format", "chat"], ["ConstrainedScriptArguments.dataset_format"]),
    ([*CONSTRAINED, "--constraint_kwargs", "{not json"], ["ConstrainedScriptArguments.constraint_kwargs"]),
    ([*CONSTRAINED, "--corpus_min_toxicity", "2"], ["ConstrainedScriptArguments.corpus_min_toxicity"]),
    (
        [*CONSTRAINED, "--corpus_min_satisfaction", "-0.1"],
        ["ConstrainedScriptArguments.corpus_min_satisfaction"],
    ),
    (["eval", "toxicity", "--oracle_kwargs", "{topic"], ["ToxicityEvalArguments.oracle_kwargs", "JSON"]),
    (["eval", "toxicity", "--oracle_kwargs", "[1]"], ["ToxicityEvalArguments.oracle_kwargs", "mapping"]),
    ([*CONSTRAINED, "--kl_coef", "-1"], ["kl_coef"]),
    ([*CONSTRAINED, "--kl_cof", "1"], ["unknown key 'kl_cof'", "kl_coef"]),
    ([*PERSONA, "--persona_source", "people"], ["PersonaScriptArguments.persona_source"]),
    ([*PERSONA, "--embedder_method", "svd"], ["PersonaScriptArguments.embedder_method"]),
    ([*PERSONA, "--question_block", "1"], ["PersonaScriptArguments.question_block"]),
    ([*PERSONA, "--holdout_fraction", "0.7"], ["PersonaScriptArguments.holdout_fraction"]),
]


@pytest.mark.parametrize("argv, needles", PARSE_CASES, ids=[" ".join(c[0][:3]) for c in PARSE_CASES])
def test_bad_values_are_one_line(argv, needles, capsys):
    fails(capsys, argv, *needles)


# --------------------------------------------------------------------------------------------------
# CLI: `steer train constrained` checks before the model loads
# --------------------------------------------------------------------------------------------------


def test_constrained_unknown_constraint(files, capsys, monkeypatch):
    never_load(monkeypatch)
    fails(
        capsys,
        [*CONSTRAINED, "--output_dir", str(files["out"]), "--constraint", "nope"],
        "ConstrainedScriptArguments.constraint",
        "'nope'",
        "non_toxic",
    )


def test_constrained_bad_constraint_kwargs(files, capsys, monkeypatch):
    never_load(monkeypatch)
    fails(
        capsys,
        [*CONSTRAINED, "--output_dir", str(files["out"]), "--constraint_kwargs", '{"backend": "vibes"}'],
        "constraint_kwargs",
        "vibes",
    )
    fails(
        capsys,
        [
            *CONSTRAINED,
            "--output_dir",
            str(files["out"]),
            "--constraint",
            "keyword",
            "--constraint_kwargs",
            "{}",
        ],
        "constraint_kwargs",
        "KeywordConstraint",
    )


def test_constrained_detoxify_offline_names_checkpoint_and_config_dir(files, capsys, monkeypatch):
    """Offline, the published detoxify checkpoint cannot be downloaded: one line naming the offline kwargs."""
    import urllib.error

    never_load(monkeypatch)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    fails(
        capsys,
        [*CONSTRAINED, "--output_dir", str(files["out"]), "--constraint_kwargs", '{"backend": "detoxify"}'],
        "checkpoint",
        "config_dir",
        "URLError",
    )


def test_constrained_output_dir_with_a_previous_run(files, capsys, monkeypatch):
    never_load(monkeypatch)
    line = fails(
        capsys,
        [*CONSTRAINED, "--output_dir", str(files["previous_run"])],
        str(files["previous_run"]),
        "overwrite_output_dir",
    )
    assert "guidance" in line and "adapter_config.json" in line
    assert (files["previous_run"] / "adapter_config.json").read_text() == "{}"  # untouched


def test_constrained_missing_resume_checkpoint(files, capsys, monkeypatch):
    never_load(monkeypatch)
    missing = files["out"] / "checkpoint-7"
    fails(
        capsys,
        [*CONSTRAINED, "--output_dir", str(files["out"]), "--resume_from_checkpoint", str(missing)],
        "resume_from_checkpoint",
        str(missing),
    )
    fails(
        capsys,
        [*CONSTRAINED, "--output_dir", str(files["out"]), "--resume_from_checkpoint", "true"],
        "resume_from_checkpoint",
        "no checkpoint",
    )


def test_constrained_incomplete_checkpoint(files, capsys, monkeypatch):
    never_load(monkeypatch)
    checkpoint = files["out"] / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    fails(
        capsys,
        [*CONSTRAINED, "--output_dir", str(files["out"]), "--resume_from_checkpoint", "latest"],
        "resume_from_checkpoint",
        "constrained_state.pt",
    )


@pytest.mark.parametrize(
    "which, needles",
    [
        ("adapter_without_weights", ["model_name_or_path", "adapter_model.safetensors"]),
        ("empty_dir", ["model_name_or_path", "no config.json"]),
    ],
)
def test_constrained_model_dir_without_a_model(which, needles, files, capsys, monkeypatch):
    never_load(monkeypatch)
    fails(
        capsys,
        [*CONSTRAINED, "--output_dir", str(files["out"]), "--model_name_or_path", str(files[which])],
        *needles,
    )


@pytest.mark.parametrize(
    "which, needles",
    [
        ("empty", ["dataset_name", "empty.jsonl", "empty"]),
        ("blank", ["dataset_name", "blank.jsonl", "empty"]),
        ("wrong_columns", ["dataset_name", "'body'", "'text'"]),
        ("text_only", ["dataset_name", "no 'prompt' column", "prompt_dataset_name"]),
        ("unsupported", ["dataset_name", "'.txt'"]),
        ("missing", ["dataset_name", "missing.jsonl", "not found"]),
    ],
)
def test_constrained_bad_dataset_files(which, needles, files, capsys, monkeypatch, tmp_path):
    never_load(monkeypatch)
    path = files[which] if which != "missing" else tmp_path / "missing.jsonl"
    argv = [*CONSTRAINED, "--output_dir", str(files["out"]), "--constraint", "keyword"]
    argv += ["--constraint_kwargs", '{"banned": ["bad"]}', "--dataset_name", str(path)]
    fails(capsys, argv, *needles)


def test_constrained_prompt_row_without_text(files, capsys, monkeypatch):
    never_load(monkeypatch)
    argv = [*CONSTRAINED, "--output_dir", str(files["out"]), "--constraint", "keyword"]
    argv += ["--constraint_kwargs", '{"banned": ["bad"]}', "--dataset_name", str(files["text_only"])]
    argv += ["--prompt_dataset_name", str(files["bad_prompts"])]
    fails(capsys, argv, "prompt_dataset_name", "row 1", "no prompt text")


def _rtp_mirror(tmp_path, monkeypatch, lines: list[str]) -> Path:
    root = tmp_path / "mirror"
    (root / "rtp").mkdir(parents=True)
    path = root / "rtp" / "part0.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    monkeypatch.setenv("STEER_DATA_DIR", str(root))
    return path


def test_rtp_record_without_prompt_names_file_and_line(files, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    good = json.dumps({"prompt": {"text": "The cat"}, "continuation": {"text": " sat."}})
    bad = json.dumps({"continuation": {"text": " and no prompt"}})
    path = _rtp_mirror(tmp_path, monkeypatch, [good, good, "", bad])
    argv = [*CONSTRAINED, "--output_dir", str(files["out"]), "--heldout_size", "0"]
    argv += ["--constraint_kwargs", '{"backend": "profanity"}']
    fails(capsys, argv, f"{path}:4", "has no 'prompt'")


def test_rtp_mirror_of_empty_files(files, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    _rtp_mirror(tmp_path, monkeypatch, [])
    argv = [
        *CONSTRAINED,
        "--output_dir",
        str(files["out"]),
        "--constraint_kwargs",
        '{"backend": "profanity"}',
    ]
    fails(capsys, argv, "RealToxicityPrompts", "empty")


def test_steer_data_dir_that_is_not_a_directory(files, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    monkeypatch.setenv("STEER_DATA_DIR", str(tmp_path / "nowhere"))
    argv = [
        *CONSTRAINED,
        "--output_dir",
        str(files["out"]),
        "--constraint_kwargs",
        '{"backend": "profanity"}',
    ]
    fails(capsys, argv, "STEER_DATA_DIR", "nowhere")


# --------------------------------------------------------------------------------------------------
# CLI: `steer train persona` checks before data and model load
# --------------------------------------------------------------------------------------------------


def test_persona_overlapping_waves(files, capsys, monkeypatch):
    never_load(monkeypatch)
    argv = [*PERSONA, "--output_dir", str(files["out"]), "--train_waves", "26", "27", "--eval_waves", "27"]
    fails(capsys, argv, "W27", "train_waves", "eval_waves")


def test_persona_missing_opinionqa_dir(files, capsys, monkeypatch, tmp_path):
    never_load(monkeypatch)
    argv = [*PERSONA, "--output_dir", str(files["out"]), "--opinionqa_dir", str(tmp_path / "no_such_dir")]
    fails(capsys, argv, "PersonaScriptArguments.opinionqa_dir", "no_such_dir")


def test_persona_unknown_wave(files, capsys, monkeypatch, tmp_path):
    never_load(monkeypatch)
    root = tmp_path / "opinionqa"
    (root / "American_Trends_Panel_W26").mkdir(parents=True)
    argv = [*PERSONA, "--output_dir", str(files["out"]), "--opinionqa_dir", str(root)]
    argv += ["--train_waves", "26", "--valid_waves", "998", "--eval_waves", "999"]
    fails(capsys, argv, "valid_waves", "American_Trends_Panel_W998", str(root))


def test_persona_missing_responses_csv(files, capsys, monkeypatch, tmp_path):
    never_load(monkeypatch)
    argv = [*PERSONA, "--output_dir", str(files["out"]), "--persona_source", "individuals"]
    argv += ["--responses_csv", str(tmp_path / "responses.csv")]
    fails(capsys, argv, "PersonaScriptArguments.responses_csv", "responses.csv")


def test_persona_contrast_needs_question_block(files, capsys, monkeypatch):
    never_load(monkeypatch)
    fails(
        capsys,
        [*PERSONA, "--output_dir", str(files["out"]), "--contrast_weight", "1.0"],
        "contrast_weight",
        "question_block",
    )


def test_persona_output_dir_with_a_previous_run(files, capsys, monkeypatch):
    never_load(monkeypatch)
    fails(capsys, [*PERSONA, "--output_dir", str(files["previous_run"])], "overwrite_output_dir")


# --------------------------------------------------------------------------------------------------
# CLI: evaluations
# --------------------------------------------------------------------------------------------------


def test_eval_toxicity_prompt_record_without_prompt(files, capsys, monkeypatch):
    never_load(monkeypatch)
    argv = ["eval", "toxicity", "--prompts_file", str(files["rtp_missing_prompt"])]
    fails(capsys, argv, f"{files['rtp_missing_prompt']}:2", "'prompt'")


def test_eval_toxicity_invalid_json_line(files, capsys, monkeypatch):
    never_load(monkeypatch)
    fails(
        capsys, ["eval", "toxicity", "--prompts_file", str(files["invalid_json"])], "invalid.jsonl:2", "JSON"
    )


@pytest.mark.parametrize(
    "flag, which, needles",
    [
        ("--prompts_file", "missing", ["ToxicityEvalArguments.prompts_file", "not found"]),
        ("--guidance_dir", "missing", ["ToxicityEvalArguments.guidance_dir", "not found"]),
        ("--guidance_dir", "empty_dir", ["ToxicityEvalArguments.guidance_dir", "config.json"]),
        ("--model_name_or_path", "adapter_without_weights", ["model_name_or_path", "adapter"]),
        ("--heldout_file", "missing", ["ToxicityEvalArguments.heldout_file"]),
    ],
)
def test_eval_toxicity_paths(flag, which, needles, files, capsys, monkeypatch, tmp_path):
    never_load(monkeypatch)
    path = files[which] if which != "missing" else tmp_path / "missing"
    fails(capsys, ["eval", "toxicity", flag, str(path)], *needles)


def test_eval_toxicity_classifier_oracle_needs_a_checkpoint(capsys, monkeypatch):
    never_load(monkeypatch)
    fails(capsys, ["eval", "toxicity", "--oracle", "classifier"], "oracle_checkpoint")


def test_eval_opinions_without_persona_dir(files, capsys):
    fails(capsys, ["eval", "opinions"], "OpinionEvalArguments.persona_dir")
    fails(capsys, ["eval", "opinions", "--persona_dir", str(files["empty_dir"])], "soft_prompt_config.json")


# --------------------------------------------------------------------------------------------------
# --debug / STEER_DEBUG, and internal errors keep their traceback
# --------------------------------------------------------------------------------------------------


def test_debug_shows_the_traceback(capsys, monkeypatch):
    assert cli.main(["--debug", "eval", "opinions"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "OpinionEvalArguments.persona_dir" in err.splitlines()[-1]
    monkeypatch.setenv("STEER_DEBUG", "1")
    assert cli.main(["eval", "opinions"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(monkeypatch):
    import steer.eval.opinions

    def broken(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(steer.eval.opinions, "run_opinion_eval", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main(["eval", "opinions", "--persona_dir", "x"])


# --------------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------------


def test_api_errors_are_user_input_errors(files, tmp_path):
    from steer.constraints import build_constraint
    from steer.data import load_table

    with pytest.raises(InputFileNotFoundError, match="missing.csv"):
        load_table(str(tmp_path / "missing.csv"), what="my_field")
    with pytest.raises(UserInputError, match="my_field='.*empty.jsonl': the file is empty"):
        load_table(str(files["empty"]), what="my_field")
    with pytest.raises(UserInputError, match="unknown constraint 'nope'") as info:
        build_constraint("nope")
    assert isinstance(info.value, KeyError)  # InputKeyError keeps the builtin type callers may catch
    with pytest.raises(UserInputError, match="is not a steer.constraints.Constraint subclass"):
        build_constraint("collections:OrderedDict")


def test_load_causal_lm_errors_are_one_line(files, tmp_path):
    from steer.models import load_causal_lm

    with pytest.raises(ModelLoadError, match="adapter_model.safetensors") as info:
        load_causal_lm(files["adapter_without_weights"])
    assert isinstance(info.value, OSError)
    with pytest.raises(ModelLoadError) as info:
        load_causal_lm("no-such-org/no-such-model-xyz")
    assert "\n" not in str(info.value) and "no-such-model-xyz" in str(info.value)


def test_build_oracle_detoxify_offline(monkeypatch):
    import urllib.error

    from steer.eval.oracle import build_oracle
    from steer.eval.toxicity import ToxicityEvalArguments

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserInputError, match="--oracle_checkpoint .*--oracle_config_dir"):
        build_oracle(ToxicityEvalArguments(oracle="detoxify"))


# --------------------------------------------------------------------------------------------------
# Artefacts record their base model
# --------------------------------------------------------------------------------------------------


def _steered(seed: int = 0):
    from steer.persona.soft_prompt import SoftPromptNetwork
    from steer.persona.steering import PersonaSteeredModel

    model, tokenizer = tiny_causal_lm("llama", seed=seed)
    network = SoftPromptNetwork(4, 2, hidden=8, model_config=model.config)
    personas = {"cohort:0": torch.zeros(4), "cohort:1": torch.ones(4)}
    return PersonaSteeredModel(
        model, tokenizer, network, personas=personas, metadata={"base_model": "tiny-0"}
    )


def test_persona_on_a_different_base_model_is_refused(tmp_path):
    from steer.persona.steering import PersonaSteeredModel

    _steered(seed=0).save_pretrained(tmp_path / "persona")
    other, tokenizer = tiny_causal_lm("llama", seed=1)  # same shapes, other weights
    with pytest.raises(ArtefactMismatchError, match="tiny-0"):
        PersonaSteeredModel.from_pretrained(other, tmp_path / "persona", tokenizer=tokenizer)
    same, tokenizer = tiny_causal_lm("llama", seed=0)
    loaded = PersonaSteeredModel.from_pretrained(same, tmp_path / "persona", tokenizer=tokenizer)
    assert sorted(loaded.personas) == ["cohort:0", "cohort:1"]
    # the same base model in bfloat16 is the same model
    PersonaSteeredModel.from_pretrained(same.to(torch.bfloat16), tmp_path / "persona", tokenizer=tokenizer)


def test_persona_on_a_different_base_model_cli(tmp_path, capsys):
    steered = _steered(seed=0)
    steered.personas["POLPARTY=Democrat"] = torch.zeros(4)  # a group of the evaluated group_attribute
    steered.save_pretrained(tmp_path / "run" / "persona")
    other, tokenizer = tiny_causal_lm("llama", seed=1)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    (tmp_path / "run" / "data").mkdir()
    split = {"waves": ["W26"], "question_keys": [], "protocol": "groups"}
    (tmp_path / "run" / "data" / "split.json").write_text(json.dumps(split))
    argv = ["eval", "opinions", "--persona_dir", str(tmp_path / "run" / "persona")]
    fails(capsys, [*argv, "--model_name_or_path", str(tmp_path / "other")], "trained on base model tiny-0")


def test_guidance_on_a_different_base_model_is_refused(tmp_path):
    from steer.guidance import GuidanceConfig, GuidanceModel

    model, _ = tiny_causal_lm("llama", seed=0)
    GuidanceModel(model, GuidanceConfig(lora_r=4)).save_pretrained(tmp_path / "guidance")
    other, _ = tiny_causal_lm("llama", seed=1)
    with pytest.raises(ArtefactMismatchError, match="guidance model"):
        GuidanceModel.from_pretrained(tmp_path / "guidance", other)
    assert not hasattr(other, "peft_config")  # refused before an adapter was attached
    same, _ = tiny_causal_lm("llama", seed=0)
    GuidanceModel.from_pretrained(tmp_path / "guidance", same)


# --------------------------------------------------------------------------------------------------
# Persona runs: data/ and persona/ always belong together
# --------------------------------------------------------------------------------------------------


def test_eval_opinions_refuses_data_and_persona_of_different_runs(tmp_path, capsys):
    steered = _steered()
    steered.metadata["run_id"] = "aaaa"
    steered.save_pretrained(tmp_path / "run" / "persona")
    (tmp_path / "run" / "data").mkdir()
    split = {"waves": ["W26"], "question_keys": [], "protocol": "groups", "run_id": "bbbb"}
    (tmp_path / "run" / "data" / "split.json").write_text(json.dumps(split))
    line = fails(
        capsys,
        ["eval", "opinions", "--persona_dir", str(tmp_path / "run" / "persona")],
        "split.json (run bbbb)",
        "(run aaaa)",
        "different training runs",
    )
    assert "persona" in line
    # a split from a newer run beside a persona from before run ids were recorded is refused too
    steered.metadata.pop("run_id")
    steered.save_pretrained(tmp_path / "run" / "persona")
    fails(capsys, ["eval", "opinions", "--persona_dir", str(tmp_path / "run" / "persona")], "unrecorded")


@pytest.mark.skipif(opinionqa_root() is None, reason="OpinionQA data not available")
def test_a_failing_persona_run_leaves_the_previous_run_intact(tmp_path, monkeypatch, capsys):
    from steer.scripts.persona import PersonaScriptArguments, train_persona
    from steer.trainers.persona import PersonaConfig, PersonaTrainer

    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")

    def script(**changes):
        values = dict(
            model_name_or_path=str(tmp_path / "tiny"),
            train_waves=[26],
            valid_waves=[],
            eval_waves=[27],
            group_attributes=["POLPARTY", "SEX"],
            fold_in_groups=[],
            embedding_dim=2,
            max_train_examples=8,
            max_eval_examples=4,
        )
        values.update(changes)
        return PersonaScriptArguments(**values)

    def config():
        return PersonaConfig(
            output_dir=str(tmp_path / "run"),
            use_cpu=True,
            bf16=False,
            max_steps=1,
            per_device_train_batch_size=4,
            num_virtual_tokens=2,
            soft_prompt_hidden=4,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )

    train_persona(script(), config())
    run = tmp_path / "run"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    split = json.loads((run / "data" / "split.json").read_text())
    index = json.loads((run / "persona" / "personas.json").read_text())
    assert split["run_id"] == index["run_id"]

    # without overwrite_output_dir the second run is refused before it starts
    with pytest.raises(UserInputError, match="overwrite_output_dir"):
        train_persona(script(dataset_seed=1), config())

    # with it, a run that fails in training leaves the previous pair exactly as it was
    def crash(self, *args, **kwargs):
        raise RuntimeError("training crashed")

    monkeypatch.setattr(PersonaTrainer, "train", crash)
    with pytest.raises(RuntimeError, match="training crashed"):
        train_persona(script(dataset_seed=1, overwrite_output_dir=True), config())
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before
    assert not any(p.name.startswith(".run-") for p in run.iterdir())


# --------------------------------------------------------------------------------------------------
# Guidance rounds: constraints that return garbage, and the parallel schedule's error path
# --------------------------------------------------------------------------------------------------

PROMPTS = ["The cat", "A dog", "The bird is", "Good and", "It was", "The calm"]


def _garbage_constraint(kind: str):
    from steer.constraints import Constraint

    class Garbage(Constraint):
        name = f"garbage[{kind}]"

        def score(self, texts):
            value = {"nan": math.nan, "range": 3.0, "string": "yes", "none": None}[kind]
            return [value] * len(texts)

    return Garbage()


def _learner(policy, guidance, tokenizer, constraint):
    from steer.trainers.schedule import GuidanceLearner, RoundSettings

    settings = RoundSettings(
        samples_per_round=8,
        sample_max_new_tokens=4,
        sample_batch_size=8,
        guidance_steps_per_round=2,
        guidance_batch_size=8,
    )
    return GuidanceLearner(
        policy, guidance, tokenizer, constraint, PROMPTS, settings, lr=1e-2, seed=0, buffer_size=32
    )


def _policy():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    return get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    ), tokenizer


@pytest.mark.parametrize("kind", ["nan", "range", "string", "none"])
def test_a_round_without_valid_labels_is_an_error(kind, one_thread):
    from steer.guidance import GuidanceConfig, GuidanceModel
    from steer.trainers.schedule import GuidanceRoundError

    policy, tokenizer = _policy()
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    learner = _learner(policy, guidance, tokenizer, _garbage_constraint(kind))
    with pytest.raises(GuidanceRoundError, match="none of the 8 policy samples has a usable label"):
        learner.run_round(0)


class _FailingOracle:
    """A keyword constraint whose backend goes down from the ``fail_from``-th round on (calls scoring at most
    8 texts, one round's samples; the trainer's token prior scores the whole vocabulary once)."""

    def __new__(cls, fail_from: int):
        from steer.constraints import KeywordConstraint

        class Failing(KeywordConstraint):
            def score(self, texts):
                if len(texts) <= 8:
                    self._rounds = getattr(self, "_rounds", 0) + 1
                    if self._rounds >= fail_from:
                        raise ConnectionError("oracle backend unreachable")
                return super().score(texts)

        return Failing(banned=["the"])


@pytest.mark.filterwarnings("ignore:guidance round 0")
def test_parallel_round_failure_surfaces_at_the_next_step(one_thread):
    """A background round that fails is raised by the next check (every policy step), the policy keeps the
    last good guidance, a checkpoint taken now holds that good state, and finish() does not re-raise."""
    from steer.guidance import GuidanceConfig, GuidanceModel
    from steer.trainers.schedule import ParallelSchedule

    policy, tokenizer = _policy()
    worker_policy = copy.deepcopy(policy)
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    worker_guidance = GuidanceModel(worker_policy, GuidanceConfig(lora_r=4))
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    main_named, worker_named = dict(policy.named_parameters()), dict(worker_policy.named_parameters())
    schedule = ParallelSchedule(
        _learner(worker_policy, worker_guidance, tokenizer, _FailingOracle(fail_from=2)),
        policy_params=lambda: [main_named[n] for n in names],
        worker_policy_params=lambda: [worker_named[n] for n in names],
        guidance_params=guidance.trainable_parameters,
        worker_threads=1,
    )
    try:
        assert len(schedule.on_round(0)) == 1 and schedule.version == 0
        good = [p.detach().clone() for p in guidance.trainable_parameters()]
        assert schedule.on_round(1) == []  # round 1 runs in the background and fails
        concurrent.futures.wait([schedule._future])
        state = schedule.state_dict()  # a checkpoint now: the last good state, no pending round
        assert state["pending"] is None and state["version"] == 0
        assert all(torch.equal(a, b) for a, b in zip(state["guidance"], good))
        assert all(torch.equal(a, b) for a, b in zip(state["learner"]["guidance"], good))
        with pytest.raises(ConnectionError, match="oracle backend unreachable"):
            schedule.check()  # the next policy step
        assert all(torch.equal(a, b) for a, b in zip(guidance.trainable_parameters(), good))
        assert schedule.finish() == []  # already raised: training is unwinding from it
    finally:
        schedule.close()


@pytest.mark.filterwarnings("ignore:guidance round 0")
def test_parallel_failure_in_the_last_round_stops_training_and_keeps_checkpoints(tmp_path, one_thread):
    """With the parallel schedule an oracle error in a later round stops training long before the last
    step; every checkpoint written is complete (the last good one survives)."""
    from datasets import Dataset

    from steer.trainers.constrained import STATE_NAME, ConstrainedConfig, ConstrainedTrainer

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    from peft import LoraConfig

    texts = ["The cat sees a dog.", "A good bird runs.", "It was calm and warm.", "The dog likes music."] * 4
    config = ConstrainedConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=40,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="steps",
        save_steps=1,
        max_length=16,
        seed=0,
        kl_coef=1.0,
        guidance_interval=2,
        guidance_steps_per_round=1,
        guidance_batch_size=8,
        guidance_lora_r=4,
        samples_per_round=8,
        sample_max_new_tokens=4,
        sample_batch_size=8,
        disable_tqdm=True,
        schedule="parallel",
        parallel_worker_threads=1,
    )
    trainer = ConstrainedTrainer(
        model,
        config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        constraint=_FailingOracle(fail_from=2),  # round 0 (warm-up) works, round 1 fails
        prompt_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    with pytest.raises(ConnectionError, match="oracle backend unreachable"):
        trainer.train()
    assert trainer.state.global_step <= 4  # round 1 starts at step 2; surfaced by step 4 at the latest
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert checkpoints, "the checkpoints written before the failure must survive"
    for checkpoint in checkpoints:
        assert (checkpoint / STATE_NAME).is_file() and (checkpoint / "trainer_state.json").is_file()


def test_output_dir_rules(tmp_path, files):
    """A previous run is refused unless overwritten or resumed from inside; a new or empty dir is fine."""
    from steer.scripts.output import check_output_dir, resolve_resume

    previous = files["previous_run"]
    check_output_dir(tmp_path / "new", overwrite=False, resume=None, owner="X")
    check_output_dir(files["empty_dir"], overwrite=False, resume=None, owner="X")
    with pytest.raises(UserInputError, match="X.overwrite_output_dir"):
        check_output_dir(previous, overwrite=False, resume=None, owner="X")
    check_output_dir(previous, overwrite=True, resume=None, owner="X")
    checkpoint = previous / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    (previous / "checkpoint-12").mkdir()
    (previous / "checkpoint-12" / "trainer_state.json").write_text("{}")
    assert resolve_resume("latest", previous, owner="X") == str(
        previous / "checkpoint-12"
    )  # by step, not name
    check_output_dir(previous, overwrite=False, resume=str(checkpoint), owner="X")  # resuming inside it
    outside = tmp_path / "elsewhere" / "checkpoint-1"
    outside.mkdir(parents=True)
    (outside / "trainer_state.json").write_text("{}")
    with pytest.raises(UserInputError, match="previous run"):
        check_output_dir(previous, overwrite=False, resume=str(outside), owner="X")
    with pytest.raises(UserInputError, match="not a directory"):
        check_output_dir(files["empty"], overwrite=True, resume=None, owner="X")


def test_a_real_process_prints_exactly_one_line(files):
    """`python -m steer.cli ...` in a fresh process: exit status 2 and a single stderr line (no log noise,
    no traceback) for a user error raised after the command's modules were imported."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "steer.cli", "eval", "toxicity", "--prompts_file", str(files["empty"])],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0] == f"steer eval toxicity: error: no prompts in {files['empty']}"
