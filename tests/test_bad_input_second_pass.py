"""The second pass on bad input: options that do not apply, artefacts on another base model, inputs longer than
the model takes, late failures, one line where a traceback was, and noise nobody asked for. Each case: exit
status 2 (130 for Ctrl-C, see test_bad_input_overwrite.py), one ``error:`` line naming the problem, and nothing
lost or half-written."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
from helpers.cli import fails, never_load

from steer import cli
from steer.cli.devices import accelerator_available
from steer.errors import InputFileNotFoundError, InputKeyError, UserInputError
from steer.models import tiny_causal_lm
from steer.scripts.output import run_entries

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINED = ["train", "constrained"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from helpers.models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    """Another tiny model of the same shapes (other weights)."""
    path = tmp_path_factory.mktemp("tiny-llama-1")
    model, tokenizer = tiny_causal_lm("llama", seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_dir) -> Path:
    """A policy adapter as `steer train constrained` saves it: adapter files + base_model.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from steer.models import BASE_MODEL_FILE, base_model_record

    path = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    (path / BASE_MODEL_FILE).write_text(json.dumps(base_model_record(base)))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(path)
    return path


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the cat"}\n{"prompt": "good people"}\n')
    return path


def _corpus(path: Path, prompt: str = "The cat sees a dog", n: int = 4) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": prompt, "completion": " and runs."}) + "\n" for _ in range(n))
    )
    return path


def _constrained(tmp_path, tiny_dir, *extra: str) -> list[str]:
    return [
        *CONSTRAINED,
        "--output_dir",
        str(tmp_path / "out"),
        "--model_name_or_path",
        str(tiny_dir),
        "--dataset_name",
        str(_corpus(tmp_path / "corpus.jsonl")),
        "--constraint",
        "keyword",
        "--constraint_kwargs",
        '{"banned": ["bad"]}',
        "--dataset_format",
        "prompt_completion",
        *extra,
    ]


def _eval(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "toxicity",
        "--model_name_or_path",
        str(model),
        "--prompts_file",
        str(prompts),
        "--num_generations",
        "2",
        "--max_new_tokens",
        "3",
        "--num_heldout",
        "0",
        "--output_dir",
        str(out),
        *extra,
    ]


