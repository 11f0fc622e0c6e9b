"""The ``steer`` command line: dispatch, YAML + overrides through TrlParser, errors naming the key, help."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from steer import cli
from steer.cli import COMMANDS, Command, CommandLineError, find_command, parse_command_args
from steer.cli.devices import accelerator_available, use_cpu_when_no_accelerator

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _ToyArguments:
    model_name_or_path: str = field(default="smollm2-135m", metadata={"help": "Model to train."})
    kl_coef: float = field(default=0.1, metadata={"help": "Weight of the constraint KL."})
    layers: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "Layer indices."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter."})

    def __post_init__(self):
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")


_TOY = Command(("toy",), "steer.cli", ("_ToyArguments",), "run", "toy command")


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_find_command():
    assert find_command(["train", "constrained", "--config", "x"])[0].words == ("train", "constrained")
    assert find_command(["eval", "opinions"])[0].entry == "run_opinion_eval"
    assert find_command(["demo"])[0].module == "steer.demo"
    command, words, rest = find_command(["train", "--help"])
    assert command is None and words == ("train",) and rest == ["--help"]
    assert {c.name for c in COMMANDS} == {
        "train constrained",
        "train persona",
        "train oracle",
        "eval toxicity",
        "eval agreement",
        "eval opinions",
        "export policy",
        "demo",
    }


def test_yaml_then_command_line_overrides(tmp_path):
    path = _yaml(
        tmp_path,
        """
        model_name_or_path: tiny
        kl_coef: 0.5
        layers: [3, 4, 5]
        use_peft: true
        """,
    )
    (args,) = parse_command_args(_TOY, ["--config", str(path)], [_ToyArguments])
    assert args == _ToyArguments("tiny", 0.5, [3, 4, 5], True)
    (args,) = parse_command_args(
        _TOY, ["--config", str(path), "--kl_coef", "2e-3", "--layers", "7"], [_ToyArguments]
    )
    assert args.kl_coef == pytest.approx(2e-3) and args.layers == [7] and args.model_name_or_path == "tiny"
    (args,) = parse_command_args(_TOY, [f"--config={path}", "--use_peft", "false"], [_ToyArguments])
    assert args.use_peft is False and args.kl_coef == 0.5
    (args,) = parse_command_args(_TOY, [], [_ToyArguments])  # no YAML: dataclass defaults
    assert args == _ToyArguments()


def test_yaml_env_section_sets_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("STEER_TEST_ENV_VAR", raising=False)
    path = _yaml(tmp_path, "env:\n  STEER_TEST_ENV_VAR: hello\nkl_coef: 1.0\n")
    parse_command_args(_TOY, ["--config", str(path)], [_ToyArguments])
    assert os.environ["STEER_TEST_ENV_VAR"] == "hello"


def test_unknown_yaml_key_is_named(tmp_path):
    path = _yaml(tmp_path, "kl_coeff: 0.5\n")
    with pytest.raises(CommandLineError) as err:
        parse_command_args(_TOY, ["--config", str(path)], [_ToyArguments])
    message = str(err.value)
    assert "'kl_coeff'" in message and str(path) in message and "did you mean kl_coef" in message


def test_unknown_command_line_key_is_named():
    with pytest.raises(CommandLineError, match=r"unknown key 'learning_rat'.*command line"):
        parse_command_args(_TOY, ["--learning_rat", "1"], [_ToyArguments])


def test_prefix_abbreviations_are_rejected():
    # argparse would otherwise silently read --kl as --kl_coef
    with pytest.raises(CommandLineError, match="unknown key 'kl'"):
        parse_command_args(_TOY, ["--kl", "0.3"], [_ToyArguments])


def test_field_validation_error_surfaces(tmp_path):
    path = _yaml(tmp_path, "kl_coef: -1\n")
    with pytest.raises(CommandLineError, match=r"kl_coef must be >= 0.*recipe.yaml"):
        parse_command_args(_TOY, ["--config", str(path)], [_ToyArguments])


def test_missing_config_file(tmp_path):
    with pytest.raises(CommandLineError, match="config file not found: .*nope.yaml"):
        parse_command_args(_TOY, ["--config", str(tmp_path / "nope.yaml")], [_ToyArguments])


def test_training_arguments_from_yaml(tmp_path):
    """TrainingArguments fields (floats written as 1e-4 strings by YAML, bools, ints) parse correctly."""
    from transformers import TrainingArguments

    path = _yaml(
        tmp_path,
        f"""
        output_dir: {tmp_path / "out"}
        learning_rate: 1e-4
        max_steps: 3
        use_cpu: true
        report_to: none
        """,
    )
    toy, targs = parse_command_args(
        _TOY, ["--config", str(path), "--max_steps", "5"], [_ToyArguments, TrainingArguments]
    )
    assert targs.learning_rate == pytest.approx(1e-4) and targs.max_steps == 5 and targs.use_cpu is True
    assert toy == _ToyArguments()


def test_main_exit_codes(capsys):
    assert cli.main(["--help"]) == 0
    assert "train constrained" in capsys.readouterr().out
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert cli.main(["train", "constrained", "--config", "/nonexistent/recipe.yaml"]) in (2,)
    assert "/nonexistent/recipe.yaml" in capsys.readouterr().err


def test_top_level_help_is_fast_and_lazy():
    code = (
        "import sys, steer.cli as c; c.main(['--help']); print('TORCH' if 'torch' in sys.modules else 'LAZY')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("LAZY")
    for command in COMMANDS:
        assert command.name in out.stdout


def test_python_dash_m_entry_points():
    for module in ("steer", "steer.cli"):
        out = subprocess.run(
            [sys.executable, "-m", module, "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert out.returncode == 0 and out.stdout.startswith("steer "), out.stderr


def _leaf_types(name: str) -> list[type]:
    command = next(c for c in COMMANDS if c.name == name)
    try:
        _, types = cli.load_command(command)
    except CommandLineError as err:
        pytest.fail(f"{name}: {err}")
    return types


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _owner(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO whose own body declares the field ``name``."""
    return next(
        c
        for c in cls.__mro__
        if name in getattr(c, "__annotations__", {}) and name in vars(c).get("__dataclass_fields__", {})
    )


