"""``--overwrite_output_dir`` leaves the new run's artefacts only: nothing of the previous run (its checkpoints,
adapter, ``guidance/``) is picked up afterwards by ``resume latest``, ``steer eval toxicity`` or ``--guidance_dir``;
a run that stops before writing anything puts the previous run back; Ctrl-C says how to resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import fails

from steer import cli
from steer.scripts.output import REPLACED_DIR, replacing_previous_run, run_entries

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from helpers.models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from steer.models import tiny_corpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    sentences = tiny_corpus(3, 40)
    path.write_text(
        "".join(
            json.dumps({"prompt": sentences[i], "completion": " " + sentences[i + 1]}) + "\n"
            for i in range(0, 40, 2)
        )
    )
    return path


def _train(tiny_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "constrained",
        "--config",
        str(ROOT / "recipes" / "tiny" / "constrained.yaml"),
        "--model_name_or_path",
        str(tiny_dir),
        "--dataset_name",
        str(corpus),
        "--constraint",
        "keyword",
        "--constraint_kwargs",
        '{"banned": ["the", "bad"]}',
        "--output_dir",
        str(out),
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--samples_per_round",
        "4",
        "--sample_max_new_tokens",
        "4",
        *extra,
    ]


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def test_overwrite_keeps_only_the_new_run_then_resume_and_eval(tiny_dir, corpus, tmp_path, one_thread):
    out = tmp_path / "run"
    # 1. a LoRA run with two checkpoints
    assert cli.main(_train(tiny_dir, corpus, out, "--max_steps", "4")) == 0
    assert {"adapter_config.json", "base_model.json", "guidance", "checkpoint-2", "checkpoint-4"} <= set(
        run_entries(out)
    )
    # 2. over it, a full fine-tune of 2 steps (guidance on its own backbone)
    full = ("--use_peft", "false", "--guidance_backbone", "separate")
    assert (
        cli.main(_train(tiny_dir, corpus, out, "--max_steps", "2", *full, "--overwrite_output_dir", "true"))
        == 0
    )
    names = set(p.name for p in out.iterdir())
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "base_model.json", "checkpoint-4"}
    assert REPLACED_DIR not in names
    assert {"model.safetensors", "config.json", "guidance", "checkpoint-2"} <= names
    assert _state(out / "checkpoint-2")["max_steps"] == 2  # the new run's checkpoint
    guidance_config = json.loads((out / "guidance" / "config.json").read_text())
    assert guidance_config["guidance_config"]["backbone"] == "separate"

    # 3. `resume latest` picks the new run's checkpoint-2 (not the old checkpoint-4) and continues to step 4
    assert (
        cli.main(
            _train(tiny_dir, corpus, out, "--max_steps", "4", *full, "--resume_from_checkpoint", "latest")
        )
        == 0
    )
    assert _state(out / "checkpoint-4")["global_step"] == 4
    assert not (out / "adapter_config.json").exists()

    # 4. `steer eval toxicity` evaluates the new full model with its guidance model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n{"prompt": "good people"}\n')
    argv = ["eval", "toxicity", "--model_name_or_path", str(out), "--guidance_dir", str(out / "guidance")]
    argv += ["--prompts_file", str(prompts), "--num_generations", "2", "--max_new_tokens", "3"]
    argv += ["--num_heldout", "0", "--output_dir", str(tmp_path / "eval"), "--run_name", "new"]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "eval" / "new.json").read_text())
    assert result["adapter"] is False and result["generator"] == "nado_guided"


def _fake_constrained_run(out: Path) -> None:
    (out / "guidance").mkdir(parents=True)
    (out / "guidance" / "config.json").write_text("{}")
    (out / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}')
    (out / "adapter_model.safetensors").write_bytes(b"old")
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # not a run artefact: never moved


def _opinionqa_available() -> bool:
    try:
        from steer.data import opinionqa_dir

        return (Path(opinionqa_dir()) / "American_Trends_Panel_W26" / "info.csv").is_file()
    except (FileNotFoundError, OSError):
        return False


@pytest.mark.skipif(not _opinionqa_available(), reason="OpinionQA data not available")
def test_persona_over_a_constrained_run(tiny_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    _fake_constrained_run(out)
    argv = ["train", "persona", "--config", str(ROOT / "recipes" / "tiny" / "persona.yaml")]
    argv += ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--max_steps", "1"]
    argv += ["--n_respondents", "30", "--max_train_examples", "16", "--max_questions", "8"]
    fails(capsys, argv, "overwrite_output_dir", "adapter_config.json")
    assert cli.main([*argv, "--overwrite_output_dir", "true"]) == 0
    capsys.readouterr()
    names = {p.name for p in out.iterdir()}
    assert {"persona", "data", "notes.txt"} <= names
    assert not names & {
        "adapter_config.json",
        "adapter_model.safetensors",
        "guidance",
        "checkpoint-3",
        REPLACED_DIR,
    }
    # nothing of the constrained run is picked up any more
    fails(capsys, ["eval", "toxicity", "--guidance_dir", str(out / "guidance")], "guidance_dir", "not found")
    resume = [*argv, "--resume_from_checkpoint", "latest"]
    fails(capsys, resume, "resume_from_checkpoint", "no checkpoint")


def test_a_run_that_stops_before_writing_puts_the_previous_run_back(
    tiny_dir, corpus, tmp_path, capsys, monkeypatch
):
    from steer.trainers.constrained import ConstrainedTrainer

    out = tmp_path / "run"
    _fake_constrained_run(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ConstrainedTrainer, "train", interrupted)
    code = cli.main(_train(tiny_dir, corpus, out, "--max_steps", "2", "--overwrite_output_dir", "true"))
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "put back" in lines[0], err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not (out / REPLACED_DIR).exists()


def test_ctrl_c_says_how_to_resume(tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    from steer.trainers.constrained import ConstrainedTrainer

    out = tmp_path / "run"

    def interrupted_after_a_checkpoint(self, *args, **kwargs):
        (out / "checkpoint-2").mkdir(parents=True)
        (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(ConstrainedTrainer, "train", interrupted_after_a_checkpoint)
    assert cli.main(_train(tiny_dir, corpus, out, "--max_steps", "2")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "interrupted" in line)
    assert line.startswith("steer train constrained: interrupted:")
    assert "--resume_from_checkpoint latest" in line and "checkpoint-2" in line


def test_replacing_keeps_a_stopped_runs_checkpoints(tmp_path):
    """A run that wrote a checkpoint and then failed keeps it (it can resume); the previous run stays in
    .replaced-run, which steer never reads, and the next overwrite clears it."""
    out = tmp_path / "run"
    _fake_constrained_run(out)
    with pytest.raises(RuntimeError), replacing_previous_run(out, overwrite=True, resume=None):
        (out / "checkpoint-1").mkdir()
        (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
        raise RuntimeError("crash")
    assert {p.name for p in out.iterdir()} == {"checkpoint-1", "notes.txt", REPLACED_DIR}
    assert (out / REPLACED_DIR / "checkpoint-3").is_dir()
    with replacing_previous_run(out, overwrite=True, resume=None) as replaced:
        assert replaced.moved == ["checkpoint-1"]
        (out / "model.safetensors").write_bytes(b"new")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "notes.txt"}
    # without overwrite, or when resuming, nothing moves
    with replacing_previous_run(out, overwrite=False, resume=None) as replaced:
        assert replaced.moved == []
    assert (out / "model.safetensors").is_file()