# --------------------------------------------------------------------------------------------------
# Options that do not apply
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", [["--waves", "26", "27", "29"], ["--group_by", "SEX"]])
def test_persona_individual_options_under_groups(option, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    argv = ["train", "persona", "--output_dir", str(tmp_path / "out"), *option]
    fails(capsys, argv, f"PersonaScriptArguments.{option[0][2:]}", "persona_source='individuals' only")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Artefacts loaded onto another base model
# --------------------------------------------------------------------------------------------------


def test_adapter_on_another_base_model(adapter_dir, other_dir, prompts, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = _eval(adapter_dir, prompts, out, "--base_model", str(other_dir), "--skip_perplexity", "true")
    fails(capsys, argv, f"the adapter in {adapter_dir}", "different weights", "--allow_base_mismatch")
    assert not list(out.glob("*.json"))  # refused before anything was generated
    assert cli.main([*argv, "--allow_base_mismatch", "true"]) == 0  # the rare user who means it
    capsys.readouterr()


def test_adapter_load_is_quiet(adapter_dir):
    from steer.eval.generation import load_eval_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_eval_model(str(adapter_dir), device="cpu")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_example_refuses_another_base_model(adapter_dir, other_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "inference_constrained", ROOT / "examples" / "inference_constrained.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit) as exit_:
        example.main([str(adapter_dir), "--base_model", str(other_dir), "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "different weights" in err and "--allow_base_mismatch" in err
    texts = example.main(
        [str(adapter_dir), "--base_model", str(other_dir), "--max_new_tokens", "2", "--allow_base_mismatch"]
    )
    assert len(texts) == 1
    for argv, needle in (
        ([str(adapter_dir.parent / "nowhere")], "output_dir not found"),
        ([str(adapter_dir), "--guided"], "--guided needs"),
    ):
        with pytest.raises(SystemExit) as exit_:
            example.main(argv)
        assert exit_.value.code == 2 and needle in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Inputs longer than the model takes
# --------------------------------------------------------------------------------------------------


def test_truncate_prompts_keeps_the_end():
    from steer.data import prompt_budget, truncate_prompts
    from steer.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    long = " ".join(["the cat sees a dog"] * 50) + " and the end"
    out, cut = truncate_prompts(["short one", long], tokenizer, budget=12)
    assert cut == 1 and out[0] == "short one"
    assert len(tokenizer(out[1])["input_ids"]) <= 12 and out[1].endswith("and the end")
    assert prompt_budget(512, 20) == 492 and prompt_budget(None, 20) is None
    with pytest.raises(UserInputError, match="max_new_tokens=600"):
        prompt_budget(512, 600)


def test_eval_truncates_prompts_past_the_context(tiny_dir, tmp_path, capsys, caplog):
    prompts = tmp_path / "long.jsonl"
    long = " ".join(["the cat sees a dog"] * 200)  # far more than the tiny model's 512 positions
    prompts.write_text(json.dumps({"prompt": long}) + "\n" + json.dumps({"prompt": "good people"}) + "\n")
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING, logger="steer.eval.toxicity"):
        assert cli.main(_eval(tiny_dir, prompts, out, "--run_name", "long")) == 0
    capsys.readouterr()
    result = json.loads((out / "long.json").read_text())
    assert result["metrics"]["num_prompts_truncated"] == 1
    assert result["protocol"]["prompt_budget"] == 512 - 3
    assert "1 of 2 prompts are longer than the prompt budget of 509 tokens" in caplog.text


def test_training_prompts_are_cut_to_the_sampling_budget(tiny_dir, tmp_path):
    from datasets import Dataset

    from steer.models import load_tokenizer
    from steer.scripts.constrained import ConstrainedScriptArguments, check_constrained_model
    from steer.trainers.constrained import ConstrainedConfig

    script = ConstrainedScriptArguments(model_name_or_path=str(tiny_dir), constraint="keyword")
    config = ConstrainedConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, sample_max_new_tokens=12)
    train = Dataset.from_dict({"text": ["a cat", "a dog"]})
    long = " ".join(["the cat sees a dog"] * 200) + " the very end"
    prompts = check_constrained_model(script, config, train, Dataset.from_dict({"prompt": ["The cat", long]}))
    tokenizer = load_tokenizer(str(tiny_dir))
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts["prompt"]]
    assert prompts["prompt"][0] == "The cat" and lengths[1] <= 512 - 12
    assert prompts["prompt"][1].endswith("the very end")


# --------------------------------------------------------------------------------------------------
# Late failures that lose finished work: checked before the expensive part
# --------------------------------------------------------------------------------------------------


def test_eval_output_dir_that_cannot_be_written(prompts, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fails(
        capsys,
        _eval(Path("smollm2-135m"), prompts, blocker / "eval"),
        "ToxicityEvalArguments.output_dir",
        "not writable",
    )
    fails(
        capsys,
        _eval(Path("smollm2-135m"), prompts, blocker),
        "ToxicityEvalArguments.output_dir",
        "not a directory",
    )


def test_eval_unknown_baseline_run(tiny_dir, prompts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    assert cli.main(_eval(tiny_dir, prompts, out, "--run_name", "base", "--skip_perplexity", "true")) == 0
    capsys.readouterr()
    never_load(monkeypatch)
    argv = _eval(tiny_dir, prompts, out, "--run_name", "second", "--baseline_run", "bsae")
    fails(capsys, argv, "baseline_run='bsae'", "'base'")
    assert sorted(p.name for p in out.glob("*.json")) == ["base.json", "toxicity_report.json"]


def test_eval_compare_with_another_kind_of_report(prompts, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    other = tmp_path / "opinions.json"
    other.write_text(json.dumps({"schema": "steer.eval.opinions/v1", "metrics": {}}))
    argv = _eval(Path("smollm2-135m"), prompts, tmp_path / "eval", "--compare_with", str(other))
    fails(capsys, argv, "compare_with", "opinions.json", "not a `steer eval toxicity` run result")


def test_report_shows_intervals(tiny_dir, prompts, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(_eval(tiny_dir, prompts, out, "--run_name", "r", "--skip_perplexity", "true")) == 0
    text = (out / "toxicity_report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| r |"))
    assert row.count("[") >= 3 and "95% interval" in text
    capsys.readouterr()
    assert cli.main(["eval", "toxicity", "--help"]) == 0
    assert "95% interval" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------------------
# One line where a traceback was
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needles",
    [
        ("kl_coef: 1.0\n  bad: [1, 2\n", ["not valid YAML", "line 2, column 6"]),
        ("kl_coef: [1\n", ["not valid YAML", "expected ',' or ']'"]),
        ("- a\n- b\n", ["must be a YAML mapping", "list"]),
    ],
)
def test_malformed_yaml(text, needles, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    fails(capsys, [*CONSTRAINED, "--config", str(recipe)], str(recipe), *needles)
    recipe.write_bytes(b"\x00\x01\xff\xfe")
    fails(capsys, ["eval", "toxicity", "--config", str(recipe)], str(recipe), "not a UTF-8 text file")


def test_binary_prompts_file(tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n\x89PNG\r\n\x1a\n\x00\xff\xfe')
    fails(capsys, ["eval", "toxicity", "--prompts_file", str(path)], str(path), "not UTF-8 text", "line 2")
    path.write_bytes(b'{"prompt": "ok"}\n\x00\x00\x00\n')
    fails(capsys, ["eval", "toxicity", "--prompts_file", str(path)], str(path), "binary")


def test_corrupt_guidance_files(tiny_dir, prompts, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from steer.guidance import GuidanceConfig, GuidanceModel

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    guidance = tmp_path / "guidance"
    GuidanceModel(model, GuidanceConfig(backbone="separate", separate_num_layers=1)).save_pretrained(guidance)
    (guidance / "context_prior.safetensors").write_bytes(b"\x07garbage, not safetensors")
    argv = _eval(tiny_dir, prompts, tmp_path / "eval", "--guidance_dir", str(guidance))
    fails(capsys, argv, "guidance_dir", str(guidance / "context_prior.safetensors"), "cannot be read")
    (guidance / "context_prior.safetensors").unlink()
    (guidance / "model.safetensors").write_bytes(b"\x00" * 16)
    fails(capsys, argv, "guidance_dir", str(guidance / "model.safetensors"), "cannot be read")


def test_use_peft_false_with_the_lora_guidance_backbone(tiny_dir, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    argv = _constrained(tmp_path, tiny_dir, "--use_peft", "false")
    fails(capsys, argv, "use_peft=false", "guidance_backbone='lora'", "separate")
    fails(capsys, [*argv, "--guidance_backbone", "separate", "--kl_reference", "base"], "kl_reference='base'")
    fails(
        capsys,
        [*argv, "--guidance_backbone", "separate", "--policy_export_weight", "0.5"],
        "policy_export_weight",
    )


def test_max_length_too_small_for_any_sample(tiny_dir, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    argv = _constrained(tmp_path, tiny_dir, "--max_length", "3")
    fails(capsys, argv, "ConstrainedConfig.max_length=3", "no trained token", "shortest prompt has")


def test_lora_target_that_does_not_exist(tiny_dir, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    argv = _constrained(tmp_path, tiny_dir, "--lora_target_modules", "q_proj", "qproj")
    line = fails(capsys, argv, "lora_target_modules", "['qproj']", "q_proj")
    assert "v_proj" in line  # the names that exist


def test_oracle_failing_on_the_context_prior_word_list(tiny_dir, tmp_path, capsys, monkeypatch):
    module = tmp_path / "fragile_oracle.py"
    module.write_text(
        "from steer.constraints import KeywordConstraint\n\n"
        "class Fragile(KeywordConstraint):\n"
        "    def score(self, texts):\n"
        "        if 'bad' in texts:\n"
        "            raise TypeError('cannot score the word list')\n"
        "        return super().score(texts)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = _constrained(tmp_path, tiny_dir, "--constraint", "fragile_oracle:Fragile", "--max_steps", "1")
    _corpus(tmp_path / "corpus.jsonl", prompt="The bad cat")  # 'bad' is a word of the corpus: it is scored
    argv += ["--guidance_context_prior", "corpus", "--guidance_prior_cache_dir", str(tmp_path / "cache")]
    fails(capsys, argv, "constraint", "context-prior word list", "TypeError: cannot score the word list")
    assert not run_entries(tmp_path / "out")  # stopped before anything was trained or written


def test_gpu_deepspeed_config_without_an_accelerator(tmp_path, capsys, monkeypatch):
    if accelerator_available():
        pytest.skip("an accelerator is present")
    never_load(monkeypatch)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    fails(
        capsys,
        [*CONSTRAINED, "--output_dir", str(tmp_path)],
        "mixed_precision=bf16",
        "accelerate_configs/zero2_cpu.yaml",
    )
    monkeypatch.setenv("RANK", "1")  # the other ranks exit with status 2 without repeating the line
    assert cli.main([*CONSTRAINED, "--output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ""


def test_opinionqa_loader_errors(tmp_path):
    from steer.persona.opinionqa import group_distributions, load_metadata, load_responses, load_wave

    wave = tmp_path / "American_Trends_Panel_W26"
    wave.mkdir()
    with pytest.raises(InputFileNotFoundError, match="info.csv"):
        load_wave(wave)
    (wave / "info.csv").write_text("key,question\nQ1_W26,Do you?\n")
    with pytest.raises(UserInputError, match=r"info.csv: missing column 'references'"):
        load_wave(wave)
    (wave / "info.csv").write_text("")
    with pytest.raises(UserInputError, match=r"info.csv: the file is empty"):
        load_wave(wave)
    (wave / "info.csv").write_bytes(b"\xff\xfe\x00\x01bad")
    with pytest.raises(UserInputError, match=r"info.csv: cannot read the file as CSV"):
        load_wave(wave)
    (wave / "metadata.csv").write_text("key\nAGE\n")
    with pytest.raises(UserInputError, match=r"metadata.csv: missing column 'options'"):
        load_metadata(wave)
    (wave / "info.csv").write_text(
        "key,question,references,option_ordinal\nQ1_W26,Do you?,\"['Yes', 'No']\",\"[1.0, 2.0]\"\n"
    )
    (wave / "SEX_data.json").write_text("{not json")
    with pytest.raises(UserInputError, match=r"SEX_data.json: invalid json"):
        group_distributions(wave, "SEX")
    (wave / "SEX_data.json").write_text(json.dumps({"Q9_W26": {}}))
    with pytest.raises(InputKeyError, match="Q9_W26 is not in the wave's info.csv"):
        group_distributions(wave, "SEX")
    with pytest.raises(InputFileNotFoundError, match="responses file not found"):
        load_responses([tmp_path / "responses.csv"], load_wave(wave))


# --------------------------------------------------------------------------------------------------
# Noise a user did not ask for
# --------------------------------------------------------------------------------------------------


def test_no_deepspeed_or_matplotlib_noise(tmp_path):
    """Without an accelerator the CLI tells DeepSpeed so (no "Setting accelerator to CPU" warning when a library
    imports it) and keeps matplotlib's font-cache INFO line out of the log."""
    import subprocess
    import sys

    if accelerator_available():
        pytest.skip("an accelerator is present")
    code = (
        "import logging, os; from steer import cli; "
        f"cli.main(['eval', 'toxicity', '--prompts_file', {str(tmp_path / 'none.jsonl')!r}]); "
        "import deepspeed; "
        "print(os.environ.get('DS_ACCELERATOR'), logging.getLogger('matplotlib').getEffectiveLevel())"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=180, env=env
    )
    assert out.stdout.split()[-2:] == ["cpu", str(logging.WARNING)], out.stderr
    assert "Setting accelerator to CPU" not in out.stdout + out.stderr


# --------------------------------------------------------------------------------------------------
# Found by a new user's pass over `steer --help`'s commands
# --------------------------------------------------------------------------------------------------


def test_new_user_pass(tiny_dir, prompts, tmp_path, capsys, monkeypatch):
    never_load(monkeypatch)
    binary = tmp_path / "data.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    fails(capsys, ["eval", "agreement", "--limit", "0"], "OracleAgreementArguments.limit")
    fails(
        capsys,
        ["eval", "agreement", "--output_file", str(binary / "x.json")],
        "output_file",
        "not a directory",
    )
    argv = _eval(tiny_dir, prompts, tmp_path / "eval", "--reference_model", str(tmp_path / "nowhere"))
    fails(capsys, argv, "ToxicityEvalArguments.reference_model", "not found")
    argv = _eval(
        tiny_dir, prompts, tmp_path / "eval", "--oracle", "detoxify", "--oracle_checkpoint", str(checkpoint)
    )
    fails(capsys, argv, str(checkpoint), "not a readable detoxify checkpoint")
    argv = [*CONSTRAINED, "--output_dir", str(tmp_path / "out"), "--dataset_name", str(binary)]
    fails(capsys, argv, "dataset_name", "data.csv", "cannot read the file as csv")
    assert not list((tmp_path / "eval").glob("*.json")) if (tmp_path / "eval").exists() else True


def test_guidance_model_on_another_base_needs_the_override(tmp_path, caplog):
    from steer.errors import ArtefactMismatchError
    from steer.guidance import GuidanceConfig, GuidanceModel

    policy, _ = tiny_causal_lm("llama", seed=0)
    GuidanceModel(policy, GuidanceConfig(lora_r=4)).save_pretrained(tmp_path / "guidance")
    other, _ = tiny_causal_lm("llama", seed=3)
    with pytest.raises(ArtefactMismatchError, match="different weights.*--allow_base_mismatch"):
        GuidanceModel.from_pretrained(tmp_path / "guidance", other)
    with caplog.at_level(logging.WARNING):
        GuidanceModel.from_pretrained(tmp_path / "guidance", other, allow_base_mismatch=True)
    assert "loading it anyway" in caplog.text