ALL_COMMANDS = [
    "train constrained",
    "train persona",
    "train oracle",
    "eval toxicity",
    "eval agreement",
    "eval opinions",
    "demo",
]


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_command_help_lists_steer_fields_first(name, capsys):
    """`--help` (read from the source, no heavy import) lists every field steer declares, with its help text;
    the inherited transformers/trl fields are left to `--help-all`."""
    types = _leaf_types(name)
    assert cli.main([*name.split(), "--help"]) == 0
    text = _normalise(capsys.readouterr().out)
    assert text.startswith(f"usage: steer {name}")
    for cls in types:
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            owner = _owner(cls, f.name)
            if not owner.__module__.startswith("steer"):
                assert f"--{f.name} " not in text, (
                    f"inherited {owner.__name__}.{f.name} shown by plain --help"
                )
                continue
            assert f"--{f.name} " in text, f"{cls.__name__}.{f.name} missing from `steer {name} --help`"
            help_text = _normalise(f.metadata.get("help", ""))
            assert help_text, f"{cls.__name__}.{f.name} has no help metadata"
            assert help_text[:40] in text, f"help of {cls.__name__}.{f.name} not shown"
    first = dataclasses.fields(types[0])[0].name  # the script arguments come first
    assert text.index(f"--{first} ") < text.index(" --", text.index(f"--{first} ") + 1) or len(types) == 1


@pytest.mark.parametrize("name", ["train constrained", "train persona"])
def test_help_all_lists_every_field(name, capsys):
    types = _leaf_types(name)
    assert cli.main([*name.split(), "--help-all"]) == 0
    text = _normalise(capsys.readouterr().out)
    for cls in types:
        for f in dataclasses.fields(cls):
            if f.init:
                assert f"--{f.name}" in text, (
                    f"{cls.__name__}.{f.name} missing from `steer {name} --help-all`"
                )


def test_command_help_is_lazy():
    """`steer train constrained --help` imports neither torch nor trl (it reads steer's own source)."""
    code = (
        "import sys, steer.cli as c; c.main(['train', 'constrained', '--help']); "
        "print('HEAVY' if {'torch', 'trl', 'transformers'} & set(sys.modules) else 'LAZY')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("LAZY")
    assert "--kl_coef" in out.stdout and "--model_name_or_path" in out.stdout
    lines = out.stdout.splitlines()
    assert any("--constraint " in line for line in lines[:60]), "steer's fields must come in the first screen"


def test_eval_toxicity_end_to_end(tmp_path, capsys):
    """`steer eval toxicity` with YAML + overrides runs the evaluation and prints its report."""
    from steer.models import tiny_causal_lm

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "the cat"}\n{"prompt": "good people"}\n')
    recipe = _yaml(
        tmp_path,
        f"""
        model_name_or_path: {tmp_path / "model"}
        prompts_file: {tmp_path / "prompts.jsonl"}
        num_generations: 2
        max_new_tokens: 4
        skip_perplexity: true
        num_heldout: 0
        output_dir: {tmp_path / "eval"}
        """,
    )
    assert cli.main(["eval", "toxicity", "--config", str(recipe), "--run_name", "tiny-run"]) == 0
    out = capsys.readouterr().out
    assert "RealToxicityPrompts evaluation" in out and "tiny-run" in out
    assert (tmp_path / "eval" / "tiny-run.json").is_file()


@dataclass
class _Clash:
    seed: int = field(default=1, metadata={"help": "clashes with TrainingArguments.seed"})


def test_field_clash_between_dataclasses_is_reported():
    from transformers import TrainingArguments

    with pytest.raises(CommandLineError, match=r"'seed' is defined by both _Clash and TrainingArguments"):
        cli.make_parser(_TOY, [_Clash, TrainingArguments])


def test_cpu_defaults_and_multi_rank_cpu(monkeypatch):
    from transformers import TrainingArguments

    if accelerator_available():
        pytest.skip("an accelerator is present: the CPU defaults do not apply")
    parser = cli.make_parser(_TOY, [_ToyArguments, TrainingArguments])
    assert parser.get_default("use_cpu") is True and parser.get_default("bf16") is False
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    use_cpu_when_no_accelerator()
    assert "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    use_cpu_when_no_accelerator()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"


def test_parameter_digest(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama[0], LoraConfig(r=2, target_modules=["q_proj"]))
    digest, count = cli.parameter_digest([model])
    assert count == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert cli.parameter_digest([model]) == (digest, count)
    param = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param.add_(1e-3)
    assert cli.parameter_digest([model])[0] != digest
    assert cli.parameter_digest([model], max_values=count - 1) == ("", 0)


RECIPES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").glob("*/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_parse(recipe, tmp_path):
    """Every recipe YAML only uses keys its command defines, and its values pass validation."""
    name = next((f"train {kind}" for kind in ("persona", "oracle") if kind in recipe), "train constrained")
    command = next(c for c in COMMANDS if c.name == name)
    script_args, training_args = parse_command_args(
        command, ["--config", str(ROOT / recipe), "--output_dir", str(tmp_path)], _leaf_types(name)
    )
    assert training_args.output_dir == str(tmp_path)
    assert script_args.model_name_or_path
